"""The learning loop's training side (issue 18): experience -> blocks/rows -> train on text, blocks and NPC rows
-> rl (TRL GRPO) -> register.

The pure parts (reward terms on hand-made replies, the experience reader, loss windows) run instantly. The loop
runs on a tiny random Gemma 3 with the embedded model's tokenizer (``federated_proc.tiny_base``): the mechanics are
under test, not the quality, so a couple of steps each keep it to well under a minute of CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from zyke_train.batching import collate
from zyke_train.cli import main
from zyke_train.experience import (
    BadRecord,
    ExperienceTooLarge,
    Limits,
    TornLine,
    UnsupportedVersion,
    convert,
    read_experience,
)
from zyke_train.rewards import RewardWeights, Row, score
from zyke_train.train_data import sequence_windows

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "training" / "data" / "npc_train.jsonl"
BROM = json.loads(TRAIN.read_text().splitlines()[0])["npc"]
EMOTIONS = ["neutral", "pleased", "annoyed", "angry", "amused"]
ACTIONS = ["none", "trade", "repair", "refuse", "give_quest", "attack"]


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def reply(say: str, emotion: str = "neutral", action: str = "none") -> str:
    return json.dumps({"say": say, "emotion": emotion, "action": action}) + "\n"


# -- rewards, on hand-made replies


def test_reward_terms_on_hand_made_replies() -> None:
    row = Row(EMOTIONS, ACTIONS, history_says=["Ten gold and not a copper less."], label_action="refuse")
    good = score(reply("Not today, friend.", "annoyed", "refuse"), row)
    assert good == {"validity": 1.0, "action": 1.0, "feedback": None, "repetition": 0.0, "length": 0.0,
                    "total": 2.0}
    wrong = score(reply("Sure, here you go.", "pleased", "trade"), row)
    assert wrong["validity"] == 1.0 and wrong["action"] == -1.0 and wrong["total"] == 0.0
    repeat = score(reply("Like I said, ten gold and not a copper less.", "annoyed", "refuse"), row)
    assert repeat["repetition"] == -1.0 and repeat["total"] == 2.0 - 0.5  # shares "ten gold and not"
    three_words = score(reply("Ten gold, stranger.", "annoyed", "refuse"), row)
    assert three_words["repetition"] == 0.0  # "ten gold" alone is no repeated phrase

    # invalid: undeclared action, extra key, not JSON, text before the JSON; all count as wrong actions
    for bad in [reply("Hm.", "neutral", "dance"), '{"say": "Hm.", "emotion": "neutral", "action": "none", "x": 1}',
                "Brom grunts.", 'Sure {"say": "Hm.", "emotion": "neutral", "action": "none"}']:
        terms = score(bad, row)
        assert terms["validity"] == -1.0 and terms["action"] == -1.0 and terms["repetition"] == 0.0, bad
    # only the first line counts, as in the daemon
    assert score(reply("Aye.", "neutral", "refuse") + "Player: more junk", row)["validity"] == 1.0
    # the turn's allowed actions narrow validity
    narrowed = Row(EMOTIONS, ["none", "refuse"], label_action="refuse")
    assert score(reply("Here.", "neutral", "trade"), narrowed)["validity"] == -1.0

    # length band: empty say and walls of text are penalised, proportionally, capped at -1
    assert score(reply(""), Row(EMOTIONS, ACTIONS))["length"] == -1.0
    assert score(reply("x" * 450), Row(EMOTIONS, ACTIONS))["validity"] == -1.0  # over MAX_SAY_CHARS
    line = reply("x" * 450).strip()  # invalid, so the raw line is measured
    assert score(line, Row(EMOTIONS, ACTIONS))["length"] == pytest.approx(-min(1.0, (len(line) - 300) / 300))
    assert score(reply("x" * 250), Row(EMOTIONS, ACTIONS))["length"] == 0.0

    # recorded feedback: credited to a reply that takes the same action, 0 to one that does not
    fb = Row(EMOTIONS, ACTIONS, recorded_action="attack", recorded_reward=-0.8)
    assert score(reply("Die!", "angry", "attack"), fb)["feedback"] == -0.8
    assert score(reply("Easy now.", "annoyed", "refuse"), fb)["feedback"] == 0.0
    assert score(reply("Easy now.", "annoyed", "refuse"), fb)["action"] is None  # unlabelled: the term is off
    weights = RewardWeights(validity=0.0, action=0.0, feedback=2.0, repetition=0.0, length=0.0)
    assert score(reply("Die!", "angry", "attack"), fb, weights)["total"] == pytest.approx(-1.6)


# -- the experience format


def record(**overrides: Any) -> dict[str, Any]:
    rec = {"v": 1, "time": "2026-11-30T12:00:00Z", "game": "karak", "reply_id": "r-1", "npc": "brom", "spec": BROM,
           "history": [{"player": "Hi.", "reply": {"say": "Mind the anvil.", "emotion": "neutral", "action": "none"}}],
           "state": {"location": "forge"}, "input": "Fix my sword, now!",
           "reply": {"say": "Ten gold.", "emotion": "neutral", "action": "repair"}, "adapter": "npc-default",
           "feedback": [{"time": "2026-11-30T12:00:05Z", "reward": -1.0, "label": {"action": "refuse"},
                         "source": "game"}]}
    rec.update(overrides)
    return rec


def write_jsonl(path: Path, rows: list[Any], torn_tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn_tail)
    return path


def test_experience_reader_validates_bounds_and_converts(tmp_path: Path) -> None:
    liked = record(reply_id="r-2", feedback=[{"time": "2026-11-30T12:01:00Z", "reward": 0.9}])
    disliked = record(reply_id="r-3", feedback=[{"time": "2026-11-30T12:02:00Z", "reward": -0.5}])
    unrated = record(reply_id="r-4", feedback=[])
    path = write_jsonl(tmp_path / "exp.jsonl", [record(), liked, disliked, unrated],
                       torn_tail='{"v": 1, "time": "2026-11-30T12:0')  # a writer killed mid-append
    result = read_experience([path])
    assert [r.reply_id for r in result.records] == ["r-1", "r-2", "r-3", "r-4"]
    assert len(result.problems) == 1 and isinstance(result.problems[0], TornLine) and result.problems[0].line == 5
    assert result.records[0].label is not None and result.records[0].label.action == "refuse"
    assert result.records[1].reward == 0.9 and result.records[3].reward is None

    manifest = convert([path], tmp_path / "rows")
    assert manifest["counts"] == {"records": 4, "skipped_lines": 1, "npc_rows": 2, "reward_rows": 3,
                                  "labelled": 1, "rejected_rows": 0}
    npc_rows = [json.loads(ln) for ln in (tmp_path / "rows" / "npc_rows.jsonl").read_text().splitlines()]
    # the labelled record teaches the corrected action; the liked one its own reply; the disliked one nothing
    assert [r["reply"]["action"] for r in npc_rows] == ["refuse", "repair"]
    assert npc_rows[0]["reply"]["say"] == "Ten gold." and npc_rows[0]["state"] == {"location": "forge"}
    rewards = [json.loads(ln) for ln in (tmp_path / "rows" / "reward_rows.jsonl").read_text().splitlines()]
    assert [(r["reward"], r["recorded"]["action"], r["label"]) for r in rewards] == [
        (-1.0, "repair", {"action": "refuse"}), (0.9, "repair", None), (-0.5, "repair", None)]

    # typed errors, each naming file and line
    bad = {
        "undeclared label": record(feedback=[{"time": "2026-11-30T12:00:05Z", "reward": 0.0,
                                              "label": {"action": "dance"}}]),
        "reward out of range": record(feedback=[{"time": "2026-11-30T12:00:05Z", "reward": 2.0}]),
        "a token field": record(token="secret"),
        "npc is not the spec's": record(npc="mira"),
    }
    for why, rec in bad.items():
        p = write_jsonl(tmp_path / "bad.jsonl", [record(), rec])
        with pytest.raises(BadRecord) as err:
            read_experience([p], strict=True)
        assert err.value.line == 2, why
        assert len(read_experience([p]).records) == 1, why  # not strict: skipped, the rest kept
    with pytest.raises(UnsupportedVersion):
        read_experience([write_jsonl(tmp_path / "v2.jsonl", [record(v=2)])])
    with pytest.raises(ExperienceTooLarge):
        read_experience([path], Limits(max_line_bytes=200))
    with pytest.raises(ExperienceTooLarge):
        read_experience([path], Limits(max_records=2))
    with pytest.raises(ExperienceTooLarge):
        read_experience([path], Limits(max_file_bytes=100))


# -- loss windows for text and blocks


def test_loss_windows_make_every_token_a_target_exactly_once() -> None:
    from zyke_train.train_data import Tokenized

    ids = list(range(100, 137))  # 37 tokens
    for max_length in (2, 5, 16, 37, 64):
        windows = sequence_windows(ids, max_length)
        assert all(len(p) == 1 and len(p) + len(c) <= max_length for p, c in windows)
        assert [t for _, c in windows for t in c] == ids[1:]  # each token after the first, once, in order
        batch = collate([Tokenized(str(i), p, c) for i, (p, c) in enumerate(windows)], pad_id=0)
        assert batch["targets"] == len(ids) - 1
    assert sequence_windows([5], 8) == []


# -- the loop on a tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from federated_proc import tiny_base

    return tiny_base(tmp_path_factory.mktemp("tiny") / "base")


def lora_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_blocks_round_trip_and_text_rows_take_loss_on_every_token(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer
    from zyke_train.blocks import BlocksError, read_block_shards
    from zyke_train.train_data import tokenize_texts

    texts = ["The mill stood at the edge of the village for two hundred years.",
             "Brom's forge rang from dawn until dusk; the apprentices took turns at the bellows."] * 3
    corpus = write_jsonl(tmp_path / "lore.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "blocks"
    result = invoke("blocks", str(corpus), "--out", str(out), "--tokenizer", str(tiny), "--seq-len", "16",
                    "--steps-per-block", "3", "--env-id", "karak", "--npc-type", "smith", "--quiet")
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["block_size"], manifest["steps_per_block"], manifest["env_id"], manifest["npc_type"]) == \
        (16, 3, "karak", "smith")
    assert f"{manifest['blocks']} blocks of 16 tokens" in result.output

    tok = AutoTokenizer.from_pretrained(str(tiny))
    stream: list[int] = []
    for t in texts:  # each row is a document of its own: BOS text EOS
        stream += [tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    shards = read_block_shards(out, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    ids = np.concatenate([a for _, _, a in shards]).reshape(-1).tolist()
    assert ids == stream[:len(ids)] and len(stream) - len(ids) == manifest["dropped_tail_tokens"] < 16

    with pytest.raises(BlocksError, match="vocabulary"):
        read_block_shards(out, vocab_size=len(tok) + 1)
    shard = out / manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BlocksError, match="sha256"):
        read_block_shards(out)

    # a text row: BOS + tokens + EOS, and every token after BOS is a loss target (not just a completion)
    items = tokenize_texts(tok, [("t0", texts[0])], max_length=8)
    n = len(tok(texts[0], add_special_tokens=False)["input_ids"]) + 2
    assert len(items) > 1 and collate(items, pad_id=0)["targets"] == n - 1
    # ... and the training loss over it is the model's own causal-LM loss over the whole sequence
    import torch
    from transformers import AutoModelForCausalLM
    from zyke_train.batching import completion_loss_sum

    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    (whole,) = tokenize_texts(tok, [("t0", texts[0])], max_length=64)
    ids = torch.tensor([whole.prompt + whole.completion])
    with torch.no_grad():
        reference = float(model(input_ids=ids, labels=ids).loss)  # mean over the n - 1 shifted tokens
        ours = float(completion_loss_sum(model, collate([whole], pad_id=0))) / (n - 1)
        windowed = float(completion_loss_sum(model, collate(items, pad_id=0))) / (n - 1)
    assert ours == pytest.approx(reference, rel=1e-4)
    assert windowed > 0 and np.isfinite(windowed)  # shorter context per window: close to, not equal to, ours


def test_loop_experience_blocks_train_rl_register(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZYKE_DATA_DIR", str(tmp_path / "data"))  # the adapter registry of this test only
    # recorded experience -> NPC rows and reward rows
    exp = write_jsonl(tmp_path / "exp.jsonl", [record(), record(reply_id="r-2", feedback=[
        {"time": "2026-11-30T12:01:00Z", "reward": 0.75, "source": "player"}])])
    rows = tmp_path / "rows"
    out = invoke("blocks", "--experience", str(exp), "--out", str(rows)).output
    assert "2 NPC rows" in out and "2 reward rows" in out

    # a prepared corpus -> blocks, and text rows, trained together with NPC rows in one run
    lore = write_jsonl(tmp_path / "lore.jsonl", [{"text": "Karak's forges never sleep. " * 6, "group": "a"},
                                                 {"text": "The northern bridge charges a toll.", "group": "b"}])
    invoke("blocks", str(lore), "--out", str(tmp_path / "blocks"), "--tokenizer", str(tiny), "--seq-len", "24",
           "--quiet")
    npc = tmp_path / "npc.jsonl"
    npc.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:2]))
    run = tmp_path / "sft"
    trained = invoke("train", "--model", str(tiny), "--data", str(npc), "--data", str(rows / "npc_rows.jsonl"),
                     "--data", str(lore), "--data", str(tmp_path / "blocks"), "--output-dir", str(run),
                     "--max-steps", "2", "--batch-size", "4", "--lora-r", "4", "--lora-alpha", "8",
                     "--lora-target-modules", "q_proj,v_proj", "--max-length", "384", "--lr", "0.01",
                     "--threads", "2")
    assert "4 NPC examples (completion-only loss) and" in trained.output
    log = json.loads((run / "train_log.json").read_text())
    assert [e["step"] for e in log["losses"]] == [1, 2] and all(np.isfinite(e["loss"]) for e in log["losses"])

    # rl from the trained adapter, on training-split rows and reward rows, then registered by name
    start = lora_tensors(run / "adapter")
    rl_dir = tmp_path / "rl"
    result = invoke("rl", "--model", str(tiny), "--adapter", str(run / "adapter"), "--data", str(npc),
                    "--data", str(rows / "reward_rows.jsonl"), "--output-dir", str(rl_dir), "--max-steps", "1",
                    "--num-generations", "4", "--max-completion-length", "8", "--prompts-per-step", "1",
                    "--min-say-chars", "400", "--lr", "0.01", "--threads", "2", "--adapter-name", "tiny-rl")
    assert "registered tiny-rl" in result.output
    after = lora_tensors(rl_dir / "adapter")
    assert set(after) == set(start)  # the same LoRA (rank, targets), only its weights moved; no "ref" copy
    assert any(not np.array_equal(after[k], start[k]) for k in start)
    assert lora_tensors(run / "adapter").keys() == start.keys()  # the source adapter is untouched
    assert all(np.array_equal(lora_tensors(run / "adapter")[k], start[k]) for k in start)
    rl_log = json.loads((rl_dir / "rl_log.json").read_text())
    step = rl_log["log"][0]
    assert {"rewards/validity/mean", "rewards/action/mean", "rewards/length/mean", "kl"} <= set(step)
    assert rl_log["weight_change_l2"] > 0 and rl_log["config"]["beta"] == 0.04

    from zyke_models.hf_checkpoint import base_fingerprint
    from zyke_train.adapters import default_registry

    registry = default_registry()
    assert registry.resolve("tiny-rl", base_fingerprint(tiny), "gguf").is_file()
    peft = registry.resolve("tiny-rl", base_fingerprint(tiny), "peft")
    assert all(np.array_equal(lora_tensors(peft)[k], after[k]) for k in after)


def test_rl_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    heldout_like = write_jsonl(tmp_path / "rows.jsonl", [{"id": "x", "npc": BROM, "input": "Hi",
                                                          "reply": {"say": "Hm.", "emotion": "neutral",
                                                                    "action": "dance"}}])
    base = ["rl", "--data", str(heldout_like), "--output-dir", str(tmp_path / "o")]
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 1 and "no usable rows" in result.output and "dance" in result.output
    good = write_jsonl(tmp_path / "good.jsonl", [json.loads(TRAIN.read_text().splitlines()[0])])
    result = CliRunner().invoke(main, ["rl", "--data", str(good), "--output-dir", str(tmp_path / "o"),
                                       "--adapter", "no-such-adapter"])
    assert result.exit_code == 1 and "neither a PEFT folder nor a registered adapter" in result.output
    result = CliRunner().invoke(main, ["rl", "--data", str(good), "--output-dir", str(tmp_path / "o"),
                                       "--reward-weights", "style=2"])
    assert result.exit_code == 2 and "--reward-weights" in result.output


def test_rl_prompts_cap_a_label_share() -> None:
    from zyke_train.rl import load_prompts

    everything = load_prompts([TRAIN])
    capped = load_prompts([TRAIN], max_action_share={"none": 0.2})
    nones = [r for r in capped if r["label_action"] == "none"]
    others = [r for r in everything if r["label_action"] != "none"]
    assert nones and len(nones) < sum(1 for r in everything if r["label_action"] == "none")
    assert len(nones) <= 0.2 * len(capped) + 1
    assert [r["id"] for r in capped if r["label_action"] != "none"] == [r["id"] for r in others]
    assert load_prompts([TRAIN], max_action_share={"none": 0.2}) == capped  # the same seed, the same prompts


# -- action mode: only the decision is sampled


def test_action_mode_prompts_end_where_the_action_starts_and_rewards_judge_the_whole_line() -> None:
    from zyke_train.rewards import grpo_reward_funcs
    from zyke_train.rl import load_prompts

    rows = load_prompts([TRAIN], limit=3, decide="action")
    plain = load_prompts([TRAIN], limit=3)
    for row, whole in zip(rows, plain, strict=True):
        assert row["prompt"] == whole["prompt"] + row["reply_prefix"] and whole["reply_prefix"] == ""
        assert row["prompt"].endswith('"action": "') and row["reply_prefix"].startswith('{"say": ')
    row = rows[0]
    label, wrong = row["label_action"], next(a for a in row["actions"] if a != row["label_action"])
    columns = {k: [row[k]] * 3 for k in row if k != "prompt"}
    funcs = {f.__name__: f for f in grpo_reward_funcs()}
    completions = [label + '"}', wrong + '"}', 'dance"}']
    assert funcs["action"]([row["prompt"]] * 3, completions, **columns) == [1.0, -1.0, -1.0]
    assert funcs["validity"]([row["prompt"]] * 3, completions, **columns) == [1.0, 1.0, -1.0]


def test_label_probabilities_match_token_by_token_decoding(tiny: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from zyke_train.rl import label_logprobs, label_probabilities, load_prompts

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    rows = load_prompts([TRAIN], limit=2, decide="action")
    rows.append({**rows[0], "label_action": None})  # a reward row without a label
    probs = label_probabilities(model, tokenizer, rows)
    assert probs[2] is None
    for row, prob in zip(rows[:2], probs[:2], strict=True):
        ids = tokenizer(row["prompt"])["input_ids"]
        expected = 1.0
        with torch.no_grad():
            for token in tokenizer(row["label_action"] + '"}', add_special_tokens=False)["input_ids"]:
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                expected *= float(torch.softmax(logits.float(), dim=-1)[token])
                ids.append(token)
        assert prob is not None and prob == pytest.approx(expected, rel=1e-3)
    # every allowed label in one right-padded batch, labels of different lengths: the same as one at a time
    ids, labels = tokenizer(rows[0]["prompt"])["input_ids"], rows[0]["actions"]
    assert len({len(tokenizer(a)["input_ids"]) for a in labels}) > 1
    with torch.no_grad():
        batched = label_logprobs(model, tokenizer, ids, labels)
        alone = [label_logprobs(model, tokenizer, ids, [a])[0] for a in labels]
    assert batched == pytest.approx(alone, abs=1e-4)


def test_rl_action_mode_keeps_unsure_prompts_and_trains(tiny: Path, tmp_path: Path) -> None:
    npc = tmp_path / "npc.jsonl"
    npc.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:3]))
    run = tmp_path / "sft"
    invoke("train", "--model", str(tiny), "--data", str(npc), "--output-dir", str(run), "--max-steps", "1",
           "--batch-size", "3", "--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules", "q_proj,v_proj",
           "--max-length", "384", "--threads", "2")
    start = lora_tensors(run / "adapter")
    out = invoke("rl", "--model", str(tiny), "--adapter", str(run / "adapter"), "--data", str(npc),
                 "--output-dir", str(tmp_path / "rl"), "--decide", "action", "--keep-below", "0.5",
                 "--max-steps", "1", "--num-generations", "2", "--max-completion-length", "8", "--lr", "0.01",
                 "--threads", "2", "--save-every", "1").output
    assert "kept 3 of 3 prompts" in out  # a random tiny model is sure of no label
    log = json.loads((tmp_path / "rl" / "rl_log.json").read_text())
    assert log["config"]["decide"] == "action" and log["prompts"] == 3 and log["steps"] == 1
    # a random tiny model samples freely almost never a valid label; under the allowed-label constraint always
    assert log["log"][0]["rewards/validity/mean"] == 1.0
    after = lora_tensors(tmp_path / "rl" / "adapter")
    assert any(not np.array_equal(after[k], start[k]) for k in start)
    saved = lora_tensors(tmp_path / "rl" / "grpo" / "checkpoint-1")  # --save-every: the trained adapter, not ref
    assert saved.keys() == after.keys() and all(np.array_equal(saved[k], after[k]) for k in after)
    bad = CliRunner().invoke(main, ["rl", "--data", str(npc), "--output-dir", str(tmp_path / "o"),
                                    "--keep-below", "0.5"])
    assert bad.exit_code == 1 and "needs --decide action" in bad.output
