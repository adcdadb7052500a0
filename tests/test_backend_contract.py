"""The backend contract (``zyke_daemon.backends.base``): every backend class declares each capability itself, and
has what it declares. The server reads the flags and never probes a backend with ``hasattr``.

mypy checks the conformance functions below against the protocols (tools/test.sh runs it on this file); the tests
check the same flags at run time, and the batch of one that a backend without batching runs as."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

import pytest
from zyke_daemon.backends.base import (
    Backend,
    BatchingBackend,
    BatchItem,
    GenerationRequest,
    GenerationResult,
    IdlePrefillBackend,
    OnText,
    run_batch_of_one,
)
from zyke_daemon.backends.llamacpp import LlamaCppBackend

if TYPE_CHECKING:
    from zyke_daemon.backends.hf import TransformersBackend


# -- checked by mypy: a backend that stops satisfying its protocols fails the type check


def _llamacpp_is_a_backend(b: LlamaCppBackend) -> Backend:
    return b


def _llamacpp_batches(b: LlamaCppBackend) -> BatchingBackend:
    return b


def _llamacpp_prefills_idle(b: LlamaCppBackend) -> IdlePrefillBackend:
    return b


def _transformers_is_a_backend(b: TransformersBackend) -> Backend:
    return b


# -- checked at run time

#: each capability flag and the protocol a backend that sets it satisfies
CAPABILITIES: dict[str, type[Any]] = {"supports_batching": BatchingBackend, "supports_idle_prefill": IdlePrefillBackend}


def _methods(protocol: type[Any]) -> set[str]:
    return {name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")}


def _backend_class(module: str) -> type[Any]:
    if module == "hf":
        if not all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft")):
            pytest.skip("the transformers backend needs torch, transformers and peft")
        from zyke_daemon.backends.hf import TransformersBackend

        return TransformersBackend
    return LlamaCppBackend


@pytest.mark.parametrize("module", ["llamacpp", "hf"])
def test_each_backend_declares_its_capabilities_and_has_what_it_declares(module: str) -> None:
    cls = _backend_class(module)
    assert _methods(Backend) <= set(dir(cls))
    assert cls.chat_template is not None and cls.adapter_kind in ("gguf", "peft")
    for flag, protocol in CAPABILITIES.items():
        assert isinstance(vars(cls).get(flag), bool), f"{cls.__name__} must set {flag} itself"
        has = all(callable(getattr(cls, name, None)) for name in _methods(protocol) - _methods(Backend))
        assert has is vars(cls)[flag], (cls.__name__, flag)


def test_the_capabilities_are_what_the_backends_do() -> None:
    assert LlamaCppBackend.supports_batching and LlamaCppBackend.supports_idle_prefill
    hf = _backend_class("hf")
    assert not hf.supports_batching and not hf.supports_idle_prefill and hf.preemptions == 0


class _OneAtATime:
    """Just enough of a backend for ``run_batch_of_one``: answers ``ok`` or raises for a prompt ``fail``."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def generate(self, request: GenerationRequest, on_text: OnText) -> GenerationResult:
        self.prompts.append(request.prompt)
        if request.prompt == "fail":
            raise RuntimeError("model failed")
        on_text("ok")
        return GenerationResult("ok", "stop", 1, 1)


def test_a_backend_without_batching_runs_a_batch_of_one() -> None:
    backend = _OneAtATime()
    outcomes: list[GenerationResult | BaseException] = []
    texts: list[str] = []
    asked: list[int] = []
    def on_text(piece: str) -> bool:
        texts.append(piece)
        return True

    def item(prompt: str) -> BatchItem:
        return BatchItem(lambda: GenerationRequest(prompt=prompt, schema=None), on_text, outcomes.append)

    queued = [item("fail"), item("hi")]

    def take(n: int, adapter: object) -> list[BatchItem]:
        asked.append(n)
        return [queued.pop()] if queued else []

    run_batch_of_one(backend, take)  # type: ignore[arg-type]  # a partial backend
    assert asked == [1] and backend.prompts == ["hi"] and texts == ["ok"]
    assert isinstance(outcomes[0], GenerationResult) and outcomes[0].text == "ok"
    run_batch_of_one(backend, take)  # type: ignore[arg-type]
    assert isinstance(outcomes[1], RuntimeError)  # its exception is its outcome; the caller carries on
    run_batch_of_one(backend, take)  # type: ignore[arg-type]  # nothing queued: nothing runs
    assert asked == [1, 1, 1] and len(outcomes) == 2
