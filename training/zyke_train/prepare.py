"""``zyke-train prepare``: a cleaned, deduplicated text corpus from Hub datasets and local files.

The pipeline reads each source in turn and puts every document through three stages, in this order,
counting it in exactly one bucket of the manifest:

1. quality heuristics (``dropped_quality:<rule>``): word count bounds, alphanumeric share of the
   non-space characters, share of repeated lines, mean word length. Thresholds live in a per-source
   :class:`Profile` because one size fits nobody: Gopher's 50-word minimum is right for web pages and
   would throw away every line of NPC dialogue (see training/PREPARE.md for the numbers and why).
2. language (``dropped_lang``): py3langid, whose model ships inside the package (no download, no
   pickle). Short texts are judged leniently since a 20-character line carries little signal.
3. near-duplicates (``dropped_dup``): MinHash over 5-word shingles, LSH banding chosen for >= 95 %
   recall at the threshold, and every LSH candidate confirmed with the MinHash Jaccard estimate.
   Deduplication is global across sources: the earlier source keeps the shared document.

``--weights`` split ``--max-total`` (characters) between sources; each source stops once its share
of kept characters is reached. Output is JSONL shards (``{"text", "source", "group"}``; rows of the
same ``group`` are consecutive paragraphs of one file, which ``blocks`` glues back together) plus
``manifest.json``. ``state.json`` records each flushed shard and how far each source was read, with the
MinHash signatures of kept rows beside it, so a re-run with the same arguments resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import posixpath
import re
import unicodedata
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

import numpy as np

#: Bump when a filter's behaviour changes, so an old state file is not resumed with new rules.
PIPELINE_VERSION = 1
STATE = "state.json"
MANIFEST = "manifest.json"
SIG_DIR = ".minhash"
LOCAL_SUFFIXES = (".txt", ".md", ".jsonl", ".epub")
SHINGLE = 5
MINHASH_SEED = 1  # fixed: signatures saved by an interrupted run must match the ones a resumed run makes
#: datasketch >= 2.0 permutation scheme, named explicitly for the same reason (its default may change).
MINHASH_SCHEME = "affine32"
LSH_RECALL = 0.95


class PrepareError(Exception):
    """A problem with the inputs or the output directory that the user must fix (exit 2)."""


# -- quality profiles


@dataclass(frozen=True)
class Profile:
    """Quality thresholds for one kind of text. ``lang_skip_chars``: below it no language check (too short
    to tell); ``lang_strict_chars``: from it the target language must be the top guess."""

    name: str
    min_words: int
    max_words: int
    min_alnum_ratio: float
    max_repeated_line_ratio: float
    min_mean_word_len: float
    max_mean_word_len: float
    lang_skip_chars: int = 20
    lang_strict_chars: int = 100


PROFILES: dict[str, Profile] = {
    # Gopher (Rae et al. 2021) rules for web pages: 50..100k words, mean word length 3..10, <= 30 %
    # duplicate lines; alphanumeric share 0.8 stands in for its symbol/word and 80 %-alphabetic rules.
    "web": Profile("web", 50, 100_000, 0.80, 0.30, 3.0, 10.0),
    # Books are split into paragraphs, and a novel has one-line paragraphs ("Yes," said he.), so only
    # empty ones go; a paragraph cannot be 100k words, the cap catches a file with no blank lines.
    "books": Profile("books", 1, 20_000, 0.75, 0.30, 2.5, 12.0),
    # NPC and chat lines: "Aye." is a fine reply. Emotes and ellipses lower the alnum share.
    "dialogue": Profile("dialogue", 1, 2_000, 0.60, 0.50, 2.0, 12.0, lang_skip_chars=20, lang_strict_chars=60),
}

_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")
_NOT_ALNUM = re.compile(r"[\W_]+")  # what is left is letters and digits (Unicode), as str.isalnum counts them


def quality_reject(text: str, profile: Profile) -> str | None:
    """The first quality rule ``text`` breaks (the manifest's ``dropped_quality:<rule>``), or None."""
    words = text.split()
    if len(words) < profile.min_words:
        return "too_short"
    if len(words) > profile.max_words:
        return "too_long"
    visible = len(_SPACE.sub("", text))
    if len(_NOT_ALNUM.sub("", text)) < profile.min_alnum_ratio * visible:
        return "alnum_ratio"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and (len(lines) - len(set(lines))) > profile.max_repeated_line_ratio * len(lines):
        return "repeated_lines"
    mean = sum(len(w) for w in words) / len(words)
    if not profile.min_mean_word_len <= mean <= profile.max_mean_word_len:
        return "mean_word_len"
    return None


# -- language


class LanguageFilter:
    """Keeps texts in one language (py3langid; its model is an npz inside the wheel, loaded in ~1.5 s)."""

    def __init__(self, lang: str) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.lang = lang
        self._id = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        if lang not in self._id.labels:
            raise PrepareError(f"--lang {lang!r} is not a language py3langid knows (ISO 639-1 codes like en, fr)")

    def keep(self, text: str, profile: Profile) -> bool:
        """Long texts: the target must be the top guess. Short ones (py3langid calls "I am fine." Nigerian
        Pidgin): also kept when the top guess is unsure (< 0.5) and the target is among the top 3."""
        n = len(text)
        if n < profile.lang_skip_chars:
            return True
        ranked = self._id.rank(text)
        if ranked[0][0] == self.lang:
            return True
        if n >= profile.lang_strict_chars or ranked[0][1] >= 0.5:
            return False
        return self.lang in (code for code, _ in ranked[:3])


# -- near-duplicates


def lsh_params(threshold: float, num_perm: int, recall: float = LSH_RECALL) -> tuple[int, int]:
    """(bands, rows) with the most rows per band (fewest false candidates) that still make a pair at exactly
    ``threshold`` a candidate with probability >= ``recall``: P = 1 - (1 - s^r)^b.

    datasketch's own choice for 0.8/128 perms is 9 x 13, which finds such a pair only 40 % of the time;
    this picks 18 x 7 (98.5 %). Candidates are then confirmed with the Jaccard estimate, so the extra
    candidates cost time, not precision."""
    if not 0 < threshold < 1:
        raise PrepareError(f"--minhash-threshold must be in (0, 1), got {threshold}")
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def shingles(text: str, n: int = SHINGLE) -> set[bytes]:
    """Word n-grams of the lowercased text (punctuation dropped); a text shorter than n words is one shingle."""
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


class Deduper:
    """MinHash LSH index of the kept documents: ``is_dup`` then ``add``."""

    def __init__(self, threshold: float, num_perm: int) -> None:
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self.threshold = threshold
        self.num_perm = num_perm
        self.params = lsh_params(threshold, num_perm)
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=self.params)
        # Drawing the permutations costs more than hashing a paragraph: draw them once, share them.
        self._perms = MinHash(num_perm=num_perm, seed=MINHASH_SEED, scheme=MINHASH_SCHEME).permutations
        self._sigs: dict[str, Any] = {}

    def signature(self, text: str) -> Any:
        m = self._minhash(num_perm=self.num_perm, seed=MINHASH_SEED, permutations=self._perms, scheme=MINHASH_SCHEME)
        m.update_batch(list(shingles(text)))
        return m

    def is_dup(self, sig: Any) -> bool:
        return any(sig.jaccard(self._sigs[key]) >= self.threshold for key in self._lsh.query(sig))

    def add(self, key: str, sig: Any) -> None:
        self._lsh.insert(key, sig)
        self._sigs[key] = sig

    def add_saved(self, prefix: str, hashvalues: np.ndarray) -> None:
        """Re-insert signatures an earlier run saved (resume)."""
        for i, row in enumerate(hashvalues):
            self.add(f"{prefix}/{i}", self._minhash(num_perm=self.num_perm, seed=MINHASH_SEED, hashvalues=row,
                                                      permutations=self._perms, scheme=MINHASH_SCHEME))


# -- sources


@dataclass(frozen=True)
class Source:
    """One input: ``kind`` "hub" (``spec`` = NAME[:CONFIG][:SPLIT]) or "local" (a file or folder)."""

    kind: str
    spec: str
    name: str
    weight: float = 1.0
    profile: str = "books"
    text_field: str = "text"


Doc = tuple[str, str]  # (text, group)
HubLoader = Callable[[str, str | None, str], Iterable[dict[str, Any]]]


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """NAME[:CONFIG][:SPLIT] -> (name, config, split). A spec that is an existing path is a local dataset
    folder (datasets infers the json/text/parquet builder from its files) with split "train"."""
    if Path(spec).exists():
        return spec, None, "train"
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise PrepareError(f"--hub {spec!r}: expected NAME[:CONFIG][:SPLIT]")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), "train"
    if len(parts) == 3 and parts[2]:
        split = parts[2]
    return name, config, split


def hub_loader(name: str, config: str | None, split: str) -> Iterable[dict[str, Any]]:
    """Stream a dataset with ``datasets.load_dataset(..., streaming=True)``: nothing is downloaded whole."""
    try:
        import datasets
    except ImportError as exc:
        raise PrepareError("--hub needs the datasets library: pip install 'zyke[train]'") from exc
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # datasets raises many types offline (ConnectionError, DatasetNotFoundError, ...)
        raise PrepareError(f"could not open Hub dataset {name!r} (config {config}, split {split}): {exc}. "
                           "Offline? Hub sources need network access; use --local for files on disk.") from exc


def iter_hub(source: Source, loader: HubLoader | None = None) -> Iterator[Doc]:
    name, config, split = parse_hub_spec(source.spec)
    rows = iter((loader or hub_loader)(name, config, split))
    i = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # a dropped connection mid-stream: what was flushed is kept, the rest resumes
            raise PrepareError(f"reading {source.spec!r} failed at row {i}: {exc}. Re-run the same command to "
                               "resume from the last finished shard.") from exc
        text = row.get(source.text_field) if isinstance(row, dict) else None
        yield (text if isinstance(text, str) else ""), f"{source.name}#{i}"
        i += 1


def local_files(path: Path) -> list[Path]:
    """The readable files under ``path`` in a stable (sorted) order, so a resumed run sees the same stream."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PrepareError(f"--local {path}: no such file or folder")
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)


def iter_local(source: Source) -> Iterator[Doc]:
    root = Path(source.spec)
    for file in local_files(root):
        rel = file.name if root.is_file() else file.relative_to(root).as_posix()
        group = f"{source.name}:{rel}"
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_docs(file, group, source.text_field)
        elif suffix == ".epub":
            yield from ((p, group) for p in epub_paragraphs(file))
        elif suffix in (".txt", ".md"):
            yield from ((p, group) for p in text_paragraphs(file.read_text(encoding="utf-8", errors="replace")))
        else:  # a single file named directly with another suffix: treat it as text
            yield from ((p, group) for p in text_paragraphs(file.read_text(encoding="utf-8", errors="replace")))


def _jsonl_docs(file: Path, group: str, text_field: str) -> Iterator[Doc]:
    with file.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            text = row.get(text_field) if isinstance(row, dict) else None
            yield (text if isinstance(text, str) else ""), f"{group}#{lineno}"


_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)",
                            re.I | re.M)


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Cut a Project Gutenberg file to the book between its START and END lines (license and credits out)."""
    start = _GUTENBERG_START.search(text)
    if start is None:
        return text, False
    body = text[start.end():]
    end = _GUTENBERG_END.search(body)
    return (body[:end.start()] if end else body), True


def text_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs. Gutenberg files are hard-wrapped at ~70 columns, so their lines are
    joined back; other text keeps its line breaks (Markdown lists, verse)."""
    text, gutenberg = strip_gutenberg(text.replace("\r\n", "\n").replace("\r", "\n"))
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        block = " ".join(block.split()) if gutenberg else "\n".join(ln.rstrip() for ln in block.strip().splitlines())
        if block.strip():
            paragraphs.append(block.strip())
    return paragraphs


class _HtmlText(HTMLParser):
    """Text of an XHTML chapter, one paragraph per block element; script and style skipped."""

    BLOCKS = frozenset({"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "blockquote", "pre", "tr", "br",
                        "section", "article", "dd", "dt", "figcaption"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buf: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag in self.BLOCKS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head"):
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self._buf.append(data)

    def _flush(self) -> None:
        text = " ".join("".join(self._buf).split())
        if text:
            self.paragraphs.append(text)
        self._buf = []

    def close(self) -> None:
        super().close()
        self._flush()


def epub_paragraphs(path: Path) -> list[str]:
    """Paragraphs of an EPUB in reading order: container.xml -> OPF spine -> XHTML files (stdlib only)."""
    try:
        with zipfile.ZipFile(path) as z:
            paragraphs: list[str] = []
            for name in _epub_spine(z):
                parser = _HtmlText()
                parser.feed(z.read(name).decode("utf-8", errors="replace"))
                parser.close()
                paragraphs.extend(parser.paragraphs)
            return paragraphs
    except (zipfile.BadZipFile, KeyError, ET.ParseError) as exc:
        raise PrepareError(f"{path}: not a readable EPUB ({exc})") from exc


def _epub_spine(z: zipfile.ZipFile) -> list[str]:
    names = set(z.namelist())
    try:
        container = ET.fromstring(z.read("META-INF/container.xml"))
        opf_path = next(el.get("full-path") for el in container.iter() if el.tag.endswith("rootfile"))
    except (KeyError, StopIteration):
        opf_path = None
    if not opf_path:  # no container: every XHTML file in name order
        return sorted(n for n in names if n.lower().endswith((".xhtml", ".html", ".htm")))
    opf = ET.fromstring(z.read(opf_path))
    base = PurePosixPath(opf_path).parent
    items = {el.get("id"): el.get("href") for el in opf.iter() if el.tag.endswith("item")}
    spine = [items.get(el.get("idref")) for el in opf.iter() if el.tag.endswith("itemref")]
    # hrefs are URLs relative to the OPF: percent-decoded, may climb with "../", may carry a #fragment
    paths = [posixpath.normpath(posixpath.join(str(base), unquote(href.split("#")[0]))) for href in spine if href]
    return [p for p in dict.fromkeys(paths) if p in names]


def _normalize(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()


# -- the run


@dataclass
class SourceState:
    """How far a source got, as of its last flushed shard (what a resumed run continues from)."""

    consumed: int = 0
    done: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    shards: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Settings:
    lang: str | None = "en"
    max_total: int | None = None  # characters of kept text over all sources
    shard_size: int = 10_000  # rows per shard
    minhash_threshold: float = 0.8
    num_perm: int = 128


def config_hash(sources: list[Source], settings: Settings) -> str:
    """What a resumable run must share with the one that wrote the state: arguments, pipeline version, and
    the local files' names, sizes and mtimes (a changed file would make the saved read offsets wrong)."""
    files = []
    for s in sources:
        if s.kind == "local":
            for f in local_files(Path(s.spec)):
                st = f.stat()
                files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"v": PIPELINE_VERSION, "sources": [asdict(s) for s in sources],
                       "settings": asdict(settings), "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def budgets(sources: list[Source], max_total: int | None) -> dict[str, int | None]:
    """Each source's share of ``max_total`` characters, in proportion to its weight."""
    if max_total is None:
        return {s.name: None for s in sources}
    total = sum(s.weight for s in sources)
    return {s.name: int(max_total * s.weight / total) for s in sources}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepare(sources: list[Source], out: Path, settings: Settings, *, force: bool = False,
            hub: HubLoader | None = None, progress: bool = True,
            on_shard: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the pipeline into ``out`` and return the manifest. ``result["new_rows"]`` is how many
    rows this call wrote (0 when everything was already done). ``on_shard`` is called after each flushed
    shard (tests use it to interrupt a run)."""
    if not sources:
        raise PrepareError("no sources: give --hub and/or --local")
    if len({s.name for s in sources}) != len(sources):
        raise PrepareError("two sources have the same name")
    for s in sources:
        if s.profile not in PROFILES:
            raise PrepareError(f"source {s.name}: unknown profile {s.profile!r} (one of {', '.join(PROFILES)})")
    if settings.shard_size < 1:
        raise PrepareError("--shard-size must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    digest = config_hash(sources, settings)
    state_path = out / STATE
    states = _load_state(state_path, digest, force, out)

    if all(states.get(s.name, SourceState()).done for s in sources) and (out / MANIFEST).exists():
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        manifest["new_rows"] = 0
        manifest["already_done"] = True
        return manifest

    langf = LanguageFilter(settings.lang) if settings.lang else None
    dedup = Deduper(settings.minhash_threshold, settings.num_perm)
    for s in sources:  # rebuild the LSH index from every flushed shard, in order
        for shard in states.get(s.name, SourceState()).shards:
            dedup.add_saved(shard["file"], np.load(out / SIG_DIR / f"{shard['file']}.npy", allow_pickle=False))
    (out / SIG_DIR).mkdir(exist_ok=True)

    def save_state() -> None:
        payload = {"config_hash": digest, "sources": {n: asdict(st) for n, st in states.items()}}
        _atomic_write(state_path, json.dumps(payload, indent=1).encode())

    shares = budgets(sources, settings.max_total)
    new_rows = 0
    for source in sources:
        st = states.setdefault(source.name, SourceState())
        if st.done:
            continue
        new_rows += _run_source(source, st, out, settings, PROFILES[source.profile], langf, dedup,
                                shares[source.name], hub, progress, save_state, on_shard)

    manifest = build_manifest(sources, states, settings, dedup.params, shares)
    _atomic_write(out / MANIFEST, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
    manifest["new_rows"] = new_rows
    return manifest


def _load_state(path: Path, digest: str, force: bool, out: Path) -> dict[str, SourceState]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("config_hash") == digest and not force:
        return {name: SourceState(**st) for name, st in data["sources"].items()}
    if not force:
        raise PrepareError(f"{out} holds a run with other arguments or changed input files; "
                           "use another --out, or --force to start over there")
    for st in data.get("sources", {}).values():  # --force: remove what the old run wrote
        for shard in st.get("shards", []):
            (out / shard["file"]).unlink(missing_ok=True)
            (out / SIG_DIR / f"{shard['file']}.npy").unlink(missing_ok=True)
    path.unlink()
    (out / MANIFEST).unlink(missing_ok=True)
    return {}


def _run_source(source: Source, st: SourceState, out: Path, settings: Settings, profile: Profile,
                langf: LanguageFilter | None, dedup: Deduper, budget: int | None, hub: HubLoader | None,
                progress: bool, save_state: Callable[[], None],
                on_shard: Callable[[dict[str, Any]], None] | None) -> int:
    """Read one source from where it stopped, filter, write shards. Returns the rows written."""
    from tqdm import tqdm

    counts = Counter(st.counts)
    docs: Iterator[Doc] = iter_hub(source, hub) if source.kind == "hub" else iter_local(source)
    consumed = st.consumed
    docs = itertools.islice(docs, consumed, None)  # resume: skip what the flushed shards already covered
    rows: list[dict[str, str]] = []
    sigs: list[np.ndarray] = []
    written = 0

    def flush() -> None:
        nonlocal rows, sigs, written
        if rows:
            name = f"{source.name}-{len(st.shards):05d}.jsonl"
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
            _atomic_write(out / name, data)
            tmp = out / SIG_DIR / f".{name}.npy.tmp"
            with tmp.open("wb") as fh:
                np.save(fh, np.stack(sigs), allow_pickle=False)
            os.replace(tmp, out / SIG_DIR / f"{name}.npy")
            st.shards.append({"file": name, "rows": len(rows), "chars": sum(len(r["text"]) for r in rows),
                              "sha256": _sha256(data)})
            written += len(rows)
        st.consumed = consumed
        st.counts = dict(counts)
        save_state()
        if rows and on_shard is not None:
            on_shard(st.shards[-1])
        rows, sigs = [], []

    bar = tqdm(desc=f"prepare {source.name}", unit="doc", initial=consumed, disable=not progress, leave=False)
    try:
        for raw, group in docs:
            consumed += 1
            bar.update(1)
            counts["read"] += 1
            text = _normalize(raw)
            if not text:
                counts["dropped_quality:no_text"] += 1
                continue
            rule = quality_reject(text, profile)
            if rule is not None:
                counts[f"dropped_quality:{rule}"] += 1
                continue
            if langf is not None and not langf.keep(text, profile):
                counts["dropped_lang"] += 1
                continue
            sig = dedup.signature(text)
            if dedup.is_dup(sig):
                counts["dropped_dup"] += 1
                continue
            dedup.add(f"{source.name}-{len(st.shards):05d}.jsonl/{len(rows)}", sig)
            rows.append({"text": text, "source": source.name, "group": group})
            sigs.append(sig.hashvalues)
            counts["kept"] += 1
            counts["kept_chars"] += len(text)
            if len(rows) >= settings.shard_size:
                flush()
            if budget is not None and counts["kept_chars"] >= budget:
                counts["stopped_at_budget"] = 1
                break
    finally:
        bar.close()
    st.done = True
    flush()
    return written


def build_manifest(sources: list[Source], states: dict[str, SourceState], settings: Settings,
                   lsh: tuple[int, int], shares: dict[str, int | None]) -> dict[str, Any]:
    per_source = {}
    totals: Counter[str] = Counter()
    shards = []
    for s in sources:
        st = states[s.name]
        counts = {k: v for k, v in sorted(st.counts.items()) if k != "stopped_at_budget"}
        totals.update(counts)
        per_source[s.name] = {"kind": s.kind, "spec": s.spec, "profile": s.profile, "weight": s.weight,
                              "budget_chars": shares[s.name], "stopped_at_budget": bool(st.counts.get(
                                  "stopped_at_budget")), "counts": counts, "profile_thresholds": asdict(
                                  PROFILES[s.profile])}
        shards.extend({**sh, "source": s.name} for sh in st.shards)
    bands, rows = lsh
    return {
        "version": PIPELINE_VERSION,
        "settings": {**asdict(settings), "max_total_unit": "characters", "shingle_words": SHINGLE,
                     "minhash_seed": MINHASH_SEED, "minhash_scheme": MINHASH_SCHEME,
                     "lsh_bands": bands, "lsh_rows": rows,
                     "lsh_recall_at_threshold": round(1 - (1 - settings.minhash_threshold**rows) ** bands, 4)},
        "sources": per_source,
        "totals": dict(sorted(totals.items())),
        "shards": shards,
    }


def make_sources(hub: list[str], local: list[str], weights: str | None, profiles: list[str],
                 text_field: str) -> list[Source]:
    """Sources from the CLI flags: --hub ones first, then --local ones (the order --weights lists)."""
    specs = [("hub", h) for h in hub] + [("local", loc) for loc in local]
    names: list[str] = []
    for kind, spec in specs:
        base = Path(spec).name if kind == "local" or Path(spec).exists() else spec.replace(":", "-")
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(base).stem if kind == "local" else base) or "source"
        while name in names:
            name += "_"
        names.append(name)
    sources = [Source(kind, spec, name, profile="web" if kind == "hub" else "books", text_field=text_field)
               for (kind, spec), name in zip(specs, names, strict=True)]
    for item in profiles:
        key, _, prof = item.partition("=")
        idx = _source_index(key, sources, "--profile")
        sources[idx] = replace(sources[idx], profile=prof)
    if weights:
        parts = [w.strip() for w in weights.split(",") if w.strip()]
        if all("=" in p for p in parts):
            for p in parts:
                key, _, w = p.partition("=")
                idx = _source_index(key, sources, "--weights")
                sources[idx] = replace(sources[idx], weight=_weight(w))
        elif len(parts) == len(sources):
            sources = [replace(s, weight=_weight(w)) for s, w in zip(sources, parts, strict=True)]
        else:
            raise PrepareError(f"--weights: give one weight per source ({len(sources)}: "
                               f"{', '.join(s.name for s in sources)}) or NAME=W pairs")
    return sources


def _source_index(key: str, sources: list[Source], flag: str) -> int:
    for i, s in enumerate(sources):
        if key in (s.name, s.spec):
            return i
    raise PrepareError(f"{flag}: no source named {key!r} (sources: {', '.join(s.name for s in sources)})")


def _weight(text: str) -> float:
    try:
        w = float(text)
    except ValueError:
        raise PrepareError(f"--weights: {text!r} is not a number") from None
    if w <= 0:
        raise PrepareError("--weights must be positive")
    return w


def parse_size(text: str | None) -> int | None:
    """``10M``, ``500k``, ``2G`` or a plain number (characters)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise PrepareError(f"--max-total {text!r}: expected a number of characters like 5000000 or 5M")
    return int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()])
