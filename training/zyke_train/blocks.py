"""``zyke-train blocks``: tokenize a prepared corpus into fixed-length "experience blocks".

A shared trainer hands blocks out as tasks, so a block must be self-contained, equal-sized and
verifiable: each shard is a safetensors file holding one int32 tensor ``input_ids`` of shape
``[n, block_size]`` (safetensors, never pickle: a volunteer must be able to load a task without running
code from it), and the manifest records every shard's sha256.

The token stream is built the way causal LM pretraining packs documents: each document is
``BOS text EOS`` (BOS because Gemma is trained with it and degrades without it) and documents are
concatenated, then cut every ``block_size`` tokens. A "document" is a run of consecutive rows with the same
``group`` (paragraphs of one book or file, which ``prepare`` split only to filter and deduplicate them);
its rows are joined with a blank line, so a book reads as a book again. The last partial block is dropped
and its size reported.

The manifest also carries what a trainer needs to hand blocks out and what a reader needs to trust them:
``steps_per_block`` (optimizer steps a worker spends on one block), ``env_id`` and ``npc_type`` (which game
and which kind of NPC the text is for, so a shared trainer can keep one game's lore out of another's
adapter). ``read_block_shards`` is the reader ``zyke-train train`` uses: it checks every shard's sha256 and
the tokenizer before a single id is trained on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from zyke_models.embedded import sha256_file
from zyke_models.files import atomic_write_bytes

MANIFEST = "manifest.json"
TENSOR = "input_ids"
TOKENIZE_BATCH = 256
#: What --env-id and --npc-type may be (they end up in file names and task descriptions).
LABEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class BlocksError(Exception):
    """Bad input (no prepared corpus, no usable tokenizer): exit 2."""


def load_tokenizer(name: str | None) -> tuple[Any, str]:
    """The tokenizer and the name recorded for it: ``name`` (a tokenizer or checkpoint folder) or, by
    default, the embedded model's, from its cached transformers checkpoint (converted once, ~90 s)."""
    from transformers import AutoTokenizer

    if name is None:
        from zyke_models.hf_checkpoint import base_fingerprint, embedded_hf_checkpoint

        path = embedded_hf_checkpoint()
        return AutoTokenizer.from_pretrained(str(path)), f"embedded:{path.name} ({base_fingerprint(path)})"
    try:
        return AutoTokenizer.from_pretrained(name), name
    except (OSError, ValueError) as exc:
        raise BlocksError(f"--tokenizer {name}: cannot load a tokenizer there ({exc})") from exc


def read_rows(prepared: Path) -> Iterator[dict[str, Any]]:
    """Rows of a ``prepare`` output folder in manifest order (or of one JSONL file)."""
    if prepared.is_file():
        files = [prepared]
    else:
        manifest = prepared / MANIFEST
        if not manifest.is_file():
            raise BlocksError(f"{prepared} has no {MANIFEST}: run zyke-train prepare first")
        files = [prepared / s["file"] for s in json.loads(manifest.read_text(encoding="utf-8"))["shards"]]
    for file in files:
        with file.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def _batches(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def make_blocks(prepared: Path, out: Path, tokenizer: str | None = None, block_size: int = 512,
                blocks_per_shard: int = 4096, bos: bool = True, progress: bool = True, steps_per_block: int = 1,
                env_id: str | None = None, npc_type: str | None = None) -> dict[str, Any]:
    """Tokenize, pack and write the shards + ``manifest.json`` into ``out``; return the manifest."""
    from safetensors.numpy import save
    from tqdm import tqdm

    if block_size < 2 or blocks_per_shard < 1 or steps_per_block < 1:
        raise BlocksError("--seq-len must be >= 2, --blocks-per-shard and --steps-per-block >= 1")
    for flag, value in (("--env-id", env_id), ("--npc-type", npc_type)):
        if value is not None and not LABEL.fullmatch(value):
            raise BlocksError(f"{flag} {value!r}: use 1-64 letters, digits, '_', '-' or '.'")
    tok, tok_name = load_tokenizer(tokenizer)
    eos = tok.eos_token_id
    if eos is None:
        raise BlocksError(f"tokenizer {tok_name} has no EOS token to separate documents with")
    bos_id = tok.bos_token_id if bos else None
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("blocks-*.safetensors"):  # a re-run replaces the previous blocks
        old.unlink()

    buffer: list[int] = []
    shards: list[dict[str, Any]] = []
    counts = {"rows": 0, "documents": 0, "tokens": 0}
    per_shard = block_size * blocks_per_shard

    def write(n_blocks: int) -> None:
        nonlocal buffer
        arr = np.asarray(buffer[:n_blocks * block_size], dtype=np.int32).reshape(n_blocks, block_size)
        buffer = buffer[n_blocks * block_size:]
        name = f"blocks-{len(shards):05d}.safetensors"
        atomic_write_bytes(out / name, save({TENSOR: arr}, metadata={"block_size": str(block_size),
                                                                     "tokenizer": tok_name}))
        shards.append({"file": name, "blocks": n_blocks, "first_block": sum(s["blocks"] for s in shards),
                       "sha256": sha256_file(out / name)})

    group: str | None = None
    bar = tqdm(desc="tokenizing", unit="row", disable=not progress, leave=False)
    try:
        for batch in _batches(read_rows(prepared), TOKENIZE_BATCH):
            ids = tok([r["text"] for r in batch], add_special_tokens=False)["input_ids"]
            for row, tokens in zip(batch, ids, strict=True):
                row_group = row.get("group")
                if group is not None and row_group == group:
                    buffer.extend(sep)
                else:
                    if group is not None:
                        buffer.append(eos)
                    if bos_id is not None:
                        buffer.append(bos_id)
                    counts["documents"] += 1
                    # a row without a group is a document of its own
                    group = row_group if row_group is not None else f"\0row{counts['rows']}"
                buffer.extend(tokens)
                counts["rows"] += 1
            bar.update(len(batch))
            while len(buffer) >= per_shard:
                counts["tokens"] += per_shard
                write(blocks_per_shard)
    finally:
        bar.close()
    if group is not None:
        buffer.append(eos)
    tail_blocks = len(buffer) // block_size
    counts["tokens"] += tail_blocks * block_size
    if tail_blocks:
        write(tail_blocks)
    manifest = {
        "tokenizer": tok_name,
        "vocab_size": len(tok),
        "bos_token_id": bos_id,
        "eos_token_id": eos,
        "block_size": block_size,
        "steps_per_block": steps_per_block,
        "env_id": env_id,
        "npc_type": npc_type,
        "dtype": "int32",
        "tensor": TENSOR,
        "blocks": sum(s["blocks"] for s in shards),
        "dropped_tail_tokens": len(buffer),
        "counts": counts,
        "source": str(prepared),
        "source_manifest_sha256": (sha256_file(prepared / MANIFEST) if prepared.is_dir() else
                                   sha256_file(prepared)),
        "shards": shards,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(path: Path, vocab_size: int | None = None, eos_token_id: int | None = None) -> dict[str, Any]:
    """A blocks folder's parsed ``manifest.json``, its shard entries checked for the fields every reader relies on.

    With ``vocab_size``/``eos_token_id`` the blocks must come from a tokenizer with that vocabulary and EOS:
    a mismatch raises, because ids from another tokenizer are valid integers that mean something else."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BlocksError(f"{path} has no {MANIFEST}: not a zyke-train blocks folder")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise TypeError(f"a JSON {type(manifest).__name__}, not an object")
        manifest["shards"] = [{**s, "file": str(s["file"]), "sha256": str(s["sha256"]),
                               "first_block": int(s["first_block"]), "blocks": int(s.get("blocks", 0))}
                              for s in manifest["shards"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BlocksError(f"{manifest_path}: not a blocks manifest ({exc})") from exc
    if vocab_size is not None and manifest.get("vocab_size") != vocab_size:
        raise BlocksError(f"{path}: blocks were tokenized with {manifest.get('tokenizer')} "
                          f"(vocabulary {manifest.get('vocab_size')}), this model's has {vocab_size}")
    if eos_token_id is not None and manifest.get("eos_token_id") not in (None, eos_token_id):
        raise BlocksError(f"{path}: blocks use EOS id {manifest.get('eos_token_id')}, this tokenizer "
                          f"{eos_token_id}")
    return manifest


def _load_shard(file: Path, sha: str | None, vocab_size: int | None) -> np.ndarray:
    """One shard's ``input_ids`` after its sha256 (when known) and shape, dtype and id range are checked: the one
    place a shard's bytes are trusted, for whole-folder and by-reference reads alike."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not file.is_file():
        raise BlocksError(f"block shard {file} is missing")
    if sha is not None and sha256_file(file) != sha:
        raise BlocksError(f"block shard {file} does not match the sha256 in its manifest")
    try:
        array = load_file(str(file))[TENSOR]
    except (SafetensorError, KeyError, OSError) as exc:
        raise BlocksError(f"{file}: not a block shard ({exc})") from exc
    if array.ndim != 2 or array.dtype != np.int32:
        raise BlocksError(f"{file}: {TENSOR} must be int32 [blocks, block_size], got {array.dtype} "
                          f"{list(array.shape)}")
    if vocab_size is not None and array.size and (array.min() < 0 or array.max() >= vocab_size):
        raise BlocksError(f"{file}: token ids outside this model's vocabulary of {vocab_size}")
    return array


def read_block_shards(path: Path, vocab_size: int | None = None, eos_token_id: int | None = None
                      ) -> list[tuple[str, int, np.ndarray]]:
    """``(shard name, first global block index, int32 [n, block_size] array)`` for a blocks folder (every
    shard of its manifest, sha256-checked) or for one shard file (its own metadata only).

    With ``vocab_size``/``eos_token_id`` the blocks must come from a tokenizer with that vocabulary and EOS:
    a mismatch raises, because ids from another tokenizer are valid integers that mean something else."""
    if path.is_dir():
        manifest = read_manifest(path, vocab_size, eos_token_id)
        entries: list[tuple[Path, str | None, int]] = [(path / s["file"], s["sha256"], int(s["first_block"]))
                                                       for s in manifest["shards"]]
    else:
        entries = [(path, None, 0)]
    return [(file.name, first, _load_shard(file, sha, vocab_size)) for file, sha, first in entries]


def block_refs(manifest: dict[str, Any], indices: list[int]) -> list[dict[str, Any]]:
    """Global block ``indices`` as by-reference task entries ``{shard, sha256, indices}``, one per shard touched,
    in the order the indices first reach it. What a shared trainer puts in a task instead of the tokens: a
    worker holding the same folder can find, and prove it has, exactly these blocks."""
    refs: dict[str, dict[str, Any]] = {}
    for index in indices:
        shard = next((s for s in manifest["shards"]
                      if int(s["first_block"]) <= index < int(s["first_block"]) + int(s["blocks"])), None)
        if shard is None:
            raise BlocksError(f"block {index} is outside the manifest's {manifest.get('blocks')} blocks")
        ref = refs.setdefault(shard["file"], {"shard": shard["file"], "sha256": shard["sha256"], "indices": []})
        ref["indices"].append(int(index))
    return list(refs.values())


def read_blocks_by_ref(path: Path, refs: list[dict[str, Any]], manifest_sha256: str | None = None,
                       vocab_size: int | None = None, eos_token_id: int | None = None) -> np.ndarray:
    """Exactly the referenced rows (``[sum of len(indices), block_size]`` int32, in ``refs`` order) of a local blocks
    folder, after checking that its ``manifest.json`` hashes to ``manifest_sha256``, that each referenced shard is
    in that manifest with the ``sha256`` the reference names, that the file on disk still has it, and that every
    index falls inside its shard. Any difference raises ``BlocksError``: a worker must train on the blocks it was
    handed or on nothing, never on whatever its copy happens to hold under that name."""
    if not path.is_dir():
        raise BlocksError(f"{path} is not a blocks folder")
    if manifest_sha256 is not None and (path / MANIFEST).is_file() and sha256_file(path / MANIFEST) != manifest_sha256:
        raise BlocksError(f"{path / MANIFEST} is not the manifest the task names (sha256 differs): this is another "
                          "blocks folder or another version of it")
    manifest = read_manifest(path, vocab_size, eos_token_id)
    shards = {s["file"]: s for s in manifest["shards"]}
    block_size = int(manifest.get("block_size", 0))
    rows: list[np.ndarray] = []
    for ref in refs:
        try:
            name, sha, indices = str(ref["shard"]), str(ref["sha256"]), [int(i) for i in ref["indices"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise BlocksError(f"not a block reference: {ref!r} ({exc})") from exc
        entry = shards.get(name)
        if entry is None or Path(name).name != name:
            raise BlocksError(f"block shard {name!r} is not in {path / MANIFEST}")
        if entry["sha256"] != sha:
            raise BlocksError(f"block shard {name}: the task names sha256 {sha[:12]}…, {path / MANIFEST} "
                              f"{str(entry['sha256'])[:12]}…")
        first, count = int(entry["first_block"]), int(entry["blocks"])
        outside = [i for i in indices if not first <= i < first + count]
        if outside:
            raise BlocksError(f"block shard {name} holds blocks {first}..{first + count - 1}, not {outside[:5]}")
        array = _load_shard(path / name, sha, vocab_size)
        if array.shape[0] != count or (block_size and array.shape[1] != block_size):
            raise BlocksError(f"block shard {name}: shape {list(array.shape)} is not the manifest's "
                              f"[{count}, {block_size}]")
        rows.append(array[[i - first for i in indices]])
    if not rows:
        return np.zeros((0, block_size), np.int32)
    return np.concatenate(rows, axis=0)
