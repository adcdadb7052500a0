"""Daemon settings: defaults, then the TOML file in the user config dir, then ZYKE_* env vars, then flags.

Flags win because a developer typing a command means it; env vars beat the file so a launcher or a
test can override one value without editing anything.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from zyke.paths import DEFAULT_PORT, config_dir

# The default adapter's name and the reserved "base" (defined with the adapter registry, zyke_models.names).
from zyke_models.names import BASE_ADAPTER as BASE_ADAPTER
from zyke_models.names import DEFAULT_ADAPTER_NAME as DEFAULT_ADAPTER_NAME


@dataclass(frozen=True)
class DaemonConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    model: str | None = None  # None: the embedded Gemma 3 270M; transformers also takes a Hub name or a checkpoint dir
    backend: str = "auto"  # auto: transformers on a CUDA machine with torch, llama.cpp otherwise
    device: str = "auto"  # transformers: auto (cuda > mps > cpu), cuda, cuda:1, mps, cpu
    dtype: str = "auto"  # transformers: auto (bfloat16 on CUDA, float32 elsewhere), bfloat16, float16, float32
    quantization: str | None = None  # transformers: None, 4bit (NF4) or 8bit, via bitsandbytes
    attn_implementation: str | None = None  # transformers: None picks flash_attention_2 when installed, else sdpa
    compile: bool = False  # transformers: torch.compile the model
    log_level: str = "info"
    n_ctx: int = 4096
    n_threads: int | None = None  # None: llama.cpp's own choice
    max_frame_bytes: int = 64 * 1024
    max_queued_per_client: int = 8
    request_timeout_s: float = 120.0  # counted from arrival: time in the queue counts
    # Caps on what one client can cost the daemon (docs/RELIABILITY.md). Each is far above what a game does:
    # a game opens one or two connections, defines its NPCs in a burst and then says a line every few seconds.
    max_connections: int = 64  # more are answered too_many_connections and closed (1013)
    rate_limit_per_s: float = 100.0  # frames per second per connection, sustained; beyond: rate_limited
    rate_limit_burst: int = 200  # frames a connection may send at once before the rate applies
    hello_timeout_s: float = 10.0  # a connection that has not authenticated by then is closed (1008)
    max_auth_failures: int = 3  # wrong tokens on one connection before it is closed (1008)
    max_send_queue_bytes: int = 4 * 1024 * 1024  # answers waiting for a client that does not read (1008)
    max_history: int = 12
    # Priorities (docs/SCHEDULING.md): foreground lines first, background chatter short, late or never.
    #: a waiting priority level is served at least once every this many admissions of more urgent ones (0: never)
    starve_after: int = 4
    #: per-reply token caps by priority (None: only the request's own max_tokens): short barks for background
    background_max_tokens: int | None = 48
    normal_max_tokens: int | None = None
    #: a background line that names no deadline_ms is dropped (expired) after waiting this long (None: never)
    background_deadline_ms: int | None = None
    #: lower-priority replies in the batch wait while a foreground reply decodes its first tokens (0: off)
    foreground_solo_tokens: int = 8
    #: daemon-wide decode budget for background replies, tokens per second (None: unlimited)
    background_tokens_per_s: float | None = None
    allowed_origins: tuple[str, ...] = field(default_factory=tuple)
    #: Host header names answered besides the loopback ones and the bound host ("*": any). A web page that
    #: rebinds its own name to 127.0.0.1 sends its name as Host, so checking it keeps /health and /metrics local.
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)
    adapter_dirs: tuple[str, ...] = field(default_factory=tuple)  # besides <data dir>/adapters
    max_loaded_adapters: int = 8
    #: the adapter NPCs use when neither the game nor the NPC names one; "none" turns it off. Applied only
    #: when it is registered for the model being served (the shipped one fits the embedded model).
    default_adapter: str | None = DEFAULT_ADAPTER_NAME
    token: str | None = None  # None: ZYKE_TOKEN or the token file
    #: Safety rails (docs/SAFETY.md): who the game is for (minor, teen or adult; an NPC may only narrow it),
    #: and the switch for all rails. Only this configuration sets them: nothing a client sends can loosen them.
    audience: str = "minor"
    safe_mode: bool = True
    #: the studio's own blocked and allowed words (TOML); None: safety.toml in the config dir when it exists
    safety_file: str | None = None
    #: Experience recording (docs/EXPERIENCE.md), opt-in twice: with this on, the replies of NPCs defined with
    #: ``record: true`` (and the feedback on them) are appended to <data dir>/experience/experience.jsonl.
    record_experience: bool = False

    @property
    def is_loopback(self) -> bool:
        return self.host in {"127.0.0.1", "localhost", "::1"}


def config_file() -> Path:
    return Path(os.environ.get("ZYKE_CONFIG_FILE") or config_dir() / "daemon.toml")


def _coerce(name: str, raw: Any) -> Any:
    kind = {f.name: f.type for f in fields(DaemonConfig)}[name]
    if raw is None or (name == "default_adapter" and str(raw).strip().lower() in {"", "none"}):
        return None
    if "tuple" in str(kind):
        items = raw.split(",") if isinstance(raw, str) else raw
        return tuple(str(i).strip() for i in items if str(i).strip())
    if kind.startswith("bool"):
        if isinstance(raw, str):
            if raw.strip().lower() not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
                raise ValueError(f"{name}: expected true or false, got {raw!r}")
            return raw.strip().lower() in {"1", "true", "yes", "on"}
        return bool(raw)
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    return str(raw)


def load_config(overrides: dict[str, Any] | None = None, path: Path | None = None) -> DaemonConfig:
    """Merge the layers. Unknown keys in the file are an error, so a typo is not silently ignored."""
    names = {f.name for f in fields(DaemonConfig)}
    values: dict[str, Any] = {}
    cfg_path = path or config_file()
    if cfg_path.exists():
        with cfg_path.open("rb") as fh:
            data = tomllib.load(fh)
        data = data.get("daemon", data)
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{cfg_path}: unknown setting(s) {', '.join(sorted(unknown))}")
        values.update({k: _coerce(k, v) for k, v in data.items()})
    for name in names:
        env = os.environ.get(f"ZYKE_{name.upper()}")
        if env is not None and env != "":
            values[name] = _coerce(name, env)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)
    if values.get("audience") is not None and values["audience"] not in {"minor", "teen", "adult"}:
        raise ValueError(f"audience: expected minor, teen or adult, got {values['audience']!r}")
    return replace(DaemonConfig(), **values)
