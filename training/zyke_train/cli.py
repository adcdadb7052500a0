"""``zyke-train``: datasets, LoRA training, evaluation and export.

A thin click shell: each subcommand parses flags, calls pure functions in a module of its own
(``npc_data`` for ``npc-data``) and prints. To add a subcommand, write its logic in a new module and
register a function here with ``@main.command("name")``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import __version__

if TYPE_CHECKING:
    from .npc_data import Rejection

#: Inputs with more lines than this get a progress bar (below it, the bar costs more than it tells).
PROGRESS_MIN_LINES = 5000
#: Rejections printed in the table; the JSON report always holds all of them.
MAX_TABLE_ROWS = 50


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zyke-train")
def main() -> None:
    """Zyke training: datasets, LoRA training, evaluation and export for NPC models."""


@main.command("npc-data")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the rendered examples ({id, prompt, completion} JSONL).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the counts and every rejected row as JSON here.")
@click.pass_context
def npc_data_cmd(ctx: click.Context, inputs: tuple[Path, ...], out: Path, report_path: Path | None) -> None:
    """Check NPC dataset rows (schemas/npc_example.json) and render them into training examples.

    Every row must match the row schema, and its reply and history replies must use only that NPC's
    emotions and actions. Bad rows are reported (file, line, id, reason) and skipped; the exit code
    stays 0. An input that cannot be read exits 2 before anything is written.
    """
    from . import npc_data  # imported here so `zyke-train --help` stays fast as subcommands grow

    try:
        sources = [(str(path), npc_data.read_lines(path)) for path in inputs]
    except npc_data.InputError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(2)

    total = sum(len(lines) for _, lines in sources)
    if total >= PROGRESS_MIN_LINES:
        with click.progressbar(length=total, label="checking rows", file=sys.stderr) as bar:
            result = npc_data.process(sources, on_line=lambda: bar.update(1))
    else:
        result = npc_data.process(sources)

    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for example in result.examples:
            fh.write(example.to_json() + "\n")

    if result.rejections:
        _print_rejections(result.rejections)
    for entry in result.report()["files"]:
        click.echo(f"{entry['file']}: {entry['rows']} rows, {entry['good']} good, {entry['bad']} bad")
    click.echo(f"total: {result.rows} rows, {len(result.examples)} good, {len(result.rejections)} bad; "
               f"wrote {len(result.examples)} examples to {out}")
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(result.report(str(out)), indent=2, ensure_ascii=False) + "\n",
                               encoding="utf-8")
        click.echo(f"report: {report_path}")


def _print_rejections(rejections: Sequence[Rejection]) -> None:
    """A short table: file:line, id, reason (long reasons cut so each rejection stays on one line)."""
    shown = rejections[:MAX_TABLE_ROWS]
    where = [f"{r.file}:{r.line}" for r in shown]
    ids = [r.id or "-" for r in shown]
    w1 = max(len("where"), *map(len, where))
    w2 = max(len("id"), *map(len, ids))
    click.echo(f"rejected {len(rejections)} rows:")
    click.echo(f"  {'where':<{w1}}  {'id':<{w2}}  reason")
    for loc, rid, r in zip(where, ids, shown, strict=True):
        reason = r.reason if len(r.reason) <= 100 else r.reason[:97] + "..."
        click.echo(f"  {loc:<{w1}}  {rid:<{w2}}  {reason}")
    if len(rejections) > len(shown):
        click.echo(f"  ... and {len(rejections) - len(shown)} more (see --report)")


@main.command("export-gguf")
@click.argument("peft_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="GGUF file to write (default: adapter.gguf inside the adapter directory).")
@click.option("--arch", default="gemma3", show_default=True, help="llama.cpp architecture of the base model.")
def export_gguf_cmd(peft_dir: Path, out: Path | None, arch: str) -> None:
    """Export a PEFT LoRA adapter to a GGUF LoRA for the llama.cpp backend."""
    from .adapters import export_gguf

    try:
        click.echo(f"wrote {export_gguf(peft_dir, out, arch)}")
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("register")
@click.argument("name")
@click.argument("peft_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--base", type=click.Path(exists=True, path_type=Path),
              help="Base model it was trained on: a GGUF file or a checkpoint dir (default: the embedded model).")
@click.option("--arch", default="gemma3", show_default=True, help="llama.cpp architecture of the base model.")
def register_cmd(name: str, peft_dir: Path, base: Path | None, arch: str) -> None:
    """Make an adapter servable by name: copy it, export its GGUF twin, record its base fingerprint."""
    from .adapters import register

    try:
        entry = register(name, peft_dir, base, arch)
    except (ValueError, OSError, KeyError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"registered {entry.name}: rank {entry.rank}, base {entry.base}, targets {', '.join(entry.targets)}")


@main.command("ship")
@click.argument("peft_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--name", default=None, help="Adapter name (default: the daemon's DEFAULT_ADAPTER_NAME, npc-default).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Its `zyke-train evaluate --report` JSON: the table is recorded in the manifest.")
@click.option("--recipe", default=None, help="The command that reproduces it, recorded in the manifest.")
def ship_cmd(peft_dir: Path, name: str | None, report_path: Path | None, recipe: str | None) -> None:
    """Ship an adapter inside the installed package (zyke_models/shipped_adapters), in half precision."""
    from zyke_models.names import DEFAULT_ADAPTER_NAME

    from .ship import load_report, ship

    try:
        entry = ship(peft_dir, name or DEFAULT_ADAPTER_NAME, recipe=recipe, report=load_report(report_path))
    except (ValueError, OSError, KeyError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"shipped {entry.name}: rank {entry.rank}, base {entry.base}, files {', '.join(entry.sha256)}")


@main.command("adapters")
def adapters_cmd() -> None:
    """List the registered adapters."""
    from .adapters import default_registry

    entries = default_registry().entries()
    if not entries:
        click.echo("no adapters registered (zyke-train register NAME PEFT_DIR)")
    for name, (root, entry) in sorted(entries.items()):
        click.echo(f"{name}\trank {entry.rank}\tbase {entry.base}\t{root / name}")


@main.command("merge")
@click.argument("peft_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Checkpoint dir to write.")
@click.option("--base", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Base checkpoint (default: the embedded model's transformers checkpoint).")
def merge_cmd(peft_dir: Path, out: Path, base: Path | None) -> None:
    """Fold an adapter into its base and save a plain transformers checkpoint."""
    from .adapters import merge

    click.echo(f"wrote {merge(peft_dir, out, base)}")


def _load_yaml_config(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    """``--config file.yaml``: its keys become the command's defaults, so any flag given on the command line
    wins. Keys may be spelled like the flags (``lora-r``) or like Python (``lora_r``)."""
    if value is None:
        return None
    try:
        import yaml
    except ImportError as exc:
        raise click.BadParameter("reading a YAML config needs pyyaml: pip install pyyaml") from exc
    try:
        data = yaml.safe_load(value.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read {value}: {exc}") from exc
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value} must hold a mapping of option names to values")
    names = {p.name for p in ctx.command.params}
    defaults: dict[str, object] = {}
    for key, val in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise click.BadParameter(f"{value}: unknown option {key!r}")
        if name == "lora_target_modules" and isinstance(val, list):
            val = ",".join(map(str, val))
        if name == "max_action_share" and isinstance(val, dict):
            val = [f"{k}={v}" for k, v in val.items()]
        defaults[name] = val
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _parse_shares(values: tuple[str, ...] | list[str]) -> dict[str, float]:
    shares: dict[str, float] = {}
    for value in values:
        action, sep, share = str(value).partition("=")
        try:
            number = float(share)
        except ValueError:
            number = -1.0
        if not sep or not action.strip() or not 0.0 < number <= 1.0:
            raise click.BadParameter(f"expected ACTION=SHARE with 0 < SHARE <= 1, got {value!r}",
                                     param_hint="--max-action-share")
        shares[action.strip()] = number
    return shares


@main.command("train")
@click.option("--config", type=click.Path(dir_okay=False, exists=True, path_type=Path), is_eager=True,
              expose_value=False, callback=_load_yaml_config, help="YAML file of options (flags win over it).")
@click.option("--data", "data", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Training data, repeatable and mixable: JSONL of NPC dataset rows or rendered {prompt, completion} "
                   "(completion-only loss), JSONL of {\"text\": ...} rows or a `zyke-train blocks` folder "
                   "(loss on every token).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Checkpoints, the final adapter (OUTPUT_DIR/adapter) and train_log.json go here.")
@click.option("--model", default=None, help="HF model name or checkpoint dir (default: the embedded Gemma 3 270M).")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (overrides --epochs).")
@click.option("--lr", type=float, default=5e-4, show_default=True, help="Peak learning rate (warmup, then cosine).")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Examples per micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--max-length", type=int, default=512, show_default=True,
              help="Tokens per example; longer prompts lose their oldest tokens.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-every", type=int, default=50, show_default=True, help="Checkpoint every N steps.")
@click.option("--keep-checkpoints", type=int, default=2, show_default=True)
@click.option("--resume-latest", is_flag=True, help="Continue from the newest checkpoint in --output-dir.")
@click.option("--init-adapter", default=None, metavar="ADAPTER",
              help="Start from this adapter's weights (PEFT folder or registered name, e.g. npc-default) instead "
                   "of a fresh LoRA; its own rank and modules apply.")
@click.option("--warmup-ratio", type=float, default=0.05, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--lora-r", type=int, default=16, show_default=True)
@click.option("--lora-alpha", type=float, default=32.0, show_default=True)
@click.option("--lora-dropout", type=float, default=0.05, show_default=True)
@click.option("--lora-target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
              show_default=True, help="Comma-separated module names.")
@click.option("--lora-layers", type=int, default=None,
              help="Adapt only the last N blocks (cheaper backward on a CPU; default: all).")
@click.option("--decision-weight", type=float, default=1.0, show_default=True,
              help="Loss weight of the tokens spelling the reply's emotion and action (1: plain average).")
@click.option("--max-action-share", "max_action_share", multiple=True, metavar="ACTION=SHARE",
              help="Subsample rows with this action to at most SHARE of each epoch (e.g. none=0.35); repeatable.")
@click.option("--qlora", is_flag=True, help="Load the base in 4-bit NF4 (bitsandbytes; CUDA only).")
@click.option("--log-to", type=click.Choice(["none", "tensorboard", "wandb"]), default="none", show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--adapter-name", default=None, help="Register the result for the daemon under this name.")
@click.option("--hf-push", "hf_push", default=None, metavar="REPO", help="Upload the adapter to this Hub repo.")
def train_cmd(data: tuple[Path, ...], output_dir: Path, adapter_name: str | None, hf_push: str | None,
              lora_target_modules: str, **options: object) -> None:
    """LoRA fine-tuning with completion-only loss; checkpoints are resumable and pickle-free."""
    from .errors import TrainError
    from .train import TrainConfig, iter_loss_lines, push_to_hub, register_adapter, train

    if not data:
        raise click.UsageError("give at least one --data file (or `data:` in --config)")
    targets = [t.strip() for t in lora_target_modules.split(",") if t.strip()]
    options["max_action_share"] = _parse_shares(options.get("max_action_share") or ())  # type: ignore[arg-type]
    config = TrainConfig(data=[str(p) for p in data], output_dir=str(output_dir), lora_target_modules=targets,
                         **options)  # type: ignore[arg-type]
    try:
        result = train(config, on_log=click.echo)
        for line in iter_loss_lines(result.losses):
            click.echo(line)
        click.echo(f"trained {result.steps} steps in {result.seconds:.0f} s "
                   f"({result.tokens / max(result.seconds, 1e-9):.0f} tokens/s); adapter: {result.adapter_dir}")
        if adapter_name:
            entry = register_adapter(adapter_name, result.adapter_dir, config.model)
            click.echo(f"registered {entry.name} (base {entry.base}): the daemon serves it by name")
        if hf_push:
            click.echo(f"pushed to {push_to_hub(hf_push, result.adapter_dir)}")
    except TrainError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("rl")
@click.option("--data", "data", multiple=True, required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Prompts: NPC dataset rows of the TRAINING split (their action is the label) and/or reward rows "
                   "from `zyke-train blocks --experience`; repeatable.")
@click.option("--adapter", "adapter", default="npc-default", show_default=True,
              help="Starting adapter: a PEFT folder or a registered name (copied; the source is never written).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="OUTPUT_DIR/adapter (the result), OUTPUT_DIR/start (the copy it started from), rl_log.json.")
@click.option("--model", default=None, help="Base model the adapter belongs to (default: the embedded Gemma 3 270M).")
@click.option("--max-steps", type=click.IntRange(1), default=20, show_default=True, help="GRPO optimizer steps.")
@click.option("--num-generations", type=click.IntRange(2), default=4, show_default=True,
              help="Samples per prompt that GRPO compares.")
@click.option("--max-completion-length", type=click.IntRange(8), default=64, show_default=True,
              help="Tokens per sample (generation also stops at the end of the reply line).")
@click.option("--prompts-per-step", type=click.IntRange(1), default=1, show_default=True)
@click.option("--lr", type=float, default=2e-5, show_default=True)
@click.option("--beta", type=float, default=0.04, show_default=True,
              help="KL coefficient towards the starting adapter (0: no anchor).")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N rows.")
@click.option("--max-action-share", "max_action_share", multiple=True, metavar="ACTION=SHARE",
              help="Subsample prompts labelled with this action to at most SHARE (e.g. none=0.2); repeatable.")
@click.option("--reward-weights", default=None, metavar="TERM=W,...",
              help="Override reward term weights (validity, action, feedback, repetition, length).")
@click.option("--min-say-chars", type=click.IntRange(0), default=2, show_default=True,
              help="Length band of `say` (the length term is 0 inside it).")
@click.option("--max-say-chars", type=click.IntRange(1), default=300, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--decide", type=click.Choice(["reply", "action"]), default="reply", show_default=True,
              help="Sample whole replies, or only the action after each row's own line and emotion.")
@click.option("--keep-below", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="With --decide action: train only on prompts whose label the starting adapter gives a "
                   "probability below this (the rest teach GRPO nothing).")
@click.option("--save-every", type=click.IntRange(1), default=None,
              help="Also save the adapter every N steps (OUTPUT_DIR/grpo/checkpoint-N), to evaluate along the way.")
@click.option("--adapter-name", default=None, help="Register the result for the daemon under this name.")
def rl_cmd(data: tuple[Path, ...], adapter: str, output_dir: Path, reward_weights: str | None,
           adapter_name: str | None, **options: object) -> None:
    """Improve a LoRA adapter from rewards with TRL's GRPO (KL-anchored to the starting adapter)."""
    from dataclasses import fields, replace

    from .errors import TrainError
    from .rewards import RewardWeights
    from .rl import RlConfig, RlError, rl
    from .train import register_adapter

    weights = RewardWeights()
    if reward_weights:
        names = {f.name for f in fields(RewardWeights)}
        updates: dict[str, float] = {}
        for item in reward_weights.split(","):
            key, sep, value = item.partition("=")
            try:
                if not sep or key.strip() not in names:
                    raise ValueError
                updates[key.strip()] = float(value)
            except ValueError:
                raise click.BadParameter(f"expected TERM=W with TERM one of {', '.join(sorted(names))}, got "
                                         f"{item!r}", param_hint="--reward-weights") from None
        weights = replace(weights, **updates)
    options["max_action_share"] = _parse_shares(options.get("max_action_share") or ())  # type: ignore[arg-type]
    config = RlConfig(data=[str(p) for p in data], output_dir=str(output_dir), adapter=adapter, weights=weights,
                      **options)  # type: ignore[arg-type]
    try:
        result = rl(config, on_log=click.echo)
        click.echo(f"rl: {result.steps} steps in {result.seconds:.0f} s; adapter: {result.adapter_dir}")
        if adapter_name:
            entry = register_adapter(adapter_name, result.adapter_dir, config.model)
            click.echo(f"registered {entry.name} (base {entry.base}): the daemon serves it by name")
    except (RlError, TrainError) as exc:
        raise click.ClickException(str(exc)) from exc


# -- data preparation: prepare, blocks, publish (logic in prepare.py, blocks.py, publish.py)


@main.command("prepare")
@click.option("--hub", "hub", multiple=True, metavar="NAME[:CONFIG][:SPLIT]",
              help="Hub dataset to stream, e.g. Skylion007/openwebtext, wikimedia/wikipedia:20231101.en; repeatable.")
@click.option("--local", "local", multiple=True, metavar="PATH",
              help="File or folder of .txt, .md, .jsonl (a text field) and .epub files; repeatable.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: JSONL shards, manifest.json, state.json (for resuming).")
@click.option("--weights", default=None, metavar="W1,W2,...|NAME=W,...",
              help="Share of --max-total per source: --hub sources first, then --local, or NAME=W pairs.")
@click.option("--max-total", default=None, metavar="CHARS",
              help="Cap on kept text in characters over all sources (5000000, 5M); split by --weights.")
@click.option("--lang", default="en", show_default=True, help="Keep only this language (ISO 639-1); 'any': off.")
@click.option("--profile", "profiles", multiple=True, metavar="SOURCE=web|books|dialogue",
              help="Quality thresholds for a source (default: web for --hub, books for --local).")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text in JSONL/Hub rows.")
@click.option("--minhash-threshold", type=float, default=0.8, show_default=True,
              help="Jaccard similarity (5-word shingles) from which a document counts as a near-duplicate.")
@click.option("--minhash-perms", type=int, default=128, show_default=True, help="MinHash permutations.")
@click.option("--shard-size", type=int, default=10_000, show_default=True, help="Rows per output shard.")
@click.option("--force", is_flag=True, help="Start over in an --out that holds a run with other arguments.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def prepare_cmd(ctx: click.Context, hub: tuple[str, ...], local: tuple[str, ...], out: Path, weights: str | None,
                max_total: str | None, lang: str, profiles: tuple[str, ...], text_field: str,
                minhash_threshold: float, minhash_perms: int, shard_size: int, force: bool, quiet: bool) -> None:
    """Build a cleaned, language-filtered, near-deduplicated text corpus (resumable; see training/PREPARE.md)."""
    from .errors import PrepareError
    from .prepare import Settings, make_sources, parse_size, prepare

    try:
        sources = make_sources(list(hub), list(local), weights, list(profiles), text_field)
        settings = Settings(lang=None if lang.lower() in ("any", "") else lang, max_total=parse_size(max_total),
                            shard_size=shard_size, minhash_threshold=minhash_threshold, num_perm=minhash_perms)
        manifest = prepare(sources, out, settings, force=force, progress=not quiet)
    except PrepareError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(2)
    if manifest.get("already_done"):
        click.echo(f"nothing new: every source in {out} was already finished")
    for name, entry in manifest["sources"].items():
        counts = entry["counts"]
        drops = ", ".join(f"{k.removeprefix('dropped_')} {v}" for k, v in counts.items() if k.startswith("dropped"))
        click.echo(f"{name}: read {counts.get('read', 0)}, kept {counts.get('kept', 0)}"
                   f" ({counts.get('kept_chars', 0)} chars){'; dropped ' + drops if drops else ''}")
    totals = manifest["totals"]
    click.echo(f"total: kept {totals.get('kept', 0)} rows in {len(manifest['shards'])} shards "
               f"({manifest['new_rows']} new); manifest {out / 'manifest.json'}")


@main.command("blocks")
@click.argument("prepared", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: blocks-NNNNN.safetensors + manifest.json (and npc_rows.jsonl, reward_rows.jsonl "
                   "with --experience).")
@click.option("--tokenizer", default=None, help="Tokenizer or checkpoint folder (default: the embedded model's).")
@click.option("--seq-len", "--block-size", "block_size", type=int, default=512, show_default=True,
              help="Tokens per block.")
@click.option("--blocks-per-shard", type=int, default=4096, show_default=True)
@click.option("--steps-per-block", type=int, default=1, show_default=True,
              help="Optimizer steps a worker spends on one block (recorded in the manifest for the trainer).")
@click.option("--env-id", default=None, help="The game (environment) the text is for, recorded in the manifest.")
@click.option("--npc-type", default=None, help="The kind of NPC the text is for, recorded in the manifest.")
@click.option("--no-bos", is_flag=True, help="Do not start each document with BOS.")
@click.option("--experience", "experience", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Recorded experience JSONL (docs/EXPERIENCE.md): write NPC rows and reward rows; repeatable.")
@click.option("--min-reward", type=float, default=0.5, show_default=True,
              help="An unlabelled experience record becomes an NPC row from this mean reward up.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def blocks_cmd(ctx: click.Context, prepared: Path | None, out: Path, tokenizer: str | None, block_size: int,
               blocks_per_shard: int, steps_per_block: int, env_id: str | None, npc_type: str | None, no_bos: bool,
               experience: tuple[Path, ...], min_reward: float, quiet: bool) -> None:
    """Tokenize a prepared corpus into fixed-length int32 blocks (safetensors shards + manifest), and/or turn
    recorded experience into NPC training rows and reward rows (--experience)."""
    from .blocks import BlocksError, make_blocks

    if prepared is None and not experience:
        raise click.UsageError("give a PREPARED corpus, --experience FILE, or both")
    if experience:
        from .experience import ExperienceError, convert

        try:
            report = convert(experience, out, min_reward)
        except ExperienceError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        c = report["counts"]
        click.echo(f"experience: {c['records']} records ({c['labelled']} labelled, {c['skipped_lines']} lines "
                   f"skipped) -> {c['npc_rows']} NPC rows in {out / 'npc_rows.jsonl'}, {c['reward_rows']} reward "
                   f"rows in {out / 'reward_rows.jsonl'}")
    if prepared is None:  # --experience alone (without either, the check above raised): nothing to tokenize
        return
    try:
        manifest = make_blocks(prepared, out, tokenizer, block_size, blocks_per_shard, bos=not no_bos,
                               progress=not quiet, steps_per_block=steps_per_block, env_id=env_id,
                               npc_type=npc_type)
    except BlocksError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(2)
    click.echo(f"{manifest['counts']['rows']} rows, {manifest['counts']['documents']} documents -> "
               f"{manifest['blocks']} blocks of {block_size} tokens in {len(manifest['shards'])} shards "
               f"({manifest['dropped_tail_tokens']} tail tokens dropped); manifest {out / 'manifest.json'}")


@main.command("publish")
@click.argument("adapter")
@click.option("--repo-id", required=True, metavar="ORG/NAME", help="Hub model repo to create or update.")
@click.option("--eval-report", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Evaluation report JSON for the card (default: eval_report.json in the adapter's folder).")
@click.option("--base-model", default=None, metavar="HUB_ID", help="base_model for the card's metadata.")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--dry-run", is_flag=True, help="Only write the folder that would be uploaded and list it.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to build the upload folder (default: ./publish-ADAPTER).")
def publish_cmd(adapter: str, repo_id: str, eval_report: Path | None, base_model: str | None, private: bool,
                dry_run: bool, out: Path | None) -> None:
    """Push a registered adapter (PEFT files, GGUF twin, model card) to the Hugging Face Hub."""
    from .publish import PublishError, build_folder, upload

    folder = out or Path(f"publish-{adapter}")
    try:
        files = build_folder(adapter, folder, repo_id, eval_report, base_model)
        for f in files:
            click.echo(f"{f}\t{f.stat().st_size} bytes")
        if dry_run:
            click.echo(f"dry run: {len(files)} files in {folder} would be uploaded to {repo_id}")
            return
        click.echo(f"uploaded: {upload(folder, repo_id, private=private)}")
    except PublishError as exc:
        raise click.ClickException(str(exc)) from exc


@main.group("trainer")
def trainer_group() -> None:
    """The shared (federated) trainer: rounds of FFA-LoRA updates from contributing workers."""


@trainer_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, envvar="TRAINER_HOST",
              help="Interface to bind; anything but loopback exposes the trainer to the network.")
@click.option("--port", default=8731, show_default=True, envvar="TRAINER_PORT", help="Port (0: any free one).")
@click.option("--port-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the bound port here once listening (for --port 0).")
@click.option("--checkpoint-dir", required=True, envvar="CHECKPOINT_DIR",
              type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoints, accepted updates and the round journal.")
@click.option("--base", envvar="TRAINER_BASE", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Base transformers checkpoint (default: the embedded model's).")
@click.option("--data", envvar="TRAINER_DATA", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="JSONL of NPC rows or rendered {prompt, completion} examples handed out in tasks.")
@click.option("--blocks", envvar="TRAINER_BLOCKS", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="A zyke-train blocks folder: tasks name its blocks by reference (workers need a copy, "
                   "contribute --blocks-dir). With --data too, each task carries a slice of both.")
@click.option("--token", "tokens", multiple=True, envvar="TRAINER_TOKENS",
              help="A worker token (repeat; the env var takes them space-separated).")
@click.option("--num-tasks-per-round", default=2, show_default=True, envvar="NUM_TASKS_PER_ROUND",
              type=click.IntRange(1))
@click.option("--round-timeout-sec", default=600.0, show_default=True, envvar="ROUND_TIMEOUT_SEC", type=float)
@click.option("--min-updates-per-round", default=1, show_default=True, envvar="MIN_UPDATES_PER_ROUND",
              type=click.IntRange(1))
@click.option("--tick-interval-sec", default=5.0, show_default=True, envvar="TICK_INTERVAL_SEC", type=float)
@click.option("--max-staleness", default=2, show_default=True, envvar="MAX_STALENESS", type=click.IntRange(0))
@click.option("--delta-norm-max", default=10.0, show_default=True, envvar="DELTA_NORM_MAX", type=float)
@click.option("--max-body-bytes", default=64 << 20, show_default=True, envvar="MAX_BODY_BYTES", type=click.IntRange(1))
@click.option("--aggregation", default="mean", show_default=True, envvar="AGGREGATION",
              type=click.Choice(["mean", "trimmed_mean", "median"]))
@click.option("--trim-fraction", default=0.1, show_default=True, envvar="TRIM_FRACTION", type=float)
@click.option("--server-lr", default=1.0, show_default=True, envvar="SERVER_LR", type=float)
@click.option("--rank", default=4, show_default=True, envvar="LORA_R", type=click.IntRange(1))
@click.option("--alpha", default=8.0, show_default=True, envvar="LORA_ALPHA", type=float)
@click.option("--target-modules", default="q_proj,v_proj", show_default=True, envvar="TARGET_MODULES")
@click.option("--seed", default=0, show_default=True, envvar="SEED", help="Seed of the frozen LoRA A matrices.")
@click.option("--examples-per-task", default=8, show_default=True, envvar="EXAMPLES_PER_TASK", type=click.IntRange(1))
@click.option("--blocks-per-task", default=4, show_default=True, envvar="BLOCKS_PER_TASK", type=click.IntRange(1))
@click.option("--local-steps", default=2, show_default=True, envvar="LOCAL_STEPS", type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, envvar="LOCAL_LR", type=float)
@click.option("--max-seq-len", default=256, show_default=True, envvar="MAX_SEQ_LEN", type=click.IntRange(8))
@click.option("--adapter-name", default="zyke-shared", show_default=True, envvar="ADAPTER_NAME",
              help="Name each new version is registered under for the daemon ('' to skip registering).")
def trainer_serve_cmd(host: str, port: int, port_file: Path | None, base: Path | None, tokens: tuple[str, ...],
                      target_modules: str, adapter_name: str, **settings: object) -> None:
    """Serve the shared trainer over HTTP (FastAPI; OpenAPI description at /openapi.json)."""
    import logging
    import socket

    import uvicorn

    from .federated.server import TrainerConfig, create_app

    if settings.get("data") is None and settings.get("blocks") is None:
        raise click.UsageError("give --data (examples), --blocks (a zyke-train blocks folder) or both")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if base is None:
        from zyke_models.hf_checkpoint import embedded_hf_checkpoint

        base = embedded_hf_checkpoint()
    split = [t for value in tokens for t in value.split()]
    try:
        config = TrainerConfig(base=base, tokens=split, target_modules=[m for m in target_modules.split(",") if m],
                               adapter_name=adapter_name or None, **settings)  # type: ignore[arg-type]
        app = create_app(config)
    except (ValueError, OSError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    if port_file is not None:
        port_file.write_text(str(bound))
    click.echo(f"trainer listening on http://{host}:{bound} (version {app.state.trainer.store.version})")
    uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])


@main.command("contribute")
@click.option("--trainer-url", required=True, envvar="ZYKE_TRAINER_URL", help="e.g. http://127.0.0.1:8731")
@click.option("--num-tasks", default=1, show_default=True, type=click.IntRange(1))
@click.option("--token", envvar="ZYKE_TRAINER_TOKEN", help="Worker token from the trainer's operator.")
@click.option("--base", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Local copy of the trainer's base checkpoint (default: the embedded model's).")
@click.option("--blocks-dir", envvar="ZYKE_TRAINER_BLOCKS_DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Local copy of the trainer's blocks folder, for tasks that name blocks by reference.")
def contribute_cmd(trainer_url: str, num_tasks: int, token: str | None, base: Path | None,
                   blocks_dir: Path | None) -> None:
    """Train tasks from a shared trainer locally and send back the updates (FFA-LoRA ΔB)."""
    from .federated.worker import ContributeError, contribute

    try:
        outcomes = contribute(trainer_url, token, num_tasks, base, on_event=click.echo, blocks_dir=blocks_dir)
    except ContributeError as exc:
        raise click.ClickException(str(exc)) from exc
    done = sum(o.status in ("accepted", "duplicate") for o in outcomes)
    click.echo(f"done: {done}/{len(outcomes)} updates accepted")
    if done < len(outcomes):
        raise SystemExit(1)


@main.command("converse")
@click.option("--script", "script_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("training/data/conversations.jsonl"), show_default=True,
              help="Scripted conversations, one JSON object a line: {id, npc, turns, repeat_ok}.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the full JSON report (every turn, every overlap, the summary) here.")
@click.option("--url", default=None, help="Daemon URL (default: ZYKE_URL or the running daemon; none: start one).")
@click.option("--token", default=None, help="Daemon token (default: ZYKE_TOKEN or the daemon's token file).")
@click.option("--adapter", default=None, help="Adapter for every line (default: whatever the daemon serves).")
@click.option("--max-tokens", type=click.IntRange(1, 1024), default=60, show_default=True, help="Per reply.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Run only the first N scripts.")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds one reply may take (a busy CPU queues lines; the SDK's 60 s default is too tight).")
@click.pass_context
def converse_cmd(ctx: click.Context, script_path: Path, report_path: Path | None, url: str | None,
                 token: str | None, adapter: str | None, max_tokens: int, limit: int | None, timeout: float) -> None:
    """Hold scripted conversations with the real daemon and count replies that repeat an earlier one.

    A reply repeats when it shares a word 6-gram with an earlier reply of the same conversation (turns in
    the script's repeat_ok, where the player asks for a repeat, are not checked). Exit code 0 even when
    repeats are found (this is a measurement); 2 when the script file is bad or the daemon cannot be reached.
    """
    import sys

    from zyke import AuthenticationError, Client, ConnectionLost, DaemonNotRunning, ZykeError

    from . import converse as cv

    try:
        scripts = cv.load_scripts(script_path)[:limit]
    except cv.ScriptError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(2)
    results: list[cv.ConversationResult] = []
    daemon: dict[str, str] = {}
    try:
        # no --url: autostart, so the command works on a machine where no daemon runs yet
        with Client(url, token, game="converse", timeout=timeout, autostart=url is None) as client:
            info = client.connect()
            daemon |= {"version": info.daemon_version, "model": info.model.name, "backend": info.backend,
                      "url": client.url}
            click.echo(f"zyke-daemon {info.daemon_version} at {client.url}: {info.model.name} on {info.backend}")
            with click.progressbar(length=sum(len(s.turns) for s in scripts), label="turns",
                                   file=sys.stderr) as bar:
                for script in scripts:
                    results.append(cv.converse(client, script, max_tokens=max_tokens, adapter=adapter,
                                               on_turn=lambda: bar.update(1)))
    except (DaemonNotRunning, ConnectionLost, AuthenticationError) as exc:
        click.echo(f"error: cannot reach the Zyke daemon ({url or 'autostart'}): {exc}", err=True)
        ctx.exit(2)
    except ZykeError as exc:  # e.g. an unknown --adapter: the daemon answered, the request was wrong
        raise click.ClickException(f"the daemon refused a line: {exc}") from exc
    click.echo(cv.format_table(results))
    if report_path is not None:
        report = cv.build_report(results, script_path=str(script_path), max_tokens=max_tokens,
                                 requested_adapter=adapter, daemon=daemon)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        click.echo(f"report: {report_path}")


@main.command("evaluate")
@click.option("--npc", "npc_files", type=click.Path(dir_okay=False, exists=True, path_type=Path), multiple=True,
              help="NPC scenarios (dataset rows, e.g. training/data/npc_heldout.jsonl), served by the daemon backend; "
                   "repeatable (each file is also reported as its own group).")
@click.option("--seen-data", "seen_files", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              multiple=True, help="Training files: report scenarios with seen and unseen personas and action names "
                                  "separately; repeatable.")
@click.option("--score-actions", is_flag=True,
              help="Also pick each reply's action by the likelihood of every allowed label, to compare with greedy.")
@click.option("--adapter", "adapters", multiple=True,
              help="Registered adapter name to compare with the base model; repeatable.")
@click.option("--no-base", is_flag=True, help="Skip the base model (adapters only).")
@click.option("--baseline", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Reuse the base model's NPC results from an earlier report (same scenarios and backend).")
@click.option("--backend", type=click.Choice(["llama.cpp", "transformers"]), default="llama.cpp", show_default=True,
              help="The daemon backend to serve the scenarios with.")
@click.option("--model", default=None, help="Base model (default: the embedded model).")
@click.option("--max-tokens", type=int, default=96, show_default=True, help="Per reply, as the daemon's default.")
@click.option("--limit", type=int, default=None, help="Use only the first N scenarios / texts.")
@click.option("--perplexity", "ppl_sources", multiple=True,
              help="A local .txt/.jsonl file, or wikitext2, wikitext103, c4, lambada (needs `datasets` and the net).")
@click.option("--lm-eval-tasks", default=None, help="Comma-separated lm-evaluation-harness tasks (needs lm_eval).")
@click.option("--threads", type=int, default=None, help="CPU threads for the backend.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the full JSON report here.")
def evaluate_cmd(npc_files: tuple[Path, ...], seen_files: tuple[Path, ...], score_actions: bool,
                 adapters: tuple[str, ...], no_base: bool, baseline: Path | None,
                 backend: str, model: str | None,
                 max_tokens: int, limit: int | None, ppl_sources: tuple[str, ...], lm_eval_tasks: str | None,
                 threads: int | None, report_path: Path | None) -> None:
    """Compare the base model and registered adapters: NPC scenarios, perplexity, lm-eval tasks."""
    import sys

    from . import evaluate as ev

    if not (npc_files or ppl_sources or lm_eval_tasks):
        raise click.UsageError("nothing to evaluate: give --npc, --perplexity or --lm-eval-tasks")
    names: list[str | None] = ([] if no_base else [None]) + list(adapters)
    npc_names = [n for n in names if n is not None] if baseline else names
    report: dict[str, object] = {"created": ev.timestamp(), "models": [n or "base" for n in names]}
    try:
        if npc_files:
            scenarios, groups = ev.load_scenario_files(npc_files, limit, seen_files)
            files = ", ".join(map(str, npc_files))
            with click.progressbar(length=len(scenarios) * len(npc_names), label="scenarios",
                                   file=sys.stderr) as bar:
                npc = ev.run_npc_eval(scenarios, npc_names, backend, model, max_tokens, threads,
                                      progress=lambda *_: bar.update(1), score_actions=score_actions,
                                      groups=groups)
            if baseline is not None:
                npc = ev.merge_baseline(npc, json.loads(baseline.read_text(encoding="utf-8")), files)
            report["npc"] = {"scenarios_file": files, **npc}
            click.echo(f"NPC evaluation: {len(scenarios)} scenarios from {files}, backend {backend}")
            click.echo(ev.format_table(npc))
            for group in groups:
                click.echo(f"\n{group} ({len(groups[group])} scenarios)")
                click.echo(ev.format_table({"results": {k: v["groups"][group] for k, v in npc["results"].items()
                                                        if group in v.get("groups", {})}}))
            if report_path is not None:  # written now too, so a slow perplexity run cannot lose these results
                report_path.parent.mkdir(parents=True, exist_ok=True)
                report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if ppl_sources:
            report["perplexity"] = ev.perplexity_report(ppl_sources, names, model, limit, on_log=click.echo)
        if lm_eval_tasks:
            tasks = [t.strip() for t in lm_eval_tasks.split(",") if t.strip()]
            report["lm_eval"] = ev.lm_eval_report(tasks, names, model, limit, on_log=click.echo)
    except ev.EvalError as exc:
        raise click.ClickException(str(exc)) from exc
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        click.echo(f"report: {report_path}")
