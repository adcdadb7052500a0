"""Start a local daemon for a game that did not find one (``Client(autostart=True)``).

The daemon runs as a child process (``python -m zyke_daemon start``), never in the game's own
process: the model's threads and memory stay out of the game, and a crash in one cannot take down
the other. The client stops it when it closes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from .errors import DaemonNotRunning
from .paths import DEFAULT_PORT, data_dir

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
INSTALL_HINT = "install it with: pip install 'zyke[daemon]'"


def daemon_installed() -> bool:
    """Whether the daemon and its model runtime can be imported here (checked without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("zyke_daemon", "llama_cpp"))


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalDaemon:
    """A daemon child process this SDK started; ``stop()`` ends it."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, url: str | None = None, token: str | None = None, timeout: float = 180.0) -> LocalDaemon:
        """Start ``zyke_daemon`` and wait until /health says ready (blocking).

        With ``url`` the daemon listens on that URL's port (it must be a loopback address); without,
        on the default port when free, else on any free port. ``token`` is handed to the daemon so the
        client's explicit token matches.
        """
        if not daemon_installed():
            raise DaemonNotRunning(f"no Zyke daemon is running and autostart cannot start one: the daemon "
                                   f"package is not installed; {INSTALL_HINT}")
        if url:
            parts = urlsplit(url)
            if parts.hostname not in _LOOPBACK or parts.port is None:
                raise DaemonNotRunning(f"autostart only starts a daemon on this machine, at an explicit "
                                       f"port; {url} is not such an address")
            port = parts.port
        else:
            port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else _free_port()
        env = dict(os.environ)
        if token:
            env["ZYKE_TOKEN"] = token
        log_path = data_dir() / "daemon-autostart.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "zyke_daemon", "start", "--port", str(port)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        daemon = cls(proc, port, log_path)
        try:
            daemon.wait_ready(timeout)
        except BaseException:
            daemon.stop()
            raise
        return daemon

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise DaemonNotRunning(f"the autostarted daemon exited with code {code}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as resp:
                    status = json.loads(resp.read()).get("status")
                if status == "ready":
                    return
            except urllib.error.HTTPError as exc:  # 503: the model failed to load
                raise DaemonNotRunning(f"the autostarted daemon failed: {exc.read()[:500]!r}") from exc
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise DaemonNotRunning(f"the autostarted daemon was not ready within {timeout:g} s; "
                               f"see {self.log_path}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return f"(no log at {self.log_path})"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the daemon saves sessions and removes its runtime file), then kill if it hangs."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
