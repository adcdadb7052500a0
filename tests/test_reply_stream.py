from __future__ import annotations

import json

import pytest
from zyke_daemon.reply_stream import ReplyAssembler, SayExtractor

SAYS = ["Aye, hand it over.", 'He said "hi" \\ then left\nfor good.', "Ünïcödé ✓ and emoji 🔥 too", ""]


@pytest.mark.parametrize("say", SAYS)
@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_deltas_concatenate_to_the_decoded_line(say: str, chunk: int) -> None:
    raw = json.dumps({"say": say, "emotion": "calm", "action": "none"}, ensure_ascii=chunk % 2 == 1)
    extractor = SayExtractor()
    deltas = [extractor.feed(raw[i:i + chunk]) for i in range(0, len(raw), chunk)]
    assert "".join(deltas) == say


def test_stop_string_cuts_the_line_and_stops() -> None:
    assembler = ReplyAssembler(["calm"], ["none", "wave"], None, None, stop=["END"])
    raw = '{"say": "Hello there END and more", "emotion": "calm", "action": "wave"}'
    out, keep = [], True
    for ch in raw:
        delta, keep = assembler.feed(ch)
        out.append(delta)
        if not keep:
            break
    assert "".join(out) == "Hello there "
    reply, complete = assembler.reply()
    assert not complete and assembler.stopped_by_string
    assert reply == {"say": "Hello there", "emotion": "calm", "action": "none"}


def test_salvage_keeps_enum_values_the_model_already_wrote() -> None:
    assembler = ReplyAssembler(["calm", "angry"], ["none", "attack"], "calm", None)
    assembler.feed('{"say": "Get out!", "emotion": "angry", "action": "att')
    reply, complete = assembler.reply()
    assert not complete
    assert reply == {"say": "Get out!", "emotion": "angry", "action": "none"}


def test_escaped_surrogate_pairs_wait_for_both_halves() -> None:
    raw = json.dumps({"say": "fire 🔥!", "emotion": "calm", "action": "none"})  # ascii: \ud83d\udd25
    extractor = SayExtractor()
    deltas = [extractor.feed(ch) for ch in raw]
    assert "".join(deltas) == "fire 🔥!"
    assert all("\ud83d" not in d for d in deltas)
