"""Build the starter NPC dataset (npc_train.jsonl, npc_heldout.jsonl) from the hand-written rows in sources/.

Every line an NPC says in sources/*.py was written by hand; this script only expands the compact tables
into schema rows (schemas/npc_example.json), checks them the way ``zyke-train npc-data`` does, and splits
them. Run it after editing a source file:

    .venv/bin/python training/data/make_dataset.py            # rewrite the two JSONL files
    .venv/bin/python training/data/make_dataset.py --check    # fail if they are stale
    .venv/bin/python training/data/make_dataset.py --stats    # markdown tables for README.md

The split is deterministic: personas marked ``heldout_only`` go entirely to held-out (to measure how
the model does on an NPC it never trained on), and the remaining held-out quota (so that ~15% of all
rows are held out) is drawn from every other persona in proportion to its size, with a random
generator seeded by SEED and the persona id.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from zyke_train.npc_data import check_row

HERE = Path(__file__).resolve().parent
SOURCES = ("townsfolk", "wilds", "far_shores")
SEED = 1234
HELDOUT_FRACTION = 0.15
TRAIN_FILE = "npc_train.jsonl"
HELDOUT_FILE = "npc_heldout.jsonl"
#: Lines should be short: a 270M model imitates length too.
MAX_SAY = 200


def load_personas() -> list[dict[str, Any]]:
    """The persona tables from sources/*.py, in a fixed order."""
    personas: list[dict[str, Any]] = []
    for name in SOURCES:
        spec = importlib.util.spec_from_file_location(f"npc_sources_{name}", HERE / "sources" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        personas.extend(module.PERSONAS)
    return personas


def expand(persona: dict[str, Any]) -> list[dict[str, Any]]:
    """One persona's compact rows as schema rows.

    A row's state is the persona's base state updated with the row's own keys. A history turn carries
    the state the game sent with it: its own keys over the base state when it names any, otherwise the
    row's state (the game usually sends the same state on consecutive turns).
    """
    npc, base = persona["npc"], persona.get("base_state", {})
    rows = []
    for i, entry in enumerate(persona["rows"], start=1):
        tags, player, say, emotion, action, *rest = entry
        state_keys = rest[0] if rest else None
        history = rest[1] if len(rest) > 1 else []
        state = None if state_keys is None else {**base, **state_keys}
        turns = []
        for turn in history:
            t_player, t_say, t_emotion, t_action, *t_rest = turn
            t_state = {**base, **t_rest[0]} if t_rest else state
            item: dict[str, Any] = {"player": t_player}
            if t_state:
                item["state"] = t_state
            item["reply"] = {"say": t_say, "emotion": t_emotion, "action": t_action}
            turns.append(item)
        row: dict[str, Any] = {"id": f"{npc['id']}-{i:03d}", "npc": npc, "history": turns}
        if state:
            row["state"] = state
        row.update(input=player, reply={"say": say, "emotion": emotion, "action": action}, tags=tags.split())
        rows.append(row)
    return rows


def check(rows: list[dict[str, Any]]) -> list[str]:
    """Problems that would make the dataset worse to train on: invalid rows, long or repeated lines."""
    problems = []
    seen_say: dict[str, str] = {}
    seen_input: set[tuple[str, str]] = set()
    for row in rows:
        reason = check_row(row)
        if reason:
            problems.append(f"{row['id']}: {reason}")
        say = row["reply"]["say"]
        if len(say) > MAX_SAY:
            problems.append(f"{row['id']}: say is {len(say)} characters (max {MAX_SAY})")
        if say in seen_say:
            problems.append(f"{row['id']}: same line as {seen_say[say]}")
        seen_say[say] = row["id"]
        key = (row["npc"]["id"], row["input"])
        if key in seen_input:
            problems.append(f"{row['id']}: same player input twice for this NPC")
        seen_input.add(key)
    return problems


def split(personas: list[dict[str, Any]], seed: int = SEED) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Persona-stratified split: held-out-only personas whole, plus a proportional seeded draw from the rest."""
    expanded = [(p, expand(p)) for p in personas]
    total = sum(len(rows) for _, rows in expanded)
    unseen = [rows for p, rows in expanded if p.get("heldout_only")]
    seen = [(p["npc"]["id"], rows) for p, rows in expanded if not p.get("heldout_only")]
    quota = max(0, round(total * HELDOUT_FRACTION) - sum(len(r) for r in unseen))
    seen_total = sum(len(rows) for _, rows in seen)
    # largest-remainder apportionment of the quota over the seen personas, by size
    exact = [quota * len(rows) / seen_total for _, rows in seen]
    shares = [int(x) for x in exact]
    for i in sorted(range(len(seen)), key=lambda i: exact[i] - shares[i], reverse=True)[: quota - sum(shares)]:
        shares[i] += 1
    train, heldout = [], [row for rows in unseen for row in rows]
    for (npc_id, rows), share in zip(seen, shares, strict=True):
        picked = set(random.Random(f"{seed}:{npc_id}").sample(range(len(rows)), share))
        for i, row in enumerate(rows):
            (heldout if i in picked else train).append(row)
    return train, sorted(heldout, key=lambda r: r["id"])


#: Rows whose exchange can open any conversation with that NPC, so it may serve as earlier context.
CONTEXT_TAGS = {"greeting", "small_talk", "lore", "out_of_world"}
#: Share of rows without written history that get 1-3 context turns, and the weights of 1, 2, 3 turns.
CONTEXT_SHARE = 0.4
CONTEXT_TURNS = ((1, 2, 3), (5, 3, 2))


def add_context(rows: list[dict[str, Any]], seed: int = SEED, label: str = "") -> list[dict[str, Any]]:
    """Give some rows a few earlier turns, so the model learns to answer the newest line with a history above it.

    The turns are other rows of the same NPC in the same split whose exchange needs no context (greeting,
    small talk, lore, out-of-world questions; no state, no history, no action but a neutral one), with a
    greeting first if one is drawn. They carry the target row's state, as a game sends the same state on
    consecutive turns. Rows that open or close a conversation (greeting, farewell) get none.
    """
    by_npc: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_npc.setdefault(row["npc"]["id"], []).append(row)
    out = []
    for row in rows:
        npc_id = row["npc"]["id"]
        rng = random.Random(f"{seed}:context:{label}:{row['id']}")
        pool = [c for c in by_npc[npc_id] if c["id"] != row["id"] and c["input"] != row["input"]
                and not c["history"] and "state" not in c and set(c["tags"]) <= CONTEXT_TAGS
                and c["reply"]["action"] in ("none", "share_lore")]
        wants = rng.random() < CONTEXT_SHARE
        if row["history"] or {"greeting", "farewell"} & set(row["tags"]) or not pool or not wants:
            out.append(row)
            continue
        k = min(len(pool), rng.choices(*CONTEXT_TURNS)[0])
        picked = sorted(rng.sample(pool, k), key=lambda c: "greeting" not in c["tags"])
        turns = []
        for c in picked:
            turn: dict[str, Any] = {"player": c["input"]}
            if "state" in row:
                turn["state"] = row["state"]
            turn["reply"] = c["reply"]
            turns.append(turn)
        out.append({**row, "history": turns})
    return out


def to_jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def stats_markdown(train: list[dict[str, Any]], heldout: list[dict[str, Any]]) -> str:
    """The count tables README.md shows (persona, tag, action, emotion)."""
    rows = train + heldout
    per_split = {"train": Counter(r["npc"]["id"] for r in train), "held-out": Counter(r["npc"]["id"] for r in heldout)}
    lines = [f"{len(rows)} rows: {len(train)} train, {len(heldout)} held-out; "
             f"{sum(1 for r in rows if 'state' in r)} with game state, "
             f"{sum(1 for r in rows if r['history'])} with history "
             f"({', '.join(f'{n} turns: {c}' for n, c in sorted(Counter(len(r['history']) for r in rows).items()))}).",
             "",
             "| persona | name | actions | emotions | train | held-out |", "| --- | --- | --- | --- | ---: | ---: |"]
    npcs = {r["npc"]["id"]: r["npc"] for r in rows}
    for npc_id, npc in npcs.items():
        lines.append(f"| `{npc_id}` | {npc['name']} | {', '.join(npc['actions'])} | {', '.join(npc['emotions'])} "
                     f"| {per_split['train'][npc_id]} | {per_split['held-out'][npc_id]} |")
    for title, counter in (("tag", Counter(t for r in rows for t in r["tags"])),
                           ("action", Counter(r["reply"]["action"] for r in rows)),
                           ("emotion", Counter(r["reply"]["emotion"] for r in rows))):
        lines += ["", f"| {title} | rows |", "| --- | ---: |"]
        lines += [f"| `{k}` | {n} |" for k, n in counter.most_common()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSONL files differ from a fresh build")
    parser.add_argument("--stats", action="store_true", help="print the README count tables")
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)

    personas = load_personas()
    all_rows = [row for p in personas for row in expand(p)]
    problems = check(all_rows)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    train, heldout = split(personas)
    train, heldout = add_context(train, label="train"), add_context(heldout, label="heldout")
    outputs = {args.out_dir / TRAIN_FILE: to_jsonl(train), args.out_dir / HELDOUT_FILE: to_jsonl(heldout)}
    if args.stats:
        print(stats_markdown(train, heldout), end="")
        return 0
    if args.check:
        stale = [str(p) for p, text in outputs.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
        if stale:
            print(f"stale: {', '.join(stale)}; run {Path(__file__).name}", file=sys.stderr)
            return 1
        print(f"up to date: {len(train)} train, {len(heldout)} held-out rows")
        return 0
    for path, text in outputs.items():
        path.write_text(text, encoding="utf-8")
    print(f"wrote {len(train)} train rows to {TRAIN_FILE} and {len(heldout)} held-out rows to {HELDOUT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
