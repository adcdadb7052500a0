"""``zyke-daemon``: start, stop and inspect the local daemon."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click
from zyke.paths import data_dir, read_runtime

from . import __version__
from .config import load_config
from .errors import ModelLoadError
from .safety import rails_for


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zyke-daemon")
def cli() -> None:
    """The Zyke daemon: NPC replies from a local model, over WebSocket."""


@cli.command()
@click.option("--host", help="Address to bind (default 127.0.0.1; anything else exposes the daemon).")
@click.option("--port", type=int, help="Port (default 7341; 0 picks a free one).")
@click.option("--model", help="A GGUF file (llama.cpp), or a checkpoint directory or Hugging Face Hub name "
              "(transformers). Default: the embedded Gemma 3 270M.")
@click.option("--backend", type=click.Choice(["auto", "llama.cpp", "transformers"]),
              help="Model backend (auto: transformers on a CUDA GPU, llama.cpp otherwise).")
@click.option("--device", help="transformers: auto (cuda > mps > cpu), cuda, cuda:N, mps or cpu.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
              help="transformers: weight dtype (auto: bfloat16 on CUDA, float32 elsewhere).")
@click.option("--quantization", type=click.Choice(["4bit", "8bit"]),
              help="transformers: load the weights quantized with bitsandbytes (pip install 'zyke[gpu]').")
@click.option("--attn-implementation", "attn_implementation",
              type=click.Choice(["flash_attention_2", "sdpa", "eager"]),
              help="transformers: attention kernel (default: flash_attention_2 when installed, else sdpa).")
@click.option("--compile/--no-compile", "compile", default=None, help="transformers: torch.compile the model.")
@click.option("--threads", "n_threads", type=int, help="CPU threads for llama.cpp.")
@click.option("--allow-origin", "allowed_origins", multiple=True,
              help="A browser Origin allowed to connect (repeatable). Browsers are refused otherwise.")
@click.option("--allow-host", "allowed_hosts", multiple=True,
              help="A Host header name the daemon answers besides loopback names (repeatable; '*' for any). "
                   "Guards /health and /metrics against DNS rebinding.")
@click.option("--max-connections", "max_connections", type=int,
              help="WebSocket connections served at once (default 64); more get too_many_connections.")
@click.option("--rate-limit", "rate_limit_per_s", type=float,
              help="Frames per second one connection may send, sustained (default 100; bursts of 200; 0: off).")
@click.option("--adapter-dir", "adapter_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Another directory with a manifest.json of LoRA adapters (repeatable).")
@click.option("--default-adapter", "default_adapter",
              help="Adapter for NPCs that name none (default: the shipped npc-default on the embedded model; "
                   "'none' serves the bare base model).")
@click.option("--audience", type=click.Choice(["minor", "teen", "adult"]),
              help="Who the game is for (default minor): what the safety rails block; an NPC can only narrow it.")
@click.option("--safe-mode/--no-safe-mode", "safe_mode", default=None,
              help="Safety rails on (default) or off for every NPC; see docs/SAFETY.md.")
@click.option("--record-experience/--no-record-experience", "record_experience", default=None,
              help="Record the replies of NPCs defined with record: true, and the game's feedback on them, in "
                   "<data dir>/experience (off by default; docs/EXPERIENCE.md).")
@click.option("--detach", is_flag=True, help="Run in the background and return once the model is ready.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Log verbosity.")
def start(detach: bool, **flags: Any) -> None:
    """Start the daemon (config: flags > ZYKE_* env vars > daemon.toml in the config dir)."""
    flags["allowed_origins"] = flags["allowed_origins"] or None
    flags["allowed_hosts"] = flags["allowed_hosts"] or None
    flags["adapter_dirs"] = flags["adapter_dirs"] or None
    try:
        config = load_config(flags)
        rails_for(config)  # a broken safety.toml stops the start here, not at the first NPC line
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise click.ClickException(str(exc)) from exc
    running = _health()
    if running is not None:
        raise click.ClickException(f"a daemon is already running (pid {running[0].get('pid')}); "
                                   "stop it with: zyke-daemon stop")
    if detach:
        _start_detached()
        return
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .app import run_daemon

    try:
        asyncio.run(run_daemon(config))
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from exc


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the health document as JSON.")
def status(as_json: bool) -> None:
    """Say whether a daemon is running, and on what model. Exit code 1 when none is."""
    found = _health()
    if found is None:
        click.echo("not running (start it with: zyke-daemon start)", err=True)
        sys.exit(1)
    runtime, health = found
    if as_json:
        click.echo(json.dumps(health | {"pid": runtime.get("pid"), "port": runtime.get("port")}))
    else:
        click.echo(f"{health['status']}: ws://{runtime['host']}:{runtime['port']} pid {runtime.get('pid')} "
                   f"model {health.get('model', '-')} backend {health.get('backend', '-')} "
                   f"up {health['uptime_s']:.0f}s")


@cli.command()
@click.option("--timeout", default=15.0, show_default=True, help="Seconds to wait for it to exit.")
def stop(timeout: float) -> None:
    """Stop the running daemon (SIGTERM, then wait)."""
    runtime = read_runtime()
    if not runtime or not _alive(runtime.get("pid")):
        click.echo("not running", err=True)
        sys.exit(1)
    pid = int(runtime["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise click.ClickException(f"daemon pid {pid} did not exit within {timeout:g} s")
        time.sleep(0.1)
    click.echo(f"stopped (pid {pid})")


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited process not yet reaped by its parent (a zombie) still answers kill(0)
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _health() -> tuple[dict[str, Any], dict[str, Any]] | None:
    runtime = read_runtime()
    if not runtime or not _alive(runtime.get("pid")):
        return None
    host = "127.0.0.1" if runtime["host"] in ("0.0.0.0", "::") else runtime["host"]
    try:
        with urllib.request.urlopen(f"http://{host}:{runtime['port']}/health", timeout=3) as resp:
            return runtime, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return runtime, json.loads(exc.read() or b"{}") | {"status": "error"}
    except (OSError, ValueError):
        return None


def _start_detached() -> None:
    log_path = data_dir() / "daemon.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    args = [a for a in sys.argv[1:] if a != "--detach"]
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "zyke_daemon", *args], stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    with click.progressbar(length=1, label="starting zyke-daemon", file=sys.stderr) as bar:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise click.ClickException(f"the daemon exited with code {proc.returncode}; see {log_path}")
            found = _health()
            if found and found[0].get("pid") == proc.pid and found[1]["status"] == "ready":
                bar.update(1)
                break
            time.sleep(0.2)
        else:
            raise click.ClickException(f"the daemon did not become ready; see {log_path}")
    runtime = found[0]
    click.echo(f"zyke-daemon ready on ws://{runtime['host']}:{runtime['port']} (pid {proc.pid}, log {log_path})")


@cli.group()
def experience() -> None:
    """Recorded play experience (docs/EXPERIENCE.md): where it is, export it, delete it."""


@experience.command("path")
def experience_path_cmd() -> None:
    """Print the experience file's path (it exists once a reply was recorded)."""
    from .experience import experience_path

    click.echo(str(experience_path()))


@experience.command("export")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the records to this file (default: standard output).")
def experience_export(out: Path | None) -> None:
    """Write every valid record, its feedback merged in, as experience JSONL (format v1).

    Lines the reader refuses (a torn last line, a bad record) are left out and counted on stderr, so what is
    exported is exactly what zyke-train reads."""
    from zyke.experience import ExperienceError, read_experience

    from .experience import experience_path

    path = experience_path()
    if not path.exists():
        click.echo(f"no experience recorded ({path} does not exist)", err=True)
        return
    try:
        result = read_experience([path])
    except ExperienceError as exc:
        raise click.ClickException(str(exc)) from exc
    lines = "".join(json.dumps(r.model_dump(mode="json", exclude_none=True), ensure_ascii=False) + "\n"
                    for r in result.records)
    if out is None:
        click.echo(lines, nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(lines, encoding="utf-8")
    rated = sum(1 for r in result.records if r.feedback)
    click.echo(f"exported {len(result.records)} records ({rated} rated) from {path}"
               + (f" to {out}" if out else "") + (f"; skipped {len(result.problems)} bad lines" if result.problems
                                                  else ""), err=True)
    for problem in result.problems[:10]:
        click.echo(f"  skipped {problem}", err=True)


@experience.command("clear")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def experience_clear(yes: bool) -> None:
    """Delete the recorded experience (the player's right: nothing of it is kept anywhere else)."""
    from zyke.experience import ExperienceError, read_experience

    from .experience import experience_dir

    files = sorted(experience_dir().glob("*.jsonl")) if experience_dir().is_dir() else []
    if not files:
        click.echo("no experience recorded; nothing to delete")
        return
    try:
        records: int | str = len(read_experience(files).records)
    except ExperienceError:  # too large or a newer format: still the player's to delete
        records = "an unknown number of"
    if not yes:
        click.confirm(f"delete {records} recorded replies ({', '.join(str(f) for f in files)})?", abort=True)
    for file in files:
        file.unlink(missing_ok=True)
    click.echo(f"deleted {records} records ({len(files)} file{'s' if len(files) != 1 else ''})")


def main() -> None:
    cli()
