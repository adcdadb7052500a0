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

The filters live in ``prepare_filters.py`` and the readers in ``prepare_sources.py``; this module is the run.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from zyke_models.files import atomic_write_bytes

from .errors import PrepareError
from .prepare_filters import (
    MINHASH_SCHEME,
    MINHASH_SEED,
    PROFILES,
    SHINGLE,
    Deduper,
    LanguageFilter,
    Profile,
    quality_reject,
)
from .prepare_sources import Doc, HubLoader, Source, iter_hub, iter_local, local_files, normalize_text

#: Bump when a filter's behaviour changes, so an old state file is not resumed with new rules.
PIPELINE_VERSION = 1
STATE = "state.json"
MANIFEST = "manifest.json"
SIG_DIR = ".minhash"


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
    """The shared fsynced write (zyke_models.files): a resumed run trusts every file the state names, so a crash
    must leave the old file or the new one, on disk, never a torn one."""
    atomic_write_bytes(path, data)


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
        manifest: dict[str, Any] = json.loads((out / MANIFEST).read_text(encoding="utf-8"))  # a finished run wrote it
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
            buf = io.BytesIO()
            np.save(buf, np.stack(sigs), allow_pickle=False)
            _atomic_write(out / SIG_DIR / f"{name}.npy", buf.getvalue())
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
            text = normalize_text(raw)
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
    shards: list[dict[str, Any]] = []
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
