from __future__ import annotations

from pathlib import Path

import pytest
from zyke_daemon.config import load_config
from zyke_daemon.scheduler import (
    BACKGROUND,
    FOREGROUND,
    NORMAL,
    FairQueue,
    PriorityQueue,
    after_admission,
    level_order,
    rank_of,
)


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


# --- priorities: the pure admission rule and the queue built on it -----------------------------------------


def test_level_order_is_by_priority_until_a_level_has_been_passed_over_enough() -> None:
    assert level_order([1, 1, 1], [0, 0, 0], starve_after=4) == [FOREGROUND, NORMAL, BACKGROUND]
    assert level_order([0, 2, 1], [0, 0, 0], starve_after=4) == [NORMAL, BACKGROUND]  # empty levels left out
    assert level_order([1, 1, 1], [0, 0, 4], starve_after=4) == [BACKGROUND, FOREGROUND, NORMAL]
    assert level_order([1, 1, 1], [0, 5, 4], starve_after=4) == [NORMAL, BACKGROUND, FOREGROUND]
    assert level_order([1, 1, 1], [0, 9, 9], starve_after=0) == [FOREGROUND, NORMAL, BACKGROUND]  # ageing off


def test_after_admission_counts_only_levels_that_were_waiting() -> None:
    assert after_admission([1, 1, 0], [0, 2, 3], served=FOREGROUND) == [0, 3, 3]
    assert after_admission([0, 1, 1], [0, 3, 2], served=NORMAL) == [0, 0, 3]


def test_rank_of_protocol_priorities() -> None:
    assert [rank_of(p) for p in ("foreground", "normal", "background", None)] == [0, 1, 2, 1]


def test_foreground_queued_behind_background_is_served_first_and_fair_within_a_level() -> None:
    q: PriorityQueue[str] = PriorityQueue(starve_after=0)
    for i in range(3):
        q.push("a", f"bg{i}", f"bg{i}", BACKGROUND)
    q.push("a", "n0", "n0", NORMAL)
    q.push("b", "fb0", "fb0", FOREGROUND)
    q.push("a", "fa0", "fa0", FOREGROUND)
    q.push("a", "fa1", "fa1", FOREGROUND)
    assert q.depths() == [3, 1, 3] and len(q) == 7
    assert [q.pop() for _ in range(7)] == ["fb0", "fa0", "fa1", "n0", "bg0", "bg1", "bg2"]
    assert q.pop() is None and q.depths() == [0, 0, 0]


def test_ageing_lets_background_through_every_starve_after_admissions() -> None:
    q: PriorityQueue[str] = PriorityQueue(starve_after=3)
    q.push("game", "bark", "bark", BACKGROUND)
    order = []
    for i in range(10):  # a steady stream of foreground lines: one always waiting
        q.push("game", f"f{i}", f"f{i}", FOREGROUND)
        order.append(q.pop())
    assert order.index("bark") == 3  # after exactly starve_after foreground admissions
    alone: PriorityQueue[str] = PriorityQueue(starve_after=1)
    alone.push("game", "b", "b", BACKGROUND)
    alone.push("game", "f", "f", FOREGROUND)
    assert alone.pop_ranked() == ("f", FOREGROUND)
    alone.push("game", "f2", "f2", FOREGROUND)
    assert alone.pop_ranked() == ("b", FOREGROUND)  # served by ageing ahead of f2: promoted
    alone.push("game", "b2", "b2", BACKGROUND)
    assert alone.pop_ranked() == ("f2", FOREGROUND) and alone.pop_ranked() == ("b2", BACKGROUND)  # nothing passed


def test_max_rank_pops_only_foreground() -> None:
    q: PriorityQueue[str] = PriorityQueue(starve_after=1)
    q.push("a", "bg", "bg", BACKGROUND)
    q.push("a", "fg", "fg", FOREGROUND)
    assert q.pop_ranked(max_rank=FOREGROUND) == ("fg", FOREGROUND)
    assert q.pop(max_rank=FOREGROUND) is None  # the starved background level is not foreground
    assert q.waiting(BACKGROUND) == 1 and q.pop() == "bg"
    for i in range(2):  # background passed over twice: due, so foreground-only asks yield to it
        q.push("a", f"f{i}", f"f{i}", FOREGROUND)
    q.push("a", "bg2", "bg2", BACKGROUND)
    assert q.pop(max_rank=FOREGROUND) == "f0"
    assert q.pop(max_rank=FOREGROUND) is None and q.pop() == "bg2" and q.pop(max_rank=FOREGROUND) == "f1"


def test_a_line_never_overtakes_an_earlier_line_for_the_same_npc() -> None:
    q: PriorityQueue[str] = PriorityQueue(starve_after=0)
    q.push("a", "other", "other", NORMAL, group="guard")
    q.push("a", "m1", "m1", BACKGROUND, group="mira")
    assert q.push("a", "m2", "m2", FOREGROUND, group="mira") == FOREGROUND
    assert q.rank("a", "m1") == FOREGROUND  # lifted: priority inheritance
    assert q.push("a", "m3", "m3", BACKGROUND, group="mira") == FOREGROUND  # waits at its earlier line's level
    assert [q.pop() for _ in range(4)] == ["m1", "m2", "m3", "other"]


def test_priority_queue_remove_and_drain_keep_counts() -> None:
    q: PriorityQueue[str] = PriorityQueue()
    q.push("a", "x", "x", FOREGROUND)
    q.push("a", "y", "y", BACKGROUND)
    q.push("b", "z", "z", NORMAL)
    assert q.remove("a", "x") == "x" and q.remove("a", "x") is None
    assert q.drain("a") == ["y"] and q.depths() == [0, 1, 0] and len(q) == 1
    assert q.count("b") == 1 and q.pop() == "z"


def test_priority_settings_load_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZYKE_BACKGROUND_MAX_TOKENS", "12")
    monkeypatch.setenv("ZYKE_BACKGROUND_DEADLINE_MS", "2500")
    monkeypatch.setenv("ZYKE_BACKGROUND_TOKENS_PER_S", "20")
    config = load_config({}, path=tmp_path / "none.toml")
    assert (config.background_max_tokens, config.background_deadline_ms, config.background_tokens_per_s) == \
        (12, 2500, 20.0)
    assert (config.starve_after, config.normal_max_tokens, config.foreground_solo_tokens) == (4, None, 8)
