"""Training data for ``zyke-train train``: what ``--data`` names, read by kind and tokenized into ``Tokenized`` items.

NPC rows are rendered only by ``zyke.prompt_format`` (through ``npc_data``) and the prompt and completion are
tokenized separately, the way the daemon tokenizes the prompt and then generates the reply token by token.
``{"text": ...}`` rows and ``zyke-train blocks`` folders become items whose "prompt" is their first token only, so
they train with loss on every token (continued pretraining) in the same batches as NPC rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TrainError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tokenized:
    """One example as token ids: ``prompt`` (with BOS) then ``completion``; loss goes on ``completion``."""

    id: str
    prompt: list[int]
    completion: list[int]
    #: Loss weight per completion token (None: all 1.0); see ``decision_weights``.
    weights: tuple[float, ...] | None = None
    #: The reply's action, when the completion is a reply JSON; what ``--max-action-share`` counts.
    action: str | None = None

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion)



@dataclass
class TrainingData:
    """What ``--data`` named, by kind: NPC examples get completion-only loss, text rows and blocks get
    full-sequence (causal LM) loss. One run may mix them; each becomes ``Tokenized`` items of one list."""

    #: ``(id, prompt, completion)``: dataset rows rendered via ``npc_data``, or rendered JSONL.
    examples: list[tuple[str, str, str]] = field(default_factory=list)
    #: ``(id, text)`` from ``{"text": ...}`` rows (``zyke-train prepare`` output, lore, scripts).
    texts: list[tuple[str, str]] = field(default_factory=list)
    #: ``zyke-train blocks`` output folders, or single ``blocks-*.safetensors`` shards.
    blocks: list[Path] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.examples or self.texts or self.blocks)


def load_training_data(paths: Sequence[Path]) -> TrainingData:
    """Sort ``--data`` by kind: a folder or ``.safetensors`` file is blocks, a JSONL file is judged by its
    first non-empty line (``npc`` key: dataset rows; ``prompt``: rendered examples; ``text``: text rows)."""
    data = TrainingData()
    jsonl: list[Path] = []
    for path in paths:
        if path.is_dir() or path.suffix == ".safetensors":
            data.blocks.append(path)
            continue
        first = _read_with_head(path)[1]
        if isinstance(first, dict) and "text" in first and "prompt" not in first and "npc" not in first:
            data.texts.extend(_text_rows(path))
        elif first is not None:
            jsonl.append(path)
    if jsonl:
        data.examples = load_examples(jsonl)
    if not data:
        raise TrainError("no training examples in " + ", ".join(map(str, paths)))
    return data


def _read_with_head(path: Path) -> tuple[list[str], Any]:
    """A JSONL file's lines and its first non-empty line parsed (None for an empty file): how each ``--data``
    file is judged."""
    from . import npc_data

    try:
        lines = npc_data.read_lines(path)
    except npc_data.InputError as exc:
        raise TrainError(str(exc)) from exc
    first = next((ln for ln in lines if ln.strip()), None)
    if first is None:
        return lines, None
    try:
        return lines, json.loads(first)
    except json.JSONDecodeError as exc:
        raise TrainError(f"{path}: first line is not JSON ({exc.msg})") from exc


def _text_rows(path: Path) -> list[tuple[str, str]]:
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TrainError(f"{path}:{lineno}: expected a {{\"text\": ...}} row like the first one ({exc})") from exc
        if not isinstance(text, str):
            raise TrainError(f"{path}:{lineno}: \"text\" must be a string")
        if text.strip():
            out.append((str(row.get("id", f"{path.name}:{lineno}")), text))
    return out


def sequence_windows(ids: Sequence[int], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Cut one token sequence into ``(prompt, completion)`` windows of at most ``max_length`` tokens for
    full-sequence loss: each window's first token is its one-token "prompt" (nothing predicts it) and the
    rest is completion. Windows overlap by that one token, so every token but the sequence's very first
    (BOS, for text rows) is a loss target exactly once, however the sequence is cut."""
    if len(ids) < 2:
        return []
    step = max(1, max_length - 1)
    return [(list(ids[start:start + 1]), list(ids[start + 1:start + 1 + step]))
            for start in range(0, len(ids) - 1, step)]


def tokenize_texts(tokenizer: Any, texts: Sequence[tuple[str, str]], max_length: int) -> list[Tokenized]:
    """Text rows as ``BOS text EOS`` (the way ``zyke-train blocks`` frames a document) in loss windows."""
    out: list[Tokenized] = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text_id, text in texts:
        ids = bos + tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        windows = sequence_windows(ids, max_length)
        out.extend(Tokenized(text_id if len(windows) == 1 else f"{text_id}#{i}", p, c)
                   for i, (p, c) in enumerate(windows))
    return out


def load_block_items(path: Path, tokenizer: Any, max_length: int) -> list[Tokenized]:
    """Every block of a ``zyke-train blocks`` folder (or one shard) as full-sequence loss windows.

    A folder's shards are checked against the sha256 its manifest records, and its tokenizer against the
    model's (same vocabulary size and EOS id): blocks are token ids, and ids from another tokenizer would
    train silently on garbage."""
    from .blocks import BlocksError, read_block_shards

    try:
        shards = read_block_shards(path, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    except BlocksError as exc:
        raise TrainError(str(exc)) from exc
    return block_items(((f"{name}:{first + row}", array[row]) for name, first, array in shards
                        for row in range(array.shape[0])), max_length)


def block_items(rows: Iterable[tuple[str, Sequence[int]]], max_length: int) -> list[Tokenized]:
    """``(id, block)`` rows as full-sequence loss windows (ids ``ID`` or ``ID#i`` when a block needs several):
    the one way a block becomes training items, for a local ``--data BLOCKS_DIR`` run and for a shared trainer's
    task that names blocks by reference alike."""
    out: list[Tokenized] = []
    for block_id, block in rows:
        windows = sequence_windows(block.tolist() if hasattr(block, "tolist") else list(block), max_length)
        out.extend(Tokenized(block_id + (f"#{i}" if len(windows) > 1 else ""), p, c)
                   for i, (p, c) in enumerate(windows))
    return out


def load_examples(paths: Sequence[Path]) -> list[tuple[str, str, str]]:
    """``(id, prompt, completion)`` from dataset rows (checked and rendered via ``npc_data``) or from
    already-rendered ``{prompt, completion}`` JSONL; each file is judged by its first non-empty line."""
    from . import npc_data

    out: list[tuple[str, str, str]] = []
    for path in paths:
        lines, head = _read_with_head(path)
        if head is None:
            continue
        if isinstance(head, dict) and "npc" in head:
            result = npc_data.process([(str(path), lines)])
            if result.rejections:
                r = result.rejections[0]
                log.warning("%s: skipped %d bad rows (first: line %d, %s)", path, len(result.rejections), r.line,
                            r.reason)
            out.extend((e.id, e.prompt, e.completion) for e in result.examples)
            continue
        for lineno, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                out.append((str(row.get("id", f"{path.name}:{lineno}")), row["prompt"], row["completion"]))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise TrainError(f"{path}:{lineno}: expected a dataset row or {{prompt, completion}} ({exc})") from exc
    if not out:
        raise TrainError("no training examples in " + ", ".join(map(str, paths)))
    return out


def decision_spans(completion: str) -> list[tuple[int, int]]:
    """Character spans of the ``emotion`` and ``action`` values in a rendered reply (empty when the
    completion is not one). They are the reply's decisions: a few tokens among dozens of ``say`` tokens."""
    spans = []
    for key in ("emotion", "action"):
        marker = f'"{key}": "'
        start = completion.rfind(marker)
        if start < 0:
            continue
        start += len(marker)
        end = completion.find('"', start)
        if end > start:
            spans.append((start, end))
    return spans


def reply_action(completion: str) -> str | None:
    try:
        value = json.loads(completion).get("action")
    except (json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def tokenize_examples(tokenizer: Any, examples: Sequence[tuple[str, str, str]], max_length: int,
                      decision_weight: float = 1.0) -> tuple[list[Tokenized], int]:
    """Token ids per example, the prompt left-truncated (BOS kept) to fit ``max_length``; returns the
    examples and how many were truncated. A completion that alone does not fit is cut at its end.

    ``decision_weight`` scales the loss of the tokens that spell the emotion and action values. With
    plain token-averaged loss those two or three tokens weigh as much as two words of the line, so a
    short run learns the voice and falls back to the most common action (``none``); weighting them is
    the cheap way to make the run learn the choice the game acts on."""
    out: list[Tokenized] = []
    truncated = 0
    for ex_id, prompt, completion in examples:
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        weights: tuple[float, ...] | None = None
        if decision_weight != 1.0 and (spans := decision_spans(completion)):
            enc = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
            c = enc["input_ids"]
            weights = tuple(decision_weight if any(s < b and a < e for s, e in spans) else 1.0
                            for a, b in enc["offset_mapping"])
        else:
            c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if len(p) + len(c) > max_length:
            truncated += 1
            c = c[: max(1, max_length - 1)]
            weights = weights[: len(c)] if weights else None
            room = max_length - len(c)
            bos = p[:1] if p and p[0] == tokenizer.bos_token_id else []
            p = bos + p[len(p) - (room - len(bos)):] if room > len(bos) else bos
        out.append(Tokenized(ex_id, p, c, weights, reply_action(completion)))
    return out, truncated
