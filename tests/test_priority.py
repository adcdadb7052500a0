"""Priorities (docs/SCHEDULING.md), checked by count and order, never by wall clock.

Three levels: the sans-I/O core and the batch's step selection with stand-in rows (no model); the llama.cpp
batch loop in-process, where the test decides exactly at which step a foreground reply arrives (so a pause is
certain and every token can be compared with a solo run); and a real daemon over loopback, where the wiring is
checked end to end: queue order, typed ``expired``, token caps, no starvation. The pure admission rule and queue
are unit-tested in tests/test_scheduler_config.py.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from daemon_proc import DaemonProcess
from zyke import AsyncClient, AsyncNpc, Expired
from zyke.prompt_format import render_prompt, reply_schema
from zyke.protocol import ModelInfo, NpcDefaults, NpcSpec
from zyke_daemon.backends.base import BatchItem, GenerationRequest, GenerationResult
from zyke_daemon.backends.llamacpp import LlamaCppBackend
from zyke_daemon.config import DaemonConfig
from zyke_daemon.core import ConnectionCore, DaemonCore, SayJob, Send, Submit, token_cap
from zyke_daemon.scheduler import BACKGROUND, FOREGROUND, NORMAL
from zyke_daemon.sessions import SessionStore

#: the test daemon's background cap: small, so capped replies stay short and the test fast
BG_CAP = 10

#: ``adapter="base"``: the bare model. With the shipped LoRA adapter, llama.cpp's batched rows are not always
#: bit-identical to solo runs even without priorities (measured: 4 NPCs in one plain batch, one reply differed,
#: with 5 slots as with 6), so the comparison below would test that, not the scheduler.
NPCS = [
    NpcSpec(id=f"npc{i}", name=name, persona=persona, actions=["none", "trade", "leave"],
            emotions=["neutral", "happy", "angry"], adapter="base")
    for i, (name, persona) in enumerate([
        ("Mira", "A cheerful innkeeper in a mountain village."),
        ("Brom", "A grumpy dwarf blacksmith who loves his forge."),
        ("Hilda", "A stern city guard at the north gate."),
        ("Pip", "A nervous young apprentice wizard who talks too much."),
        ("Tam", "An old ferryman who has seen every storm on the river."),
        ("Yara", "A travelling merchant with a cart full of strange goods."),
        ("Odo", "A sleepy monk who tends the monastery garden."),
    ])
]
LINE = "Tell me everything about this place and the people who live here."


# --- the sans-I/O core: which priority, deadline and cap a line gets ------------------------------------------


def _core_conn(tmp_path: Path, **cfg: Any) -> tuple[DaemonCore, ConnectionCore]:
    daemon = DaemonCore(DaemonConfig(**cfg), SessionStore(tmp_path / "npcs"), "t", ModelInfo(name="m.gguf"), "test")
    conn = daemon.connect()
    assert conn.receive(json.dumps({"v": 1, "type": "hello", "id": "h", "token": "t", "protocol": 1}))
    return daemon, conn


def _say(conn: ConnectionCore, rid: str, npc: str, **extra: Any) -> SayJob:
    [submit] = conn.receive(json.dumps({"v": 1, "type": "npc.say", "id": rid, "npc": npc, "input": "hi", **extra}))
    assert isinstance(submit, Submit), submit
    return submit.job


def test_a_lines_priority_comes_from_the_say_then_the_npc_then_normal(tmp_path: Path) -> None:
    _, conn = _core_conn(tmp_path)
    guard = NPCS[2].model_copy(update={"id": "guard", "defaults": NpcDefaults(priority="background")})
    for spec in (NPCS[0], guard):
        conn.receive(json.dumps({"v": 1, "type": "npc.define", "id": "d", "npc": spec.model_dump(exclude_none=True)}))
    assert _say(conn, "a", NPCS[0].id).rank == NORMAL
    assert _say(conn, "b", "guard").rank == BACKGROUND
    assert _say(conn, "c", "guard", priority="foreground").rank == FOREGROUND
    job = _say(conn, "d", NPCS[0].id, deadline_ms=250)
    assert job.deadline_at is not None and job.deadline_at - job.enqueued_at == pytest.approx(0.25)
    [error] = conn.receive(json.dumps({"v": 1, "type": "npc.say", "id": "e", "npc": "guard", "input": "hi",
                                       "priority": "urgent"}))
    assert isinstance(error, Send) and error.frame["code"] == "bad_frame"


def test_background_lines_get_the_default_deadline_and_the_token_cap(tmp_path: Path) -> None:
    config = DaemonConfig(background_max_tokens=12, normal_max_tokens=40, background_deadline_ms=500)
    assert (token_cap(config, BACKGROUND, 96), token_cap(config, BACKGROUND, 5)) == (12, 5)
    assert (token_cap(config, NORMAL, 96), token_cap(config, FOREGROUND, 96)) == (40, 96)
    _, conn = _core_conn(tmp_path, background_deadline_ms=500)
    conn.receive(json.dumps({"v": 1, "type": "npc.define", "id": "d", "npc": NPCS[0].model_dump(exclude_none=True)}))
    bg = _say(conn, "a", NPCS[0].id, priority="background")
    assert bg.deadline_at is not None and bg.deadline_at - bg.enqueued_at == pytest.approx(0.5)
    assert _say(conn, "b", NPCS[0].id).deadline_at is None  # only background lines get the default


def _row(priority: int, generated: int = 0) -> Any:
    """A running reply as ``LlamaCppBackend._stepping`` reads it."""
    return SimpleNamespace(item=SimpleNamespace(priority=priority), decoder=SimpleNamespace(generated=[0] * generated),
                           feed=[7], held=0)


def test_lower_priorities_sit_out_a_foreground_head_a_bounded_number_of_steps() -> None:
    b = object.__new__(LlamaCppBackend)  # only the step selection: no model
    b.foreground_solo_tokens, b.background_tokens_per_s, b._budget, b._budget_at = 2, None, 0.0, 0.0
    fg, normal, bg = _row(FOREGROUND), _row(NORMAL), _row(BACKGROUND)
    assert b._stepping([fg, normal, bg]) == [fg]
    assert b._stepping([fg, normal, bg]) == [fg]
    assert b._stepping([fg, normal, bg]) == [fg, normal, bg]  # each sat out foreground_solo_tokens steps: enough
    late = _row(BACKGROUND)
    fg.decoder.generated = [0, 0]  # past its head: nobody sits out for it
    assert b._stepping([fg, late]) == [fg, late]
    b.foreground_solo_tokens = 0  # off
    fresh_fg, fresh_bg = _row(FOREGROUND), _row(BACKGROUND)
    assert b._stepping([fresh_fg, fresh_bg]) == [fresh_fg, fresh_bg]


def test_the_background_budget_meters_background_replies_only() -> None:
    b = object.__new__(LlamaCppBackend)
    b.foreground_solo_tokens, b.background_tokens_per_s = 0, 1.0  # one token a second: a test's pauses refill ~0
    normal, bg = _row(NORMAL), _row(BACKGROUND)
    b._budget, b._budget_at = 0.0, time.perf_counter()
    assert b._stepping([normal, bg]) == [normal]  # the budget is spent: background sits out
    b._budget, b._budget_at = 1.0, time.perf_counter()
    assert b._stepping([normal, bg]) == [normal, bg] and b._budget < 0.5  # one token taken
    assert b._stepping([normal, bg]) == [normal]


# --- the batch loop, in-process: a pause is certain, every token is compared ---------------------------------


def _request(npc: NpcSpec, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(prompt=render_prompt(npc, [], LINE), schema=reply_schema(npc), max_tokens=max_tokens)


def _solo(backend: LlamaCppBackend, npc: NpcSpec, max_tokens: int) -> GenerationResult:
    """The plain path: a cold slot, one reply alone, no overlap."""
    overlap = backend.overlap
    backend.overlap = False
    try:
        backend.reset()
        return backend.generate(_request(npc, max_tokens), lambda _: True)
    finally:
        backend.overlap = overlap


@dataclass
class _Run:
    done: list[tuple[str, GenerationResult | BaseException]]

    def item(self, npc: NpcSpec, max_tokens: int, priority: int) -> BatchItem:
        return BatchItem(lambda: _request(npc, max_tokens), lambda _: True,
                         lambda outcome: self.done.append((npc.id, outcome)), priority=priority)


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaCppBackend]:
    """One llama.cpp thread: these tests check order and exactness, not speed, and on a busy shared machine two
    threads spend most of their time waiting for each other at llama.cpp's barriers."""
    from zyke_models.embedded import embedded_model_path

    path, sha = embedded_model_path()
    b = LlamaCppBackend(path, sha256=sha, n_ctx=1024, n_threads=1)
    yield b
    b.close()


@pytest.mark.slow
def test_a_foreground_reply_pauses_a_full_background_batch_and_every_reply_matches_its_solo_run(
        backend: LlamaCppBackend) -> None:
    background, foreground = NPCS[:4], NPCS[4]
    run = _Run([])
    handed = {"take": 0, "preempt": 0}

    def take(n: int, adapter: object) -> list[BatchItem]:
        handed["take"] += 1
        return [run.item(npc, 24, 2) for npc in background] if handed["take"] == 1 else []

    def preempt(n: int, adapter: object) -> list[BatchItem]:
        handed["preempt"] += 1
        if handed["preempt"] == 4:  # the batch is full and decoding: a seat must be made
            assert n == 1, n
            return [run.item(foreground, 12, 0)]
        return []

    backend.reset()
    paused_before = backend.preemptions
    backend.run_batch(take, preempt=preempt)
    assert backend.preemptions == paused_before + 1
    order = [npc_id for npc_id, _ in run.done]
    assert sorted(order) == sorted(n.id for n in NPCS[:5])
    assert order.index(foreground.id) < 4, order  # the foreground reply overtook the batch it arrived in
    results = dict(run.done)
    for npc in [*background, foreground]:
        result = results[npc.id]
        assert isinstance(result, GenerationResult), result
        solo = _solo(backend, npc, 12 if npc is foreground else 24)
        assert result.tokens == solo.tokens, npc.id


@pytest.mark.slow
def test_a_foreground_line_arriving_while_newcomers_are_prefilled_goes_before_the_rest(
        backend: LlamaCppBackend) -> None:
    """Four background lines are handed over at once; the player's line arrives while the first is prefilled.
    It is seated next, before the other three are prefilled (not after all four), and every reply still matches
    its solo run."""
    background, foreground = NPCS[:4], NPCS[4]
    run = _Run([])
    arrived = {"fg": False}
    prefilled: list[str] = []

    def arriving(npc: NpcSpec) -> BatchItem:  # the player speaks as the model thread takes the first line
        item = run.item(npc, 16, 2)

        def prepare() -> GenerationRequest:
            arrived["fg"] = True
            return item.prepare()
        return BatchItem(prepare, item.on_text, item.done, priority=2)

    def take(n: int, adapter: object) -> list[BatchItem]:
        return [arriving(background[0])] + [run.item(npc, 16, 2) for npc in background[1:]] if not prefilled else []

    def preempt(n: int, adapter: object) -> list[BatchItem]:
        if arrived["fg"] and foreground.id not in prefilled:
            return [run.item(foreground, 12, 0)]
        return []

    start = backend._start

    def spy(request: GenerationRequest, busy: Any = frozenset()) -> Any:  # the order prompts are prefilled in
        prefilled.append(next(n.id for n in NPCS if f"About {n.name}:" in request.prompt))
        return start(request, busy)

    backend.reset()
    backend._start = spy  # type: ignore[method-assign]
    try:
        backend.run_batch(take, preempt=preempt, urgent=lambda: arrived["fg"] and foreground.id not in prefilled)
    finally:
        del backend._start
    assert prefilled[:2] == [background[0].id, foreground.id], prefilled
    assert sorted(prefilled) == sorted(n.id for n in NPCS[:5])
    results = dict(run.done)
    for npc in [*background, foreground]:
        result = results[npc.id]
        assert isinstance(result, GenerationResult), result
        assert result.tokens == _solo(backend, npc, 12 if npc is foreground else 16).tokens, npc.id


# --- a real daemon over loopback ---------------------------------------------------------------------------


class _PriorityDaemon(DaemonProcess):
    @property
    def env(self) -> dict[str, str]:
        # one llama.cpp thread: see the backend fixture
        return super().env | {"ZYKE_BACKGROUND_MAX_TOKENS": str(BG_CAP), "ZYKE_N_THREADS": "1"}


@pytest.fixture(scope="module")
def pdaemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    proc = _PriorityDaemon(tmp_path_factory.mktemp("zyke-priority")).start()
    yield proc
    proc.stop()


def _metric(daemon: DaemonProcess, name: str) -> float:
    with urllib.request.urlopen(f"{daemon.http}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def _client(daemon: DaemonProcess, game: str) -> tuple[AsyncClient, dict[str, AsyncNpc]]:
    client = AsyncClient(daemon.url, daemon.token, game=game, timeout=300)
    return client, {spec.id: await client.define(spec) for spec in NPCS}


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.slow
def test_a_full_batch_expires_what_waits_pauses_for_foreground_and_stays_exact(pdaemon: DaemonProcess) -> None:
    """Four normal lines fill the batch (long ones: background lines are capped short, and a batch that empties
    early has free seats, so nothing would need pausing); what the pause does to a background reply, token by
    token, the in-process test above shows."""
    async def main() -> dict[str, Any]:
        client, handles = await _client(pdaemon, "pause")
        try:
            assert "priority" in (await client.connect()).capabilities
            npcs = [handles[spec.id] for spec in NPCS[:6]]
            streams = [n.stream(LINE, max_tokens=40) for n in npcs[:4]]
            iters = [s.__aiter__() for s in streams]
            # sent together (a stream sends on its first iteration); once each has a piece the batch is full
            await asyncio.gather(*(it.__anext__() for it in iters))
            with pytest.raises(Expired) as expired:  # waits behind the full batch, past its deadline
                await npcs[5].say(LINE, priority="background", deadline_ms=1)
            fg = await npcs[4].say(LINE, priority="foreground", max_tokens=8)
            batched = []
            for stream, it in zip(streams, iters, strict=True):
                async for _ in it:
                    pass
                assert stream.response is not None
                batched.append(stream.response)
            solo = []
            for n in npcs[:4]:
                await n.reset()
                solo.append(await n.say(LINE, max_tokens=40))
            await npcs[0].reset()
            capped = await npcs[0].say(LINE, priority="background", max_tokens=40)
            return {"expired": expired.value, "fg": fg, "batched": batched, "solo": solo, "capped": capped}
        finally:
            await client.aclose()

    before = {name: _metric(pdaemon, name) for name in (_PAUSED, _EXPIRED)}
    out = _run(main())
    assert out["expired"].code == "expired"
    assert _metric(pdaemon, _EXPIRED) == before[_EXPIRED] + 1
    assert _metric(pdaemon, _PAUSED) >= before[_PAUSED] + 1  # the foreground line took a paused reply's seat
    assert out["fg"].usage.completion_tokens <= 8
    for b, s in zip(out["batched"], out["solo"], strict=True):  # paused or not, as if alone
        assert (b.reply, b.usage.completion_tokens) == (s.reply, s.usage.completion_tokens), b.npc
    # the daemon's background cap: no complete reply fits in BG_CAP tokens, so it is cut there
    capped = out["capped"]
    assert capped.usage.completion_tokens == BG_CAP and capped.finish_reason == "length"
    assert out["batched"][0].usage.completion_tokens > BG_CAP  # the same line at normal priority
    assert out["fg"].timings.queue_ms >= 0


_PAUSED = "zyke_preemptions_total"
_EXPIRED = 'zyke_expired_total{priority="background"}'


@pytest.mark.slow
def test_foreground_queued_behind_background_is_served_first(pdaemon: DaemonProcess) -> None:
    async def main() -> list[str]:
        client, handles = await _client(pdaemon, "order")
        try:
            finished: list[str] = []

            async def say(npc_id: str, priority: str, max_tokens: int) -> None:
                await handles[npc_id].say(LINE, priority=priority, max_tokens=max_tokens)
                finished.append(npc_id)

            # six background lines (four fit in the batch, two queue), then one short foreground line
            tasks = [asyncio.create_task(say(spec.id, "background", BG_CAP)) for spec in NPCS[:6]]
            for _ in range(10):
                await asyncio.sleep(0)  # their frames go out first
            tasks.append(asyncio.create_task(say(NPCS[6].id, "foreground", 8)))
            await asyncio.gather(*tasks)
            return finished
        finally:
            await client.aclose()

    finished = _run(main())
    # the background lines still queued when the foreground one arrived finish after it
    assert finished.index(NPCS[6].id) < finished.index(NPCS[4].id), finished
    assert finished.index(NPCS[6].id) < finished.index(NPCS[5].id), finished


@pytest.mark.slow
def test_background_without_deadline_completes_within_ten_foreground_replies(pdaemon: DaemonProcess) -> None:
    async def main() -> int:
        client, handles = await _client(pdaemon, "starve")
        try:
            fg_done = 0
            bg_done_after: list[int] = []

            async def background() -> None:
                while fg_done < 2:  # the foreground stream is under way: seats full, queue non-empty
                    await asyncio.sleep(0.01)
                sent = fg_done
                await handles[NPCS[0].id].say(LINE, priority="background", max_tokens=8)
                bg_done_after.append(fg_done - sent)

            async def foreground(npc: AsyncNpc) -> None:
                nonlocal fg_done
                while not bg_done_after and fg_done < 40:  # line after line until the bark is out
                    await npc.say(LINE, priority="foreground", max_tokens=8)
                    fg_done += 1

            # six foreground NPCs keep the batch (4 seats) full and the queue non-empty
            await asyncio.gather(background(), *(foreground(handles[spec.id]) for spec in NPCS[1:]))
            return bg_done_after[0]
        finally:
            await client.aclose()

    assert _run(main()) <= 10
    with urllib.request.urlopen(f"{pdaemon.http}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for needle in ['zyke_queue_depth_by_priority{priority="foreground"}',
                   'zyke_queue_wait_seconds_count{priority="foreground"}',
                   'zyke_queue_wait_seconds_count{priority="background"}']:
        assert needle in text, needle
