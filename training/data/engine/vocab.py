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
    #: More descriptions for training only (held-out NPCs draw from ``descriptions`` alone, so adding here
    #: leaves the held-out split unchanged).
    train_descriptions: tuple[str, ...] = ()


ACTION_ROLES: dict[str, Role] = {r.key: r for r in (
    Role("none", ("none", "none", "none", "none", "none", "none", "none", "none", "none", "talk", "idle", "chat", "speak", "just_talk", "no_action", "respond", "small_talk", "nothing", "none", "none", "none", "none", "just_chat", "talk_only", "banter", "reply", "no_effect", "listen"), ("none", "converse"),
         ("just talk, do nothing else", "only speak", "no action, keep talking"),
         train_descriptions=("talk without doing anything", "reply only, no game effect", "conversation only")),
    Role("trade", ("trade", "sell", "barter", "open_shop", "sell_goods", "shop", "sell_item", "do_business", "offer_goods", "deal", "sell_wares", "buy_or_sell", "merchant_trade", "sell_stock", "hawk_wares", "trade_goods", "sell_supplies", "ring_up", "take_coin", "market", "haggle", "buy_sell", "shopkeep", "exchange_goods"), ("vend", "peddle", "make_sale"),
         ("sell goods to the player or buy from them", "open the shop and do business", "hand over goods for the player's coin"),
         train_descriptions=("buy or sell items", "the player pays and gets goods", "sell the player what they pay for")),
    Role("repair", ("repair", "fix_item", "mend", "fix_gear", "fix", "fix_weapon", "reforge", "mend_armor", "repair_item", "hammer_out", "fix_broken", "fix_armor", "repair_weapon", "smith_repair", "weld", "resharpen", "rebuild", "tinker", "fix_up", "sew_up", "service_item", "repair_armour"), ("restore_gear", "patch_up"),
         ("fix the player's weapon, armour or gear", "mend something the player brought", "repair a broken item"),
         train_descriptions=("fix broken equipment for a fee", "mend the player's armour or weapon", "make a damaged item whole again")),
    Role("heal", ("heal", "cure", "tend_wounds", "treat", "heal_player", "bandage", "give_medicine", "nurse", "cure_wounds", "mend_wounds", "heal_wounds", "give_potion", "doctor", "medicate", "stitch_wounds", "tend_player", "cure_player", "soothe", "dress_wounds"), ("apply_remedy", "treat_injury"),
         ("treat the player's wounds or sickness", "heal the player", "patch up the player's injuries"),
         train_descriptions=("cure the player's injury or illness", "tend to the player's wounds", "give the player medical care")),
    Role("give_quest", ("give_quest", "offer_quest", "assign_task", "start_quest", "quest", "offer_job", "give_task", "hire_player", "assign_quest", "give_mission", "send_on_errand", "offer_contract", "task_player", "issue_quest", "recruit_player", "give_errand", "commission", "give_assignment", "hand_task", "quest_offer"), ("post_bounty", "request_aid"),
         ("give the player a task or job to do", "ask the player to do something for a reward", "start a quest"),
         train_descriptions=("hand the player a job with a reward", "ask the player for help with a task", "send the player on an errand")),
    Role("refuse", ("refuse", "decline", "deny", "say_no", "rebuff", "deny_service", "refuse_help", "decline_ask", "not_allowed", "say_never", "brush_off", "no_deal", "refuse_service", "withhold", "shut_down", "dismiss", "spurn", "forbid", "nope"), ("turn_down", "reject_request"),
         ("say no to what the player asks", "turn the player's request down", "refuse to help or to sell"),
         train_descriptions=("deny the player's request", "do not do what the player wants", "turn the player away")),
    Role("attack", ("attack", "fight", "draw_weapon", "start_combat", "fight_player", "combat", "hit", "swing_weapon", "brawl", "charge", "lunge", "assail", "open_fire", "smite", "engage", "fight_back", "club", "stab", "melee", "punch", "slash", "ambush"), ("strike", "assault"),
         ("start a fight with the player", "attack the player", "draw steel and fight"),
         train_descriptions=("fight the player", "hit the player with a weapon", "begin combat")),
    Role("flee", ("flee", "run_away", "retreat", "run", "run_off", "hide", "scurry_off", "get_away", "take_flight", "dash_off", "run_for_it", "skedaddle", "rush_off", "clear_out", "back_away", "evacuate", "scram", "hightail", "vanish", "withdraw"), ("bolt", "escape"),
         ("run away from danger", "run off in fear", "get away from the player"),
         train_descriptions=("get away from danger fast", "run for safety", "leave in a hurry out of fear")),
    Role("call_guards", ("call_guards", "alert_guards", "raise_alarm", "yell_for_help", "shout_guards", "alarm", "get_guards", "ring_bell", "call_help", "call_soldiers", "report_player", "cry_help", "blow_whistle", "send_for_guards", "alert_town", "call_militia", "fetch_guards", "shout_alarm"), ("summon_watch", "sound_horn"),
         ("shout for the town guard", "call for help from the guards", "raise the alarm"),
         train_descriptions=("call the guards over", "shout for the soldiers", "get help from the law")),
    Role("give_item", ("give_item", "hand_over", "gift_item", "give", "gift", "donate", "give_reward", "hand_item", "offer_gift", "grant_item", "give_gift", "hand_out", "give_free", "offer_item", "share_item", "gift_player", "give_token", "give_supplies", "provide_item", "pass_item"), ("bestow", "present_item"),
         ("give the player an item for free", "hand the player a reward or gift", "give something to the player"),
         train_descriptions=("give the player something at no cost", "hand over a gift", "reward the player with an item")),
    Role("follow", ("follow", "join_party", "accompany", "join", "travel_with", "come_along", "go_with", "companion", "join_player", "team_up", "join_group", "walk_with", "follow_player", "ride_along", "sign_on", "come_too", "pair_up", "enlist"), ("tag_along", "escort_player"),
         ("join the player and travel with them", "come along with the player", "follow the player"),
         train_descriptions=("become the player's companion", "travel alongside the player", "join the player's party")),
    Role("let_pass", ("open_gate", "let_pass", "allow_entry", "allow_through", "grant_entry", "unlock_gate", "let_through", "admit", "permit_entry", "raise_gate", "let_in", "open_door", "clear_path", "step_aside", "open_way", "allow_pass", "let_by", "unbar_gate", "admit_player", "stand_aside"), ("lift_barrier", "wave_through"),
         ("open the way and let the player through", "let the player pass the gate", "allow the player to enter"),
         train_descriptions=("let the player go through", "open the door or gate for the player", "grant the player entry")),
    Role("rent_room", ("rent_room", "offer_bed", "give_room", "rent_bed", "book_room", "house_guest", "offer_room", "let_room", "book_bed", "give_bed", "let_stay", "bed_guest", "room_player", "night_stay", "provide_room", "inn_room", "hire_room", "rent_out_room"), ("lodge_guest", "give_lodging"),
         ("rent the player a bed for the night", "give the player a room", "let the player stay the night"),
         train_descriptions=("let the player sleep here for a fee", "give the player lodging", "rent out a room")),
    Role("serve_drink", ("serve_drink", "pour_ale", "serve", "pour", "serve_ale", "give_drink", "bartend", "serve_food", "draw_ale", "pour_wine", "serve_meal", "serve_beer", "fetch_drink", "give_ale", "serve_mead", "brew_drink", "serve_player", "pour_beer", "offer_drink"), ("fill_tankard", "pour_drink"),
         ("pour the player a drink", "serve food or drink", "bring the player something to drink"),
         train_descriptions=("serve the player food or drink", "pour a drink for the player", "give the player a meal or a drink")),
    Role("share_rumor", ("give_rumor", "share_rumor", "tell_secret", "tell_rumor", "share_news", "reveal_secret", "share_info", "tell_news", "rumor", "spread_rumor", "share_secret", "pass_news", "tip_off", "leak_info", "tell_tale", "give_hint", "share_tidings", "rumour", "confide"), ("spill_gossip", "whisper_news"),
         ("tell the player a rumour or secret", "share gossip or news", "pass on a secret"),
         train_descriptions=("tell the player some news", "reveal a secret to the player", "pass on what people are saying")),
    Role("teach", ("teach_skill", "train_player", "teach", "train", "give_lesson", "teach_spell", "mentor", "coach", "share_skill", "teach_craft", "show_how", "lesson", "educate", "drill_player", "train_skill", "teach_trick", "school", "demonstrate"), ("instruct", "tutor"),
         ("teach the player a skill or spell", "train the player", "give the player a lesson"),
         train_descriptions=("teach the player something new", "give the player training", "show the player how to do a skill")),
    Role("travel", ("give_ride", "sail", "transport", "take_player", "carry_player", "row_boat", "drive_cart", "transport_player", "give_passage", "journey", "sail_player", "drive_player", "boat_ride", "give_lift", "cart_ride", "ship_player", "take_trip", "convey", "depart"), ("ferry_player", "carry_over"),
         ("take the player to another place", "carry the player across by boat or cart", "start the journey with the player"),
         train_descriptions=("take the player somewhere", "give the player passage", "bring the player to another place")),
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
