"""The llama.cpp backend on the real embedded model: constrained output, determinism, the prefix cache."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from zyke.prompt_format import render_prompt, render_reply, reply_schema
from zyke.protocol import NpcReply, NpcSpec, Turn
from zyke.protocol.validation import validator_for
from zyke_daemon.backends.base import GenerationRequest
from zyke_daemon.backends.decoding import sample
from zyke_daemon.backends.llamacpp import PREFILL_CHUNK, LlamaCppBackend
from zyke_models.embedded import EMBEDDED_NAME

pytestmark = pytest.mark.slow

NPC = NpcSpec(id="mira", name="Mira", persona="A cheerful innkeeper in a mountain village.",
              actions=["none", "serve_drink", "rent_room", "kick_out"], emotions=["happy", "annoyed", "neutral"])


def gen(backend: LlamaCppBackend, prompt: str, **kw: object) -> tuple[str, object]:
    pieces: list[str] = []
    req = GenerationRequest(prompt=prompt, schema=reply_schema(NPC), **kw)  # type: ignore[arg-type]
    result = backend.generate(req, lambda p: pieces.append(p) or True)
    assert "".join(pieces) == result.text
    return result.text, result


def test_embedded_model_is_verified(backend: LlamaCppBackend) -> None:
    assert backend.model.name == EMBEDDED_NAME and backend.model.sha256 is not None


def test_constrained_reply_validates_for_several_inputs(backend: LlamaCppBackend) -> None:
    check = validator_for(reply_schema(NPC))
    for line in ["A room for the night, please.", "Give me your money!", "What's the weather like?"]:
        text, result = gen(backend, render_prompt(NPC, [], line, {"gold": 5}), max_tokens=120)
        assert result.finish_reason == "stop"  # type: ignore[attr-defined]
        reply = json.loads(text)
        assert check.is_valid(reply), reply
        assert list(reply) == ["say", "emotion", "action"]


def test_greedy_is_deterministic_and_prefix_reuse_changes_nothing(backend: LlamaCppBackend) -> None:
    history = [Turn(player="Hello!", reply=NpcReply(say="Welcome, traveller!", emotion="happy", action="none"))]
    prompt = render_prompt(NPC, history, "Do you have ale?")
    backend.reset()  # cold
    cold, cold_result = gen(backend, prompt, max_tokens=40)
    assert cold_result.cached_tokens == 0  # type: ignore[attr-defined]
    warm, warm_result = gen(backend, prompt, max_tokens=40)
    assert warm == cold
    assert warm_result.cached_tokens > 0  # type: ignore[attr-defined]
    # a longer conversation that extends the cached one reuses its prefix and matches a cold run
    longer = render_prompt(NPC, [*history, Turn(player="Do you have ale?", reply=NpcReply.model_validate(
        json.loads(cold)))], "How much?")
    warm2, warm2_result = gen(backend, longer, max_tokens=40)
    assert warm2_result.cached_tokens >= len(backend.tokenize(prompt)) - PREFILL_CHUNK  # type: ignore[attr-defined]
    backend.reset()
    cold2, _ = gen(backend, longer, max_tokens=40)
    assert warm2 == cold2


def test_seeded_sampling_is_reproducible(backend: LlamaCppBackend) -> None:
    prompt = render_prompt(NPC, [], "Tell me a story.")
    a, _ = gen(backend, prompt, max_tokens=30, temperature=1.0, top_p=0.95, seed=7)
    b, _ = gen(backend, prompt, max_tokens=30, temperature=1.0, top_p=0.95, seed=7)
    others = {gen(backend, prompt, max_tokens=30, temperature=1.0, top_p=0.95, seed=s)[0] for s in (8, 9, 10)}
    assert a == b
    assert others - {a}, "different seeds never changed the sample"


def test_max_tokens_and_cancel_stop_early(backend: LlamaCppBackend) -> None:
    prompt = render_prompt(NPC, [], "Describe every room of your inn in detail.")
    _, result = gen(backend, prompt, max_tokens=5)
    assert result.finish_reason == "length" and result.completion_tokens == 5  # type: ignore[attr-defined]
    cancel = threading.Event()
    count = 0

    def on_text(_: str) -> bool:
        nonlocal count
        count += 1
        if count == 3:
            cancel.set()
        return True

    req = GenerationRequest(prompt=prompt, schema=reply_schema(NPC), max_tokens=200, cancel=cancel)
    result = backend.generate(req, on_text)
    assert result.finish_reason == "cancelled" and result.completion_tokens == 3


def test_training_rendering_is_what_decoding_produces(backend: LlamaCppBackend) -> None:
    text, _ = gen(backend, render_prompt(NPC, [], "Hi!"), max_tokens=120)
    assert render_reply(json.loads(text)) == text


def test_sampler_respects_the_mask_and_top_k() -> None:
    rng = np.random.default_rng(0)
    logits = np.linspace(0, 10, 100).astype(np.float32)
    allowed = np.zeros(100, dtype=bool)
    allowed[[3, 50, 97]] = True
    picks = {sample(logits, allowed, 1.0, 1.0, 0, rng) for _ in range(200)}
    assert picks <= {3, 50, 97}
    assert {sample(logits, allowed, 1.0, 1.0, 1, rng) for _ in range(50)} == {97}
