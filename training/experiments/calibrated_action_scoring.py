"""Experiment (tried, not adopted): pick the action by its likelihood minus a content-free prior.

    .venv/bin/python training/experiments/calibrated_action_scoring.py SCENARIOS.jsonl [...] --out F.json
    .venv/bin/python training/experiments/calibrated_action_scoring.py --table F.json

Why: the shipped adapter often writes the right line under the wrong label, preferring a described action over an
undescribed one that fits better (``make_sale`` lost to ``post_bounty`` "start a quest"). Contextual calibration
(Zhao et al. 2021) and domain-conditional PMI (Holtzman et al. 2021) correct such label priors: score each allowed
action after the reply's line and emotion (as ``zyke-train evaluate --score-actions`` does), and subtract
``alpha`` times its score under a content-free turn (player line "...", say "..."), the same NPC and actions.
The first form generates every reply greedily with npc-default and saves both scores; ``--table`` prints accuracy
for several ``alpha`` (training/README.md reports the result).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def collect(files: list[Path], out: Path, adapter: str = "npc-default") -> None:
    from zyke.prompt_format import allowed_action_names, render_prompt, render_reply, reply_schema
    from zyke_daemon.backends.base import GenerationRequest
    from zyke_train.adapters import default_registry
    from zyke_train.evaluate import judge, label_scores, load_scenarios, open_backend, up_to_action

    backend = open_backend("llama.cpp", None, 2)
    backend.load_adapter(adapter, default_registry().resolve(adapter, backend.fingerprint, backend.adapter_kind))
    rows = []
    for s in [s for f in files for s in load_scenarios(f, None)]:
        prompt = render_prompt(s.npc, s.history, s.input, s.state, s.allowed_actions)
        result = backend.generate(GenerationRequest(prompt=prompt, max_tokens=96, adapter=adapter,
                                                    schema=reply_schema(s.npc, allowed_actions=s.allowed_actions)),
                                  lambda _: True)
        if not judge(result.text, s)["valid"]:
            continue
        reply = json.loads(result.text)
        allowed = allowed_action_names(s.npc, s.allowed_actions)
        cond = label_scores(backend, prompt + up_to_action(result.text), allowed, adapter)
        free = render_prompt(s.npc, [], "...", None, s.allowed_actions) + up_to_action(
            render_reply({"say": "...", "emotion": reply["emotion"], "action": ""}))
        prior = label_scores(backend, free, allowed, adapter)
        rows.append({"id": s.id, "expected": s.expected["action"], "greedy": reply["action"], "allowed": allowed,
                     "cond": cond, "prior": prior})
    backend.close()
    out.write_text(json.dumps(rows))


def table(rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Action accuracy, accuracy where the answer is not ``none``, spurious rate, per alpha (and greedy)."""
    out = []
    for alpha in ALPHAS:
        right = not_none = not_none_right = none = spurious = 0
        for r in rows:
            scores = [c - alpha * p for c, p in zip(r["cond"], r["prior"], strict=True)]
            pick = r["allowed"][max(range(len(scores)), key=scores.__getitem__)]
            right += pick == r["expected"]
            if r["expected"] == "none":
                none += 1
                spurious += pick != "none"
            else:
                not_none += 1
                not_none_right += pick == r["expected"]
        out.append({"alpha": alpha, "action_accuracy": round(right / len(rows), 3),
                    "action_accuracy_non_none": round(not_none_right / max(not_none, 1), 3),
                    "spurious_action_rate": round(spurious / max(none, 1), 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--table", type=Path)
    args = ap.parse_args()
    if args.table:
        rows = json.loads(args.table.read_text())
        greedy = sum(r["greedy"] == r["expected"] for r in rows) / len(rows)
        print(json.dumps({"scenarios": len(rows), "greedy_action_accuracy": round(greedy, 3), "by_alpha": table(rows)},
                         indent=1))
    else:
        collect(args.files, args.out)


if __name__ == "__main__":
    main()
