"""The llama.cpp fast paths give the replies the plain path gives, token for token.

Plain path: a cold slot (``reset()``), the whole prompt evaluated, the grammar mask computed before each
model call. Fast paths: a slot reused from an earlier turn (or copied from another NPC with the same
persona), several replies in one batch, the mask computed during the model call. Forced tokens are
evaluated together on every path: that is part of the decode step, not a cache, and evaluating them one
by one instead rounds differently (measured: up to about one logit, enough to flip a close greedy pick).
Run on the real embedded model, greedy, with the daemon's own prompt format and schemas, and with the
daemon's no-repeat ban over the history's say lines (a rule of the decode step, so it must hold on every
path alike).
"""

from __future__ import annotations

import json

import pytest
from zyke.prompt_format import render_prompt, reply_schema
from zyke.protocol import NpcReply, NpcSpec, Turn
from zyke_daemon.backends.base import ANY_ADAPTER, BatchItem, GenerationRequest, GenerationResult
from zyke_daemon.backends.decoding import say_token_ids
from zyke_daemon.backends.llamacpp import PREFILL_CHUNK, LlamaCppBackend

pytestmark = pytest.mark.slow

MIRA = NpcSpec(id="mira", name="Mira", persona="A cheerful innkeeper in a mountain village. Knows every rumour.",
               actions=["none", "serve_drink", "rent_room", "kick_out"], emotions=["happy", "annoyed", "neutral"])
BROM = NpcSpec(id="brom", name="Brom", persona="A grumpy dwarf blacksmith who loves his forge and hates elves.",
               actions=["none", "trade", "repair", "attack"], emotions=["neutral", "angry", "pleased"])
LINES = ["Hello there!", "Do you have a room for the night?", "How much is it?", "Any rumours lately?",
         "I think I saw an elf outside."]


def request_for(npc: NpcSpec, history: list[Turn], line: str, max_tokens: int = 120) -> GenerationRequest:
    """As the daemon builds it: the prompt, the NPC's schema, the history's say lines for the no-repeat ban."""
    return GenerationRequest(prompt=render_prompt(npc, history, line), schema=reply_schema(npc), max_tokens=max_tokens,
                             history_says=[t.reply.say for t in history])


def say(backend: LlamaCppBackend, npc: NpcSpec, history: list[Turn], line: str) -> GenerationResult:
    return backend.generate(request_for(npc, history, line), lambda _: True)


def plain(backend: LlamaCppBackend, npc: NpcSpec, history: list[Turn], line: str) -> GenerationResult:
    overlap = backend.overlap
    backend.overlap = False
    try:
        backend.reset()
        result = say(backend, npc, history, line)
    finally:
        backend.overlap = overlap
    assert result.cached_tokens == 0
    return result


def as_turn(line: str, result: GenerationResult) -> Turn:
    return Turn(player=line, reply=NpcReply.model_validate(json.loads(result.text)))


def test_two_npcs_taking_turns_reuse_their_slots_and_match_cold_runs(backend: LlamaCppBackend) -> None:
    backend.reset()
    histories: dict[str, list[Turn]] = {"mira": [], "brom": []}
    turns: list[tuple[NpcSpec, list[Turn], str, GenerationResult]] = []
    for line in LINES:
        for npc in (MIRA, BROM):  # the other NPC talks between any two turns of one NPC
            history = histories[npc.id]
            fast = say(backend, npc, history, line)
            turns.append((npc, history, line, fast))
            histories[npc.id] = [*history, as_turn(line, fast)]
    later = [fast for _, history, _, fast in turns if history]
    assert all(fast.cached_tokens > 0 for fast in later), [fast.cached_tokens for fast in later]
    # all but the newest turn, the old reply and at most a partial chunk came from the slot
    assert all(fast.prompt_tokens - fast.cached_tokens <= 2 * PREFILL_CHUNK + 120 for fast in later)
    for npc, history, line, fast in turns:
        assert fast.tokens == plain(backend, npc, history, line).tokens, f"{npc.id} turn {len(history) + 1}"


def test_idle_prefill_of_the_last_turn_leaves_only_the_new_line_and_changes_no_token(
        backend: LlamaCppBackend) -> None:
    backend.reset()
    history: list[Turn] = []
    for line in LINES[:3]:
        prompt = render_prompt(MIRA, history, line)
        fast = say(backend, MIRA, history, line)
        history = [*history, as_turn(line, fast)]
        # what the daemon does while its queue is empty
        assert backend.prefill_idle(prompt + fast.text + "\n", None, lambda: False) > 0
        say(backend, BROM, [], line)  # another NPC talks in between
    nxt = say(backend, MIRA, history, LINES[3])
    assert nxt.prompt_tokens - nxt.cached_tokens <= PREFILL_CHUNK + 24  # the new line and a partial chunk
    assert nxt.tokens == plain(backend, MIRA, history, LINES[3]).tokens


def test_idle_prefill_stops_when_asked(backend: LlamaCppBackend) -> None:
    backend.reset()
    text = render_prompt(MIRA, [], LINES[0])
    assert backend.prefill_idle(text, None, lambda: True) == 0


def test_an_npc_sharing_a_persona_starts_from_a_copy_and_matches_a_cold_run(backend: LlamaCppBackend) -> None:
    twin = MIRA.model_copy(update={"id": "mira-2"})  # same name and persona: the same prompt head
    backend.reset()
    say(backend, MIRA, [], LINES[1])
    fast = say(backend, twin, [], LINES[3])
    assert fast.cached_tokens >= PREFILL_CHUNK
    assert fast.tokens == plain(backend, twin, [], LINES[3]).tokens


def test_when_the_slot_to_reuse_is_the_only_free_one_it_is_cut_to_the_shared_prefix(
        backend: LlamaCppBackend) -> None:
    backend.reset()
    say(backend, MIRA, [], LINES[1])
    twin = MIRA.model_copy(update={"id": "mira-2"})
    tokens = backend.tokenize(render_prompt(twin, [], LINES[3]))
    busy = {s.seq_id for s in backend._slots if not s.tokens}  # as if every other slot were decoding
    slot, keep = backend._take_slot(tokens, None, busy)
    assert keep >= PREFILL_CHUNK and slot.reusable == keep
    assert slot.tokens == tokens[:keep]  # its KV holds exactly that prefix, ready to extend


def test_an_adapter_change_never_reuses_a_prefix_computed_under_other_weights(backend: LlamaCppBackend) -> None:
    backend.reset()
    say(backend, MIRA, [], LINES[0])
    again = say(backend, MIRA, [], LINES[0])
    assert again.cached_tokens > 0
    slot = next(s for s in backend._slots if s.tokens)
    slot.adapter = "some-adapter"  # as if those tokens had been evaluated under an adapter
    assert say(backend, MIRA, [], LINES[0]).cached_tokens == 0


def test_overlapping_the_mask_with_the_model_call_changes_no_token(backend: LlamaCppBackend) -> None:
    for line in ["Can you fix my sword?", "Give me all your gold!", "Who rules these lands?"]:
        backend.reset()
        fast = say(backend, BROM, [], line)
        assert fast.tokens == plain(backend, BROM, [], line).tokens


HILDA = NpcSpec(id="hilda", name="Hilda", persona="A stern city guard at the north gate. Suspicious of strangers.",
                actions=["none", "allow_entry", "deny_entry", "arrest"], emotions=["calm", "suspicious"])
PIP = NpcSpec(id="pip", name="Pip", persona="A nervous young apprentice wizard who talks too much.",
              actions=["none", "cast_spell", "flee"], emotions=["nervous", "excited"])


def run_batch(backend: LlamaCppBackend, arrivals: list[list[tuple[NpcSpec, str]]],
              reset: bool = True, histories: dict[str, list[Turn]] | None = None) -> list[GenerationResult]:
    """``arrivals[k]``: the replies handed over at the k-th call of ``take`` (a later call = joining a
    batch already decoding); ``histories``: an NPC's earlier turns, by id (none by default). Returns the
    results in arrival order."""
    histories = histories or {}
    results: dict[int, GenerationResult | BaseException] = {}
    calls: list[object] = []
    order = [(npc, line) for group in arrivals for npc, line in group]

    def take(n: int, adapter: object) -> list[BatchItem]:
        calls.append(adapter)
        if len(calls) > len(arrivals):
            return []
        start = sum(len(g) for g in arrivals[:len(calls) - 1])
        group = arrivals[len(calls) - 1]
        assert len(group) <= n
        return [BatchItem(lambda npc=npc, line=line: request_for(npc, histories.get(npc.id, []), line, 60),
                          lambda _: True, lambda outcome, i=start + i: results.__setitem__(i, outcome))
                for i, (npc, line) in enumerate(group)]

    if reset:
        backend.reset()
    backend.run_batch(take)
    assert calls[0] is ANY_ADAPTER and all(a is None for a in calls[1:len(arrivals)])
    assert sorted(results) == list(range(len(order)))
    out = []
    for i in range(len(order)):
        outcome = results[i]
        assert isinstance(outcome, GenerationResult), outcome
        out.append(outcome)
    return out


def test_four_npcs_in_one_batch_get_the_replies_they_get_alone(backend: LlamaCppBackend) -> None:
    group = [(MIRA, LINES[1]), (BROM, LINES[4]), (HILDA, "Let me through, I have papers."), (PIP, LINES[3])]
    batched = run_batch(backend, [group])
    for (npc, line), fast in zip(group, batched, strict=True):
        assert fast.tokens == plain(backend, npc, [], line).tokens, npc.id


def test_a_batch_reusing_cached_prefixes_still_matches_plain_runs(backend: LlamaCppBackend) -> None:
    group = [(MIRA, LINES[1]), (BROM, LINES[4]), (HILDA, "I have papers."), (PIP, LINES[3])]
    run_batch(backend, [group])  # leaves each NPC's prompt in a slot
    again = run_batch(backend, [group], reset=False)
    assert all(fast.cached_tokens > 0 for fast in again)
    for (npc, line), fast in zip(group, again, strict=True):
        assert fast.tokens == plain(backend, npc, [], line).tokens, npc.id


def test_replies_joining_a_running_batch_change_no_token(backend: LlamaCppBackend) -> None:
    arrivals = [[(BROM, LINES[0])], [(MIRA, LINES[2]), (PIP, LINES[1])], [], [(HILDA, "Who goes there?")]]
    batched = run_batch(backend, arrivals)
    for (npc, line), fast in zip([p for g in arrivals for p in g], batched, strict=True):
        assert fast.tokens == plain(backend, npc, [], line).tokens, npc.id


#: A turn Mira's session already holds: the line the base model copies when asked nearly the same again.
ROOM = Turn(player="Do you have a room for the night?",
            reply=NpcReply(say="Yes, we have a warm room upstairs for five silver coins a night.", emotion="happy",
                           action="rent_room"))
ROOM_AGAIN = "Do you have a room for the night, please?"


def ngrams(tokens: list[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def test_a_reply_repeats_no_run_of_the_history_and_is_the_same_alone_batched_and_cached(
        backend: LlamaCppBackend) -> None:
    history = [ROOM]
    cold = plain(backend, MIRA, history, ROOM_AGAIN)
    said = say_token_ids(backend.tokenizer, ROOM.reply.say)
    assert not ngrams(cold.tokens, 4) & ngrams(said, 4), cold.text
    assert json.loads(cold.text)["say"]  # still a reply, and a valid one (the grammar never gave way)
    # the ban is what made the difference: without it the model takes at least one run from the history
    copied = backend.generate(GenerationRequest(prompt=render_prompt(MIRA, history, ROOM_AGAIN),
                                                schema=reply_schema(MIRA), max_tokens=120, no_repeat_ngram=0),
                              lambda _: True)
    assert copied.tokens != cold.tokens

    backend.reset()
    alone = say(backend, MIRA, history, ROOM_AGAIN)
    cached = say(backend, MIRA, history, ROOM_AGAIN)  # the same prompt again: its aligned prefix is in the slot
    assert cached.cached_tokens > 0
    group = [(BROM, LINES[4]), (MIRA, ROOM_AGAIN), (HILDA, "I have papers.")]
    batched = run_batch(backend, [group], histories={"mira": history})[1]
    batched_cached = run_batch(backend, [group], reset=False, histories={"mira": history})[1]
    assert batched_cached.cached_tokens > 0
    for name, fast in [("alone", alone), ("cached", cached), ("batched", batched),
                       ("batched from a cached slot", batched_cached)]:
        assert fast.tokens == cold.tokens, name
