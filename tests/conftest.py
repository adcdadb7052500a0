from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_proc import DaemonProcess


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One real daemon on the embedded model for the whole session (loading it costs seconds)."""
    proc = DaemonProcess(tmp_path_factory.mktemp("zyke-daemon")).start()
    yield proc
    proc.stop()


@pytest.fixture
def fresh_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon of a test's own, for tests that restart or break it."""
    proc = DaemonProcess(tmp_path / "home").start()
    yield proc
    proc.stop()
