"""The reward function of ``zyke-train rl``: five terms, each a plain function of one completion.

Every term is computed on the completion's first line, the reply JSON the daemon would keep (it stops
at the end of the line); in action mode (``rl --decide action``) the completion is only the action and the
row's ``reply_prefix`` (its line and emotion) is put in front of it first. GRPO (TRL) sums the terms with
``RewardWeights`` and compares each completion with the other completions of the same prompt, so only
differences between completions matter.

- ``validity``: +1 when the line is one JSON object with exactly ``say``, ``emotion`` and ``action``,
  ``say`` a string of at most ``MAX_SAY_CHARS``, the emotion among the NPC's and the action among the turn's
  allowed ones (the reply schema the daemon decodes under); else -1. Always applies; in action mode every
  sample is an allowed label (``rl.label_rollout``), so it is +1 throughout and moves nothing.
- ``action``: +1 when the reply's action is the labelled one, -1 otherwise (an invalid reply is wrong).
  Applies when the row has a label: a training-split row's own action, or a feedback label.
- ``feedback``: the recorded reward when the reply takes the recorded reply's action, 0 otherwise.
  Applies to reward rows (recorded experience with feedback).
- ``repetition``: -1 when ``say`` shares a word 4-gram with an earlier reply of the history, else 0.
- ``length``: 0 when ``say`` (the raw line, if invalid) has ``min_chars``..``max_chars`` characters;
  outside, minus the relative distance to the band, at most -1. Always applies.

A term that does not apply returns None: TRL leaves it out of that row's sum.

Why these and not more:

- **Validity** is what the game relies on; the daemon decodes under the schema, but a policy that leaves
  the schema on its own spends the grammar's corrections on every line, and its choices get worse.
- **Action** is the decision the game acts on. The label comes from the *training* split (or from a game's
  feedback label), never from held-out answers: the held-out set measures the result.
- **Feedback** credits a recorded rating to a new reply only when it made the same decision (the action):
  a rating says "attack was wrong here", not that every word of the line was.
- **Repetition** is the failure players notice first (the same line again); 4 words is the shortest run
  that is a repeated phrase rather than a common "I can't do that".
- **Length** is a sanity band (default 2..300 characters of ``say``: not empty, not past the daemon's cap),
  continuous outside it so a policy drifting towards walls of text is pulled back before it hits the cap.

The KL anchor to the starting adapter is not a reward term: it is GRPO's ``beta`` (see ``rl.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from zyke.prompt_format import ITEM_SEPARATOR, MAX_SAY_CHARS

from .converse import ngrams

#: Word n-gram length of the repetition term.
REPEAT_NGRAM = 4
REPLY_KEYS = ("say", "emotion", "action")


@dataclass(frozen=True)
class RewardWeights:
    """How much each term counts in the sum GRPO ranks completions by (see the module docstring)."""

    validity: float = 1.0
    action: float = 1.0
    feedback: float = 1.0
    repetition: float = 0.5
    length: float = 0.25

    def as_list(self) -> list[float]:
        return [getattr(self, name) for name in TERMS]


@dataclass(frozen=True)
class Row:
    """What the terms need to know about a prompt (one row of an ``rl`` dataset)."""

    emotions: Sequence[str]
    actions: Sequence[str]
    history_says: Sequence[str] = ()
    label_action: str | None = None
    recorded_action: str | None = None
    recorded_reward: float | None = None


def first_line(completion: str) -> str:
    """The reply line: what the daemon keeps (it stops at the end of the line)."""
    return completion.split("\n", 1)[0].strip()


def parse_reply(completion: str, emotions: Sequence[str], actions: Sequence[str]) -> dict[str, str] | None:
    """The reply as a dict when the first line is a valid reply for this NPC and turn, else None."""
    try:
        reply = json.loads(first_line(completion))
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(reply, dict) or set(reply) != set(REPLY_KEYS):
        return None
    say, emotion, action = (reply[k] for k in REPLY_KEYS)
    if not (isinstance(say, str) and len(say) <= MAX_SAY_CHARS):
        return None
    if emotion not in emotions or action not in actions:
        return None
    return reply


def validity(completion: str, row: Row) -> float:
    return 1.0 if parse_reply(completion, row.emotions, row.actions) is not None else -1.0


def action(completion: str, row: Row) -> float | None:
    if row.label_action is None:
        return None
    reply = parse_reply(completion, row.emotions, row.actions)
    return 1.0 if reply is not None and reply["action"] == row.label_action else -1.0


def feedback(completion: str, row: Row) -> float | None:
    if row.recorded_reward is None or row.recorded_action is None:
        return None
    reply = parse_reply(completion, row.emotions, row.actions)
    return float(row.recorded_reward) if reply is not None and reply["action"] == row.recorded_action else 0.0


def repetition(completion: str, row: Row) -> float:
    reply = parse_reply(completion, row.emotions, row.actions)
    if reply is None:
        return 0.0
    mine = set(ngrams(reply["say"], REPEAT_NGRAM))
    earlier = {g for say in row.history_says for g in ngrams(say, REPEAT_NGRAM)}
    return -1.0 if mine & earlier else 0.0


def length(completion: str, row: Row, min_chars: int = 2, max_chars: int = MAX_SAY_CHARS) -> float:
    reply = parse_reply(completion, row.emotions, row.actions)
    n = len(reply["say"]) if reply is not None else len(first_line(completion))
    if n < min_chars:
        return -min(1.0, (min_chars - n) / max(1, min_chars))
    if n > max_chars:
        return -min(1.0, (n - max_chars) / max(1, max_chars))
    return 0.0


#: The terms in the order GRPO gets them (and logs them as ``rewards/<name>/mean``).
TERMS: dict[str, Callable[..., float | None]] = {"validity": validity, "action": action, "feedback": feedback,
                                                   "repetition": repetition, "length": length}


def row_from_columns(columns: dict[str, Any], i: int) -> Row:
    """The ``Row`` of completion ``i`` from the dataset columns GRPO passes to reward functions."""
    reward = columns["recorded_reward"][i]
    return Row(emotions=columns["emotions"][i], actions=columns["actions"][i],
               history_says=columns["history_says"][i], label_action=columns["label_action"][i],
               recorded_action=columns["recorded_action"][i],
               recorded_reward=None if reward is None else float(reward))


def grpo_reward_funcs(min_chars: int = 2, max_chars: int = MAX_SAY_CHARS) -> list[Callable[..., list[float | None]]]:
    """The terms as TRL reward functions (``f(prompts, completions, **columns) -> list``), named after the
    terms so TRL logs each one; ``None`` marks a term that does not apply to a row (TRL skips it)."""
    funcs = []
    for name, term in TERMS.items():
        def func(prompts: list[str], completions: list[str], _term: Callable[..., float | None] = term,
                 _name: str = name, **columns: Any) -> list[float | None]:
            extra = {"min_chars": min_chars, "max_chars": max_chars} if _name == "length" else {}
            prefixes = columns.get("reply_prefix") or [""] * len(completions)  # action mode: line given
            return [_term(prefixes[i] + c, row_from_columns(columns, i), **extra) for i, c in enumerate(completions)]

        func.__name__ = name
        funcs.append(func)
    return funcs


def score(completion: str, row: Row, weights: RewardWeights = RewardWeights()) -> dict[str, float | None]:
    """Every term and the weighted ``total`` (terms that do not apply count 0): for reports and tests."""
    terms = {name: term(completion, row) for name, term in TERMS.items()}
    terms["total"] = sum(getattr(weights, name) * (value or 0.0) for name, value in terms.items())
    return terms


def describe(weights: RewardWeights) -> str:
    return ITEM_SEPARATOR.join(f"{k}={v:g}" for k, v in asdict(weights).items())
