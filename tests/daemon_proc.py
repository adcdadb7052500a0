"""Start a real zyke-daemon in a subprocess for tests: its own data/config dirs, a free port, a known token.

A subprocess, not a thread, so a test can kill and restart it like a player's machine would, and a
crash in the daemon cannot hide behind the test process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

TOKEN = "test-token-0123456789"


@dataclass
class DaemonProcess:
    home: Path
    extra_args: list[str] = field(default_factory=list)
    token: str = TOKEN
    proc: subprocess.Popen[bytes] | None = None
    port: int | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(ZYKE_DATA_DIR=str(self.home / "data"), ZYKE_CONFIG_DIR=str(self.home / "config"),
                   ZYKE_TOKEN=self.token, ZYKE_N_THREADS="2")
        env.pop("ZYKE_URL", None)
        return env

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / "daemon.log"

    def start(self, timeout: float = 180) -> DaemonProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        runtime = self.home / "data" / "daemon.json"
        runtime.unlink(missing_ok=True)
        port = self.port or 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "zyke_daemon", "start", "--port", str(port), *self.extra_args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                info = json.loads(runtime.read_text())
                self.port = info["port"]
                with urllib.request.urlopen(f"{self.http}/health", timeout=2) as resp:
                    if json.loads(resp.read())["status"] == "ready":
                        return self
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"daemon not ready after {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> DaemonProcess:
        """Stop and start again on the same port and data dir (clients reconnect to the same URL)."""
        self.stop()
        return self.start()
