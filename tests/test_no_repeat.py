"""The no-repeat n-gram ban over the say line: its table, its step logic, its mask edit, and where the
daemon gets its history from. No model here: the fast-path and end-to-end tests run it on the real one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from zyke.protocol import GenerationOptions, ModelInfo
from zyke.protocol.validation import first_error
from zyke.response import build_options
from zyke_daemon.backends.base import DEFAULT_NO_REPEAT_NGRAM, GenerationRequest
from zyke_daemon.backends.decoding import SAY_OPENING, SayNgramBan, SayScanner, allowed_tokens, ngram_table
from zyke_daemon.config import DaemonConfig
from zyke_daemon.core import DaemonCore, Send, Submit, _merge_options
from zyke_daemon.sessions import SessionStore

N_VOCAB = 70  # three mask words, the last one partly used


def mask_of(tokens: list[int]) -> np.ndarray:
    mask = np.zeros((N_VOCAB + 31) // 32, dtype=np.int32)
    words = mask.view(np.uint32)
    for t in tokens:
        words[t >> 5] |= np.uint32(1 << (t & 31))
    return mask


def test_table_maps_each_prefix_to_every_token_that_followed_it() -> None:
    table = ngram_table([[1, 2, 3, 4], [2, 3, 9], [7]], 3)
    assert table == {(1, 2): {3}, (2, 3): {4, 9}}
    assert ngram_table([[5, 6]], 3) == {}  # shorter than n: nothing to ban


def test_history_ngrams_and_the_lines_own_ngrams_are_banned_step_by_step() -> None:
    ban = SayNgramBan(3, [[10, 11, 12, 13]])
    assert ban.banned() == set()  # fewer than n-1 say tokens: nothing can complete an n-gram yet
    ban.push(10)
    assert ban.banned() == set()
    ban.push(11)
    assert ban.banned() == {12}  # 10 11 -> 12 would copy the history line
    ban.push(40)  # the line went elsewhere
    assert ban.banned() == set()
    ban.push(41)
    ban.push(40)
    assert ban.banned() == set()  # (41, 40) never seen
    ban.push(41)
    assert ban.banned() == {40}  # its own 40 41 40 -> would loop on itself
    ban.push(12)
    assert ban.banned() == set()


def test_a_one_gram_ban_forbids_every_token_already_said() -> None:
    ban = SayNgramBan(1, [[3, 4]])
    assert ban.banned() == {3, 4}
    ban.push(5)
    assert ban.banned() == {3, 4, 5}


def test_zero_is_not_a_ban() -> None:
    with pytest.raises(ValueError):
        SayNgramBan(0, [])


def test_apply_clears_banned_tokens_from_the_grammar_mask_only() -> None:
    ban = SayNgramBan(2, [[7, 8], [7, 33], [7, 65]])
    ban.push(7)
    mask = mask_of([1, 8, 33, 50, 65, 69])
    assert ban.apply(mask)
    assert allowed_tokens(mask, N_VOCAB).tolist() == [1, 50, 69]


def test_apply_skips_the_ban_when_it_would_leave_no_token() -> None:
    ban = SayNgramBan(2, [[7, 8], [7, 31]])
    ban.push(7)
    mask = mask_of([8, 31])  # the grammar allows only banned tokens (31: the sign bit of a word)
    assert not ban.apply(mask)
    assert allowed_tokens(mask, N_VOCAB).tolist() == [8, 31]


def test_scanner_is_inside_exactly_the_say_string() -> None:
    scanner = SayScanner()
    states = []
    text = SAY_OPENING + 'He said \\"no\\" twice.", "emotion": "calm", "say": "x'
    for ch in text:
        states.append(scanner.inside)
        scanner.feed(ch)
    inside = "".join(ch for ch, was in zip(text, states, strict=True) if was)
    # the characters chosen while inside: the escaped line and its closing quote, nothing after it
    assert inside == 'He said \\"no\\" twice."'
    assert scanner.done and not scanner.inside


def test_scanner_follows_pieces_that_span_the_opening_and_the_end() -> None:
    scanner = SayScanner()
    scanner.feed('{"say')
    scanner.feed('": "Hi')
    assert scanner.inside
    scanner.feed(' there.", "')
    assert scanner.done and not scanner.inside


def test_scanner_never_enters_a_reply_that_does_not_start_with_say() -> None:
    scanner = SayScanner()
    scanner.feed('{"emotion": "calm", "say": "hello"}')
    assert scanner.done and not scanner.inside


# -- where the daemon gets n and the history lines


BROM = {"id": "brom", "name": "Brom", "persona": "A grumpy dwarf smith.", "actions": ["none", "repair"],
        "emotions": ["neutral", "angry"]}


def say_request(tmp_path: Path, npc: dict[str, object], history: list[dict[str, object]],
                options: dict[str, object] | None = None, n_ctx: int = 4096) -> GenerationRequest:
    """The GenerationRequest the daemon builds for one npc.say to an NPC restored with ``history``."""
    daemon = DaemonCore(DaemonConfig(), SessionStore(tmp_path / "npcs"), "t", ModelInfo(name="m.gguf"), "test")
    conn = daemon.connect()
    for frame in [{"v": 1, "type": "hello", "id": "h", "token": "t", "protocol": 1},
                  {"v": 1, "type": "npc.state.set", "id": "s", "state": {"v": 1, "npc": npc, "history": history}}]:
        [answer] = conn.receive(json.dumps(frame))
        assert isinstance(answer, Send) and answer.frame["type"] != "error", answer
    say: dict[str, object] = {"v": 1, "type": "npc.say", "id": "q", "npc": "brom", "input": "again"}
    if options is not None:
        say["options"] = options
    [submit] = conn.receive(json.dumps(say))
    assert isinstance(submit, Submit)
    return daemon.prepare(submit.job, count_tokens=lambda s: len(s.split()), n_ctx=n_ctx)


def turn(say: str) -> dict[str, object]:
    return {"player": "word " * 40, "reply": {"say": say, "emotion": "neutral", "action": "none"}}


def test_the_request_carries_the_says_the_prompt_shows_and_the_default_n(tmp_path: Path) -> None:
    request = say_request(tmp_path, BROM, [turn(f"line {i}") for i in range(6)], {"max_tokens": 50}, n_ctx=300)
    shown = [f"line {i}" for i in range(6) if f'"say": "line {i}"' in request.prompt]
    assert 0 < len(shown) < 6  # the oldest turns were dropped to fit
    assert request.history_says == shown
    assert request.no_repeat_ngram == DEFAULT_NO_REPEAT_NGRAM == 4


def test_n_comes_from_the_request_over_the_npc_defaults(tmp_path: Path) -> None:
    npc = {**BROM, "defaults": {"options": {"no_repeat_ngram": 6}}}
    assert say_request(tmp_path / "a", npc, []).no_repeat_ngram == 6
    assert say_request(tmp_path / "b", npc, [], {"no_repeat_ngram": 0}).no_repeat_ngram == 0
    merged = _merge_options(GenerationOptions(no_repeat_ngram=6), GenerationOptions(no_repeat_ngram=0))
    assert merged.no_repeat_ngram == 0


def test_sdk_keyword_and_schema_agree_on_the_range() -> None:
    options = build_options({"no_repeat_ngram": 6}, no_repeat_ngram=0)  # the keyword wins, 0 included
    assert options is not None and options.no_repeat_ngram == 0
    with pytest.raises(ValidationError):
        build_options(no_repeat_ngram=17)
    frame = {"v": 1, "type": "npc.say", "id": "x", "npc": "brom", "input": "hi"}
    assert first_error("frames/npc.say", {**frame, "options": {"no_repeat_ngram": 16}}) is None
    assert first_error("frames/npc.say", {**frame, "options": {"no_repeat_ngram": 17}}) is not None
    assert first_error("frames/npc.say", {**frame, "options": {"no_repeat_ngram": -1}}) is not None


# -- the word guard: respelt tokens cannot sneak a repeated run of words past the token ban


def test_complete_words_joins_apostrophes_and_leaves_out_an_unfinished_word() -> None:
    from zyke_daemon.backends.decoding import complete_words

    assert complete_words("The miller's son saw") == ["the", "millers", "son"]
    assert complete_words("The miller' s son saw ") == ["the", "millers", "son", "saw"]
    assert complete_words("Don' t leave, friend.") == ["dont", "leave", "friend"]


def test_word_guard_catches_respellings_and_allows_short_overlaps() -> None:
    from zyke_daemon.backends.decoding import SayWordGuard

    guard = SayWordGuard(5, ["The miller's son saw lights in the old tower.", "Watch your tongue or find the door."])
    # the fifth word of a run from an earlier line, however it is spelt, is refused when it finishes
    assert guard.repeats("The miller' s son saw", "The miller' s son saw lights ")
    assert guard.repeats("Watch your tongue, or find", "Watch your tongue, or find the ")
    # four shared words are fine, and so is an unfinished word (it may still become another word)
    assert not guard.repeats("The miller' s son", "The miller' s son saw ")
    assert not guard.repeats("The miller' s son saw", "The miller' s son saw light")
    assert not guard.repeats("Watch your tongue, or", "Watch your tongue, or leave ")
    # a line may not loop on itself either
    own = SayWordGuard(5, [])
    looped = "one two three four five and one two three four"
    assert own.repeats(looped, looped + " five ")


def test_word_guard_reads_apostrophes_both_ways() -> None:
    from zyke_daemon.backends.decoding import SayWordGuard, complete_words

    assert complete_words("Don' t go now ", join=False) == ["don", "t", "go", "now"]
    guard = SayWordGuard(5, ["You may pass then. Don' t leave me alone."])
    assert guard.repeats("You may pass then. Don t", "You may pass then. Don t leave ")  # "Don t" = "Don' t"
    assert guard.repeats("may pass then. Dont leave", "may pass then. Dont leave me ")  # "Dont" = "Don' t"
