"""The transformers backend (PyTorch + PEFT): any causal LM checkpoint, PEFT LoRA adapters per request.

For GPUs, and for models llama.cpp does not run. Generation goes through the same decode loop as the
llama.cpp backend (decoding.py: llguidance grammar, sampling, repeat penalty, streaming), so a request
means the same thing on either backend; this module only runs the model and hands out logits.

With no model named it runs the embedded Gemma 3 270M, converted once from the shipped GGUF into a
cached transformers checkpoint (hf_checkpoint.py). An adapter trained with PEFT on that checkpoint runs
here as is, and on llama.cpp after ``lora_gguf.export_peft_to_gguf``.

Adapters: PEFT keeps several LoRA adapters injected side by side; a request picks one with
``set_adapter`` (a pointer switch, no weight copy) or runs the base under ``disable_adapter()``. Loaded
adapters are kept in an LRU with a cap, like the llama.cpp backend.

No prefix cache: every request evaluates its whole prompt. On a GPU a few hundred prompt tokens take
milliseconds in one batched forward pass, and a cache keyed by adapter and prefix (what llama.cpp needs
on a CPU) would add state to get wrong for little gain.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from llguidance.hf import from_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer
from zyke.protocol import ModelInfo
from zyke_models.quantization import quantization_config

from ..errors import ModelLoadError
from .base import GenerationRequest, GenerationResult, OnText
from .decoding import decode

log = logging.getLogger(__name__)

#: Row name PEFT's mixed-adapter batches use for "no adapter".
BASE_ROW = "__base__"


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple's MPS, then the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA (half the memory, tensor cores), float32 elsewhere (CPU bf16 matmuls
    are slow on most CPUs and MPS bf16 support is partial)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    value = getattr(torch, aliases.get(dtype, dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32")
    return value


def pick_attention(requested: str | None, device: torch.device) -> str:
    """FlashAttention 2 only where it can run (the flash_attn package, a CUDA device); else PyTorch's SDPA.
    Asking for it without the package falls back with a warning rather than failing to start."""
    has_flash = importlib.util.find_spec("flash_attn") is not None and device.type == "cuda"
    if requested in (None, "auto"):
        return "flash_attention_2" if has_flash else "sdpa"
    if requested == "flash_attention_2" and not has_flash:
        log.warning("flash_attention_2 needs the flash_attn package and a CUDA device; using sdpa")
        return "sdpa"
    return requested


class TransformersBackend:
    name = "transformers"
    adapter_kind: Literal["gguf", "peft"] = "peft"  # loads an adapter's PEFT directory (llama.cpp its GGUF export)
    #: one reply at a time (the server runs it as a batch of one), and no prefix cache to warm
    supports_batching: ClassVar[bool] = False
    supports_idle_prefill: ClassVar[bool] = False
    #: it never pauses a reply
    preemptions = 0

    def __init__(self, model: str | Path | None = None, device: str = "auto", dtype: str | torch.dtype = "auto",
                 quantization: str | None = None, attn_implementation: str | None = None, compile: bool = False,
                 max_loaded_adapters: int = 8) -> None:
        from zyke_models.hf_checkpoint import MARKER, embedded_hf_checkpoint

        if model is None:
            model = embedded_hf_checkpoint()
        local = Path(model).expanduser()
        source = str(local) if local.exists() else str(model)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.attn_implementation = pick_attention(attn_implementation, self.device)
        quant = quantization_config(quantization, self.dtype)
        kwargs: dict[str, Any] = {"dtype": self.dtype, "attn_implementation": self.attn_implementation}
        if quant is not None:
            kwargs |= {"quantization_config": quant, "device_map": {"": self.device.index or 0}
                       if self.device.type == "cuda" else {"": str(self.device)}}
        started = time.perf_counter()
        try:
            self.hf_tokenizer = AutoTokenizer.from_pretrained(source)
            base = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except (OSError, ValueError, RuntimeError, ImportError) as exc:
            raise ModelLoadError(f"transformers could not load {source}: {exc}") from exc
        if quant is None:
            base.to(self.device)
        base.eval()
        self.lm: Any = base  # the torch module; becomes a PeftModel wrapping it once an adapter is loaded
        log.info("loaded %s on %s (%s, %s attention) in %.1f s", source, self.device, self.dtype,
                 self.attn_implementation, time.perf_counter() - started)
        logits_width = int(base.get_output_embeddings().weight.shape[0])
        tokenizer_size = len(self.hf_tokenizer)
        # The grammar's mask and the logits must cover the same ids: the wider of the two, and logits
        # are padded with -inf if the tokenizer knows ids the model has no output for.
        self._n_vocab = max(logits_width, tokenizer_size)
        self._logits_width = logits_width
        self._eos = self._eos_ids()
        self.tokenizer = from_tokenizer(self.hf_tokenizer, n_vocab=self._n_vocab, eos_token=sorted(self._eos))
        n_ctx = getattr(base.config, "max_position_embeddings", None)
        self.fingerprint = _fingerprint(source)
        # A checkpoint converted from a GGUF reports that GGUF's sha256, as llama.cpp does for the same base.
        sha256 = self.fingerprint.removeprefix("sha256:") if (local / MARKER).is_file() else None
        self.model = ModelInfo(name=local.name if local.exists() else source, sha256=sha256, n_ctx=n_ctx)
        self._compile = compile
        self._compiled: tuple[Any, Any] | None = None  # (module, compiled module)
        self._adapters: OrderedDict[str, Path] = OrderedDict()
        self._max_adapters = max_loaded_adapters
        self._lock = threading.RLock()  # one forward pass at a time; adapter switches are model-wide state

    def _eos_ids(self) -> set[int]:
        """EOS plus Gemma's end-of-turn (what the chat template ends a reply with), like llama.cpp's EOT."""
        ids: set[int] = set()
        if self.hf_tokenizer.eos_token_id is not None:
            ids.add(int(self.hf_tokenizer.eos_token_id))
        gen_eos = getattr(self.lm.generation_config, "eos_token_id", None)
        ids.update(int(i) for i in ([gen_eos] if isinstance(gen_eos, int) else gen_eos or []))
        eot = self.hf_tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if isinstance(eot, int) and eot != self.hf_tokenizer.unk_token_id:
            ids.add(eot)
        return ids

    # -- Backend protocol

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def chat_template(self) -> tuple[str, str, str] | None:
        """The checkpoint's chat template with its BOS and EOS texts, or None when the tokenizer has none."""
        tok = self.hf_tokenizer
        template = getattr(tok, "chat_template", None)
        if not isinstance(template, str) or not template:
            return None
        return template, tok.bos_token or "", tok.eos_token or ""

    def close(self) -> None:
        with self._lock:
            self._adapters.clear()
            self.lm = None
            self._compiled = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def generate(self, request: GenerationRequest, on_text: OnText) -> GenerationResult:
        started = time.perf_counter()
        prompt = self._encode(request.prompt)
        with self._lock, torch.inference_mode(), self._using(request.adapter):
            forward = self._forward()
            out = forward(input_ids=torch.tensor([prompt], device=self.device), use_cache=True, logits_to_keep=1)
            state = {"logits": out.logits[0, -1], "cache": out.past_key_values}

            def next_logits() -> np.ndarray:
                logits: np.ndarray = state["logits"].float().cpu().numpy()
                if logits.shape[0] < self._n_vocab:
                    logits = np.concatenate([logits, np.full(self._n_vocab - logits.shape[0], -np.inf, np.float32)])
                return logits

            def advance(tokens: list[int]) -> None:
                step = forward(input_ids=torch.tensor([tokens], device=self.device),
                               past_key_values=state["cache"], use_cache=True, logits_to_keep=1)
                state["logits"], state["cache"] = step.logits[0, -1], step.past_key_values

            return decode(request, self.tokenizer, self._n_vocab, self._eos, next_logits, advance,
                          self._token_bytes, on_text, prompt_tokens=len(prompt), cached_tokens=0, started=started)

    # -- adapters

    @property
    def loaded_adapters(self) -> list[str]:
        return list(self._adapters)

    def load_adapter(self, name: str, path: Path) -> None:
        """Load a PEFT LoRA adapter directory (idempotent); the least recently used one is dropped past the cap."""
        with self._lock:
            if name in self._adapters:
                self._adapters.move_to_end(name)
                return
            if name == BASE_ROW:
                raise ModelLoadError(f"{BASE_ROW!r} is reserved for the base model")
            from peft import PeftModel

            try:
                if isinstance(self.lm, PeftModel):
                    self.lm.load_adapter(str(path), adapter_name=name, is_trainable=False)
                else:
                    self.lm = PeftModel.from_pretrained(self.lm, str(path), adapter_name=name,
                                                           is_trainable=False)
                    self.lm.eval()
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise ModelLoadError(f"could not load the PEFT adapter {path}: {exc}") from exc
            self._adapters[name] = Path(path)
            while len(self._adapters) > self._max_adapters:
                self.unload_adapter(next(iter(self._adapters)))

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if self._adapters.pop(name, None) is None:
                return
            if self._adapters:
                self.lm.delete_adapter(name)
            else:
                # PEFT cannot run a PeftModel whose last adapter was deleted (it looks up the active adapter's
                # config); take the LoRA layers out instead, leaving the plain base model as it was loaded.
                self.lm = self.lm.unload()

    @contextmanager
    def _using(self, name: str | None) -> Iterator[None]:
        """Run the block with adapter ``name`` active, or with none (the base model) for None."""
        if name is None:
            if self._adapters:
                with self.lm.disable_adapter():
                    yield
            else:
                yield
            return
        if name not in self._adapters:
            raise ModelLoadError(f"adapter {name!r} is not loaded")
        self._adapters.move_to_end(name)
        self.lm.set_adapter(name)
        yield

    # -- internals

    def _encode(self, text: str) -> list[int]:
        """Token ids with the tokenizer's special tokens (BOS for Gemma), as llama.cpp's ``add_bos=True``."""
        return list(self.hf_tokenizer(text, add_special_tokens=True)["input_ids"])

    def _token_bytes(self, token: int) -> bytes:
        return self.tokenizer.decode_bytes([token])

    def _forward(self) -> Any:
        """The module to call, compiled (``compile=True``) per module: PEFT wrapping the model on the first
        adapter gives a new top-level module, and compiling it once there avoids a graph break per call."""
        if not self._compile:
            return self.lm
        if self._compiled is None or self._compiled[0] is not self.lm:
            self._compiled = (self.lm, torch.compile(self.lm, dynamic=True))
        return self._compiled[1]


def _fingerprint(source: str) -> str:
    """base_fingerprint of a local checkpoint, or of the Hub snapshot transformers just downloaded."""
    from zyke_models.hf_checkpoint import base_fingerprint

    path = Path(source)
    if not path.exists():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(source, local_files_only=True))
    return base_fingerprint(path)
