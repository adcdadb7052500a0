"""The fast paths give the plain path's replies: lockstep batches, KV slots, adapter-keyed caches.

Greedy decoding, real embedded model. Equality is exact (token for token): the backend runs without
weight repacking, so llama.cpp computes every row the same way alone or batched (see llamacpp.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from lora_fixtures import make_random_lora
from zyke.prompt_format import render_prompt, reply_schema
from zyke.protocol import NpcReply, NpcSpec, Turn
from zyke_daemon.adapters import AdapterRegistry
from zyke_daemon.backends.base import GenerationRequest, GenerationResult
from zyke_daemon.backends.decoding import BatchItem
from zyke_daemon.backends.llamacpp import LlamaCppBackend
from zyke_daemon.embedded import embedded_model_path
from zyke_daemon.scheduler import FairQueue

PERSONA = "A guard of the city watch, tired and underpaid, posted at one of the gates."
GUARDS = [NpcSpec(id=f"guard{i}", name="Guard", persona=PERSONA, actions=["none", "allow_entry", "deny_entry"],
                  emotions=["calm", "suspicious"]) for i in range(2)]
MIRA = NpcSpec(id="mira", name="Mira", persona="A cheerful innkeeper in a mountain village.",
               actions=["none", "serve_drink", "rent_room"], emotions=["happy", "annoyed"])
BROM = NpcSpec(id="brom", name="Brom", persona="A grumpy dwarf blacksmith who loves his forge.",
               actions=["none", "trade", "repair"], emotions=["neutral", "angry"])
TOKENS = 20


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaCppBackend]:
    path, sha = embedded_model_path()
    b = LlamaCppBackend(path, sha256=sha, n_ctx=1024, n_threads=2)
    yield b
    b.close()


def request(npc: NpcSpec, line: str, history: list[Turn] | None = None, **kw: object) -> GenerationRequest:
    kw.setdefault("max_tokens", TOKENS)
    return GenerationRequest(prompt=render_prompt(npc, history or [], line), schema=reply_schema(npc),
                             **kw)  # type: ignore[arg-type]


def cold(backend: LlamaCppBackend, req: GenerationRequest) -> GenerationResult:
    backend.reset()
    result = backend.generate(req, lambda _: True)
    assert result.cached_tokens == 0
    return result


def run_together(backend: LlamaCppBackend, reqs: list[GenerationRequest]) -> list[GenerationResult]:
    out: dict[int, GenerationResult | BaseException] = {}
    pieces: dict[int, list[str]] = {i: [] for i in range(len(reqs))}
    items = [BatchItem(r, lambda p, i=i: pieces[i].append(p) or True, lambda o, i=i: out.__setitem__(i, o))
             for i, r in enumerate(reqs)]
    backend.run_batch(lambda n: [items.pop(0) for _ in range(min(n, len(items)))])
    results = []
    for i in range(len(reqs)):
        result = out[i]
        assert isinstance(result, GenerationResult), result
        assert "".join(pieces[i]) == result.text  # each stream gets its own pieces
        results.append(result)
    return results


@pytest.mark.slow
def test_four_npcs_batched_equal_each_alone(backend: LlamaCppBackend) -> None:
    reqs = [request(MIRA, "A room for the night."), request(BROM, "Can you fix my sword?"),
            request(GUARDS[0], "Let me in."), request(GUARDS[1], "I have papers.", max_tokens=7)]
    alone = [cold(backend, r).tokens for r in reqs]
    backend.reset()
    together = run_together(backend, reqs)
    assert [r.tokens for r in together] == alone
    assert together[3].finish_reason == "length" and together[3].completion_tokens == 7


@pytest.mark.slow
def test_late_joiner_and_cancel_in_a_batch(backend: LlamaCppBackend) -> None:
    """A request joining at a step boundary matches its solo run; cancelling one leaves the others."""
    first, late = request(MIRA, "Any news?"), request(BROM, "Got any iron?")
    cancel = threading.Event()
    doomed = request(GUARDS[0], "Open up!", cancel=cancel, max_tokens=60)
    want_first, want_late = cold(backend, first).tokens, cold(backend, late).tokens
    backend.reset()
    out: dict[str, GenerationResult | BaseException] = {}
    steps = 0

    def take(n: int) -> list[BatchItem]:
        nonlocal steps
        steps += 1
        if steps == 1:
            return [BatchItem(first, lambda _: True, lambda o: out.__setitem__("first", o)),
                    BatchItem(doomed, lambda _: (cancel.set() or True) if steps > 5 else True,
                              lambda o: out.__setitem__("doomed", o))]
        if steps == 4:
            return [BatchItem(late, lambda _: True, lambda o: out.__setitem__("late", o))]
        return []

    backend.run_batch(take)
    assert out["first"].tokens == want_first  # type: ignore[union-attr]
    assert out["late"].tokens == want_late  # type: ignore[union-attr]
    assert out["doomed"].finish_reason == "cancelled"  # type: ignore[union-attr]


@pytest.mark.slow
def test_alternating_npcs_and_shared_personas_reuse_slots_and_match_cold(backend: LlamaCppBackend) -> None:
    # the conversation, each request run cold: the reference replies
    histories: dict[str, list[Turn]] = {npc.id: [] for npc in (*GUARDS, MIRA)}
    plan: list[tuple[GenerationRequest, list[int]]] = []
    for line in ["Hello.", "What is this place?", "Goodbye."]:
        for npc in (GUARDS[0], MIRA, GUARDS[1]):  # alternating: with one cache each would evict the other
            req = request(npc, line, histories[npc.id])
            result = cold(backend, req)
            plan.append((req, result.tokens))
            histories[npc.id].append(Turn(player=line, reply=_as_reply(result.text, npc)))
    # the same conversation on the slots, never reset
    backend.reset()
    for i, (req, want) in enumerate(plan):
        warm = backend.generate(req, lambda _: True)
        assert warm.tokens == want, i
        if i == 2:  # the second guard starts from the first guard's persona prefix (copied, not recomputed)
            assert warm.cached_tokens > 20
        if i >= 3:  # every later turn extends that NPC's own slot
            assert warm.cached_tokens >= len(backend.tokenize(plan[i - 3][0].prompt)) - 2, i


def _as_reply(text: str, npc: NpcSpec) -> NpcReply:
    try:
        return NpcReply.model_validate_json(text)
    except ValueError:  # cut by max_tokens: keep a valid turn so the history renders
        return NpcReply(say="Hm.", emotion=npc.emotions[0], action=npc.actions[0])


@pytest.mark.slow
def test_adapter_change_never_reuses_a_base_prefix(backend: LlamaCppBackend, tmp_path: Path) -> None:
    path, sha = embedded_model_path()
    registry = AdapterRegistry([tmp_path / "adapters"])
    registry.register("calm", make_random_lora(tmp_path / "src", path, seed=3, scale=0.2), f"sha256:{sha}")
    backend.load_adapter("calm", registry.resolve("calm", f"sha256:{sha}", "gguf"))
    try:
        plain, tuned = request(MIRA, "Any rooms left?"), request(MIRA, "Any rooms left?", adapter="calm")
        adapter_cold = cold(backend, tuned)
        base = cold(backend, plain)
        after_base = backend.generate(tuned, lambda _: True)
        assert after_base.cached_tokens == 0  # the base run's prefix was not reused under the adapter
        assert after_base.tokens == adapter_cold.tokens
        assert base.tokens != adapter_cold.tokens  # the adapter really changes the reply
        again = backend.generate(plain, lambda _: True)  # the base slot survived the adapter run
        assert again.cached_tokens > 0 and again.tokens == base.tokens
    finally:
        backend.unload_adapter("calm")


def test_pop_if_keeps_fair_order() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a", "1", "a:base")
    queue.push("b", "2", "b:lora")
    queue.push("c", "3", "c:base")
    assert queue.pop_if(lambda item: item.endswith("base")) == "a:base"
    assert queue.pop_if(lambda item: item.endswith("base")) is None  # b's lora job is next: no overtaking
    assert queue.pop() == "b:lora"
    assert queue.pop_if(lambda item: item.endswith("base")) == "c:base"
    assert len(queue) == 0
