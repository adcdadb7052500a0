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
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from zyke_daemon.embedded import sha256_file

MANIFEST = "manifest.json"
TENSOR = "input_ids"
TOKENIZE_BATCH = 256


class BlocksError(Exception):
    """Bad input (no prepared corpus, no usable tokenizer): exit 2."""


def load_tokenizer(name: str | None) -> tuple[Any, str]:
    """The tokenizer and the name recorded for it: ``name`` (a tokenizer or checkpoint folder) or, by
    default, the embedded model's, from its cached transformers checkpoint (converted once, ~90 s)."""
    from transformers import AutoTokenizer

    if name is None:
        from zyke_daemon.hf_checkpoint import base_fingerprint, embedded_hf_checkpoint

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
                blocks_per_shard: int = 4096, bos: bool = True, progress: bool = True) -> dict[str, Any]:
    """Tokenize, pack and write the shards + ``manifest.json`` into ``out``; return the manifest."""
    from safetensors.numpy import save_file
    from tqdm import tqdm

    if block_size < 2 or blocks_per_shard < 1:
        raise BlocksError("--block-size must be >= 2 and --blocks-per-shard >= 1")
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
        tmp = out / f".{name}.tmp"
        save_file({TENSOR: arr}, str(tmp), metadata={"block_size": str(block_size), "tokenizer": tok_name})
        tmp.replace(out / name)
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
