"""``zyke-train train`` and ``evaluate`` through the real CLI: a tiny LoRA run on the embedded model, resumed
from its checkpoint, registered for the daemon, exported to GGUF and evaluated against the base through the
llama.cpp backend. Kept tiny (two or three steps of one 128-token example) so the whole module stays well
under a few minutes of CPU; the unmarked tests check the pure parts (masking, batching, metrics) instantly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from zyke.protocol import NpcSpec, Turn
from zyke_train.batching import collate, epoch_batches, epoch_subset
from zyke_train.cli import main
from zyke_train.evaluate import Scenario, is_echo, is_off_persona, judge, summarize, word_f1
from zyke_train.train_data import Tokenized, decision_spans

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "training" / "data" / "npc_train.jsonl"
HELDOUT = REPO / "training" / "data" / "npc_heldout.jsonl"
METRICS = {"validity", "action_accuracy", "action_accuracy_non_none", "emotion_accuracy", "empty_say_rate",
           "echo_rate", "off_persona_rate", "say_f1", "mean_say_words", "ttft_s", "tokens_per_s"}


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


# -- pure parts


def test_collate_left_pads_and_masks_everything_but_the_completion() -> None:
    items = [Tokenized("a", [2, 10, 11, 12], [20, 21]), Tokenized("b", [2, 13], [22, 23, 24])]
    batch = collate(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 10, 11, 12, 20, 21], [0, 2, 13, 22, 23, 24]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, -100, 20, 21], [-100, -100, -100, 22, 23, 24]]
    assert batch["keep"] == 4 and batch["targets"] == 5  # longest completion + 1 logits are enough


def test_epoch_batches_are_deterministic_cover_everything_and_bucket_by_length() -> None:
    lengths = [(i * 37) % 101 for i in range(50)]
    a = epoch_batches(lengths, 4, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 4, seed=1, epoch=0)  # what makes --resume-latest exact
    assert a != epoch_batches(lengths, 4, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(50))
    assert all(lengths[b[i]] <= lengths[b[i + 1]] for b in a for i in range(len(b) - 1))


def test_decision_weights_reach_the_loss_weights_and_only_the_decision_tokens() -> None:
    completion = '{"say": "An emotion: none.", "emotion": "angry", "action": "trade"}\n'
    spans = decision_spans(completion)
    assert [completion[a:b] for a, b in spans] == ["angry", "trade"]  # the values, not look-alikes in say
    items = [Tokenized("a", [2, 10], [20, 21, 22], weights=(1.0, 5.0, 1.0), action="trade"),
             Tokenized("b", [2], [23])]
    batch = collate(items, pad_id=0)
    assert batch["weights"].tolist() == [[0, 0, 1, 5, 1], [0, 0, 0, 0, 1]]
    assert batch["weight"] == 8.0 and batch["targets"] == 4


def test_epoch_subset_caps_an_action_share_differently_each_epoch() -> None:
    actions = ["none"] * 60 + ["trade"] * 20 + ["refuse"] * 20
    epochs = [epoch_subset(actions, {"none": 0.3}, seed=0, epoch=e) for e in range(3)]
    for chosen in epochs:
        kept = [actions[i] for i in chosen]
        assert kept.count("trade") == 20 and kept.count("refuse") == 20  # every other row, every epoch
        assert kept.count("none") == int(0.3 * 40 / 0.7)
    assert epochs[0] == epoch_subset(actions, {"none": 0.3}, seed=0, epoch=0)  # resumable
    assert len({tuple(c) for c in epochs}) == 3  # a different sample of `none` rows each epoch
    assert epoch_subset(actions, {}, seed=0, epoch=0) == list(range(100))


def test_reply_metrics() -> None:
    npc = NpcSpec(id="brom", name="Brom", persona="A smith.", actions=["none", "trade"], emotions=["neutral", "angry"])
    history = [Turn.model_validate({"player": "Hi.", "reply": {"say": "Mind the anvil.", "emotion": "neutral",
                                                               "action": "none"}})]
    s = Scenario("x", npc, history, "Sell me an axe!", None, {"say": "Ten gold.", "emotion": "neutral",
                                                              "action": "trade"})
    assert is_echo("sell me an axe", s) and is_echo("Mind the anvil!", s) and not is_echo("Ten gold, friend.", s)
    assert is_off_persona("As an AI language model I cannot sell axes.", "Brom")
    assert is_off_persona("Player: hello", "Brom") and is_off_persona("Brom: hm", "Brom")
    assert not is_off_persona("AI? Never heard of it. Axes are ten gold.", "Brom")
    assert word_f1("ten gold", "Ten gold.") == 1.0
    good = judge('{"say": "Ten gold.", "emotion": "neutral", "action": "trade"}', s)
    bad = judge('{"say": "Ten', s)
    assert good["valid"] and good["action_ok"] and good["emotion_ok"] and not good["echo"]
    assert not bad["valid"] and not bad["action_ok"]
    timing = {"ttft_s": 0.1, "total_s": 1.1, "completion_tokens": 11}
    summary = summarize([good | timing, bad | timing], [s, s])
    assert summary["validity"] == 0.5 and summary["action_accuracy"] == 0.5 and summary["echo_rate"] == 0.0
    assert summary["tokens_per_s"] == 10.0


def test_config_file_rejects_unknown_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_r: 4\nno_such_option: 1\n")
    result = CliRunner().invoke(main, ["train", "--config", str(cfg), "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no_such_option" in result.output


def test_unavailable_options_fail_clearly(tmp_path: Path) -> None:
    import importlib.util

    import torch

    rows = tmp_path / "rows.jsonl"
    rows.write_text(TRAIN.read_text().splitlines(keepends=True)[0])
    base = ["train", "--data", str(rows), "--output-dir", str(tmp_path / "o"), "--max-steps", "1"]
    if not torch.cuda.is_available():
        result = CliRunner().invoke(main, [*base, "--qlora"])
        assert result.exit_code == 1 and "--qlora needs a CUDA GPU" in result.output
    if importlib.util.find_spec("tensorboard") is None:
        result = CliRunner().invoke(main, [*base, "--log-to", "tensorboard"])
        assert result.exit_code == 1 and "pip install tensorboard" in result.output


# -- the real thing, tiny


@pytest.mark.slow
def test_train_resume_register_export_evaluate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZYKE_DATA_DIR", str(tmp_path / "data"))  # the adapter registry of this test only
    rows = tmp_path / "rows.jsonl"
    lines = TRAIN.read_text().splitlines(keepends=True)
    rows.write_text("".join([*lines[:2], next(ln for ln in lines if '"action": "refuse"' in ln)]))
    examples = tmp_path / "examples.jsonl"
    assert "3 good" in invoke("npc-data", str(rows), "--out", str(examples)).output

    out = tmp_path / "run"
    cfg = tmp_path / "train.yaml"  # flags given on the command line win over the file
    cfg.write_text("lora_r: 4\nlora_alpha: 8\nmax_length: 128\nbatch_size: 1\nmax_steps: 99\nthreads: 2\n"
                   "lora_target_modules: [q_proj, v_proj]\nsave_every: 1\nlr: 0.002\ndecision_weight: 4\n"
                   "max_action_share: {none: 0.5}\n")
    invoke("train", "--config", str(cfg), "--data", str(examples), "--output-dir", str(out), "--max-steps", "2")
    first = json.loads((out / "train_log.json").read_text())
    assert [e["step"] for e in first["losses"]] == [1, 2] and first["config"]["lora_r"] == 4
    assert first["config"]["decision_weight"] == 4 and first["config"]["max_action_share"] == {"none": 0.5}
    assert (out / "checkpoint-000002" / "optimizer.safetensors").is_file()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # no pickles anywhere

    resumed = invoke("train", "--config", str(cfg), "--data", str(examples), "--output-dir", str(out),
                     "--max-steps", "3", "--resume-latest", "--adapter-name", "tiny-npc")
    assert "at step 2" in resumed.output and "registered tiny-npc" in resumed.output
    second = json.loads((out / "train_log.json").read_text())
    assert [e["step"] for e in second["losses"]] == [1, 2, 3]
    assert second["losses"][:2] == first["losses"]  # the history continues, it does not restart
    assert second["steps"] == 3

    # --init-adapter: a run that starts from the trained adapter's weights, keeping its LoRA shape (the run's own
    # --lora-r is ignored); at lr 0 the result must be that adapter, weight for weight
    from safetensors.numpy import load_file

    grown = tmp_path / "grown"
    invoke("train", "--config", str(cfg), "--data", str(examples), "--output-dir", str(grown), "--max-steps", "1",
           "--lr", "0", "--lora-r", "8", "--init-adapter", str(out / "adapter"))
    assert json.loads((grown / "adapter" / "adapter_config.json").read_text())["r"] == 4
    start, after = (load_file(str(d / "adapter_model.safetensors")) for d in (out / "adapter", grown / "adapter"))
    assert start.keys() == after.keys() and all((start[k] == after[k]).all() for k in start)
    assert any(abs(v).max() > 0 for k, v in after.items() if "lora_B" in k)  # trained weights, not a fresh LoRA
    missing = CliRunner().invoke(main, ["train", "--data", str(examples), "--output-dir", str(tmp_path / "x"),
                                        "--max-steps", "1", "--init-adapter", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "--init-adapter" in missing.output

    gguf = tmp_path / "tiny.gguf"
    invoke("export-gguf", str(out / "adapter"), "--out", str(gguf))
    from gguf import GGUFReader

    assert any(t.name.endswith("attn_q.weight.lora_a") for t in GGUFReader(str(gguf)).tensors)

    from zyke_models.embedded import embedded_model_path
    from zyke_train.adapters import default_registry

    _, sha = embedded_model_path()
    assert default_registry().resolve("tiny-npc", f"sha256:{sha}", "gguf").is_file()

    scenarios = tmp_path / "scenarios.jsonl"
    scenarios.write_text("".join(HELDOUT.read_text().splitlines(keepends=True)[:3]))
    report_path = tmp_path / "report.json"
    result = invoke("evaluate", "--npc", str(scenarios), "--adapter", "tiny-npc", "--threads", "2",
                    "--report", str(report_path), "--perplexity", str(scenarios), "--perplexity", "wikitext2",
                    "--lm-eval-tasks", "hellaswag")
    assert "tiny-npc" in result.output and "action_accuracy" in result.output
    report = json.loads(report_path.read_text())
    results = report["npc"]["results"]
    assert set(results) == {"base", "tiny-npc"}
    for metrics in results.values():
        assert METRICS <= set(metrics) and metrics["validity"] == 1.0 and metrics["scenarios"] == 3
    assert report["perplexity"][str(scenarios)]["tiny-npc"]["perplexity"] > 1
    assert "skipped" in report["perplexity"]["wikitext2"]  # offline / no `datasets`: a clear skip, not a crash
    assert "skipped" in report["lm_eval"] or set(report["lm_eval"]) == {"base", "tiny-npc"}

    # and a real daemon serves it by name (its data dir is the one the adapter was registered in)
    from daemon_proc import DaemonProcess
    from zyke import Client

    daemon = DaemonProcess(tmp_path).start()
    try:
        with Client(daemon.url, daemon.token, game="train-cli") as client:
            assert "tiny-npc" in [a.name for a in client.adapters()]
            npc = client.npc("brom", "A gruff dwarven blacksmith.", ["none", "trade", "refuse"],
                             ["neutral", "annoyed"], name="Brom")
            reply = npc.say("How's business?", adapter="tiny-npc", max_tokens=48)
            assert reply.action in ("none", "trade", "refuse") and reply.emotion in ("neutral", "annoyed")
    finally:
        daemon.stop()
