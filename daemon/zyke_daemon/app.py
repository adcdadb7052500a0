"""Run a daemon in the current process: the piece the CLI, the SDK's autostart and the tests share."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from zyke.paths import data_dir, ensure_token
from zyke_models.adapters import SHIPPED_ADAPTERS, AdapterRegistry
from zyke_models.embedded import resolve_model
from zyke_models.files import remove_stale_temp_files

from .backends.loader import load_backend
from .config import DaemonConfig
from .server import DaemonServer
from .sessions import SessionStore

log = logging.getLogger(__name__)


async def run_daemon(config: DaemonConfig, started: asyncio.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM. A bad model path fails here, before anything listens."""
    if fails_early(config):
        resolve_model(config.model)  # fast; fails early with ModelLoadError
    token = config.token or ensure_token()
    for folder in (data_dir() / "npcs", data_dir() / "adapters"):  # what a kill -9 mid-write left behind
        remove_stale_temp_files(folder)
    sessions = SessionStore(data_dir() / "npcs", default_max_history=config.max_history,
                            max_frame_bytes=config.max_frame_bytes)
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


def fails_early(config: DaemonConfig) -> bool:
    """Whether ``--model`` can be checked as a GGUF file before anything listens: for llama.cpp, and for
    ``auto`` with the embedded model or a file. A checkpoint directory or a Hub name (what the transformers
    backend takes) is left to the backend, which says itself what is wrong with it."""
    if config.backend == "llama.cpp" or config.model is None:
        return config.backend != "transformers"
    return config.backend == "auto" and Path(config.model).expanduser().is_file()
