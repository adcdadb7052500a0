"""``zyke-train``: datasets, LoRA training, evaluation and export.

A thin click shell: each subcommand parses flags, calls pure functions in a module of its own
(``npc_data`` for ``npc-data``) and prints. To add a subcommand, write its logic in a new module and
register a function here with ``@main.command("name")``.
"""

from __future__ import annotations

import json
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
        with click.progressbar(length=total, label="checking rows", file=click.get_text_stream("stderr")) as bar:
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
