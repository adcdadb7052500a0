"""The transformers backend on the embedded model (converted once to a cached checkpoint), and its parity
with llama.cpp: an adapter trained with PEFT here runs on both backends with the same greedy output."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import backend_helpers
import pytest
import torch
from zyke.prompt_format import render_prompt, reply_schema
from zyke.protocol import NpcReply, NpcSpec, Turn
from zyke.protocol.validation import validator_for
from zyke_daemon.backends.base import GenerationRequest, GenerationResult
from zyke_daemon.backends.decoding import say_token_ids
from zyke_daemon.backends.hf import TransformersBackend
from zyke_daemon.backends.llamacpp import LlamaCppBackend
from zyke_daemon.backends.loader import choose_backend
from zyke_daemon.config import DaemonConfig, load_config
from zyke_daemon.errors import ModelLoadError
from zyke_models.embedded import embedded_model_path
from zyke_models.hf_checkpoint import MARKER, base_fingerprint, embedded_hf_checkpoint
from zyke_models.lora_gguf import export_peft_to_gguf
from zyke_models.quantization import quantization_config

slow = pytest.mark.slow

NPC = NpcSpec(id="mira", name="Mira", persona="A cheerful innkeeper in a mountain village.",
              actions=["none", "serve_drink", "rent_room", "kick_out"], emotions=["happy", "annoyed", "neutral"])

#: The adapter is trained to continue PROMPT with TARGET, so its greedy output is far from the base's and
#: both backends follow the same strongly preferred tokens (the base models differ a little: Q4_K_M
#: activations on llama.cpp, fp32 here).
PROMPT = "Mira the innkeeper leans over the counter and whispers:"
TARGET = " The dragon sleeps under the old mill tonight, bring silver arrows and a lantern."
PARITY_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return embedded_hf_checkpoint()


@pytest.fixture(scope="module")
def hf(checkpoint: Path) -> Iterator[TransformersBackend]:
    torch.set_num_threads(2)
    b = TransformersBackend(checkpoint, device="cpu")
    yield b
    b.close()


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaCppBackend]:
    path, sha = embedded_model_path()
    b = LlamaCppBackend(path, sha256=sha, n_ctx=1024, n_threads=2)
    yield b
    b.close()


@pytest.fixture(scope="module")
def adapter(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A PEFT LoRA trained a few steps on one sentence, and its GGUF export: (peft dir, gguf file)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    peft_model.train()
    batch = tok(PROMPT + TARGET, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(6):
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(out / "peft")
    gguf = export_peft_to_gguf(out / "peft", out / "adapter.gguf")
    return out / "peft", gguf


def gen(backend: TransformersBackend, prompt: str, **kw: object) -> GenerationResult:
    pieces: list[str] = []
    req = GenerationRequest(prompt=prompt, schema=reply_schema(NPC), **kw)  # type: ignore[arg-type]
    result = backend.generate(req, lambda p: pieces.append(p) or True)
    assert "".join(pieces) == result.text
    return result


def llama_greedy(backend: LlamaCppBackend, prompt: str, adapter: str | None, n: int) -> list[int]:
    """Unconstrained greedy continuation on llama.cpp with ``adapter`` applied (no repeat penalty), from a
    cold context: the same thing ``hf_generate_batch`` computes on transformers."""
    return backend_helpers.llama_greedy(backend, prompt, n, adapter)


def generate_batch(backend: TransformersBackend, prompts: list[str], adapters: list[str | None],
                   max_new_tokens: int) -> list[list[int]]:
    return backend_helpers.hf_generate_batch(backend, prompts, adapters, max_new_tokens)


# -- the converted checkpoint


@slow
def test_checkpoint_is_marked_and_shares_the_gguf_fingerprint(checkpoint: Path) -> None:
    gguf, sha = embedded_model_path()
    marker = json.loads((checkpoint / MARKER).read_text())
    assert marker["source"] == gguf.name and marker["source_sha256"] == sha
    assert base_fingerprint(checkpoint) == base_fingerprint(gguf) == f"sha256:{sha}"
    assert embedded_hf_checkpoint() == checkpoint  # reused, not converted again
    assert not [p for p in checkpoint.parent.iterdir() if p.name.endswith(".partial")]


def test_fingerprint_of_a_plain_checkpoint_covers_config_and_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    first = base_fingerprint(tmp_path)
    assert first.startswith("sha256:") and len(first) == 7 + 64
    (tmp_path / "tokenizer_config.json").write_text('{"rewritten": true}')
    assert base_fingerprint(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert base_fingerprint(tmp_path) != first
    with pytest.raises(FileNotFoundError):
        base_fingerprint(tmp_path / "missing")


@slow
def test_tokenization_matches_llama_cpp(hf: TransformersBackend, llama: LlamaCppBackend) -> None:
    history = [Turn(player="Hello!", reply=NpcReply(say="Welcome, traveller! Café au lait?", emotion="happy",
                                                    action="none"))]
    for prompt in [render_prompt(NPC, [], "A room for the night, please.", {"gold": 5}),
                   render_prompt(NPC, history, "Do you have ale? ¿Y cerveza? 🍺"), PROMPT]:
        ids = hf._encode(prompt)
        assert ids[0] == hf.hf_tokenizer.bos_token_id and ids[1] != ids[0]  # one BOS, as add_bos=True
        assert ids == llama.tokenize(prompt)
        assert hf.count_tokens(prompt) == llama.count_tokens(prompt)


# -- generation


@slow
def test_constrained_reply_validates_and_streams(hf: TransformersBackend) -> None:
    check = validator_for(reply_schema(NPC))
    result = gen(hf, render_prompt(NPC, [], "A room for the night, please.", {"gold": 5}), max_tokens=120)
    assert result.finish_reason == "stop"
    reply = json.loads(result.text)
    assert check.is_valid(reply), reply
    assert list(reply) == ["say", "emotion", "action"]
    assert result.prompt_tokens == hf.count_tokens(render_prompt(NPC, [], "A room for the night, please.",
                                                                 {"gold": 5}))


@slow
def test_seeded_sampling_is_reproducible(hf: TransformersBackend) -> None:
    prompt = render_prompt(NPC, [], "Tell me a story.")
    a = gen(hf, prompt, max_tokens=14, temperature=1.0, top_p=0.95, seed=7).text
    b = gen(hf, prompt, max_tokens=14, temperature=1.0, top_p=0.95, seed=7).text
    others = {gen(hf, prompt, max_tokens=14, temperature=1.0, top_p=0.95, seed=s).text for s in (8, 9)}
    assert a == b
    assert others - {a}, "different seeds never changed the sample"


@slow
def test_the_no_repeat_ban_over_history_holds_here_too(hf: TransformersBackend, llama: LlamaCppBackend) -> None:
    """The ban lives in the shared decode step: it tokenizes the history with this backend's tokenizer
    (the same ids as llama.cpp's) and keeps every 4-token run of the earlier line out of the reply."""
    said = "Yes, we have a warm room upstairs for five silver coins a night."
    history = [Turn(player="Do you have a room for the night?",
                    reply=NpcReply(say=said, emotion="happy", action="rent_room"))]
    ids = say_token_ids(hf.tokenizer, said)
    assert ids == hf.hf_tokenizer(said, add_special_tokens=False)["input_ids"] == say_token_ids(llama.tokenizer, said)
    result = gen(hf, render_prompt(NPC, history, "Do you have a room for the night, please?"), max_tokens=60,
                 history_says=[said])
    assert validator_for(reply_schema(NPC)).is_valid(json.loads(result.text))
    runs = {tuple(result.tokens[i:i + 4]) for i in range(len(result.tokens) - 3)}
    assert not runs & {tuple(ids[i:i + 4]) for i in range(len(ids) - 3)}, result.text


# -- adapters: parity with llama.cpp


@slow
def test_adapter_parity_with_llama_cpp(hf: TransformersBackend, llama: LlamaCppBackend,
                                       adapter: tuple[Path, Path]) -> None:
    peft_dir, gguf = adapter
    hf_base = generate_batch(hf, [PROMPT], [None], PARITY_TOKENS)[0]
    llama_base = llama_greedy(llama, PROMPT, None, PARITY_TOKENS)

    hf.load_adapter("parity", peft_dir)
    llama.load_adapter("parity", gguf)
    hf_tuned = generate_batch(hf, [PROMPT], ["parity"], PARITY_TOKENS)[0]
    llama_tuned = llama_greedy(llama, PROMPT, "parity", PARITY_TOKENS)
    trained = hf.hf_tokenizer(TARGET, add_special_tokens=False)["input_ids"]

    assert hf_tuned[:8] == llama_tuned[:8], (hf.hf_tokenizer.decode(hf_tuned), hf.hf_tokenizer.decode(llama_tuned))
    assert hf_tuned[:4] == trained[:4]  # the adapter learned (the start of) its sentence
    assert hf_tuned != hf_base and llama_tuned != llama_base
    # the base with the adapter still loaded (request.adapter None), then after unloading it
    assert generate_batch(hf, [PROMPT], [None], PARITY_TOKENS)[0] == hf_base
    assert llama_greedy(llama, PROMPT, None, PARITY_TOKENS) == llama_base
    hf.unload_adapter("parity")
    llama.unload_adapter("parity")
    assert hf.loaded_adapters == [] and llama.loaded_adapters == []
    assert generate_batch(hf, [PROMPT], [None], PARITY_TOKENS)[0] == hf_base
    assert llama_greedy(llama, PROMPT, None, PARITY_TOKENS) == llama_base


@slow
def test_generate_uses_the_requested_adapter(hf: TransformersBackend, adapter: tuple[Path, Path]) -> None:
    prompt = render_prompt(NPC, [], "Any news?")
    base = gen(hf, prompt, max_tokens=10, repeat_penalty=1.0)
    hf.load_adapter("gen", adapter[0])
    try:
        tuned = gen(hf, prompt, max_tokens=10, repeat_penalty=1.0, adapter="gen")
        assert gen(hf, prompt, max_tokens=10, repeat_penalty=1.0).tokens == base.tokens
        assert tuned.tokens != base.tokens
        with pytest.raises(ModelLoadError, match="not loaded"):
            gen(hf, prompt, max_tokens=2, adapter="missing")
    finally:
        hf.unload_adapter("gen")


@slow
def test_batch_rows_with_different_adapters_match_single_runs(hf: TransformersBackend,
                                                              adapter: tuple[Path, Path]) -> None:
    hf.load_adapter("batch", adapter[0])
    try:
        prompts = [PROMPT, "The blacksmith looks up from the anvil and says:"]  # different lengths: left padding
        together = generate_batch(hf, prompts, ["batch", None], 8)
        alone = [generate_batch(hf, [prompts[0]], ["batch"], 8)[0], generate_batch(hf, [prompts[1]], [None], 8)[0]]
        assert together == alone
        assert together[0] != generate_batch(hf, [prompts[0]], [None], 8)[0]
    finally:
        hf.unload_adapter("batch")


@slow
def test_adapter_lru_cap(hf: TransformersBackend, adapter: tuple[Path, Path]) -> None:
    cap = hf._max_adapters
    hf._max_adapters = 2
    try:
        for name in ("npc1", "npc2", "npc1", "npc3"):  # touching npc1 makes npc2 the least recently used
            hf.load_adapter(name, adapter[0])
        assert hf.loaded_adapters == ["npc1", "npc3"]
    finally:
        hf._max_adapters = cap
        for name in hf.loaded_adapters:
            hf.unload_adapter(name)


# -- configuration


def test_quantization_needs_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed; 4-bit loading is exercised on GPU machines")
    with pytest.raises(ModelLoadError, match="bitsandbytes"):
        quantization_config("4bit", torch.bfloat16)
    with pytest.raises(ModelLoadError, match="unknown quantization"):
        quantization_config("3bit", torch.bfloat16)
    assert quantization_config(None, torch.float32) is None


def test_auto_backend_choice(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(8))
    auto = "transformers" if torch.cuda.is_available() else "llama.cpp"
    assert choose_backend(DaemonConfig()) == auto
    assert choose_backend(DaemonConfig(model=str(gguf))) == "llama.cpp"
    assert choose_backend(DaemonConfig(backend="transformers")) == "transformers"
    assert choose_backend(DaemonConfig(backend="llama.cpp", model="google/gemma-3-270m")) == "llama.cpp"


def test_transformers_settings_load_from_env_and_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZYKE_COMPILE", "true")
    monkeypatch.setenv("ZYKE_QUANTIZATION", "4bit")
    config = load_config({"dtype": "bfloat16", "device": "cuda:1"}, path=tmp_path / "none.toml")
    assert (config.compile, config.quantization, config.dtype, config.device) == (True, "4bit", "bfloat16", "cuda:1")
    monkeypatch.setenv("ZYKE_COMPILE", "maybe")
    with pytest.raises(ValueError, match="true or false"):
        load_config(path=tmp_path / "none.toml")


@slow
def test_daemon_starts_on_a_transformers_checkpoint_dir(tmp_path: Path) -> None:
    """`zyke-daemon start --backend transformers --model DIR` serves (the GGUF-only model check once ran
    first and refused every checkpoint directory with "model file not found")."""
    import sys

    from zyke import Client

    sys.path.insert(0, str(Path(__file__).parent))
    from daemon_proc import DaemonProcess
    from federated_proc import tiny_base

    model = tiny_base(tmp_path / "tiny")
    proc = DaemonProcess(tmp_path / "home", extra_args=["--backend", "transformers", "--model", str(model),
                                                         "--device", "cpu"]).start()
    try:
        with Client(proc.url, proc.token, game="hf-dir", timeout=300) as client:
            assert client.connect().backend == "transformers"
            npc = client.npc("brom", name="Brom", persona="A blacksmith.", actions=["none", "repair"],
                             emotions=["neutral", "angry"])
            reply = npc.say("Can you fix my sword?", max_tokens=24)
            assert reply.emotion in {"neutral", "angry"} and reply.action in {"none", "repair"}
    finally:
        proc.stop()
