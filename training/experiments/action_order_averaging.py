"""Experiment: is the adapter's action choice biased by where a label sits in the action list?

    .venv/bin/python training/experiments/action_order_averaging.py --adapter npc-default --orders 4 --out F.json \
        training/data/npc_heldout.jsonl training/data/npc_generated_heldout.jsonl

Small models choosing among listed options favour some positions (Zheng et al. 2024, "Large Language Models Are
Not Robust Multiple Choice Selectors"); averaging over permutations of the options is the plain remedy. Here each
scenario's allowed actions are scored after its *own* line and emotion (as ``actions_after_given_lines.py`` does, so
the lines play no part), once with the NPC's action list in its declared order and once per extra random order of
that list; the pick is the label with the best mean log-probability over the orders. Prints the accuracy of the
declared order alone and of the average, per group; the report records every pick.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any


def collect(adapter: str, files: list[Path], orders: int) -> list[dict[str, Any]]:
    from zyke.prompt_format import allowed_action_names, render_prompt, render_reply
    from zyke_train.adapters import default_registry
    from zyke_train.evaluate import label_scores, load_scenarios, open_backend, up_to_action

    backend = open_backend("llama.cpp", None, 2)
    backend.load_adapter(adapter, default_registry().resolve(adapter, backend.fingerprint, backend.adapter_kind))
    rows = []
    for path in files:
        for s in load_scenarios(path, None):
            allowed = allowed_action_names(s.npc, s.allowed_actions)
            given = up_to_action(render_reply(s.expected))
            rng = random.Random(s.id)
            per_order = []
            for k in range(orders):
                actions = list(s.npc.actions)
                if k:
                    rng.shuffle(actions)
                npc = s.npc.model_copy(update={"actions": actions})
                prompt = render_prompt(npc, s.history, s.input, s.state, s.allowed_actions)
                per_order.append(label_scores(backend, prompt + given, allowed, adapter))
            mean = [sum(o[i] for o in per_order) / orders for i in range(len(allowed))]
            rows.append({"file": str(path), "id": s.id, "expected": s.expected["action"],
                         "declared_order": allowed[max(range(len(allowed)), key=per_order[0].__getitem__)],
                         "order_mean": allowed[max(range(len(allowed)), key=mean.__getitem__)]})
    backend.close()
    return rows


def table(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    from actions_after_given_lines import action_figures  # the sibling script (its folder is on sys.path)

    return {way: action_figures(rows, way) for way in ("declared_order", "order_mean")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--adapter", default="npc-default")
    ap.add_argument("--orders", type=int, default=4, help="the declared order plus ORDERS-1 random ones")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = collect(args.adapter, args.files, args.orders)
    args.out.write_text(json.dumps({"adapter": args.adapter, "orders": args.orders, "rows": rows,
                                    "table": table(rows)}, indent=1) + "\n")
    for name, figures in table(rows).items():
        print(name, figures)


if __name__ == "__main__":
    main()
