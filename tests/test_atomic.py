"""The one atomic-write path (come.outputs): a file or folder appears whole or not at all, with no stray temporaries."""

import json
import os
import stat
import subprocess
import sys

import pytest

from come.errors import OutputExists
from come.outputs import (
    OutputNotWritable,
    atomic_file,
    atomic_folder,
    atomic_write_bytes,
    atomic_write_text,
    check_output_file,
    publish_folder,
    write_json_atomic,
)


class Boom(Exception):
    pass


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- files -------------------------------------------------------------------------------
def test_writes_text_bytes_and_json_with_umask_modes_and_no_temporaries(tmp_path):
    text = tmp_path / "deep" / "er" / "a.txt"  # missing folders are made
    assert atomic_write_text(text, "héllo\n") == text.resolve()
    assert text.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_text(text, (line for line in ["a\n", "b\n"]))  # an iterable is written line by line
    assert text.read_text() == "a\nb\n"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    write_json_atomic(tmp_path / "c.json", {"x": float("nan"), "y": [1.5]})  # strict JSON: NaN as null
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": None, "y": [1.5]}
    for path in (text, tmp_path / "b.bin", tmp_path / "c.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0600
    assert _names(tmp_path) == ["b.bin", "c.json", "deep"] and _names(text.parent) == ["a.txt"]


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_a_failure_mid_write_leaves_nothing_new(tmp_path, exc):
    path = tmp_path / "model.bin"
    with pytest.raises(exc), atomic_file(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.bin.tmp-p")
        tmp.write_bytes(b"half")
        raise exc
    assert _names(tmp_path) == []
    path.write_bytes(b"before")
    with pytest.raises(exc), atomic_file(path) as tmp:
        tmp.write_bytes(b"half")
        raise exc
    assert path.read_bytes() == b"before" and _names(tmp_path) == ["model.bin"]


def test_streaming_writers_write_to_the_temporary(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    with atomic_file(tmp_path / "w.safetensors") as tmp:
        save_file({"w": torch.ones(2)}, tmp)
        assert not (tmp_path / "w.safetensors").exists()  # not before the block completes
    with atomic_file(tmp_path / "s.pt") as tmp:
        torch.save({"step": 3}, tmp)
    assert load_file(tmp_path / "w.safetensors")["w"].tolist() == [1.0, 1.0]
    assert torch.load(tmp_path / "s.pt") == {"step": 3}
    assert _names(tmp_path) == ["s.pt", "w.safetensors"]


def test_overwrite_is_refused_unless_asked(tmp_path):
    path = tmp_path / "out.gguf"
    path.write_bytes(b"old")
    for attempt in (lambda: check_output_file(path, overwrite=False),
                    lambda: atomic_write_bytes(path, b"new", overwrite=False)):
        with pytest.raises(OutputExists, match="exists; pass --overwrite"):
            attempt()
    assert path.read_bytes() == b"old" and _names(tmp_path) == ["out.gguf"]
    atomic_write_bytes(path, b"new", overwrite=True)
    assert path.read_bytes() == b"new"


def test_a_file_that_appears_meanwhile_is_not_overwritten(tmp_path):
    path = tmp_path / "out.json"
    with pytest.raises(OutputExists), atomic_file(path, overwrite=False) as tmp:
        tmp.write_text("mine")
        path.write_text("theirs")
    assert path.read_text() == "theirs" and _names(tmp_path) == ["out.json"]


def test_a_folder_is_never_written_over_by_a_file(tmp_path):
    folder = tmp_path / "x.gguf"
    (folder / "keep").mkdir(parents=True)
    for attempt in (lambda: check_output_file(folder, what="--json"),
                    lambda: atomic_write_text(folder, "x", overwrite=True)):
        with pytest.raises(OutputExists, match="--json path .* is a folder|output path .* is a folder"):
            attempt()
    assert _names(folder) == ["keep"] and _names(tmp_path) == ["x.gguf"]


def test_a_file_where_a_folder_should_be_is_an_error(tmp_path):
    (tmp_path / "file").write_text("x")
    for attempt in (lambda: check_output_file(tmp_path / "file" / "out.json"),
                    lambda: atomic_write_text(tmp_path / "file" / "sub" / "out.json", "x")):
        with pytest.raises(OutputNotWritable, match="is a file"):
            attempt()
    assert (tmp_path / "file").read_text() == "x" and _names(tmp_path) == ["file"]


def test_an_unwritable_location_is_reported_as_such(tmp_path, read_only):
    with read_only(tmp_path / "ro") as ro:
        with pytest.raises(OutputNotWritable, match="not writable"):
            check_output_file(ro / "r.json", what="--json")
        with pytest.raises(OutputNotWritable, match="--json location .* not writable"):
            atomic_write_text(ro / "r.json", "x", what="--json")  # the same words when only the write finds out


def test_an_output_may_not_be_its_source(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(OutputExists, match="would overwrite the model"):
        check_output_file(tmp_path / "model" / "x.gguf", sources=[tmp_path / "model"])


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path, capsys):
    dead = tmp_path / f".a.json.tmp-p{_dead_pid()}-abc123"
    live = tmp_path / f".a.json.tmp-p{os.getppid()}-def456"
    other = tmp_path / f".b.json.tmp-p{_dead_pid()}-abc123"  # another file's: not this write's business
    for p in (dead, live, other):
        p.write_text("partial")
    write_json_atomic(tmp_path / "a.json", [1])
    assert not dead.exists() and live.exists() and other.exists()
    assert "leftover" in capsys.readouterr().err


# -- folders ---------------------------------------------------------------------------
def test_a_failed_folder_leaves_the_previous_one(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Boom), atomic_folder(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise Boom
    assert _names(tmp_path) == []
    with atomic_folder(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(OutputExists, match="--overwrite"), atomic_folder(out):
        pass
    with pytest.raises(Boom), atomic_folder(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
        raise Boom
    assert _names(out) == ["a"] and _names(tmp_path) == ["out"]
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert _names(out) == ["b"] and _names(tmp_path) == ["out"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()


def test_publish_folder_replaces_or_keeps_the_first(tmp_path):
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    staged = tmp_path / "work" / "final"
    (staged / "new").mkdir(parents=True)
    assert publish_folder(staged, out)
    assert _names(out) == ["new"] and not staged.exists() and _names(tmp_path) == ["out", "work"]
    (staged / "mine").mkdir(parents=True)
    assert not publish_folder(staged, out, first_wins=True)  # a cache entry another process made first
    assert _names(out) == ["new"] and _names(staged) == ["mine"]


def test_first_wins_folder_keeps_an_existing_entry(tmp_path):
    out = tmp_path / "cache-entry"
    with atomic_folder(out, first_wins=True) as tmp:
        (tmp / "config.json").write_text("first")
    with atomic_folder(out, first_wins=True) as tmp:  # never refused, never replaced
        (tmp / "config.json").write_text("second")
    assert (out / "config.json").read_text() == "first" and _names(tmp_path) == ["cache-entry"]
