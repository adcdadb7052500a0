"""``zyke-train rl``: improve a LoRA adapter from rewards with TRL's ``GRPOTrainer``.

GRPO (Shao et al. 2024, DeepSeekMath) samples ``num_generations`` replies per prompt, scores each with the
reward function (``rewards.py``), and pushes the policy towards the replies that scored above their group's
mean; no value model, which is what makes it fit a CPU and a 270M model. TRL's implementation is used as is
(the issue asks for the field's libraries rather than a loop of our own); this module only builds its
inputs and takes its output:

- **Prompts are the daemon's prompts.** Rows (NPC dataset rows of the *training* split, or reward rows from
  ``zyke-train blocks --experience``) are rendered by ``zyke.prompt_format.render_prompt``, and the tokenizer
  adds BOS as the daemon's does. Generation stops at the end of the reply line (the newline is made an EOS
  for generation), as the daemon does, so no compute goes into text the daemon would drop.
- **LoRA only, from a starting adapter.** The starting adapter (a PEFT folder, or a registered name such as
  the shipped ``npc-default``) is *copied* into the output folder and loaded trainable; the source is never
  written to. Only its LoRA weights change; rank and targets stay, so the result is a drop-in replacement.
- **KL anchor to the starting adapter.** With ``beta > 0`` and a pretrained PEFT adapter, TRL 1.16 keeps a
  frozen copy of it as a second adapter named ``ref`` and computes the reference log-probabilities with it
  (``GRPOTrainer.__init__``, "create a 'ref' adapter that is a copy of the 'default' adapter"): the KL term
  anchors to the adapter we started from, not to the bare base model. Only ``default`` is saved.
- **Whole replies, or only the decision.** ``decide="reply"`` samples the whole reply line. ``decide="action"``
  gives the row's own line and emotion as the start of the reply and samples only the action after them, the
  label the game acts on, so the line a label is rewarded after always fits it (the row's own line, where the
  model's own line might say no while the label says sell). The label is drawn among the turn's allowed
  labels only, from the policy's own probabilities of them (``label_rollout``, TRL's ``rollout_func``), as
  the daemon decodes under the schema; sampled freely, invalid labels made ``none`` the safe bet. It is not
  much cheaper on a CPU: a sample's cost is the forward and backward pass over its ~470-token prompt
  (measured about 6 s a sample either way).
- **Only prompts the adapter is unsure of** (``keep_below``). GRPO learns nothing from a prompt whose samples
  all score the same; DAPO (Yu et al. 2025, "dynamic sampling") over-samples and drops such groups. Here the
  starting adapter's probability of each prompt's label is computed once, teacher-forced, and prompts above
  ``keep_below`` are dropped before training (action mode: the label is the whole completion).
- **A small, explicit budget.** ``--max-steps`` optimizer steps, each on ``--prompts-per-step`` prompts x
  ``--num-generations`` samples of at most ``--max-completion-length`` tokens. The step log (loss, KL and
  every reward term's mean per step) is written to ``rl_log.json``.

The result, ``OUTPUT_DIR/adapter``, is a plain PEFT adapter folder: ``zyke-train register`` / ``ship`` (or
``--adapter-name`` here, which calls the same ``register_adapter`` as ``train``) take it unchanged.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .rewards import RewardWeights

log = logging.getLogger(__name__)

class RlError(Exception):
    """A problem the user can fix (bad data, unknown adapter, a budget that cannot run): the CLI prints it."""


@dataclass
class RlConfig:
    """Everything an ``rl`` run depends on; written into ``rl_log.json``."""

    data: list[str]
    output_dir: str
    #: Starting adapter: a PEFT folder or a registered adapter name.
    adapter: str = "npc-default"
    model: str | None = None
    max_steps: int = 20
    num_generations: int = 4
    max_completion_length: int = 64
    prompts_per_step: int = 1
    lr: float = 2e-5
    #: KL coefficient towards the starting adapter (0 turns the anchor off).
    beta: float = 0.04
    temperature: float = 1.0
    seed: int = 0
    limit: int | None = None
    #: Subsample prompts whose label is this action to at most this share (e.g. ``{"none": 0.35}``), as
    #: ``train --max-action-share`` does: GRPO learns only where samples of a prompt disagree, and most
    #: "just talk" prompts have every sample right already.
    max_action_share: dict[str, float] = field(default_factory=dict)
    min_say_chars: int = 2
    max_say_chars: int = 300
    threads: int | None = None
    weights: RewardWeights = field(default_factory=RewardWeights)
    #: What is sampled: ``reply`` (the whole line) or ``action`` (after the row's own line and emotion).
    decide: str = "reply"
    #: Action mode: keep only prompts whose label the starting adapter gives a probability below this.
    keep_below: float | None = None
    #: Also save the adapter every N steps (``OUTPUT_DIR/grpo/checkpoint-N``), to see where a run went.
    save_every: int | None = None


#: What ``RlConfig.decide`` accepts.
DECIDE = ("reply", "action")


@dataclass
class RlResult:
    adapter_dir: Path
    start_dir: Path
    steps: int
    log: list[dict[str, float]]
    seconds: float


# -- data


def prompt_row(row: dict[str, Any], decide: str = "reply") -> dict[str, Any]:
    """One GRPO dataset row from an NPC dataset row or a reward row (docs/EXPERIENCE.md).

    An NPC row's reply action is its label (simulated feedback: the training split says what was right);
    a reward row carries the recorded reply's action and reward, and a label when the game sent one.
    With ``decide="action"`` the prompt goes on with the row's reply (or the recorded one) up to where its
    action starts; ``reply_prefix`` keeps that text so the reward terms judge the whole line."""
    from zyke.prompt_format import allowed_action_names, render_prompt, render_reply
    from zyke.protocol.models import NpcSpec, Turn

    from .evaluate import up_to_action
    from .npc_data import check_row

    recorded = row.get("recorded")
    context = {k: v for k, v in row.items() if k not in ("recorded", "reward", "label", "adapter")}
    if recorded is not None:
        context["reply"] = recorded
    reason = check_row(context)
    if reason is not None:
        raise ValueError(reason)
    npc = NpcSpec.model_validate(row["npc"])
    history = [Turn.model_validate(t) for t in row.get("history", [])]
    allowed = row.get("allowed_actions")
    if recorded is None:
        label, recorded_action, reward = row["reply"]["action"], None, None
    else:
        reward = row.get("reward")
        if not isinstance(reward, int | float) or not -1.0 <= reward <= 1.0:
            raise ValueError("reward must be a number in [-1, 1]")
        label = (row.get("label") or {}).get("action")
        recorded_action = recorded["action"]
        reward = float(reward)
    prefix = up_to_action(render_reply(context["reply"])) if decide == "action" else ""
    return {"prompt": render_prompt(npc, history, row["input"], row.get("state"), allowed) + prefix,
            "reply_prefix": prefix,
            "id": row["id"], "emotions": npc.emotion_names, "actions": allowed_action_names(npc, allowed),
            "history_says": [t.reply.say for t in history], "label_action": label,
            "recorded_action": recorded_action, "recorded_reward": reward}


def cap_label_share(rows: list[dict[str, Any]], max_share: dict[str, float], seed: int = 0) -> list[dict[str, Any]]:
    """The rows with each capped label subsampled to at most its share (``train``'s ``epoch_subset``, one
    epoch); rows without a label (reward rows) are kept."""
    from .batching import epoch_subset

    return [rows[i] for i in epoch_subset([r["label_action"] for r in rows], max_share, seed, 0)]


def load_prompts(paths: Sequence[Path], limit: int | None = None, max_action_share: dict[str, float] | None = None,
                 seed: int = 0, decide: str = "reply") -> list[dict[str, Any]]:
    """GRPO rows from every file, bad rows skipped with a warning (like ``train``), at most ``limit``, then
    labels capped by ``max_action_share``."""
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise RlError(f"cannot read {path}: {exc}") from exc
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                if not isinstance(raw, dict):
                    raise ValueError("a row is a JSON object")
                rows.append(prompt_row(raw, decide))
            except (json.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
                skipped.append(f"{path}:{lineno}: {exc}")
    if skipped:
        log.warning("skipped %d bad rows (first: %s)", len(skipped), skipped[0])
    if limit is not None:
        rows = rows[:limit]
    if max_action_share:
        rows = cap_label_share(rows, max_action_share, seed)
    if not rows:
        raise RlError("no usable rows in " + ", ".join(map(str, paths)) + (f" ({skipped[0]})" if skipped else ""))
    return rows


#: What follows the label in a reply line: the closing quote and brace (the line's newline ends the sample).
LABEL_END = '"}'


def label_logprobs(model: Any, tokenizer: Any, prompt_ids: Sequence[int], labels: Sequence[str]) -> list[float]:
    """Each label's log-probability as the whole completion (label, closing ``"}``) after the prompt.

    One forward pass for all labels: the rows are the prompt plus one label each, right-padded, which needs
    no attention mask (a causal model's earlier positions never see the padding after them); logits are kept
    only where label tokens are predicted, since a prompt's full logits are 0.5 GB of floats."""
    import torch

    encoded = [tokenizer(label + LABEL_END, add_special_tokens=False)["input_ids"] for label in labels]
    longest = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[*prompt_ids, *e, *[pad] * (longest - len(e))] for e in encoded])
    logits = model(input_ids=ids, logits_to_keep=longest + 1).logits[:, :-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor([[*e, *[pad] * (longest - len(e))] for e in encoded])
    picked = logprobs.gather(2, targets[:, :, None])[:, :, 0]
    mask = torch.tensor([[1.0] * len(e) + [0.0] * (longest - len(e)) for e in encoded])
    return [float(x) for x in (picked * mask).sum(dim=1)]


def label_probabilities(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]],
                        on_progress: Callable[[int], object] = lambda _: None) -> list[float | None]:
    """Action mode: the model's probability of each row's label as the whole completion (label, closing
    ``"}``), teacher-forced; None for rows without a label. One forward pass per row, no gradients."""
    import math

    import torch

    out: list[float | None] = []
    with torch.no_grad():
        for i, row in enumerate(rows):
            if row["label_action"] is None:
                out.append(None)
                continue
            prompt = tokenizer(row["prompt"])["input_ids"]
            out.append(math.exp(label_logprobs(model, tokenizer, prompt, [row["label_action"]])[0]))
            on_progress(i + 1)
    return out


def label_rollout(labels_of: dict[str, Sequence[str]], temperature: float, seed: int,
                  end_id: int) -> Callable[[list[str], Any], dict[str, Any]]:
    """Action mode's sampler, a TRL ``rollout_func``: each completion is one of the prompt's allowed labels,
    drawn from the policy's own probabilities of the allowed labels (``label_logprobs``, renormalised,
    ``temperature`` applied), then ``"}`` and the line's end (``end_id``).

    Why not TRL's ``generate``: sampled freely, a third of the labels came out invalid, and with validity
    scored the always-allowed ``none`` became the safe bet (the measured run in training/README.md learnt
    ``none``). The daemon decodes under the schema, so the only choice that matters is among the allowed
    labels, and that is exactly what this samples. The loss stays TRL's: the sampled tokens' log-probabilities
    under the whole vocabulary, so a rewarded label gains mass from every other token."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def rollout(prompts: list[str], trainer: Any) -> dict[str, Any]:
        model, tokenizer = trainer.model, trainer.processing_class
        prompt_ids = tokenizer(text=prompts)["input_ids"]
        policy: dict[str, tuple[Sequence[str], Any]] = {}
        completions: list[list[int]] = []
        was_training = model.training
        model.eval()  # no LoRA dropout while sampling, as generate() would
        try:
            with torch.no_grad():
                for prompt, ids in zip(prompts, prompt_ids, strict=True):
                    if prompt not in policy:  # a prompt comes num_generations times in a row
                        labels = labels_of[prompt]
                        scores = torch.tensor(label_logprobs(model, tokenizer, ids, labels))
                        policy[prompt] = (labels, torch.softmax(scores / temperature, dim=0))
                    labels, probs = policy[prompt]
                    label = labels[int(torch.multinomial(probs, 1, generator=generator))]
                    completions.append([*tokenizer(label + LABEL_END, add_special_tokens=False)["input_ids"],
                                        end_id])
        finally:
            model.train(was_training)
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None}

    return rollout


# -- the starting adapter


def copy_adapter(source: Path, dest: Path) -> Path:
    """The starting adapter's two files copied to ``dest`` (the source, e.g. the shipped one, stays as is)."""
    dest.mkdir(parents=True, exist_ok=True)
    from .adapters import ADAPTER_FILES

    for name in ADAPTER_FILES:
        shutil.copyfile(source / name, dest / name)
    return dest


# -- the run


def rl(config: RlConfig, on_log: Callable[[str], None] = print) -> RlResult:
    """Run GRPO on the starting adapter; writes ``OUTPUT_DIR/adapter`` and ``OUTPUT_DIR/rl_log.json``."""
    import torch

    try:
        from datasets import Dataset
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as exc:
        raise RlError(f"zyke-train rl needs the train extra (trl, peft, datasets): pip install 'zyke[train]' "
                      f"({exc})") from exc

    from . import rewards
    from .train import resolve_model

    if config.max_steps < 1 or config.num_generations < 2 or config.max_completion_length < 8 \
            or config.prompts_per_step < 1:
        raise RlError("--max-steps >= 1, --num-generations >= 2 (GRPO compares samples of one prompt), "
                      "--max-completion-length >= 8 and --prompts-per-step >= 1")
    if config.decide not in DECIDE:
        raise RlError(f"--decide is one of {', '.join(DECIDE)}, not {config.decide!r}")
    if config.keep_below is not None and (config.decide != "action" or not 0 < config.keep_below <= 1):
        raise RlError("--keep-below takes a probability in (0, 1] and needs --decide action")
    if config.threads:
        torch.set_num_threads(config.threads)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = load_prompts([Path(p) for p in config.data], config.limit, config.max_action_share, config.seed,
                        config.decide)
    from .adapters import resolve_adapter
    from .errors import AdapterError

    try:
        start = copy_adapter(resolve_adapter(config.adapter), output_dir / "start")
    except AdapterError as exc:
        raise RlError(str(exc)) from exc

    base_path = resolve_model(config.model)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16 if use_bf16 else torch.float32)
    try:
        model = PeftModel.from_pretrained(base, str(start), is_trainable=True)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise RlError(f"the adapter {config.adapter} does not fit the model {base_path}: {exc}") from exc
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(newline) == 1:  # stop where the daemon stops: at the end of the reply line
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, newline[0]]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    kept_from = len(rows)
    if config.keep_below is not None:
        from tqdm import tqdm

        with tqdm(total=len(rows), desc="label probabilities", unit="prompt") as bar:
            probs = label_probabilities(model, tokenizer, rows, lambda n: bar.update(n - bar.n))
        rows = [r for r, p in zip(rows, probs, strict=True) if p is None or p < config.keep_below]
        on_log(f"kept {len(rows)} of {kept_from} prompts whose label the starting adapter gives < "
               f"{config.keep_below:g}")
        if not rows:
            raise RlError(f"the starting adapter is surer than {config.keep_below:g} of every label: nothing to learn")

    args = GRPOConfig(
        output_dir=str(output_dir / "grpo"), max_steps=config.max_steps, learning_rate=config.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        # one prompt's samples per forward/backward, the step's prompts accumulated: the same optimizer step as one
        # batch of all of them, without holding every sample's activations at once (14 GB for 4 x 6 samples of a
        # 470-token prompt, and 3.5 min a step on 2 cores)
        per_device_train_batch_size=config.num_generations, gradient_accumulation_steps=config.prompts_per_step,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length, temperature=config.temperature, beta=config.beta,
        reward_weights=config.weights.as_list(), seed=config.seed, data_seed=config.seed, logging_steps=1,
        save_strategy="steps" if config.save_every else "no", save_steps=config.save_every or 500,
        save_only_model=True, report_to="none", use_cpu=not torch.cuda.is_available(), bf16=use_bf16,
        dataloader_num_workers=0, disable_tqdm=True, log_completions=False, gradient_checkpointing=False)
    # gradient_checkpointing off: TRL turns it on by default, but a LoRA on a 270M model has small activations,
    # and recomputing them on a CPU would cost a third of every backward pass for memory nobody needs.
    history: list[dict[str, float]] = []

    class _Log(TrainerCallback):  # type: ignore[misc]  # transformers is not followed by mypy, so its class is Any
        def on_log(self, _args: Any, state: Any, _control: Any, logs: dict[str, float] | None = None,
                   **_: Any) -> None:
            if logs and "loss" in logs:
                entry = {"step": state.global_step, **{k: float(v) for k, v in logs.items()
                                                       if isinstance(v, int | float)}}
                history.append(entry)
                on_log(f"step {state.global_step}: reward {entry.get('reward', float('nan')):.3f}, "
                       f"kl {entry.get('kl', 0.0):.4f}, loss {entry['loss']:.4f}")

    rollout = None
    if config.decide == "action":
        end = newline[0] if len(newline) == 1 else tokenizer.eos_token_id
        rollout = label_rollout({r["prompt"]: r["actions"] for r in rows}, config.temperature, config.seed, end)
    trainer = GRPOTrainer(model=model, reward_funcs=rewards.grpo_reward_funcs(config.min_say_chars,
                                                                               config.max_say_chars),
                          args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[_Log()], rollout_func=rollout)
    on_log(f"{len(rows)} prompts; GRPO {config.max_steps} steps x {config.prompts_per_step} prompts x "
           f"{config.num_generations} samples of <= {config.max_completion_length} tokens, beta {config.beta} "
           f"(KL to the starting adapter), rewards {rewards.describe(config.weights)}")
    started = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - started

    trained = trainer.accelerator.unwrap_model(trainer.model)
    after = {k: v.detach() for k, v in trained.named_parameters() if k in before}
    change = float(sum((after[k].float() - before[k].float()).norm() ** 2 for k in before) ** 0.5)
    adapter_dir = output_dir / "adapter"
    trained.save_pretrained(str(adapter_dir), selected_adapters=["default"])
    (output_dir / "rl_log.json").write_text(json.dumps({
        "config": asdict(config), "start_adapter": config.adapter, "prompts": len(rows),
        "prompts_before_keep_below": kept_from, "steps": len(history),
        "seconds": round(elapsed, 1), "weight_change_l2": change, "log": history}, indent=1) + "\n",
        encoding="utf-8")
    on_log(f"LoRA weights moved by {change:.3g} (L2) from the starting adapter")
    return RlResult(adapter_dir, start, trainer.state.global_step, history, elapsed)
