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

#: The adapter an NPC on the embedded model speaks with unless the game or the daemon's settings name
#: another: the base model alone is a script-continuing text model, not an NPC. It ships inside the
#: package (``zyke_daemon/shipped_adapters``, see ``adapters.SHIPPED_ADAPTERS``).
DEFAULT_ADAPTER_NAME = "npc-default"
#: The adapter name a game uses on ``npc.define`` / ``npc.say`` for "no adapter: the bare base model".
BASE_ADAPTER = "base"


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
    request_timeout_s: float = 120.0
    max_history: int = 12
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
    return replace(DaemonConfig(), **values)
