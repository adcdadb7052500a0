from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from daemon_proc import DaemonProcess
from zyke import Client

if TYPE_CHECKING:
    from zyke_daemon.backends.llamacpp import LlamaCppBackend


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One real daemon on the embedded model for the whole session (loading it costs seconds)."""
    proc = DaemonProcess(tmp_path_factory.mktemp("zyke-daemon")).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaCppBackend]:
    """The llama.cpp backend on the embedded model, in-process, shared by one test module."""
    from zyke_daemon.backends.llamacpp import LlamaCppBackend
    from zyke_models.embedded import embedded_model_path

    path, sha = embedded_model_path()
    b = LlamaCppBackend(path, sha256=sha, n_ctx=2048, n_threads=2)
    yield b
    b.close()


@pytest.fixture
def fresh_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon of a test's own, for tests that restart or break it."""
    proc = DaemonProcess(tmp_path / "home").start()
    yield proc
    proc.stop()


def game_name(request: pytest.FixtureRequest) -> str:
    """A daemon-side game namespace of a test's own, so tests sharing the session daemon never share NPCs."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[-64:]


@pytest.fixture
def client(daemon: DaemonProcess, request: pytest.FixtureRequest) -> Iterator[Client]:
    """A sync SDK client on the shared daemon, in a game namespace of the test's own."""
    # a generous timeout: on a loaded 2-core CI box a queued reply can wait minutes (seen: 60 s exceeded)
    with Client(daemon.url, daemon.token, game=game_name(request), timeout=300) as c:
        yield c
