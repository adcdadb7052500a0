"""What an NPC can do and feel, as abstract roles with the many names games give them.

The data engine writes every row against *roles* (``trade``, ``refuse``, ``happy``...) and only at the
end names them the way one particular game would. Each role has training names, held-out names that
training never sees, and a description a game might write. Renaming is what forces the model to read
the action list in the prompt instead of memorising that "trade" follows "buy".
"""

# ruff: noqa: E501  (vocabulary tables read better one role a line)

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Role:
    """An abstract action: names used in training, names kept for held-out, descriptions a game might write."""

    key: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]
    descriptions: tuple[str, ...]


ACTION_ROLES: dict[str, Role] = {r.key: r for r in (
    Role("none", ("none", "none", "none", "talk", "idle", "chat"), ("none", "converse"),
         ("just talk, do nothing else", "only speak", "no action, keep talking")),
    Role("trade", ("trade", "sell", "barter", "open_shop", "sell_goods"), ("vend", "peddle", "make_sale"),
         ("sell goods to the player or buy from them", "open the shop and do business", "hand over goods for the player's coin")),
    Role("repair", ("repair", "fix_item", "mend", "fix_gear"), ("restore_gear", "patch_up"),
         ("fix the player's weapon, armour or gear", "mend something the player brought", "repair a broken item")),
    Role("heal", ("heal", "cure", "tend_wounds"), ("apply_remedy", "treat_injury"),
         ("treat the player's wounds or sickness", "heal the player", "patch up the player's injuries")),
    Role("give_quest", ("give_quest", "offer_quest", "assign_task", "start_quest"), ("post_bounty", "request_aid"),
         ("give the player a task or job to do", "ask the player to do something for a reward", "start a quest")),
    Role("refuse", ("refuse", "decline", "deny", "say_no"), ("turn_down", "reject_request"),
         ("say no to what the player asks", "turn the player's request down", "refuse to help or to sell")),
    Role("attack", ("attack", "fight", "draw_weapon", "start_combat"), ("strike", "assault"),
         ("start a fight with the player", "attack the player", "draw steel and fight")),
    Role("flee", ("flee", "run_away", "retreat"), ("bolt", "escape"),
         ("run away from danger", "run off in fear", "get away from the player")),
    Role("call_guards", ("call_guards", "alert_guards", "raise_alarm"), ("summon_watch", "sound_horn"),
         ("shout for the town guard", "call for help from the guards", "raise the alarm")),
    Role("give_item", ("give_item", "hand_over", "gift_item"), ("bestow", "present_item"),
         ("give the player an item for free", "hand the player a reward or gift", "give something to the player")),
    Role("follow", ("follow", "join_party", "accompany"), ("tag_along", "escort_player"),
         ("join the player and travel with them", "come along with the player", "follow the player")),
    Role("let_pass", ("open_gate", "let_pass", "allow_entry"), ("lift_barrier", "wave_through"),
         ("open the way and let the player through", "let the player pass the gate", "allow the player to enter")),
    Role("rent_room", ("rent_room", "offer_bed"), ("lodge_guest", "give_lodging"),
         ("rent the player a bed for the night", "give the player a room", "let the player stay the night")),
    Role("serve_drink", ("serve_drink", "pour_ale", "serve"), ("fill_tankard", "pour_drink"),
         ("pour the player a drink", "serve food or drink", "bring the player something to drink")),
    Role("share_rumor", ("give_rumor", "share_rumor", "tell_secret"), ("spill_gossip", "whisper_news"),
         ("tell the player a rumour or secret", "share gossip or news", "pass on a secret")),
    Role("teach", ("teach_skill", "train_player", "teach"), ("instruct", "tutor"),
         ("teach the player a skill or spell", "train the player", "give the player a lesson")),
    Role("travel", ("give_ride", "sail", "transport"), ("ferry_player", "carry_over"),
         ("take the player to another place", "carry the player across by boat or cart", "start the journey with the player")),
)}

#: Held-out names must never appear in training (checked by ``generate.check_split``).
HELDOUT_ACTION_NAMES = {n for r in ACTION_ROLES.values() for n in r.heldout} - {"none"}


@dataclass(frozen=True)
class Mood:
    """An abstract emotion and the labels games use for it."""

    key: str
    names: tuple[str, ...]


EMOTION_ROLES: dict[str, Mood] = {m.key: m for m in (
    Mood("neutral", ("neutral", "neutral", "calm", "composed")),
    Mood("happy", ("pleased", "happy", "cheerful", "glad", "friendly")),
    Mood("angry", ("angry", "furious", "hostile")),
    Mood("annoyed", ("annoyed", "irritated", "grumpy", "impatient")),
    Mood("sad", ("sad", "gloomy", "sorrowful")),
    Mood("afraid", ("afraid", "scared", "nervous")),
    Mood("amused", ("amused", "playful", "wry")),
    Mood("suspicious", ("suspicious", "wary", "distrustful")),
)}

#: When an NPC does not declare the emotion a line calls for, the closest one it has.
EMOTION_FALLBACK: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral",),
    "happy": ("happy", "amused", "neutral"),
    "angry": ("angry", "annoyed", "suspicious", "neutral"),
    "annoyed": ("annoyed", "angry", "suspicious", "neutral"),
    "sad": ("sad", "afraid", "neutral"),
    "afraid": ("afraid", "sad", "suspicious", "neutral"),
    "amused": ("amused", "happy", "neutral"),
    "suspicious": ("suspicious", "annoyed", "afraid", "neutral"),
}
