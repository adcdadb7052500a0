"""The one prompt format: the text the daemon feeds the model and the text training teaches it.

Both ``zyke_daemon`` and ``zyke_train`` build model input only through this module. If the two ever
rendered a conversation differently, every adapter would be trained on one format and served on
another, and quietly get worse; keeping one module makes that drift impossible.

Layout, chosen for a base (not instruction-tuned) model and for prefix caching:

    This is a script from a role-playing game. ...      <- persona block: stable for an NPC's life
    [Game state: {"location": "forge"}]                  <- each turn: the state the game sent with it,
    Player: ...                                             the player's line and the NPC's reply
    Brom: {"say": "...", "emotion": "...", "action": "..."}
    [Game state: {"location": "forge", "gold": 3}]       <- the new turn
    Player: <input>
    Brom: <- the model continues here with the reply JSON and a newline

Each turn renders exactly as it did when it was the newest, so the prompt of turn N is the prompt of
turn N-1 plus its reply plus the new turn: a backend that keeps its evaluated tokens only evaluates
the new turn.

The reply is JSON with its keys in a fixed order, ``say`` first so a stream can show the line while
the rest is still being decoded; ``reply_schema`` gives the schema the daemon decodes under and
``render_reply`` writes a reply exactly as that decoding produces it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .protocol.models import Choice, NpcReply, NpcSpec, Turn

#: JSON separators used in rendered replies; the daemon's grammar emits the same.
ITEM_SEPARATOR = ", "
KEY_SEPARATOR = ": "
#: The longest spoken line the model may write (characters); the protocol allows 600.
MAX_SAY_CHARS = 300
#: Ends a completion in training data; the daemon stops there too.
END_OF_REPLY = "\n"


def persona_block(npc: NpcSpec) -> str:
    """The stable head of every prompt for this NPC (identical across turns, so its KV cache is reused).

    Actions get one line each, with the game's description when it gave one: a 270M model cannot know
    what ``ferry_across`` or ``give_item`` mean from the name alone, and the training data renames and
    describes actions so that the model learns to read this list rather than remember label names.
    """
    name = npc.display_name
    action_lines = "".join(f"- {_describe(a)}\n" for a in npc.actions)
    return (
        f"This is a script from a role-playing game. {name} is a character the player meets.\n"
        f"About {name}: {_one_line(npc.persona)}\n"
        f"{name} always answers the player with one JSON object: \"say\" is what {name} says aloud, "
        f"\"emotion\" is how {name} feels and \"action\" is what {name} does.\n"
        f"Emotions: {', '.join(_describe(e) for e in npc.emotions)}.\n"
        f"Actions:\n{action_lines}"
        "\n"
    )


def _describe(item: str | Choice) -> str:
    return item if isinstance(item, str) else f"{item.name} ({_one_line(item.description)})"


def render_reply(reply: NpcReply | Mapping[str, Any]) -> str:
    """A reply as the model writes it: keys in schema order, the daemon's separators, no trailing newline."""
    data = reply.model_dump(exclude_none=True) if isinstance(reply, NpcReply) else dict(reply)
    ordered = {"say": data["say"], "emotion": data["emotion"], "action": data["action"]}
    return json.dumps(ordered, ensure_ascii=False, separators=(ITEM_SEPARATOR, KEY_SEPARATOR))


def render_state(state: Mapping[str, Any] | None) -> str:
    if not state:
        return ""
    body = json.dumps(state, ensure_ascii=False, sort_keys=True, separators=(ITEM_SEPARATOR, KEY_SEPARATOR))
    return f"[Game state: {body}]\n"


def render_prompt(
    npc: NpcSpec,
    history: Sequence[Turn],
    player_input: str,
    state: Mapping[str, Any] | None = None,
    allowed_actions: Sequence[str] | None = None,
    note: str | None = None,
) -> str:
    """The full model input for one npc.say: persona, history, game state, allowed actions, the player's line.

    ``note`` is a bracketed line from the daemon itself above the new turn (the safety rails' request to
    deflect in character); it is not kept in the history, so later turns render as before."""
    name = npc.display_name
    parts = [persona_block(npc)]
    for turn in history:
        parts.append(_render_turn(name, turn.player, turn.state, turn.allowed_actions))
        parts.append(render_reply(turn.reply) + END_OF_REPLY)
    parts.append(_render_turn(name, player_input, state, allowed_actions, note))
    return "".join(parts)


def render_allowed(allowed_actions: Sequence[str] | None) -> str:
    """The line that tells the model which actions the game allows this turn (none when all are)."""
    if not allowed_actions:
        return ""
    return f"[Actions allowed now: {', '.join(allowed_actions)}]\n"


def _render_turn(
    name: str, player_input: str, state: Mapping[str, Any] | None, allowed_actions: Sequence[str] | None,
    note: str | None = None,
) -> str:
    head = f"{render_state(state)}{render_allowed(allowed_actions)}"
    if note:
        head += f"[{_one_line(note)}]\n"
    return f"{head}Player: {_one_line(player_input)}\n{name}: "


def render_example(
    npc: NpcSpec,
    history: Sequence[Turn],
    player_input: str,
    reply: NpcReply | Mapping[str, Any],
    state: Mapping[str, Any] | None = None,
    allowed_actions: Sequence[str] | None = None,
) -> tuple[str, str]:
    """A training pair ``(prompt, completion)``: loss belongs on the completion only."""
    prompt = render_prompt(npc, history, player_input, state, allowed_actions)
    return prompt, render_reply(reply) + END_OF_REPLY


def allowed_action_names(npc: NpcSpec, allowed_actions: Sequence[str] | None = None) -> list[str]:
    """The actions one turn may use: the NPC's declared ones, narrowed to ``allowed_actions`` when given,
    in declaration order (the order of the reply schema's enum and of the daemon's fallback choice)."""
    if not allowed_actions:
        return npc.action_names
    allowed = set(allowed_actions)
    return [a for a in npc.action_names if a in allowed]


def reply_schema(
    npc: NpcSpec, max_say_chars: int = MAX_SAY_CHARS, allowed_actions: Sequence[str] | None = None
) -> dict[str, Any]:
    """The NPC reply schema narrowed to this NPC's own enums: what the daemon decodes under.

    ``target`` and ``args`` are left out of decoding on purpose: a 270M model fills free-form fields
    with noise (seen: ``"target": "repair"``), and games that need them derive them from the action.
    ``render_reply`` writes the same three keys, so training teaches exactly what decoding allows.
    ``allowed_actions`` narrows the action enum for one turn (kept in the NPC's declaration order).
    """
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["say", "emotion", "action"],
        "properties": {
            "say": {"type": "string", "maxLength": max_say_chars},
            "emotion": {"enum": npc.emotion_names},
            "action": {"enum": allowed_action_names(npc, allowed_actions)},
        },
    }


def _one_line(text: str) -> str:
    """Player text, personas and descriptions are kept on one line so they cannot forge a turn of the script
    ("\\nPlayer: ...\\nBrom: {...}"); every run of whitespace, line breaks included, becomes one space."""
    return " ".join(text.split())
