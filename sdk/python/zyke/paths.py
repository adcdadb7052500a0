"""Where Zyke keeps things on the player's machine, shared by the daemon and the SDK.

platformdirs gives the per-OS locations; ``ZYKE_CONFIG_DIR``, ``ZYKE_DATA_DIR`` and
``ZYKE_CACHE_DIR`` override them so tests and portable installs can point elsewhere. The daemon
writes its token and a runtime file (host, port, pid) here, which is how the SDK finds it without
being told.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import platformdirs

APP = "zyke"


def _dir(env: str, default: str) -> Path:
    value = os.environ.get(env)
    return Path(value).expanduser() if value else Path(default)


def config_dir() -> Path:
    return _dir("ZYKE_CONFIG_DIR", platformdirs.user_config_dir(APP))


def data_dir() -> Path:
    return _dir("ZYKE_DATA_DIR", platformdirs.user_data_dir(APP))


def cache_dir() -> Path:
    return _dir("ZYKE_CACHE_DIR", platformdirs.user_cache_dir(APP))


def token_path() -> Path:
    return config_dir() / "token"


def runtime_path() -> Path:
    """The daemon's runtime file: written when it listens, removed when it stops."""
    return data_dir() / "daemon.json"


def read_token() -> str | None:
    """The token clients must present: ``ZYKE_TOKEN`` wins, then the token file."""
    env = os.environ.get("ZYKE_TOKEN")
    if env:
        return env
    try:
        return token_path().read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def ensure_token() -> str:
    """Read the token, creating a random one (readable by this user only) on first run."""
    existing = read_token()
    if existing:
        return existing
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token


def read_runtime() -> dict[str, Any] | None:
    try:
        runtime: dict[str, Any] = json.loads(runtime_path().read_text(encoding="utf-8"))
        return runtime
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def default_url() -> str:
    """``ZYKE_URL``, else the address in the daemon's runtime file, else the default port."""
    env = os.environ.get("ZYKE_URL")
    if env:
        return env
    runtime = read_runtime()
    if runtime and "host" in runtime and "port" in runtime:
        return f"ws://{runtime['host']}:{runtime['port']}"
    return f"ws://127.0.0.1:{DEFAULT_PORT}"


DEFAULT_PORT = 7341
