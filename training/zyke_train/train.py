"""LoRA supervised fine-tuning for NPC models (``zyke-train train``).

Why a small loop of our own instead of TRL's ``SFTTrainer``: the things this project needs are few and
specific, and each is easier to get right in plain code than through trainer callbacks:

Data (``train_data``), batching and the loss (``batching``) and checkpoints (``checkpoints``) live in their own
modules; this one holds the configuration, the model and the loop.

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
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .batching import collate, completion_loss_sum, epoch_batches, epoch_subset
from .checkpoints import checkpoints, load_checkpoint, save_checkpoint
from .errors import TrainError
from .train_data import load_block_items, load_training_data, tokenize_examples, tokenize_texts

#: Every linear projection of a Gemma/Llama-style block; all of them export to llama.cpp's GGUF LoRA.
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    #: Start from this adapter's weights (a PEFT folder or a registered name) instead of a fresh LoRA: a game
    #: teaches npc-default its own NPCs without starting over. The adapter's own LoRA shape then applies.
    init_adapter: str | None = None


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    losses: list[dict[str, float]]
    seconds: float
    tokens: int
    truncated: int



# -- model


def resolve_model(model: str | None) -> str:
    """The checkpoint to train on: ``model`` as given (HF name or dir), or the embedded model's cached
    transformers checkpoint (converted from the shipped GGUF on first use)."""
    if model:
        return model
    from zyke_models.hf_checkpoint import embedded_hf_checkpoint

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
        from zyke_models.quantization import quantization_config

        kwargs["quantization_config"] = quantization_config("4bit", torch.bfloat16)  # the daemon's 4-bit NF4
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
    if config.init_adapter:
        return tokenizer, _load_init_adapter(model, config)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), layers_to_transform=layers, bias="none",
                      task_type="CAUSAL_LM")
    return tokenizer, get_peft_model(model, lora)


def _load_init_adapter(model: Any, config: TrainConfig) -> Any:
    """The base wrapped with ``config.init_adapter``'s weights, trainable (LoRA flags of the run are ignored)."""
    from peft import PeftModel

    from .adapters import resolve_adapter
    from .errors import AdapterError

    try:
        path = resolve_adapter(config.init_adapter or "", flag="--init-adapter")
    except AdapterError as exc:
        raise TrainError(str(exc)) from exc
    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as exc:  # shapes or module names of another base
        raise TrainError(f"--init-adapter {config.init_adapter!r} does not fit this base model: {exc}") from exc


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
    """Upload the adapter directory to a Hub model repo (through ``zyke_models.hub``, as ``publish`` does); returns
    the repo URL. Raises TrainError with a clear message when the Hub cannot be reached or the login is missing."""
    from zyke_models.errors import HubError
    from zyke_models.hub import upload_folder

    try:
        return upload_folder(adapter_dir, repo, "zyke-train LoRA adapter").repo_url
    except HubError as exc:
        if exc.failure == "no_package":
            raise TrainError("--hf-push needs huggingface_hub: pip install huggingface_hub") from exc
        # offline, auth and HTTP errors all end the push the same way
        reason = f"{type(exc.cause).__name__}: {exc.cause}" if exc.cause is not None else exc.message
        raise TrainError(f"could not push to the Hugging Face Hub ({reason}); the adapter is saved at "
                         f"{adapter_dir} - push it later with `huggingface-cli upload {repo} {adapter_dir}`"
                         ) from exc


def iter_loss_lines(history: Sequence[dict[str, float]], every: int = 10) -> Iterator[str]:
    """A few loss lines for the end-of-run summary."""
    for entry in history:
        if entry["step"] % every == 0 or entry is history[-1]:
            yield f"step {int(entry['step'])}: loss {entry['loss']:.4f}"
