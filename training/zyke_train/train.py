"""LoRA supervised fine-tuning for NPC models (``zyke-train train``).

Why a small loop of our own instead of TRL's ``SFTTrainer``: the things this project needs are few and
specific, and each is easier to get right in plain code than through trainer callbacks:

- **Completion-only loss, and only completion logits.** Gemma 3 has a 262,144-token vocabulary, so the
  output projection over every prompt position costs more than the rest of the model on a CPU. Batches
  are left-padded, so every completion sits at the end of its row, and the model is asked for the last
  ``max completion + 1`` logits only (``logits_to_keep``); labels are -100 on the prompt and padding.
  The loss is the sum over completion tokens divided by the completion tokens of the whole optimizer step,
  so gradient accumulation gives the same update as one big batch.
- **Text and blocks too.** ``{"text": ...}`` rows (a prepared corpus: a game's lore and scripts) and
  ``zyke-train blocks`` folders train with loss on every token (continued pretraining), in the same run
  and the same batches as NPC rows: each is a ``Tokenized`` whose "prompt" is its first token only.
- **Training sees exactly what serving sees.** Rows are rendered only by ``zyke.prompt_format`` (through
  ``npc_data``), and the prompt and completion are tokenized separately, the way the daemon tokenizes the
  prompt and then generates the reply token by token. Over-long prompts lose their oldest tokens (after
  BOS) so the newest turn and the reply are always kept.
- **Checkpoints without pickle.** A checkpoint holds the adapter (PEFT safetensors), the optimizer state
  as safetensors tensors plus JSON hyper-parameters, the LR scheduler state and RNG states as JSON and
  safetensors, and ``trainer_state.json``. Nothing is ever read back with ``pickle``/``torch.load``, so a
  checkpoint from elsewhere cannot run code. Checkpoints are written to a temporary directory and renamed,
  so ``--resume-latest`` never picks up a half-written one.
- **Deterministic data order.** Batches of an epoch are a pure function of (seed, epoch), so resuming at
  step N continues with exactly the batches an uninterrupted run would have used.

Accelerate's ``Accelerator`` owns the device and the (optional) distributed wrapping, so the same code
runs on a CPU, one GPU or several (``accelerate launch``), each process taking its share of the batches.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Every linear projection of a Gemma/Llama-style block; all of them export to llama.cpp's GGUF LoRA.
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
#: Batches are sorted by length inside windows of this many batches (length bucketing with some shuffle).
BUCKET_WINDOW = 32


class TrainError(Exception):
    """A problem the user can fix (bad flag, missing optional package, unusable data): the CLI prints it."""


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in each checkpoint so a resumed run can be compared."""

    data: list[str]
    output_dir: str
    model: str | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 5e-4
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    #: Adapt only the last N transformer blocks: backward then stops at the lowest adapted block, which
    #: saves most of the backward pass on a CPU (None = every block).
    lora_layers: int | None = None
    #: Loss weight of the emotion/action value tokens (1.0: plain token average).
    decision_weight: float = 1.0
    #: Cap on the share of an epoch taken by rows with a given action, e.g. {"none": 0.35}.
    max_action_share: dict[str, float] = field(default_factory=dict)
    qlora: bool = False
    log_to: str = "none"
    threads: int | None = None
    resume_latest: bool = False


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
class TrainResult:
    adapter_dir: Path
    steps: int
    losses: list[dict[str, float]]
    seconds: float
    tokens: int
    truncated: int


# -- data


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
    out: list[Tokenized] = []
    for name, first, array in shards:
        for row in range(array.shape[0]):
            windows = sequence_windows(array[row].tolist(), max_length)
            out.extend(Tokenized(f"{name}:{first + row}" + (f"#{i}" if len(windows) > 1 else ""), p, c)
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


def epoch_subset(actions: Sequence[str | None], max_share: dict[str, float], seed: int, epoch: int) -> list[int]:
    """Indices used in one epoch: rows whose action is capped by ``max_share`` (e.g. ``{"none": 0.35}``)
    are subsampled to at most that share of the epoch, a different random subset each epoch, so a
    dataset where most replies do nothing does not teach the model to always do nothing. Pure in
    (seed, epoch), like ``epoch_batches``."""
    rng = random.Random(f"subset:{seed}:{epoch}")
    keep = [i for i, a in enumerate(actions) if a not in max_share]
    for action, share in sorted(max_share.items()):
        rows = [i for i, a in enumerate(actions) if a == action]
        if share >= 1.0:
            keep.extend(rows)
            continue
        others = len(actions) - len(rows)
        limit = min(len(rows), int(share * others / max(1e-9, 1.0 - share)))
        keep.extend(rng.sample(rows, limit))
    return sorted(keep)


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  subset: Sequence[int] | None = None) -> list[list[int]]:
    """Index batches for one epoch (over ``subset`` when given): shuffled, sorted by length within windows
    (little padding), then the batches shuffled again. A pure function of (seed, epoch), which is what
    makes resuming exact."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths))) if subset is None else list(subset)
    rng.shuffle(order)
    window = batch_size * BUCKET_WINDOW
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(items: Sequence[Tokenized], pad_id: int) -> dict[str, Any]:
    """Left-padded tensors; ``keep`` is how many trailing logits the loss needs (longest completion + 1)."""
    import torch

    width = max(len(t) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    weights = torch.zeros((len(items), width), dtype=torch.float32)
    for row, t in enumerate(items):
        seq = t.prompt + t.completion
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
        labels[row, width - len(t.completion):] = torch.tensor(t.completion)
        weights[row, width - len(t.completion):] = torch.tensor(t.weights or [1.0] * len(t.completion))
    keep = min(width, max(len(t.completion) for t in items) + 1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights, "keep": keep,
            "tokens": int(mask.sum()), "targets": int((labels != -100).sum()), "weight": float(weights.sum())}


def completion_loss_sum(model: Any, batch: dict[str, Any]) -> Any:
    """Summed cross-entropy over the completion tokens (times their ``weights`` when the batch has them),
    computing logits only where labels are."""
    import torch.nn.functional as F

    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the positions
    keep = batch["keep"]
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids,
                logits_to_keep=keep, use_cache=False)
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, -(keep - 1):]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                             reduction="none")
    if "weights" in batch:
        losses = losses * batch["weights"][:, -(keep - 1):].reshape(-1)
    return losses.sum()


# -- checkpoints (no pickle anywhere)


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a trainer state) as (step, dir), oldest first."""
    found = []
    for d in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = d.name[len(CHECKPOINT_PREFIX):]
        if d.is_dir() and suffix.isdigit() and (d / STATE_FILE).is_file():
            found.append((int(suffix), d))
    return sorted(found)


def save_checkpoint(output_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any,
                    state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint-<step> atomically (temp dir + rename) and drop all but the newest ``keep``."""
    import torch
    from safetensors.torch import save_file

    final = output_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = output_dir / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    tensors, meta = _optimizer_to_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng_tensors[f"torch_cuda_{i}"] = s
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    py_state = random.getstate()
    (tmp / "optimizer.json").write_text(json.dumps(meta, indent=1))
    (tmp / "scheduler.json").write_text(json.dumps(sched, indent=1))
    (tmp / "rng.json").write_text(json.dumps({"python": [py_state[0], list(py_state[1]), py_state[2]]}))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))  # last: marks the checkpoint complete
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for _, old in checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG from ``path``; returns its trainer state.
    Everything is read with safetensors or json: no code can be smuggled in through a checkpoint."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise TrainError(f"{path}: adapter weights do not fit this model ({missing[:3]}...)")
    meta = json.loads((path / "optimizer.json").read_text())
    _optimizer_from_tensors(optimizer, load_file(str(path / "optimizer.safetensors")), meta)
    sched = json.loads((path / "scheduler.json").read_text())
    sched["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(sched)
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    py = json.loads((path / "rng.json").read_text())["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    return json.loads((path / STATE_FILE).read_text())


def _optimizer_to_tensors(optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """An optimizer's state as flat tensors (``state.<param>.<name>``) plus JSON for everything else."""
    import torch

    sd = optimizer.state_dict()
    tensors: dict[str, Any] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(optimizer: Any, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# -- model


def resolve_model(model: str | None) -> str:
    """The checkpoint to train on: ``model`` as given (HF name or dir), or the embedded model's cached
    transformers checkpoint (converted from the shipped GGUF on first use)."""
    if model:
        return model
    from zyke_daemon.hf_checkpoint import embedded_hf_checkpoint

    return str(embedded_hf_checkpoint())


def load_model(config: TrainConfig, device_type: str) -> tuple[Any, Any]:
    """Tokenizer and PEFT-wrapped model. ``--qlora`` loads the base in 4-bit NF4 (bitsandbytes, CUDA only)."""
    import importlib.util

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.qlora:  # checked before anything slow is loaded
        if device_type != "cuda" or not torch.cuda.is_available():
            raise TrainError("--qlora needs a CUDA GPU (bitsandbytes 4-bit training); on a CPU train plain LoRA")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise TrainError("--qlora needs bitsandbytes: pip install 'zyke[gpu]'")
    path = resolve_model(config.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs: dict[str, Any] = {}
    if config.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["dtype"] = torch.bfloat16
    else:
        use_bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
        kwargs["dtype"] = torch.bfloat16 if use_bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if config.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    layers = None
    if config.lora_layers:
        n_layers = int(model.config.get_text_config().num_hidden_layers)
        layers = list(range(max(0, n_layers - config.lora_layers), n_layers))
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), layers_to_transform=layers, bias="none",
                      task_type="CAUSAL_LM")
    return tokenizer, get_peft_model(model, lora)


def lr_lambda(total_steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to a tenth of the peak learning rate."""
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return fn


# -- logging backends


class MetricsLogger:
    """tensorboard, wandb or nothing; imported only when asked for, with a clear error if missing."""

    def __init__(self, kind: str, output_dir: Path, config: TrainConfig) -> None:
        self.kind = kind
        self._writer: Any = None
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise TrainError("--log-to tensorboard needs the tensorboard package: pip install tensorboard") from exc
            self._writer = SummaryWriter(log_dir=str(output_dir / "runs"))
        elif kind == "wandb":
            try:
                import wandb
            except ImportError as exc:
                raise TrainError("--log-to wandb needs the wandb package: pip install wandb") from exc
            self._writer = wandb.init(project=os.environ.get("WANDB_PROJECT", "zyke"), config=asdict(config),
                                      dir=str(output_dir))
        elif kind != "none":
            raise TrainError(f"unknown --log-to {kind!r}; use tensorboard, wandb or none")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.kind == "tensorboard":
            for k, v in metrics.items():
                self._writer.add_scalar(f"train/{k}", v, step)
        elif self.kind == "wandb":
            self._writer.log({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self._writer.close()
        elif self.kind == "wandb":
            self._writer.finish()


# -- the loop


def train(config: TrainConfig, on_log: Callable[[str], None] = print) -> TrainResult:
    """Train a LoRA adapter; writes checkpoints and the final adapter under ``config.output_dir``."""
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if config.threads:
        torch.set_num_threads(config.threads)
    if config.batch_size < 1 or config.grad_accum < 1 or config.max_length < 8:
        raise TrainError("--batch-size and --grad-accum must be >= 1 and --max-length >= 8")
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    metrics = MetricsLogger(config.log_to, output_dir, config) if accelerator.is_main_process else None

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    data = load_training_data([Path(p) for p in config.data])
    tokenizer, model = load_model(config, accelerator.device.type)
    items, truncated = tokenize_examples(tokenizer, data.examples, config.max_length, config.decision_weight)
    items += tokenize_texts(tokenizer, data.texts, config.max_length)
    for blocks in data.blocks:
        items += load_block_items(blocks, tokenizer, config.max_length)
    if len(items) > len(data.examples):
        on_log(f"{len(data.examples)} NPC examples (completion-only loss) and {len(items) - len(data.examples)} "
               "text/block windows (loss on every token)")
    if truncated:
        on_log(f"{truncated} of {len(items)} examples were longer than --max-length {config.max_length}: "
               "their prompts lost their oldest tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lengths = [len(t) for t in items]

    actions = [t.action for t in items]

    def batches_of(epoch: int) -> list[list[int]]:
        subset = epoch_subset(actions, config.max_action_share, config.seed, epoch) if config.max_action_share \
            else None
        return epoch_batches(lengths, config.batch_size, config.seed, epoch, subset)[rank::world]

    world, rank = accelerator.num_processes, accelerator.process_index
    micro_per_epoch = len(batches_of(0))
    if not micro_per_epoch:
        raise TrainError(f"--max-action-share {config.max_action_share} leaves no rows to train on")
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / config.grad_accum))
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup = max(1, round(config.warmup_ratio * total_steps))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup))

    step = 0
    history: list[dict[str, float]] = []
    if config.resume_latest:
        found = checkpoints(output_dir)
        if found:
            state = load_checkpoint(found[-1][1], model, optimizer, scheduler)
            step, history = state["step"], state["losses"]
            on_log(f"resumed from {found[-1][1]} at step {step}")
        else:
            on_log(f"no checkpoint in {output_dir}: starting from scratch")
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    trainable = sum(p.numel() for p in params)
    on_log(f"{len(items)} examples, {micro_per_epoch} batches of {config.batch_size} per epoch, "
           f"{steps_per_epoch} steps per epoch; training {total_steps} steps, LoRA r={config.lora_r} on "
           f"{','.join(config.lora_target_modules)} ({trainable / 1e6:.2f}M params) on {accelerator.device}")

    started = time.perf_counter()
    seen_tokens = 0
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    batches_cache: dict[int, list[list[int]]] = {}
    while step < total_steps:
        epoch, group = divmod(step, steps_per_epoch)
        if epoch not in batches_cache:
            batches_cache = {epoch: batches_of(epoch)}
        micro = batches_cache[epoch][group * config.grad_accum:(group + 1) * config.grad_accum]
        batches = [collate([items[i] for i in b], pad_id) for b in micro]
        step_targets = sum(b["weight"] for b in batches)  # == target tokens when every weight is 1
        loss_sum = 0.0
        t0 = time.perf_counter()
        for i, batch in enumerate(batches):
            batch = {k: (v.to(accelerator.device) if hasattr(v, "to") else v) for k, v in batch.items()}
            sync = i == len(batches) - 1
            ctx = accelerator.no_sync(model) if not sync else _nullcontext()
            with ctx:
                loss = completion_loss_sum(model, batch)
                accelerator.backward(loss / max(1, step_targets))
            loss_sum += float(loss.detach())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_tokens = sum(b["tokens"] for b in batches)
        seen_tokens += step_tokens
        dt = time.perf_counter() - t0
        entry = {"step": step, "loss": loss_sum / max(1, step_targets), "lr": scheduler.get_last_lr()[0],
                 "tokens": step_tokens, "seconds": round(dt, 3), "epoch": round(step / steps_per_epoch, 4)}
        history.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{step_tokens / max(dt, 1e-9):.0f}",
                        lr=f"{entry['lr']:.2e}")
        bar.update(1)
        if metrics is not None:
            metrics.log(step, {"loss": entry["loss"], "lr": entry["lr"], "tokens_per_s": step_tokens / max(dt, 1e-9)})
        if accelerator.is_main_process and (step % config.save_every == 0 or step == total_steps):
            state = {"step": step, "total_steps": total_steps, "losses": history, "config": asdict(config)}
            save_checkpoint(output_dir, step, accelerator.unwrap_model(model), optimizer.optimizer
                            if hasattr(optimizer, "optimizer") else optimizer, scheduler, state,
                            config.keep_checkpoints)
        accelerator.wait_for_everyone()
    bar.close()
    elapsed = time.perf_counter() - started

    adapter_dir = output_dir / "adapter"
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(str(adapter_dir))
        (output_dir / "train_log.json").write_text(json.dumps({
            "config": asdict(config), "steps": step, "seconds_this_run": round(elapsed, 1),
            "tokens_this_run": seen_tokens, "truncated_examples": truncated, "losses": history}, indent=1))
    if metrics is not None:
        metrics.close()
    return TrainResult(adapter_dir, step, history, elapsed, seen_tokens, truncated)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -- after training


def register_adapter(name: str, adapter_dir: Path, model: str | None) -> Any:
    """Register the trained adapter for the daemon (base fingerprint + GGUF twin). A Hub base is looked up
    in the local Hub cache: the fingerprint must name the exact weights the adapter was trained on."""
    from .adapters import register

    if model is None:
        return register(name, adapter_dir)
    base = Path(model).expanduser()
    if not base.exists():
        try:
            from huggingface_hub import snapshot_download

            base = Path(snapshot_download(model, local_files_only=True))
        except Exception as exc:  # any hub failure means the same thing here
            raise TrainError(f"cannot find {model} locally to fingerprint it; register with "
                             f"`zyke-train register {name} {adapter_dir} --base DIR`") from exc
    return register(name, adapter_dir, base)


def push_to_hub(repo: str, adapter_dir: Path) -> str:
    """Upload the adapter directory to a Hub model repo; returns the repo URL. Raises TrainError with a
    clear message when the Hub cannot be reached or the login is missing."""
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:
        raise TrainError("--hf-push needs huggingface_hub: pip install huggingface_hub") from exc
    api = HfApi()
    try:
        url = api.create_repo(repo, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(adapter_dir), repo_id=repo, repo_type="model",
                          commit_message="zyke-train LoRA adapter")
    except Exception as exc:  # offline, auth and HTTP errors all end the push the same way
        raise TrainError(f"could not push to the Hugging Face Hub ({type(exc).__name__}: {exc}); the adapter is "
                         f"saved at {adapter_dir} - push it later with `huggingface-cli upload {repo} {adapter_dir}`"
                         ) from exc
    return str(url)


def iter_loss_lines(history: Sequence[dict[str, float]], every: int = 10) -> Iterator[str]:
    """A few loss lines for the end-of-run summary."""
    for entry in history:
        if entry["step"] % every == 0 or entry is history[-1]:
            yield f"step {int(entry['step'])}: loss {entry['loss']:.4f}"
