"""Run a daemon in the current process: the piece the CLI, the SDK's autostart and the tests share."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from zyke.paths import data_dir, ensure_token

from .adapters import SHIPPED_ADAPTERS, AdapterRegistry
from .backends.loader import load_backend
from .config import DaemonConfig
from .embedded import resolve_model
from .server import DaemonServer
from .sessions import SessionStore

log = logging.getLogger(__name__)


async def run_daemon(config: DaemonConfig, started: asyncio.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM. A bad model path fails here, before anything listens."""
    resolve_model(config.model)  # fast; fails early with ModelLoadError
    token = config.token or ensure_token()
    sessions = SessionStore(data_dir() / "npcs", default_max_history=config.max_history)
    registry = AdapterRegistry([data_dir() / "adapters", *(Path(d) for d in config.adapter_dirs), SHIPPED_ADAPTERS])
    server = DaemonServer(config, sessions, token, load=lambda: load_backend(config), registry=registry)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if started is not None:
        started.set()
    serving = asyncio.create_task(server.serve_forever())
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if serving in done:
            serving.result()  # re-raises a model load error
    finally:
        log.info("stopping")
        serving.cancel()
        stopping.cancel()
        await server.stop()
