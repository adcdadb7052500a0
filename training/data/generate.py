"""The NPC data engine: thousands of varied rows from persona cards, situations and label vocabularies.

    .venv/bin/python training/data/generate.py                 # writes npc_generated_{train,heldout}.jsonl
    .venv/bin/python training/data/generate.py --check         # fail if the committed files are stale
    .venv/bin/python training/data/generate.py --stats         # counts by situation, action role, split

Why: 428 hand-written rows over 37 actions cannot teach a 270M model to *read* an action list; it learns
which names follow which words. The engine writes each row against abstract roles (engine/vocab.py) and
names them per NPC as one particular game would, so the model must read the prompt to pick the label:

- actions are renamed to synonyms and, for some NPCs, to opaque names (``act_kesh``) that only a
  description explains; descriptions are attached to about half of the labels; the order is shuffled;
- every NPC declares actions it does not use in a given row (distractors), and asking an NPC for a
  service it does not declare gets a plain line with ``none``, not an action it lacks;
- the game state decides the action: too little gold, the shop closed at night, a quest already done;
- some turns narrow the actions (``allowed_actions``): a request outside them is declined in words;
- some rows have earlier turns the answer depends on (a price asked, then "deal"; an insult, then an
  apology), others have unrelated earlier turns above them.

The held-out split uses persona cards, NPC names and action names that training never sees
(``check_split`` enforces it). Everything is a pure function of ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine import lines as L  # noqa: E402
from engine.cards import HELDOUT_CARDS, NAMES_HELDOUT, NAMES_TRAIN, TEMPERS, TRAIN_CARDS, Card  # noqa: E402
from engine.vocab import ACTION_ROLES, EMOTION_FALLBACK, EMOTION_ROLES, HELDOUT_ACTION_NAMES  # noqa: E402
from make_dataset import to_jsonl  # noqa: E402  (the hand-written rows' writer: one JSONL format for both)

SEED = 20261130
TRAIN_FILE = "npc_generated_train.jsonl"
HELDOUT_FILE = "npc_generated_heldout.jsonl"
#: NPC instances per training card, and held-out instances in all.
TRAIN_NPCS_PER_CARD = 14
HELDOUT_NPCS = 8
HELDOUT_ROWS_PER_NPC = 12
#: Roles any NPC may declare without its trade implying them (the distractors).
DISTRACTOR_ROLES = ("give_item", "share_rumor", "follow", "call_guards", "flee", "give_quest")
OPAQUE_SYLLABLES = ("ka", "vo", "ren", "tul", "mi", "zar", "esh", "qo", "lin", "dra", "po", "yth")


@dataclass
class Npc:
    """One NPC instance: a card with a name, its declared labels (role -> name) and its descriptions."""

    id: str
    name: str
    card: Card
    temper: str
    place: str
    price: int
    actions: dict[str, str]  # role -> label
    emotions: dict[str, str]  # mood -> label
    spec: dict[str, Any] = field(default_factory=dict)

    def act(self, role: str) -> str:
        return self.actions[role]

    def feel(self, mood: str) -> str:
        for m in EMOTION_FALLBACK[mood]:
            if m in self.emotions:
                return self.emotions[m]
        return next(iter(self.emotions.values()))


def make_npc(rng: random.Random, card: Card, idx: int, heldout: bool) -> Npc:
    """Declare the NPC as a game would: names for its roles, a few distractors, some descriptions, shuffled."""
    roles = ["none", *card.roles]
    if rng.random() < 0.85:
        roles.append("refuse")
    extra = [r for r in DISTRACTOR_ROLES if r not in roles]
    roles += rng.sample(extra, rng.choice((0, 1, 1, 2, 3)))
    if card.temperament in ("gruff", "stern") and "attack" not in roles and rng.random() < 0.4:
        roles.append("attack")
    used: set[str] = set()
    actions: dict[str, str] = {}
    described: dict[str, str] = {}
    for role_key in roles:
        role = ACTION_ROLES[role_key]
        pool = role.heldout if heldout else role.train
        opaque = not heldout and role_key != "none" and rng.random() < 0.12
        name = "_".join(rng.sample(OPAQUE_SYLLABLES, 2)) if opaque else rng.choice(pool)
        while name in used:
            name = rng.choice(pool) if name != pool[-1] else f"{name}_now"
        used.add(name)
        actions[role_key] = name
        if opaque or rng.random() < 0.5:
            described[name] = rng.choice(role.descriptions if heldout else role.descriptions + role.train_descriptions)
    moods = ["neutral", *rng.sample([m for m in EMOTION_ROLES if m != "neutral"], rng.randint(2, 5))]
    emotions: dict[str, str] = {}
    for mood in moods:
        name = rng.choice(EMOTION_ROLES[mood].names)
        if name not in emotions.values():
            emotions[mood] = name
    names = NAMES_HELDOUT if heldout else NAMES_TRAIN
    name = names[idx % len(names)]
    temper = rng.choice(TEMPERS[card.temperament])
    place = rng.choice(card.place)
    price = rng.randint(*card.price)
    persona = rng.choice(card.persona).format(name=name, place=place, price=price, temper=temper)
    persona = persona[0].upper() + persona[1:]
    order = list(actions.values())
    if rng.random() < 0.6:
        rng.shuffle(order)
    spec_actions: list[Any] = [{"name": a, "description": described[a]} if a in described else a for a in order]
    spec = {"id": f"{card.key}-{idx}", "name": name, "persona": persona, "actions": spec_actions,
            "emotions": list(emotions.values())}
    return Npc(spec["id"], name, card, card.temperament, place, price, actions, emotions, spec)


# --- situations: each returns (input, reply, state-extra, history, allowed, tags) or None if it does not apply


Row = dict[str, Any]


def _reply(npc: Npc, say: str, mood: str, role: str) -> dict[str, str]:
    return {"say": say, "emotion": npc.feel(mood), "action": npc.act(role)}


def _fill(text: str, npc: Npc, **extra: Any) -> str:
    return text.format(name=npc.name, title=npc.card.title, place=npc.place, price=npc.price, **extra)


def _price_known(npc: Npc) -> bool:
    """Whether the persona states the NPC's price. When it does not, only an empty purse (gold 0) may decide a
    refusal: "12 gold is too little" against a price the prompt never shows is a label no model can learn, and
    the first shipped adapters learnt from it to refuse at random (the quickstart's smith, asked to repair with
    12 gold, refused for want of 15)."""
    return str(npc.price) in npc.spec["persona"]


def _mood(npc: Npc, table: dict[str, str]) -> str:
    return table.get(npc.temper, table.get("*", "neutral"))


def sit_request(rng: random.Random, npc: Npc) -> Row | None:
    """The player asks for one of the NPC's services: granted, or refused by state or by allowed_actions."""
    services = [r for r in npc.actions if r in L.REQUEST]
    if not services:
        return None
    role = rng.choice(services)
    item = rng.choice(npc.card.goods)
    player = _fill(rng.choice(L.REQUEST[role]), npc, item=item)
    paid = role == npc.card.service or (role == "trade" and npc.card.service is not None)
    state: dict[str, Any] = {}
    allowed: list[str] | None = None
    fallback = "refuse" if "refuse" in npc.actions else "none"
    roll = rng.random()
    if paid and roll < 0.3:
        gold = rng.randint(0, max(0, npc.price - 1))
        state["gold"] = gold if _price_known(npc) else 0
        say = _fill(rng.choice(L.NO_MONEY), npc, gold=gold)
        return {"input": player, "reply": _reply(npc, say, "annoyed", fallback), "state": state,
                "tags": ["request", "no_money"]}
    if roll < 0.45:
        others = [a for r, a in npc.actions.items() if r != role]
        allowed = sorted([*rng.sample(others, min(len(others), rng.randint(1, 3))), npc.act("none")])
        allowed = list(dict.fromkeys(allowed))
        if npc.act(fallback) not in allowed:
            fallback = "none"
        say = rng.choice(L.NOT_NOW)
        return {"input": player, "reply": _reply(npc, say, "neutral", fallback), "allowed": allowed,
                "tags": ["request", "not_allowed"]}
    if paid and roll < 0.52 and role in ("trade", "repair", "serve_drink", "heal"):
        state["time"] = "midnight"
        return {"input": player, "reply": _reply(npc, rng.choice(L.CLOSED), "annoyed", fallback), "state": state,
                "tags": ["request", "closed"]}
    if paid:
        state["gold"] = rng.randint(npc.price, npc.price * 3 + 5)
    if roll < 0.62:
        allowed = list(dict.fromkeys(sorted([npc.act(role), npc.act("none"),
                                             *rng.sample(list(npc.actions.values()), 1)])))
    if rng.random() < 0.4:
        state["time"] = rng.choice(("morning", "afternoon", "evening"))
    say = _fill(rng.choice(L.GRANT[role]), npc, item=item)
    return {"input": player, "reply": _reply(npc, say, _mood(npc, {"friendly": "happy", "sly": "happy"}), role),
            "state": state, "allowed": allowed, "tags": ["request", "granted"]}


def sit_not_mine(rng: random.Random, npc: Npc) -> Row | None:
    """The player asks for a service this NPC does not declare: words, and no action."""
    missing = [r for r in L.ROLE_TITLES if r not in npc.actions and L.ROLE_TITLES[r] != npc.card.title]
    if not missing:
        return None
    role = rng.choice(missing)
    player = _fill(rng.choice(L.REQUEST[role]), npc, item=rng.choice(("sword", "boots", "cloak", "ring")))
    say = _fill(rng.choice(L.NOT_MINE), npc, other=L.ROLE_TITLES[role])
    return {"input": player, "reply": _reply(npc, say, _mood(npc, {"sly": "amused", "gruff": "annoyed"}), "none"),
            "tags": ["not_mine"]}


def sit_price_then_accept(rng: random.Random, npc: Npc) -> Row | None:
    """A price asked in an earlier turn, then "deal": the gold in the state decides trade or refuse."""
    if "trade" not in npc.actions:
        return None
    item = rng.choice(npc.card.goods)
    ask = _fill(rng.choice(L.PRICE_ASK), npc, item=item)
    quote = _fill(rng.choice(L.PRICE_SAY), npc, item=item)
    rich = rng.random() < 0.6
    gold = rng.randint(npc.price, npc.price * 2 + 3) if rich else rng.randint(0, max(0, npc.price - 1))
    history = [{"player": ask, "state": {"gold": gold}, "reply": _reply(npc, quote, "neutral", "none")}]
    if rich:
        say = _fill(rng.choice(L.GRANT["trade"]), npc, item=item)
        reply = _reply(npc, say, "happy", "trade")
    else:
        reply = _reply(npc, _fill(rng.choice(L.NO_MONEY), npc, gold=gold), "annoyed",
                       "refuse" if "refuse" in npc.actions else "none")
    return {"input": rng.choice(L.BARGAIN_ACCEPT), "reply": reply, "state": {"gold": gold}, "history": history,
            "tags": ["multi_turn", "trade"]}


def sit_price(rng: random.Random, npc: Npc) -> Row | None:
    if "trade" not in npc.actions:
        return None
    item = rng.choice(npc.card.goods)
    return {"input": _fill(rng.choice(L.PRICE_ASK), npc, item=item),
            "reply": _reply(npc, _fill(rng.choice(L.PRICE_SAY), npc, item=item), "neutral", "none"),
            "tags": ["price"]}


def sit_talk(rng: random.Random, npc: Npc) -> Row | None:
    """Greetings, small talk, lore, thanks, farewells: always action none."""
    kind = rng.choice(("greeting", "small_talk", "small_talk", "lore", "lore", "farewell", "thanks"))
    if kind == "greeting":
        player, say = rng.choice(L.GREETING), rng.choice(L.GREET_SAY[npc.temper])
        mood = _mood(npc, {"friendly": "happy", "nervous": "afraid", "sly": "amused", "stern": "suspicious"})
    elif kind in ("small_talk", "lore"):
        player, say = rng.choice(npc.card.small_talk if kind == "small_talk" else npc.card.lore)
        mood = _mood(npc, {"friendly": "happy"})
    elif kind == "farewell":
        player, say = rng.choice(L.FAREWELL), rng.choice(L.FAREWELL_SAY)
        mood = _mood(npc, {"friendly": "happy"})
    else:
        player, say, mood = rng.choice(L.THANKS), rng.choice(L.THANKS_SAY), "happy"
    return {"input": player, "reply": _reply(npc, say, mood, "none"), "tags": [kind]}


def sit_hostile(rng: random.Random, npc: Npc) -> Row | None:
    """Insults get words; threats get the NPC's strongest answer it declares; apologies calm it down."""
    kind = rng.choice(("insult", "threat", "threat", "apology", "freebie"))
    if kind == "insult":
        mood = _mood(npc, {"gruff": "angry", "stern": "angry", "friendly": "annoyed", "nervous": "afraid",
                           "sly": "amused"})
        return {"input": rng.choice(L.INSULT), "reply": _reply(npc, rng.choice(L.INSULT_SAY), mood, "none"),
                "tags": ["insult"]}
    if kind == "apology":
        history = [{"player": rng.choice(L.INSULT), "reply": _reply(npc, rng.choice(L.INSULT_SAY), "angry", "none")}]
        return {"input": rng.choice(L.APOLOGY), "reply": _reply(npc, rng.choice(L.APOLOGY_SAY), "neutral", "none"),
                "history": history, "tags": ["multi_turn", "apology"]}
    if kind == "freebie":
        item = rng.choice(npc.card.goods)
        return {"input": _fill(rng.choice(L.FREEBIE), npc, item=item),
                "reply": _reply(npc, rng.choice(L.FREEBIE_SAY), "annoyed",
                                "refuse" if "refuse" in npc.actions else "none"), "tags": ["freebie"]}
    order = ("flee", "call_guards", "attack") if npc.temper == "nervous" else ("attack", "call_guards", "flee")
    role = next((r for r in (*order, "refuse") if r in npc.actions), "none")
    mood = "afraid" if role in ("flee", "call_guards") else "angry"
    say = rng.choice(L.THREAT_SAY[role])
    return {"input": rng.choice(L.THREAT), "reply": _reply(npc, say, mood, role), "state": {"player_armed": True},
            "tags": ["threat"]}


def sit_out_of_world(rng: random.Random, npc: Npc) -> Row | None:
    mood = _mood(npc, {"stern": "suspicious", "gruff": "annoyed", "nervous": "afraid", "sly": "amused",
                       "friendly": "amused"})
    return {"input": rng.choice(L.OUT_OF_WORLD), "reply": _reply(npc, rng.choice(L.OUT_OF_WORLD_SAY), mood, "none"),
            "tags": ["out_of_world"]}


def sit_quest_done(rng: random.Random, npc: Npc) -> Row | None:
    if "give_quest" not in npc.actions:
        return None
    item = rng.choice(npc.card.goods)
    if "give_item" in npc.actions:
        reply = _reply(npc, _fill(rng.choice(L.QUEST_DONE_SAY), npc, item=item), "happy", "give_item")
    else:
        reply = _reply(npc, rng.choice(L.QUEST_DONE_SAY_NONE), "happy", "none")
    return {"input": rng.choice(L.QUEST_DONE), "reply": reply, "state": {"quest": "done"}, "tags": ["quest_done"]}


def sit_after_price(rng: random.Random, npc: Npc) -> Row | None:
    """A price named in an earlier turn, then asked again or called too dear: the NPC keeps to its own number.

    Why: the quickstart's smith named one price, then another, then a third (the model took numbers from
    the state and from templates). These rows put the price in the history only, so the one place to
    read it from is the NPC's own earlier line; the answer repeats it or defends it, action none.
    """
    service = npc.card.service if npc.card.service in npc.actions else "trade" if "trade" in npc.actions else None
    priced = [t for t in L.GRANT.get(service or "", ()) if "{price}" in t]
    if service is None or not priced:
        return None
    item = rng.choice(npc.card.goods)
    gold = rng.randint(npc.price, npc.price * 3 + 5)
    history = [{"player": _fill(rng.choice(L.REQUEST[service]), npc, item=item), "state": {"gold": gold},
                "reply": _reply(npc, _fill(rng.choice(priced), npc, item=item), "neutral", service)}]
    again = rng.random() < 0.5
    if not again and rng.random() < 0.5:  # the quickstart's order: asked again, then called too dear
        history.append({"player": rng.choice(L.PRICE_AGAIN), "state": {"gold": gold},
                        "reply": _reply(npc, _fill(rng.choice(L.PRICE_AGAIN_SAY), npc), "neutral", "none")})
    if again:
        return {"input": rng.choice(L.PRICE_AGAIN), "reply": _reply(npc, _fill(rng.choice(L.PRICE_AGAIN_SAY), npc),
                                                                    "neutral", "none"),
                "state": {"gold": gold}, "history": history, "tags": ["multi_turn", "price_again"]}
    mood = _mood(npc, {"gruff": "angry", "stern": "annoyed", "friendly": "sad", "nervous": "afraid", "sly": "amused"})
    return {"input": _fill(rng.choice(L.COMPLAIN), npc), "reply": _reply(npc, rng.choice(L.DEFEND_SAY[npc.temper]),
                                                                       mood, "none"),
            "state": {"gold": gold}, "history": history, "tags": ["multi_turn", "complain"]}


#: Situations added after the held-out split was fixed: they draw from their own random stream and only for
#: training NPCs, so the held-out rows (and every evaluation report against them) stay comparable.
EXTRA_SITUATIONS: tuple[tuple[Callable[[random.Random, Npc], Row | None], float], ...] = ((sit_after_price, 1),)
EXTRA_ROWS_PER_NPC = (3, 5)


SITUATIONS: tuple[tuple[Callable[[random.Random, Npc], Row | None], float], ...] = (
    # not_mine is kept rare: at 2 it was 11% of the rows, and its few templates became the model's answer to
    # anything (measured on held-out: "I'm a healer, not a barkeep" to a potion order).
    (sit_request, 9), (sit_not_mine, 0.6), (sit_price_then_accept, 2), (sit_price, 1), (sit_talk, 6),
    (sit_hostile, 3), (sit_out_of_world, 1), (sit_quest_done, 1),
)


def npc_rows(rng: random.Random, npc: Npc, count: int,
             situations: tuple[tuple[Callable[[random.Random, Npc], Row | None], float], ...] = SITUATIONS,
             id_prefix: str = "") -> list[Row]:
    """``count`` rows for one NPC, no player line twice, some with unrelated earlier turns above them."""
    funcs = [f for f, _ in situations]
    weights = [w for _, w in situations]
    rows: list[Row] = []
    seen: set[str] = set()
    talk: list[Row] = []
    attempts = 0
    while len(rows) < count and attempts < count * 30:
        attempts += 1
        made = rng.choices(funcs, weights)[0](rng, npc)
        if made is None or made["input"] in seen:
            continue
        seen.add(made["input"])
        rows.append(made)
        if made["tags"][0] in ("small_talk", "lore", "greeting") and not made.get("state"):
            talk.append(made)
    out = []
    for i, made in enumerate(rows, start=1):
        state = {"location": npc.place, **made.get("state", {})}
        history = list(made.get("history", []))
        context = [t for t in talk if t is not made and t["input"] != made["input"]
                   and t["reply"]["say"] != made["reply"]["say"]]
        if not history and context and rng.random() < 0.35 and made["tags"][0] not in ("greeting",):
            picked = rng.sample(context, min(len(context), rng.randint(1, 2)))
            for t in sorted(picked, key=lambda t: "greeting" not in t["tags"]):
                history.append({"player": t["input"], "reply": t["reply"]})
        for turn in history:
            turn["state"] = {"location": npc.place, **turn.get("state", {})}
        row: Row = {"id": f"gen-{npc.id}-{id_prefix}{i:03d}", "npc": npc.spec, "history": history, "state": state,
                    "input": made["input"], "reply": made["reply"]}
        if made.get("allowed"):
            row["allowed_actions"] = made["allowed"]
        row["tags"] = list(dict.fromkeys(made["tags"]))
        out.append(row)
    return out


def generate(seed: int = SEED) -> tuple[list[Row], list[Row]]:
    """The two splits; held-out NPCs come from held-out cards, names and action names only."""
    train: list[Row] = []
    for card in TRAIN_CARDS:
        for k in range(TRAIN_NPCS_PER_CARD):
            rng = random.Random(f"{seed}:train:{card.key}:{k}")
            npc = make_npc(rng, card, k, heldout=False)
            train += npc_rows(rng, npc, rng.randint(16, 24))
            extra = random.Random(f"{seed}:train-extra:{card.key}:{k}")
            train += npc_rows(extra, npc, extra.randint(*EXTRA_ROWS_PER_NPC), EXTRA_SITUATIONS, "x")
    heldout: list[Row] = []
    for k in range(HELDOUT_NPCS):
        card = HELDOUT_CARDS[k % len(HELDOUT_CARDS)]
        rng = random.Random(f"{seed}:heldout:{card.key}:{k}")
        npc = make_npc(rng, card, k, heldout=True)
        heldout += npc_rows(rng, npc, HELDOUT_ROWS_PER_NPC)
    return train, heldout


def _action_names(rows: list[Row]) -> set[str]:
    return {a if isinstance(a, str) else a["name"] for r in rows for a in r["npc"]["actions"]}


def check_split(train: list[Row], heldout: list[Row]) -> list[str]:
    """Held-out must be unseen: no persona, NPC name or held-out action name of it appears in training."""
    problems = []
    leaked = _action_names(train) & HELDOUT_ACTION_NAMES
    if leaked:
        problems.append(f"held-out action names in training: {sorted(leaked)}")
    if {r["npc"]["persona"] for r in train} & {r["npc"]["persona"] for r in heldout}:
        problems.append("a held-out persona appears in training")
    if {r["npc"]["name"] for r in train} & {r["npc"]["name"] for r in heldout}:
        problems.append("a held-out NPC name appears in training")
    unseen = (_action_names(heldout) - {"none"}) - _action_names(train)
    if not unseen:
        problems.append("held-out split has no action name unseen in training")
    return problems


def stats(train: list[Row], heldout: list[Row]) -> dict[str, Any]:
    def count(rows: list[Row]) -> dict[str, Any]:
        return {"rows": len(rows), "npcs": len({r["npc"]["id"] for r in rows}),
                "with_history": sum(1 for r in rows if r["history"]),
                "with_allowed_actions": sum(1 for r in rows if "allowed_actions" in r),
                "action_none": sum(1 for r in rows if r["reply"]["action"] == "none"),
                "situations": dict(Counter(t for r in rows for t in r["tags"]).most_common()),
                "distinct_action_names": len(_action_names(rows))}
    return {"seed": SEED, "train": count(train), "heldout": count(heldout)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--check", action="store_true", help="fail if the files on disk differ from a fresh run")
    parser.add_argument("--stats", action="store_true", help="print counts as JSON")
    args = parser.parse_args(argv)
    train, heldout = generate(args.seed)
    problems = check_split(train, heldout)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    files = {args.out_dir / TRAIN_FILE: to_jsonl(train), args.out_dir / HELDOUT_FILE: to_jsonl(heldout)}
    if args.stats:
        print(json.dumps(stats(train, heldout), indent=2))
        return 0
    if args.check:
        stale = [str(p) for p, text in files.items() if not p.exists() or p.read_text(encoding="utf-8") != text]
        if stale:
            print(f"stale: {', '.join(stale)}; run training/data/generate.py", file=sys.stderr)
            return 1
        return 0
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({text.count(chr(10))} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
