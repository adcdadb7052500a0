"""Evaluate NPC models (``zyke-train evaluate``): the NPC scenarios through the real serving path, perplexity,
and lm-evaluation-harness tasks.

The NPC evaluation is the one that matters for Zyke, and it runs where players' requests run: the daemon's
own backend (llama.cpp by default, on the embedded GGUF), the prompt from ``zyke.prompt_format.render_prompt``,
decoding constrained by ``reply_schema(npc)`` through the daemon's decode loop, greedy, with the daemon's
default repeat penalty, and an adapter loaded by *name* from the daemon's adapter registry (which checks its
base fingerprint and file hashes). A number measured here is a number a game would see; a number measured
on a transformers forward pass with teacher forcing would not be.

Metrics (each scenario is a dataset row: npc, history, state, input and the expected reply):

- ``validity``: the reply parses as JSON and passes ``validator_for(reply_schema(npc))``. Decoding is
  constrained, so anything below 1.0 means a reply ran out of ``max_tokens`` before its JSON closed.
- ``action_accuracy`` / ``emotion_accuracy``: equal to the expected reply's; an invalid reply counts as
  wrong. ``action_accuracy_non_none`` is the same on the scenarios whose expected action is not ``none``
  (about half the data is ``none``, so a model that always says ``none`` scores well on the plain number).
- ``empty_say_rate``: the spoken line is empty or only whitespace/punctuation.
- ``echo_rate``: the line repeats the player's input or a line already in the conversation (normalized
  case and punctuation, difflib ratio >= 0.8), the classic failure of a base model continuing a script.
- ``off_persona_rate``: the line breaks the fiction in a way a regex can see: the NPC calls itself an AI,
  assistant, language model, chatbot or program, names a model vendor (OpenAI, ChatGPT, Gemma...), or
  leaks the script format (``Player:``, ``[Game state``, "role-playing game", "JSON", its own ``Name:``
  prefix). Merely mentioning the word "AI" in character ("AI? Never heard of it") is *not* counted. This
  is a lower bound on breaking character: a polite modern-sounding line passes it.
- ``say_f1``: word-overlap F1 between the line and the expected line (SQuAD-style): a coarse signal of
  staying on topic, not of quality.
- ``mean_say_words``, ``ttft_s`` (mean time to first token, prompt evaluation included; the llama.cpp
  backend reuses a prompt prefix between consecutive scenarios of one NPC as the daemon does) and
  ``tokens_per_s`` (completion tokens over generation time, summed over scenarios).

Rates other than validity and the accuracies are over the valid replies (the JSON must parse to have a
line to judge); the report gives the counts too.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Hub datasets perplexity knows by a short name: (path, config, split, text field).
HUB_TEXTS: dict[str, tuple[str, str | None, str, str]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "wikitext103": ("wikitext", "wikitext-103-raw-v1", "test", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
    "lambada": ("lambada", None, "test", "text"),
}
ECHO_RATIO = 0.8
_AI_SELF = re.compile(
    r"\b(i am|i'm|im|as|being|just)\s+(an?\s+|the\s+)?(ai|a\.i\.|artificial intelligence|(large\s+)?language model|llm|"
    r"assistant|chat\s?bot|bot|computer program|program|virtual assistant|machine)\b", re.IGNORECASE)
_VENDOR = re.compile(r"\b(openai|chatgpt|gpt-?\d|gemma|google deepmind|anthropic|claude|llama)\b", re.IGNORECASE)
_SCRIPT = re.compile(r"(player:|\[game state|role-playing game|\bjson\b|\"say\"|\"action\"|\"emotion\")", re.IGNORECASE)


class EvalError(Exception):
    """A problem the user can fix (unknown adapter, unreadable file): the CLI prints it."""


@dataclass
class Scenario:
    id: str
    npc: Any  # zyke.protocol.NpcSpec
    history: list[Any]  # zyke.protocol.Turn
    input: str
    state: dict[str, Any] | None
    expected: dict[str, Any]
    #: the row's allowed_actions: rendered into the prompt and narrowing decoding, as the daemon does
    allowed_actions: list[str] | None = None


def load_scenarios(path: Path, limit: int | None = None) -> list[Scenario]:
    """Dataset rows (schemas/npc_example.json), checked like training data; a bad row is an error here."""
    from zyke.protocol.models import NpcSpec, Turn

    from .npc_data import check_row

    out: list[Scenario] = []
    for lineno, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        row = json.loads(text)
        reason = check_row(row)
        if reason is not None:
            raise EvalError(f"{path}:{lineno}: not a valid scenario row: {reason}")
        out.append(Scenario(row["id"], NpcSpec.model_validate(row["npc"]),
                            [Turn.model_validate(t) for t in row.get("history", [])], row["input"],
                            row.get("state"), row["reply"], row.get("allowed_actions")))
        if limit is not None and len(out) >= limit:
            break
    return out


# -- judging one reply


def _norm(text: str) -> str:
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def is_echo(say: str, scenario: Scenario) -> bool:
    """The line repeats the player's input or any line already in the conversation."""
    said = _norm(say)
    if not said:
        return False
    earlier = [scenario.input] + [t.player for t in scenario.history] + [t.reply.say for t in scenario.history]
    return any(said == _norm(e) or difflib.SequenceMatcher(None, said, _norm(e)).ratio() >= ECHO_RATIO
               for e in earlier if _norm(e))


def is_off_persona(say: str, npc_name: str) -> bool:
    """The line breaks the fiction visibly (see the module docstring for exactly what counts)."""
    own_prefix = re.compile(rf"(^|\n)\s*{re.escape(npc_name)}\s*:", re.IGNORECASE)
    return bool(_AI_SELF.search(say) or _VENDOR.search(say) or _SCRIPT.search(say) or own_prefix.search(say))


def word_f1(pred: str, ref: str) -> float:
    p, r = _norm(pred).split(), _norm(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def judge(text: str, scenario: Scenario) -> dict[str, Any]:
    """Per-scenario verdicts for one generated reply text."""
    from zyke.prompt_format import reply_schema
    from zyke.protocol.validation import validator_for

    try:
        reply = json.loads(text)
    except json.JSONDecodeError:
        reply = None
    schema = reply_schema(scenario.npc, allowed_actions=scenario.allowed_actions)
    valid = reply is not None and not list(validator_for(schema).iter_errors(reply))
    out: dict[str, Any] = {"valid": valid, "text": text}
    if not valid:
        return out | {"action_ok": False, "emotion_ok": False}
    say = reply["say"]
    return out | {
        "action_ok": reply["action"] == scenario.expected["action"],
        "spurious": scenario.expected["action"] == "none" and reply["action"] != "none",
        "emotion_ok": reply["emotion"] == scenario.expected["emotion"],
        "empty_say": not _norm(say),
        "echo": is_echo(say, scenario),
        "off_persona": is_off_persona(say, scenario.npc.display_name),
        "say_f1": word_f1(say, scenario.expected["say"]),
        "say_words": len(say.split()),
    }


def summarize(verdicts: Sequence[dict[str, Any]], scenarios: Sequence[Scenario]) -> dict[str, Any]:
    """Aggregate per-scenario verdicts into the metrics named in the module docstring."""
    n = len(verdicts)
    valid = [v for v in verdicts if v["valid"]]
    non_none = [v for v, s in zip(verdicts, scenarios, strict=True) if s.expected["action"] != "none"]
    none_expected = [v for v, s in zip(verdicts, scenarios, strict=True) if s.expected["action"] == "none"]

    def rate(items: Sequence[dict[str, Any]], key: str) -> float | None:
        return round(sum(bool(v.get(key)) for v in items) / len(items), 4) if items else None

    def mean(items: Sequence[dict[str, Any]], key: str) -> float | None:
        return round(sum(v[key] for v in items) / len(items), 4) if items else None

    gen_s = sum(max(v["total_s"] - v["ttft_s"], 0.0) for v in verdicts)
    return {
        "scenarios": n, "valid": len(valid), "non_none_scenarios": len(non_none),
        "validity": rate(verdicts, "valid"),
        "action_accuracy": rate(verdicts, "action_ok"),
        "action_accuracy_non_none": rate(non_none, "action_ok"),
        "spurious_action_rate": rate(none_expected, "spurious"),
        **({"action_accuracy_scored": rate(verdicts, "action_ok_scored"),
            "action_accuracy_non_none_scored": rate(non_none, "action_ok_scored")}
           if any("action_ok_scored" in v for v in verdicts) else {}),
        "emotion_accuracy": rate(verdicts, "emotion_ok"),
        "empty_say_rate": rate(valid, "empty_say"),
        "echo_rate": rate(valid, "echo"),
        "off_persona_rate": rate(valid, "off_persona"),
        "say_f1": mean(valid, "say_f1"),
        "mean_say_words": mean(valid, "say_words"),
        "ttft_s": round(sum(v["ttft_s"] for v in verdicts) / n, 4) if n else None,
        "tokens_per_s": round(sum(max(v["completion_tokens"] - 1, 0) for v in verdicts) / gen_s, 2) if gen_s else None,
    }


# -- running scenarios through a daemon backend


def open_backend(kind: str, model: str | None, threads: int | None, n_ctx: int = 2048) -> Any:
    """The daemon's own backend class, as the daemon would build it for ``--backend kind``."""
    if kind == "llama.cpp":
        from zyke_daemon.backends.llamacpp import LlamaCppBackend
        from zyke_models.embedded import resolve_model

        path, sha256 = resolve_model(model)
        return LlamaCppBackend(path, sha256=sha256, n_ctx=n_ctx, n_threads=threads)
    if kind == "transformers":
        from zyke_daemon.backends.hf import TransformersBackend

        return TransformersBackend(model)
    raise EvalError(f"unknown backend {kind!r}; use llama.cpp or transformers")


def run_npc_eval(scenarios: Sequence[Scenario], adapters: Sequence[str | None], backend_kind: str = "llama.cpp",
                 model: str | None = None, max_tokens: int = 96, threads: int | None = None,
                 registry: Any = None, progress: Callable[[str, int, int], None] | None = None,
                 score_actions: bool = False, groups: dict[str, set[str]] | None = None) -> dict[str, Any]:
    """Every scenario through the backend once per adapter (None = the base model), greedy and constrained.

    ``score_actions`` also picks each valid reply's action by likelihood (``scored_action``) to compare
    with greedy decoding; ``groups`` (name -> scenario ids) adds per-group summaries (seen/unseen)."""
    from zyke.prompt_format import render_prompt, reply_schema
    from zyke_daemon.backends.base import GenerationRequest
    from zyke_models.errors import DaemonError

    from .adapters import default_registry

    registry = registry or default_registry()
    backend = open_backend(backend_kind, model, threads)
    results: dict[str, Any] = {}
    per_scenario: list[dict[str, Any]] = [{"id": s.id, "npc": s.npc.id, "input": s.input, "expected": s.expected}
                                          for s in scenarios]
    try:
        for adapter in adapters:
            label = adapter or "base"
            if adapter is not None:
                try:
                    path = registry.resolve(adapter, backend.fingerprint, backend.adapter_kind)
                except DaemonError as exc:
                    raise EvalError(str(exc)) from exc
                backend.load_adapter(adapter, path)
            verdicts = []
            for i, s in enumerate(scenarios):
                request = GenerationRequest(prompt=render_prompt(s.npc, s.history, s.input, s.state,
                                                                 s.allowed_actions),
                                            schema=reply_schema(s.npc, allowed_actions=s.allowed_actions),
                                            max_tokens=max_tokens, adapter=adapter)
                result = backend.generate(request, lambda _piece: True)
                verdict = judge(result.text, s) | {"ttft_s": result.ttft_s, "total_s": result.total_s,
                                                   "completion_tokens": result.completion_tokens,
                                                   "finish_reason": result.finish_reason}
                if score_actions and verdict["valid"]:
                    scored = scored_action(backend, request.prompt, result.text, s, adapter)
                    verdict |= {"scored_action": scored, "action_ok_scored": scored == s.expected["action"]}
                verdicts.append(verdict)
                per_scenario[i][label] = {k: verdict[k] for k in ("text", "valid", "action_ok", "emotion_ok",
                                                                  "scored_action") if k in verdict}
                if progress:
                    progress(label, i + 1, len(scenarios))
            results[label] = summarize(verdicts, scenarios)
            if groups:
                results[label]["groups"] = {
                    name: summarize([v for v, s in zip(verdicts, scenarios, strict=True) if s.id in ids],
                                    [s for s in scenarios if s.id in ids])
                    for name, ids in groups.items() if ids}
    finally:
        backend.close()
    return {"backend": backend_kind, "model": backend_model_name(model), "max_tokens": max_tokens,
            "decoding": "greedy, reply_schema-constrained, the daemon's default repeat penalty and no-repeat ban",
            "results": results, "per_scenario": per_scenario}


#: Where the action's value starts in a reply as the grammar writes it (``zyke.prompt_format`` separators).
ACTION_KEY = '"action": "'


def scored_action(backend: Any, prompt: str, text: str, scenario: Scenario, adapter: str | None) -> str:
    """The allowed action whose label, with the reply's closing ``"}``, is most likely after the reply's line
    and emotion as decoded: the alternative to letting constrained greedy decoding pick it token by token.

    The closing quote and brace are scored too, so a label that is the start of another (``give`` and
    ``give_item``) is judged as a whole label, as the grammar would end it."""
    from zyke.prompt_format import allowed_action_names

    allowed = allowed_action_names(scenario.npc, scenario.allowed_actions)
    scores = label_scores(backend, prompt + up_to_action(text), allowed, adapter)
    return allowed[max(range(len(allowed)), key=scores.__getitem__)]


def up_to_action(text: str) -> str:
    """A reply's JSON up to where its action's value starts."""
    return text[: text.rindex(ACTION_KEY) + len(ACTION_KEY)]


def label_scores(backend: Any, prefix: str, allowed: Sequence[str], adapter: str | None) -> list[float]:
    """Each allowed action's total log-probability after ``prefix`` (which ends where the action's value starts),
    its closing ``"}`` included (``scored_action`` says why)."""
    scores: list[float] = backend.score_continuations(prefix, [a + '"}' for a in allowed], adapter)
    return scores


def load_scenario_files(npc_files: Sequence[Path], limit: int | None,
                        seen_files: Sequence[Path] = ()) -> tuple[list[Scenario], dict[str, set[str]]]:
    """Scenarios from every file, and the groups the report breaks them into: one per file (when there are
    several) and, given training files, seen/unseen personas and action names (``seen_groups``)."""
    scenarios: list[Scenario] = []
    groups: dict[str, set[str]] = {}
    for npc_file in npc_files:
        loaded = load_scenarios(npc_file, limit)
        scenarios += loaded
        if len(npc_files) > 1:
            groups[f"file:{npc_file.name}"] = {s.id for s in loaded}
    if seen_files:
        groups |= seen_groups(scenarios, seen_files)
    return scenarios, groups


def perplexity_report(sources: Sequence[str], names: Sequence[str | None], model: str | None, limit: int | None,
                      on_log: Callable[[str], None] = print) -> dict[str, Any]:
    """Perplexity of the base (``None``) and each adapter on every source; a source that cannot be read is
    recorded as skipped (with why) rather than failing the other measurements."""
    ppl: dict[str, Any] = {}
    for source in sources:
        try:
            pairs, kind = read_texts(source, limit)
        except EvalError as exc:
            on_log(str(exc))
            ppl[source] = {"skipped": str(exc)}
            continue
        for name in names:
            peft = peft_dir_for(name, model=model) if name else None
            result = perplexity(pairs, model, peft) | {"scored": kind}
            ppl.setdefault(source, {})[name or "base"] = result
            on_log(f"perplexity {source} [{name or 'base'}]: {result['perplexity']} "
                   f"over {result['tokens']} {kind} tokens")
    return ppl


def lm_eval_report(tasks: Sequence[str], names: Sequence[str | None], model: str | None, limit: int | None,
                   on_log: Callable[[str], None] = print) -> dict[str, Any]:
    """lm-evaluation-harness results per model; ``{"skipped": why}`` when the harness cannot run here."""
    results: dict[str, Any] = {}
    for name in names:
        try:
            peft_dir = peft_dir_for(name, model=model) if name else None
            results[name or "base"] = run_lm_eval(list(tasks), model, peft_dir, limit)
        except EvalError as exc:
            on_log(str(exc))
            return {"skipped": str(exc)}
    return results


def seen_groups(scenarios: Sequence[Scenario], training_files: Sequence[Path]) -> dict[str, set[str]]:
    """Scenario ids by whether training saw the persona, and whether the expected action's name was seen.

    "Seen" is decided from the training files themselves (persona text and declared action names), so
    the split is honest whichever files a run trained on."""
    personas: set[str] = set()
    actions: set[str] = set()
    for path in training_files:
        for text in path.read_text(encoding="utf-8").splitlines():
            if text.strip():
                npc = json.loads(text)["npc"]
                personas.add(npc["persona"])
                actions.update(a if isinstance(a, str) else a["name"] for a in npc["actions"])
    return {
        "seen_persona": {s.id for s in scenarios if s.npc.persona in personas},
        "unseen_persona": {s.id for s in scenarios if s.npc.persona not in personas},
        "unseen_action_name": {s.id for s in scenarios if s.expected["action"] not in actions},
    }


def merge_baseline(npc: dict[str, Any], earlier: dict[str, Any], scenarios_file: str) -> dict[str, Any]:
    """Put an earlier report's base results in front of this run's: the base model's replies do not change
    between adapter runs (greedy, same backend), so re-generating them only costs time. Refuses a report
    made on other scenarios or another backend."""
    old = earlier.get("npc") or {}
    old_ids = [p["id"] for p in old.get("per_scenario", [])]
    new_ids = [p["id"] for p in npc["per_scenario"]]
    if "base" not in old.get("results", {}) or old_ids != new_ids or old.get("backend") != npc["backend"] \
            or old.get("max_tokens") != npc["max_tokens"]:
        raise EvalError(f"the --baseline report does not hold base results for {scenarios_file} with backend "
                        f"{npc['backend']} and max_tokens {npc['max_tokens']}")
    for row, old_row in zip(npc["per_scenario"], old["per_scenario"], strict=True):
        row["base"] = old_row["base"]
    npc["results"] = {"base": old["results"]["base"], **npc["results"]}
    npc["baseline_from"] = earlier.get("created")
    return npc


def backend_model_name(model: str | None) -> str:
    return model or "embedded gemma-3-270m (Q4_K_M GGUF / its fp32 checkpoint)"


# -- perplexity


def read_texts(source: str, limit: int | None = None) -> tuple[list[tuple[str, str]], str]:
    """``(context, target)`` pairs to score, and what kind they are. A .txt file is one target with no
    context; a .jsonl of ``{text}`` likewise per line; ``{prompt, completion}`` and dataset rows score the
    completion given the prompt (rows rendered via prompt_format). Hub names need ``datasets`` and the net."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".txt":
            return [("", path.read_text(encoding="utf-8"))], "text"
        pairs: list[tuple[str, str]] = []
        kind = "text"
        for text in path.read_text(encoding="utf-8").splitlines():
            if not text.strip():
                continue
            row = json.loads(text)
            if "npc" in row:
                from .npc_data import render_row

                ex = render_row(row)
                pairs.append((ex.prompt, ex.completion))
                kind = "completion"
            elif "prompt" in row and "completion" in row:
                pairs.append((row["prompt"], row["completion"]))
                kind = "completion"
            else:
                pairs.append(("", row["text"]))
            if limit is not None and len(pairs) >= limit:
                break
        return pairs, kind
    if source not in HUB_TEXTS:
        raise EvalError(f"{source} is neither a local .txt/.jsonl file nor one of {', '.join(HUB_TEXTS)}")
    try:
        import datasets
    except ImportError as exc:
        raise EvalError(f"skipped {source}: the `datasets` package is not installed (pip install datasets)") from exc
    name, config, split, field = HUB_TEXTS[source]
    try:
        data = datasets.load_dataset(name, config, split=split, streaming=source == "c4")
    except Exception as exc:  # offline, auth or a renamed dataset all mean: skip with the reason
        raise EvalError(f"skipped {source}: could not load {name} from the Hub ({type(exc).__name__}: {exc})") from exc
    texts = []
    for row in data:
        texts.append(row[field])
        if limit is not None and len(texts) >= limit:
            break
    return [("", "\n\n".join(texts))], "text"


def perplexity(pairs: Sequence[tuple[str, str]], model_dir: str | None, peft_dir: Path | None = None,
               max_length: int = 512, stride: int = 256) -> dict[str, Any]:
    """Token-level perplexity of the targets (given their contexts), with a sliding window for long texts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train import resolve_model

    path = resolve_model(model_dir)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if peft_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(peft_dir))
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for context, target in pairs:
            ctx_ids = tok(context, add_special_tokens=True)["input_ids"] if context else [tok.bos_token_id]
            tgt_ids = tok(target, add_special_tokens=False)["input_ids"]
            ids = ctx_ids + tgt_ids
            first_target = len(ctx_ids)
            end_prev = first_target
            for begin in range(0, len(ids), stride):
                end = min(begin + max_length, len(ids))
                if end <= end_prev and begin > 0:
                    continue
                window = torch.tensor([ids[begin:end]])
                labels = window.clone()
                labels[0, : max(end_prev, first_target) - begin] = -100  # score each target token once
                n = int((labels[0, 1:] != -100).sum())
                if n:
                    # Only the scored suffix needs logits: the 262k-token output layer over a whole prompt
                    # would cost more than the rest of the model.
                    first = int((labels[0] != -100).nonzero()[0])
                    keep = min(window.shape[1], window.shape[1] - max(first, 1) + 1)
                    logits = model(input_ids=window, logits_to_keep=keep).logits[0, :-1].float()
                    targets = labels[0, window.shape[1] - keep + 1:]
                    nll += float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100,
                                                                   reduction="sum"))
                    count += n
                end_prev = end
                if end == len(ids):
                    break
    return {"tokens": count, "nll": round(nll / count, 4) if count else None,
            "perplexity": round(math.exp(nll / count), 3) if count else None}


def run_lm_eval(tasks: Sequence[str], model_dir: str | None, peft_dir: Path | None,
                limit: int | None) -> dict[str, Any]:
    """lm-evaluation-harness on the transformers model (with the adapter if given), when installed."""
    try:
        import lm_eval
    except ImportError as exc:
        raise EvalError("skipped lm-eval tasks: lm-evaluation-harness is not installed (pip install lm-eval)") from exc
    from .train import resolve_model

    args = f"pretrained={resolve_model(model_dir)},dtype=float32"
    if peft_dir is not None:
        args += f",peft={peft_dir}"
    out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=list(tasks), limit=limit)
    return {task: metrics for task, metrics in (out or {}).get("results", {}).items()}


def peft_dir_for(name: str, registry: Any = None, model: str | None = None) -> Path:
    """The registered adapter's PEFT directory, checked against the fingerprint of the base it will run on:
    ``model`` (a checkpoint directory or GGUF file, as ``--model`` gives it) or the embedded base."""
    from zyke_models.embedded import embedded_model_path
    from zyke_models.errors import DaemonError
    from zyke_models.hf_checkpoint import base_fingerprint

    from .adapters import default_registry

    if model is not None and Path(model).expanduser().exists():
        fingerprint = base_fingerprint(Path(model))
    else:  # the embedded base (a Hub name cannot be fingerprinted here: the embedded one is what matches)
        fingerprint = f"sha256:{embedded_model_path()[1]}"
    try:
        return (registry or default_registry()).resolve(name, fingerprint, "peft")
    except DaemonError as exc:
        raise EvalError(str(exc)) from exc


def format_table(npc_report: dict[str, Any]) -> str:
    """The NPC metrics side by side, one row a metric."""
    results = npc_report["results"]
    labels = list(results)
    rows = ["validity", "action_accuracy", "action_accuracy_non_none", "spurious_action_rate", "emotion_accuracy",
            "action_accuracy_scored", "action_accuracy_non_none_scored", "empty_say_rate",
            "echo_rate", "off_persona_rate", "say_f1", "mean_say_words", "ttft_s", "tokens_per_s"]
    width = max(len(r) for r in rows)
    cols = [max(12, len(lb)) for lb in labels]
    lines = ["  ".join([f"{'metric':<{width}}", *(f"{lb:>{c}}" for lb, c in zip(labels, cols, strict=True))])]
    for r in rows:
        cells = []
        for lb, c in zip(labels, cols, strict=True):
            v = results[lb].get(r)
            cells.append(f"{'-' if v is None else (f'{v:.3f}' if isinstance(v, float) else v):>{c}}")
        lines.append("  ".join([f"{r:<{width}}", *cells]))
    return "\n".join(lines)


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
