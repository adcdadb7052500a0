"""zyke-train prepare / blocks / publish through the real CLI, on fixtures made here (no network).

The corpus has, on purpose: English paragraphs that must be kept, a French and a German paragraph
(language filter), an exact and a near duplicate (one word changed: MinHash), a line of symbols
(quality), a Gutenberg header and footer (stripped before anything is counted), an EPUB and a JSONL file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from zyke_train.cli import main
from zyke_train.prepare import Settings, make_sources, prepare
from zyke_train.prepare_filters import lsh_params, shingles

EN1 = ("The old mill stood at the edge of the village for more than two hundred years, and every child who grew up "
       "there learned to fear the creaking of its great wheel on stormy nights. The miller was a quiet man with flour "
       "in his beard, who said little and watched much, and the villagers trusted him with their grain, their "
       "quarrels and their secrets alike, for he had never once been known to repeat a word of what he heard.")
EN2 = ("Beyond the river the forest began, dark and tangled, where the charcoal burners kept their smoking mounds "
       "through the long autumn. Travellers who lost the path there told of lights moving between the trees and of "
       "a voice that called them by name, though the burners only laughed and said it was the owls and the wind "
       "playing tricks on tired people who had drunk too much cider at the inn before setting out.")
EN3 = ("Mira had kept the inn at the crossroads since her mother died, and she knew every merchant, pilgrim and "
       "soldier who passed through by the way they knocked the snow from their boots. She poured ale, rented rooms, "
       "listened to complaints about the tolls on the northern bridge and quietly sent word to the watch whenever a "
       "stranger asked too many questions about the silver mine in the hills above the town.")
EN4 = ("The blacksmith's forge rang from dawn until dusk, and the apprentices took turns at the bellows while the "
       "master shaped horseshoes, nails, hinges and, once a year, a sword for the lord's new squire. He was proud of "
       "that blade more than anything else he made, and he tested each one by bending it across his knee in front "
       "of the whole village, which gathered in the square every spring to watch the ceremony.")
EN5 = ("Welcome, traveller! The fire is warm, the stew is hot, and the rooms upstairs are clean enough for a "
       "prince, if the prince does not mind a little noise from the stables below his window at night.")
FR = ("Le vieux moulin se dressait au bord du village depuis plus de deux cents ans, et chaque enfant qui y "
      "grandissait apprenait à craindre le grincement de sa grande roue les nuits d'orage. Le meunier était un "
      "homme tranquille qui parlait peu et observait beaucoup.")
DE = ("Die alte Mühle stand seit mehr als zweihundert Jahren am Rand des Dorfes, und jedes Kind, das dort "
      "aufwuchs, lernte das Knarren ihres großen Rades in stürmischen Nächten zu fürchten. Der Müller war ein "
      "stiller Mann, der wenig sagte und viel beobachtete.")
FR_LINE = "Bienvenue, voyageur ! Le feu est chaud et la soupe est prête, asseyez-vous donc près de la cheminée."
JUNK = "#### $$$ @@@ !!! %%% ^^^ &&& *** ((( ))) +++ === ~~~ ||| <<< >>>"
EN2_NEAR = EN2.replace("charcoal burners kept", "charcoal burners tended")
LICENSE = ("This eBook is for the use of anyone anywhere in the United States and most other parts of the world at no "
           "cost and with almost no restrictions whatsoever, under the terms of the Project Gutenberg License.")


def wrap(text: str, width: int = 70) -> str:
    """Hard-wrap like a Gutenberg file."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def make_epub(path: Path, paragraphs: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mimetype", "application/epub+zip", compress_type=zipfile.ZIP_STORED)
        z.writestr("META-INF/container.xml", (
            '<?xml version="1.0"?><container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:container">'
            '<rootfiles><rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/>'
            "</rootfiles></container>"))
        z.writestr("OEBPS/content.opf", (
            '<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf" version="3.0">'
            '<manifest><item id="c2" href="text/ch2.xhtml" media-type="application/xhtml+xml"/>'
            '<item id="c1" href="text/chapter%201.xhtml" media-type="application/xhtml+xml"/></manifest>'
            '<spine><itemref idref="c1"/><itemref idref="c2"/></spine></package>'))

        def chapter(title: str, paras: list[str]) -> str:
            body = "".join(f"<p>{p.replace('&', '&amp;')}</p>" for p in paras)
            return (f'<html xmlns="http://www.w3.org/1999/xhtml"><head><title>{title}</title>'
                    f"<style>p {{ margin: 0 }}</style></head><body><h1>{title}</h1>{body}</body></html>")

        z.writestr("OEBPS/text/chapter 1.xhtml", chapter("Chapter One", paragraphs[:1]))
        z.writestr("OEBPS/text/ch2.xhtml", chapter("Chapter Two", paragraphs[1:]))
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """book.txt (Gutenberg), chat.jsonl, tale.epub: read in that (sorted) order."""
    root = tmp_path / "corpus"
    root.mkdir()
    body = "\n\n".join(wrap(p) for p in [EN1, EN2, FR, DE, EN1, EN2_NEAR, JUNK])
    (root / "book.txt").write_text(
        "The Project Gutenberg eBook of The Mill\n\n" + wrap(LICENSE) + "\n\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK THE MILL ***\n\n" + body + "\n\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK THE MILL ***\n\n" + wrap(LICENSE) + "\n", encoding="utf-8")
    rows: list[dict[str, Any]] = [{"text": EN5}, {"speaker": "Mira"}, {"text": FR_LINE}, {"text": EN5}]
    (root / "chat.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                     encoding="utf-8")
    make_epub(root / "tale.epub", [EN3, EN4, EN3])
    return root


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def read_rows(out: Path) -> list[dict[str, Any]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [json.loads(line) for s in manifest["shards"] for line in (out / s["file"]).read_text().splitlines()]


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))
            if p.is_file()}


def test_lsh_params_favour_recall_at_the_threshold() -> None:
    bands, rows = lsh_params(0.8, 128)
    assert (bands, rows) == (18, 7)
    assert 1 - (1 - 0.8**rows) ** bands >= 0.95
    assert len(shingles("a b c d e f g")) == 3 and shingles("Hi there!") == {b"hi there"}


def test_prepare_filters_dedups_and_keeps_the_right_rows(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run("prepare", "--local", str(corpus), "--out", str(out), "--shard-size", "3", "--quiet")
    assert "corpus: read 16, kept 7" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["sources"]["corpus"]["counts"]
    # book.txt: EN1 EN2 FR DE EN1 EN2~ JUNK | chat.jsonl: EN5 (no text) FR_LINE EN5 |
    # tale.epub: "Chapter One" EN3 "Chapter Two" EN4 EN3 (the <h1> titles are short lines, kept by "books")
    assert counts == {"read": 16, "kept": 7, "kept_chars": sum(map(len, [EN1, EN2, EN5, EN3, EN4])) + 22,
                      "dropped_lang": 3,  # FR, DE, FR_LINE
                      "dropped_dup": 4,  # EN1 exact, EN2 near (one word changed), EN5 exact, EN3 exact in the EPUB
                      "dropped_quality:alnum_ratio": 1,  # the symbol line
                      "dropped_quality:no_text": 1}  # the JSONL row without a text field
    rows = read_rows(out)
    assert [r["text"] for r in rows] == [EN1, EN2, EN5, "Chapter One", EN3, "Chapter Two", EN4]
    assert [r["group"] for r in rows] == ["corpus:book.txt"] * 2 + ["corpus:chat.jsonl#1"] + ["corpus:tale.epub"] * 4
    assert not any("Gutenberg" in r["text"] for r in rows)  # header and license stripped (they are English)
    assert [s["rows"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["totals"]["kept"] == 7
    assert (manifest["settings"]["lsh_bands"], manifest["settings"]["lsh_rows"]) == (18, 7)


def test_hub_code_path_on_a_local_dataset(tmp_path: Path) -> None:
    hub = tmp_path / "hubdata"
    hub.mkdir()
    long_en = " ".join([EN1, EN4])
    rows = [{"text": long_en}, {"text": "Too short for a web page."}, {"text": FR + " " + FR},
            {"text": long_en.replace("quiet man", "silent man")}, {"content": "no text field"}]
    (hub / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "out"
    run("prepare", "--hub", str(hub), "--out", str(out), "--quiet")
    counts = json.loads((out / "manifest.json").read_text())["sources"]["hubdata"]["counts"]
    assert counts == {"read": 5, "kept": 1, "kept_chars": len(long_en), "dropped_quality:too_short": 1,
                      "dropped_lang": 1, "dropped_dup": 1, "dropped_quality:no_text": 1}
    assert [r["text"] for r in read_rows(out)] == [long_en]


def test_hub_offline_gives_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "zyke_train", "prepare", "--hub", "nobody/no-such-dataset",
                           "--out", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "could not open Hub dataset 'nobody/no-such-dataset'" in proc.stderr


def test_weights_split_max_total(corpus: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(p.replace("the", "a") for p in [EN3, EN4, EN5]))
    out = tmp_path / "out"
    run("prepare", "--local", str(corpus), "--local", str(other), "--out", str(out), "--quiet",
        "--max-total", "1k", "--weights", "corpus=3,other=1")
    sources = json.loads((out / "manifest.json").read_text())["sources"]
    assert (sources["corpus"]["budget_chars"], sources["other"]["budget_chars"]) == (750, 250)
    assert sources["corpus"]["stopped_at_budget"] and sources["other"]["stopped_at_budget"]
    assert sources["corpus"]["counts"]["kept"] == 2  # EN1 (416) then EN2 crosses 750
    assert sources["other"]["counts"]["kept"] == 1


def test_resume_after_interrupt_and_rerun_does_nothing(corpus: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    run("prepare", "--local", str(corpus), "--out", str(full), "--shard-size", "2", "--quiet")

    out = tmp_path / "out"
    sources = make_sources([], [str(corpus)], None, [], "text")
    settings = Settings(shard_size=2)

    def stop(shard: dict[str, Any]) -> None:
        if shard["file"].endswith("00001.jsonl"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(sources, out, settings, progress=False, on_shard=stop)
    first = snapshot(out)
    assert "corpus-00001.jsonl" in first and "manifest.json" not in first

    result = run("prepare", "--local", str(corpus), "--out", str(out), "--shard-size", "2", "--quiet")
    assert "(3 new)" in result.output  # 7 kept rows, 4 of them were in the two shards already written
    after = snapshot(out)
    for name in ("corpus-00000.jsonl", "corpus-00001.jsonl"):
        assert after[name] == first[name]  # not rewritten
    assert read_rows(out) == read_rows(full)
    assert json.loads((out / "manifest.json").read_text()) == json.loads((full / "manifest.json").read_text())

    again = run("prepare", "--local", str(corpus), "--out", str(out), "--shard-size", "2", "--quiet")
    assert "nothing new" in again.output and "(0 new)" in again.output
    assert snapshot(out) == after

    # other arguments in the same folder: refused, unless --force
    refused = CliRunner().invoke(main, ["prepare", "--local", str(corpus), "--out", str(out), "--quiet"])
    assert refused.exit_code == 2 and "--force" in refused.output
    run("prepare", "--local", str(corpus), "--out", str(out), "--quiet", "--force")
    assert [s["rows"] for s in json.loads((out / "manifest.json").read_text())["shards"]] == [7]
    assert not (out / "corpus-00001.jsonl").exists()


def make_word_tokenizer(rows: list[str], path: Path) -> Path:
    """A tiny word-level tokenizer (tokenizers library), so the blocks maths can be checked exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for r in rows for w in r.split()})
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>",
                            eos_token="<eos>").save_pretrained(str(path))
    return path


def test_blocks_shapes_and_content(corpus: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    prepared = tmp_path / "prepared"
    run("prepare", "--local", str(corpus), "--out", str(prepared), "--quiet")
    rows = read_rows(prepared)
    tok_dir = make_word_tokenizer([r["text"] for r in rows], tmp_path / "tok")
    out = tmp_path / "blocks"
    result = run("blocks", str(prepared), "--out", str(out), "--tokenizer", str(tok_dir), "--block-size", "16",
                 "--blocks-per-shard", "8", "--quiet")
    manifest = json.loads((out / "manifest.json").read_text())

    # documents: book.txt (EN1 EN2), chat.jsonl#1 (EN5), tale.epub (titles, EN3, EN4): BOS + words + EOS each
    groups: dict[str, int] = {}
    for r in rows:
        groups[r["group"]] = groups.get(r["group"], 0) + len(r["text"].split())
    stream = sum(n + 2 for n in groups.values())
    assert manifest["counts"]["documents"] == len(groups) == 3
    assert manifest["blocks"] == stream // 16 and manifest["dropped_tail_tokens"] == stream % 16
    assert f"{manifest['blocks']} blocks of 16 tokens" in result.output
    assert [s["blocks"] for s in manifest["shards"]][:-1] == [8] * (len(manifest["shards"]) - 1)

    arrays = []
    for shard in manifest["shards"]:
        path = out / shard["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        arr = load_file(str(path))["input_ids"]
        assert arr.dtype == np.int32 and arr.shape == (shard["blocks"], 16)
        arrays.append(arr)
    ids = np.concatenate(arrays).reshape(-1).tolist()
    assert ids[0] == 1  # BOS
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    decoded = tok.decode(ids)
    assert " ".join(EN1.split()) in decoded and " ".join(EN3.split()) in decoded
    assert decoded.count("<eos>") == 2  # between the three documents; the third's EOS is in the dropped tail


@pytest.mark.slow
def test_blocks_with_the_embedded_tokenizer(corpus: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer
    from zyke_models.hf_checkpoint import embedded_hf_checkpoint

    prepared = tmp_path / "prepared"
    run("prepare", "--local", str(corpus), "--out", str(prepared), "--quiet")
    out = tmp_path / "blocks"
    run("blocks", str(prepared), "--out", str(out), "--block-size", "64", "--quiet")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"].startswith("embedded:") and manifest["eos_token_id"] == 1
    arr = load_file(str(out / manifest["shards"][0]["file"]))["input_ids"]
    assert arr.shape == (manifest["blocks"], 64) and arr.dtype == np.int32
    tok = AutoTokenizer.from_pretrained(str(embedded_hf_checkpoint()))
    assert arr[0, 0] == tok.bos_token_id
    text = tok.decode(arr.reshape(-1))
    assert EN1[:200] in text and EN1 + "\n\n" + EN2 in text  # paragraphs of one book joined by a blank line


def make_tiny_lora(out: Path, rank: int = 4, dim: int = 16) -> Path:
    """A PEFT LoRA dir with tiny q_proj/v_proj tensors. lora_fixtures.make_random_lora makes full-size ones
    from the embedded GGUF's shapes, which takes ~45 s on a busy 2-core machine; publishing never looks at
    shapes, so this test does not need them."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight":
               rng.standard_normal((rank, dim) if ab == "A" else (dim, rank)).astype(np.float32)
               for i in range(2) for m in ("q_proj", "v_proj") for ab in ("A", "B")}
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}))
    return out


def test_publish_dry_run_writes_card_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zyke_models.embedded import embedded_model_path
    from zyke_train.adapters import register

    monkeypatch.setenv("ZYKE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ZYKE_CONFIG_DIR", str(tmp_path / "config"))
    _, sha = embedded_model_path()
    register("calm", make_tiny_lora(tmp_path / "src"))  # fingerprinted against the embedded model
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"json_valid_rate": 0.97, "persona_score": 4.1, "details": [1, 2]}))
    folder = tmp_path / "pub"
    result = run("publish", "calm", "--repo-id", "studio/calm-npc", "--dry-run", "--out", str(folder),
                 "--eval-report", str(report))
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "calm.gguf",
                     "eval_report.json", "zyke_adapter.json"]
    assert "dry run: 6 files" in result.output and "studio/calm-npc" in result.output
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")
    assert f"sha256:{sha}" in card and "rank: 4" in card and "q_proj, v_proj" in card
    assert "| json_valid_rate | 0.97 |" in card
    meta = json.loads((folder / "zyke_adapter.json").read_text())
    assert meta["base"] == f"sha256:{sha}" and set(meta["files"]) == {"adapter_config.json",
                                                                      "adapter_model.safetensors", "calm.gguf"}

    # no token: a clear error, nothing sent
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    failed = CliRunner().invoke(main, ["publish", "calm", "--repo-id", "studio/calm-npc", "--out", str(folder)])
    assert failed.exit_code == 1 and "no Hugging Face token" in failed.output
    unknown = CliRunner().invoke(main, ["publish", "nope", "--repo-id", "a/b", "--dry-run", "--out", str(folder)])
    assert unknown.exit_code == 1 and "no adapter named 'nope'" in unknown.output



def test_train_push_and_publish_upload_through_one_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train --hf-push` and `publish` both reach the Hub through ``zyke_models.hub.upload_folder`` (one token lookup,
    repo creation and upload), each wording a failure its own way; ``HfApi`` is replaced, so nothing is sent."""
    import huggingface_hub
    from zyke_train.errors import TrainError
    from zyke_train.publish import PublishError, upload
    from zyke_train.train import push_to_hub

    calls: list[tuple[str, Any]] = []

    class FakeApi:
        def __init__(self, token: str | None = None) -> None:
            calls.append(("token", token))

        def create_repo(self, repo_id: str, **kw: Any) -> str:
            calls.append(("create", (repo_id, kw["private"])))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw: Any) -> Any:
            calls.append(("upload", (kw["folder_path"], kw["commit_message"])))
            return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/abc",
                                              commit_message=kw["commit_message"], commit_description="", oid="abc")

    class OfflineApi(FakeApi):
        def create_repo(self, repo_id: str, **kw: Any) -> str:
            raise ConnectionError("no network")

    folder = tmp_path / "adapter"
    folder.mkdir()
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_to_hub("studio/npc", folder) == "https://huggingface.co/studio/npc"
    assert upload(folder, "studio/npc", private=True) == "https://huggingface.co/studio/npc/commit/abc"
    assert calls == [("token", "hf_test"), ("create", ("studio/npc", None)),
                     ("upload", (str(folder), "zyke-train LoRA adapter")),
                     ("token", "hf_test"), ("create", ("studio/npc", True)),
                     ("upload", (str(folder), "Upload Zyke adapter adapter"))]

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    with pytest.raises(TrainError, match=r"could not push to the Hugging Face Hub \(ConnectionError: no network\); "
                                         r"the adapter is saved at .* push it later with `huggingface-cli upload"):
        push_to_hub("studio/npc", folder)
    with pytest.raises(PublishError, match=r"^could not upload to studio/npc: no network \(offline, or the token"):
        upload(folder, "studio/npc")

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(PublishError, match=r"^no Hugging Face token"):
        upload(folder, "studio/npc")
    with pytest.raises(TrainError, match=r"could not push to the Hugging Face Hub \(no Hugging Face token"):
        push_to_hub("studio/npc", folder)

def test_hub_stream_that_breaks_mid_way_resumes(tmp_path: Path) -> None:
    """A stream that dies (network) ends with a clear error; the re-run keeps the flushed shards and goes on."""
    from zyke_train.errors import PrepareError

    paras = [EN1, EN2, EN3, EN4, EN5]
    texts = [f"{paras[a]} {paras[b]}" for a in range(5) for b in range(a + 1, 5)][:8]  # Jaccard <= ~0.5 apart

    def loader(fail_at: int | None) -> Any:
        def load(name: str, config: str | None, split: str) -> Any:
            assert (name, config, split) == ("org/tales", None, "train")
            for i, t in enumerate(texts):
                if i == fail_at:
                    raise ConnectionError("connection reset by peer")
                yield {"text": t}
        return load

    sources = make_sources(["org/tales"], [], None, [], "text")
    settings = Settings(shard_size=2)
    out, full = tmp_path / "out", tmp_path / "full"
    with pytest.raises(PrepareError, match=r"failed at row 5: connection reset.*Re-run"):
        prepare(sources, out, settings, hub=loader(5), progress=False)
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["org_tales-00000.jsonl", "org_tales-00001.jsonl"]
    resumed = prepare(sources, out, settings, hub=loader(None), progress=False)
    assert resumed["new_rows"] == 4  # rows 4..7; rows 0..3 were in the two shards written before the failure
    prepare(sources, full, settings, hub=loader(None), progress=False)
    assert read_rows(out) == read_rows(full) and [r["text"] for r in read_rows(out)] == texts
