from __future__ import annotations

from pathlib import Path

import pytest
from zyke_daemon.config import load_config
from zyke_daemon.scheduler import FairQueue


def test_clients_are_served_in_turn() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(4):
        q.push("greedy", f"g{i}", f"g{i}")
    q.push("polite", "p0", "p0")
    q.push("other", "o0", "o0")
    order = [q.pop() for _ in range(6)]
    assert order == ["g0", "p0", "o0", "g1", "g2", "g3"]
    assert q.pop() is None


def test_remove_and_drain() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(3):
        q.push("a", f"a{i}", f"a{i}")
    q.push("b", "b0", "b0")
    assert q.remove("a", "a1") == "a1"
    assert q.remove("a", "zzz") is None
    assert q.drain("a") == ["a0", "a2"]
    assert len(q) == 1 and q.pop() == "b0"


def test_pop_with_accept_only_looks_at_each_clients_oldest_item() -> None:
    q: FairQueue[str] = FairQueue()
    q.push("a", "a0", "skip-a0")
    q.push("a", "a1", "a1")
    q.push("b", "b0", "b0")
    # a1 is acceptable but queued behind a0: a client's own order is never jumped
    assert q.pop(lambda item: not item.startswith("skip")) == "b0"
    assert q.pop(lambda item: not item.startswith("skip")) is None
    assert q.pop() == "skip-a0" and q.pop() == "a1"


def test_flags_beat_env_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "daemon.toml"
    cfg.write_text('port = 9000\nhost = "127.0.0.2"\nmax_history = 5\nallowed_origins = ["http://a"]\n')
    monkeypatch.setenv("ZYKE_PORT", "9100")
    config = load_config({"port": 9200, "host": None}, path=cfg)
    assert (config.port, config.host, config.max_history, config.allowed_origins) == \
        (9200, "127.0.0.2", 5, ("http://a",))
    assert load_config({}, path=cfg).port == 9100


def test_unknown_setting_in_file_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "daemon.toml"
    cfg.write_text("prot = 1\n")
    with pytest.raises(ValueError, match="prot"):
        load_config({}, path=cfg)
