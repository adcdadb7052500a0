"""Experiment: does the adapter miss actions because of its own lines, or because it cannot read the labels?

    .venv/bin/python training/experiments/actions_after_given_lines.py --adapter npc-default --out F.json \
        training/data/npc_heldout.jsonl training/data/npc_generated_heldout.jsonl DRAW.jsonl

For every scenario it decodes the reply greedily under the schema (as the daemon does) and, separately, scores every
allowed action after the scenario's *own* line and emotion (teacher-forced, as ``zyke-train evaluate
--score-actions`` scores after the decoded ones). If the given line lifts accuracy far above greedy decoding, the
lines lead the label astray; if not, the model cannot read the label. A file whose name contains ``seed777`` (a
training-side draw of the engine, ``generate.py --seed 777``) is sampled down to 120 rows. Prints accuracy, not-none
accuracy and the spurious rate per group, both ways. training/README.md reports the result (2026-12-01).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any


def collect(adapter: str, files: list[Path]) -> list[dict[str, Any]]:
    from zyke.prompt_format import render_prompt, render_reply, reply_schema
    from zyke_daemon.backends.base import GenerationRequest
    from zyke_train.adapters import default_registry
    from zyke_train.evaluate import load_scenarios, open_backend, scored_action

    backend = open_backend("llama.cpp", None, 2)
    backend.load_adapter(adapter, default_registry().resolve(adapter, backend.fingerprint, backend.adapter_kind))
    rows = []
    for path in files:
        scenarios = load_scenarios(path, None)
        if "seed777" in path.name or "seed777" in str(path.parent):
            random.Random(0).shuffle(scenarios)
            scenarios = scenarios[:120]
        for s in scenarios:
            prompt = render_prompt(s.npc, s.history, s.input, s.state, s.allowed_actions)
            result = backend.generate(GenerationRequest(prompt=prompt, max_tokens=96, adapter=adapter,
                                                        schema=reply_schema(s.npc, allowed_actions=s.allowed_actions)),
                                      lambda _: True)
            rows.append({"file": str(path), "id": s.id, "expected": s.expected["action"],
                         "greedy": json.loads(result.text)["action"],
                         # evaluate --score-actions' pick, after the scenario's own reply instead of the decoded one
                         "after_given_line": scored_action(backend, prompt, render_reply(s.expected), s, adapter)})
    backend.close()
    return rows


def action_figures(rows: list[dict[str, Any]], way: str) -> dict[str, float]:
    """Accuracy, not-``none`` accuracy and the spurious rate of the picks in column ``way`` (as evaluate names them)."""
    acting = [r for r in rows if r["expected"] != "none"]
    quiet = [r for r in rows if r["expected"] == "none"]
    return {"scenarios": len(rows),
            "action_accuracy": round(sum(r[way] == r["expected"] for r in rows) / len(rows), 3),
            "action_accuracy_non_none": round(sum(r[way] == r["expected"] for r in acting) / max(len(acting), 1), 3),
            "spurious_action_rate": round(sum(r[way] != "none" for r in quiet) / max(len(quiet), 1), 3)}


def table(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    def group_of(row: dict[str, Any]) -> str:  # both held-out files together: the 160 of the evaluation
        return "held-out" if "heldout" in Path(row["file"]).name else row["file"]

    for group in sorted({group_of(r) for r in rows}):
        mine = [r for r in rows if group_of(r) == group]
        for way in ("greedy", "after_given_line"):
            out[f"{group} {way}"] = action_figures(mine, way)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--adapter", default="npc-default")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = collect(args.adapter, args.files)
    args.out.write_text(json.dumps({"rows": rows, "table": table(rows)}, indent=1) + "\n")
    for name, figures in table(rows).items():
        print(name, figures)


if __name__ == "__main__":
    main()
