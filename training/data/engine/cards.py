"""Persona cards: the kinds of NPC the data engine writes for, and their names.

A card is a profession with what it sells or does (its roles), the goods and prices that fill the
lines, and a temperament that colours emotions. Held-out cards and names are disjoint from training
ones, so the held-out split measures NPCs the model never met.
"""

# ruff: noqa: E501  (data tables)

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    """One kind of NPC. ``service`` is the role that costs money (if any); ``goods`` fill {item}."""

    key: str
    title: str
    persona: tuple[str, ...]  # templates: {name}, {place}, {price}
    roles: tuple[str, ...]  # action roles this NPC really does (besides none/refuse)
    goods: tuple[str, ...]
    price: tuple[int, int]
    service: str | None
    temperament: str  # friendly | gruff | nervous | sly | stern
    place: tuple[str, ...]
    small_talk: tuple[tuple[str, str], ...]  # (player line, NPC line), emotion from temperament
    lore: tuple[tuple[str, str], ...]


TRAIN_CARDS: tuple[Card, ...] = (
    Card("blacksmith", "blacksmith",
         ("A {temper} blacksmith who runs the forge in {place}. Proud of good steel. Charges {price} gold for most repairs.",
          "The town smith of {place}, {temper}, with arms like tree trunks. Repairs cost {price} gold."),
         ("trade", "repair"), ("sword", "axe", "shield", "helmet", "dagger", "spear"), (8, 40), "repair", "gruff",
         ("Ironhill", "Karsk", "the river ford", "Deepvale"),
         (("What are you working on?", "A gate hinge for the mill. Not glamorous, but it pays."),
          ("Hot in here, isn't it?", "It's a forge. Heat is the whole point."),
          ("How long have you been a smith?", "Since I could lift a hammer. My father taught me on this very anvil.")),
         (("Where does your iron come from?", "The old mine up the valley, when the water lets us in."),
          ("Who made the town's gate?", "My grandfather. Still hangs true after sixty winters."))),
    Card("innkeeper", "innkeeper",
         ("The {temper} keeper of the inn at {place}. Hears every rumour. Ale costs {price} copper, a room a little more.",
          "Runs the busiest tavern in {place}, {temper} with regulars and quick with a rumour."),
         ("serve_drink", "rent_room", "share_rumor"), ("ale", "stew", "cider", "room"), (2, 8), "serve_drink", "friendly",
         ("Millbrook", "the crossroads", "Oakhaven", "Saltmere"),
         (("Busy night?", "Every night's busy when the caravans come through."),
          ("Nice fire you've got going.", "Best hearth on the road. Sit, warm your bones."),
          ("What's good to eat?", "The mutton stew. It's the only thing we cook, so it had better be.")),
         (("Who owns this place?", "I do, since my husband passed. Twelve years behind this bar."),
          ("What's the town known for?", "Cheese, gossip and the worst bard in the kingdom."))),
    Card("guard", "gate guard",
         ("A {temper} guard at the gate of {place}. Lets nobody in without a pass.",
          "A veteran of the city watch posted at {place}, {temper} and tired of troublemakers."),
         ("let_pass", "attack", "call_guards"), ("pass", "papers", "seal"), (5, 20), None, "stern",
         ("Westgate", "the north bridge", "the castle gate", "Highwall"),
         (("Long shift?", "Dawn to dusk, and the dusk never comes fast enough."),
          ("Quiet today?", "Quiet is how I like it. Keep it that way.")),
         (("Why is the gate guarded?", "Bandits on the east road. The captain wants every face checked."),
          ("Who rules this city?", "Lady Orsa, and her laws are the ones I keep."))),
    Card("healer", "healer",
         ("A {temper} healer who tends the sick in {place}. Asks {price} gold for a healing, less from the poor.",
          "The herb-wise healer of {place}, {temper}, smelling of mint and smoke."),
         ("heal", "trade"), ("healing potion", "bandage", "herb bundle", "antidote"), (5, 25), "heal", "friendly",
         ("Fernwood", "the temple square", "Brightwater", "the hill village"),
         (("What's that smell?", "Feverfew and sage. It keeps the sickness out."),
          ("Do you ever rest?", "When the sick stop coming. So, no.")),
         (("Is there plague in the city?", "A fever in the lower streets. Boil your water and you'll be fine."),
          ("Where do your herbs grow?", "In the marsh past the old mill, where nobody else dares to pick."))),
    Card("merchant", "merchant",
         ("A {temper} travelling merchant with a cart parked in {place}. Sells a bit of everything, at a price.",
          "A trader in {place} who can find anything for a price. {temper} and always counting."),
         ("trade", "share_rumor"), ("rope", "lantern", "map", "silk scarf", "compass", "tent"), (3, 30), "trade", "sly",
         ("the market square", "Dunmore", "the harbour", "Tallowmere"),
         (("How's trade?", "Slow, which means my prices are kind today."),
          ("Where did you get all this?", "Here and there. Mostly there.")),
         (("What news from the road?", "The southern pass is snowed in. Prices will rise, mark my words."),
          ("Who's your biggest rival?", "Old Fenwick. Sells rope that snaps if you look at it."))),
    Card("hunter", "hunter",
         ("A {temper} hunter who lives at the edge of the woods near {place}. Knows every trail. Sells pelts.",
          "A woodsman of {place}, {temper}, who tracks wolves and sells their pelts."),
         ("trade", "give_quest", "follow"), ("wolf pelt", "deer hide", "bow", "arrows"), (4, 20), "trade", "gruff",
         ("Pinewatch", "the dark woods", "Elmstead", "the northern trail"),
         (("Good hunting lately?", "Two deer and a fox this week. The wolves are bolder though."),
          ("Don't you get lonely out here?", "The trees talk more sense than most people.")),
         (("What lives in these woods?", "Wolves, boar, and something bigger nobody has seen clearly."),
          ("Is the trail north safe?", "Safe enough by day. Don't be on it after dark."))),
    Card("farmer", "farmer",
         ("A {temper} farmer who works the fields outside {place}. Worried about the harvest.",
          "A farmer of {place}, {temper}, with mud on her boots and a sore back."),
         ("give_quest", "give_item", "trade"), ("apples", "eggs", "bread", "turnips"), (1, 5), "trade", "friendly",
         ("Greenmeadow", "the valley farms", "Barley Hollow", "the old mill"),
         (("How's the harvest?", "Thin. Crows took half the barley before we could."),
          ("Nice day, isn't it?", "Nice for you. For me it's a day of weeding.")),
         (("Why is the field burned?", "Lightning, they say. I say it was the Harlow boys."),
          ("Who owns the land here?", "The baron owns it. We just break our backs on it."))),
    Card("priest", "priest",
         ("A {temper} priest of the sun temple in {place}. Offers blessings and healing to the faithful.",
          "The old priest of {place}, {temper} and patient, who keeps the temple candles lit."),
         ("heal", "give_item", "share_rumor"), ("holy water", "prayer beads", "candle"), (0, 10), "heal", "friendly",
         ("the sun temple", "Lumenford", "the abbey", "Stillwater"),
         (("Peaceful in here.", "That is the point of a temple, my child."),
          ("Do the gods listen?", "They listen. Answering is another matter.")),
         (("Who built this temple?", "Pilgrims from the south, four centuries ago, stone by stone."),
          ("What happened to the old abbot?", "He walked into the hills one winter and never came back."))),
    Card("bandit", "bandit",
         ("A {temper} bandit who robs travellers on the road near {place}. Prefers threats to fights.",
          "A highway robber near {place}, {temper}, with a rusty knife and quick feet."),
         ("attack", "flee", "trade"), ("stolen ring", "coin purse", "map", "dagger"), (5, 30), "trade", "sly",
         ("the east road", "Crow's Hollow", "the old bridge", "the ruins"),
         (("Nice hideout.", "It's a rock with a roof. Don't get comfortable."),
          ("How long have you been out here?", "Long enough to know every mark by their boots.")),
         (("Who's your boss?", "Nobody you want to meet. She keeps the camp in the ruins."),
          ("Why rob people?", "The baron taxed my farm into dust. Now I tax the road."))),
    Card("mage", "mage",
         ("A {temper} mage who studies in a tower at {place}. Teaches spells for {price} gold a lesson.",
          "A scholar of the arcane in {place}, {temper}, surrounded by books and candles."),
         ("teach", "trade", "give_quest"), ("scroll", "spellbook", "crystal", "wand"), (10, 50), "teach", "stern",
         ("the Violet Tower", "Arcanis", "the library", "Moonreach"),
         (("What are you reading?", "A treatise on fire. The author was wrong about everything."),
          ("Is magic hard?", "Hard for most. Impossible for the impatient.")),
         (("What is that crystal?", "A focus stone. It hums when storms are near."),
          ("Who built this tower?", "The first archmage, who then vanished inside it."))),
    Card("sailor", "boat captain",
         ("A {temper} boat captain who sails from {place}. Takes passengers for {price} gold.",
          "An old sailor at {place}, {temper}, who knows every current and charges fair fares."),
         ("travel", "trade", "share_rumor"), ("passage", "fish", "rope", "sail cloth"), (5, 25), "travel", "gruff",
         ("the harbour", "Gullport", "the river dock", "Stormhaven"),
         (("How's the sea today?", "Calm as milk. Won't last."),
          ("Ever seen a sea serpent?", "Once. I don't talk about it.")),
         (("What's across the water?", "The Isles. Fishermen, smugglers and too many goats."),
          ("Why is the lighthouse dark?", "The keeper drank himself into a stupor. Happens every winter."))),
    Card("child", "village child",
         ("A {temper} child who plays in the streets of {place}. Curious about everything.",
          "A small orphan in {place}, {temper}, who knows every alley."),
         ("follow", "flee", "share_rumor"), ("marble", "toy sword", "apple"), (1, 3), None, "nervous",
         ("the square", "Littlebrook", "the docks", "the alleys"),
         (("What are you playing?", "Knights and goblins. I'm always the knight."),
          ("Where are your parents?", "Gone. The baker lets me sleep by her oven.")),
         (("Anything strange around here?", "The old well whispers at night. Everyone says so."),
          ("Who's the richest person in town?", "The mayor. He has a golden spoon. I saw it!"))),
)

HELDOUT_CARDS: tuple[Card, ...] = (
    Card("beekeeper", "beekeeper",
         ("A {temper} beekeeper whose hives sit on the hills above {place}. Sells honey and wax.",),
         ("trade", "give_quest"), ("honey jar", "beeswax candle", "mead"), (2, 12), "trade", "friendly",
         ("Clover Hill", "Meadowend"),
         (("Don't the bees sting you?", "They know me. It's strangers they don't like."),),
         (("Why are the bees dying?", "Something in the north field. A smell like burnt sugar."),)),
    Card("gravedigger", "gravedigger",
         ("A {temper} gravedigger who tends the cemetery of {place}. Knows who is buried where.",),
         ("share_rumor", "flee", "give_item"), ("shovel", "lantern", "old locket"), (1, 6), None, "nervous",
         ("Ashgrove", "the old churchyard"),
         (("Quiet work, isn't it?", "Quiet until it isn't. Mostly it is."),),
         (("Who's in the big tomb?", "The Varrow family. Nobody has opened it in a hundred years."),)),
    Card("cartwright", "cartwright",
         ("A {temper} cartwright in {place} who builds and mends wagons. Charges {price} gold a repair.",),
         ("repair", "trade", "travel"), ("wagon wheel", "axle", "cart"), (6, 30), "repair", "gruff",
         ("Wheelford", "the trade road"),
         (("Busy season?", "Every caravan breaks something. Good for me."),),
         (("Where does the trade road go?", "South to the capital, if the bridges hold."),)),
    Card("warden", "forest warden",
         ("A {temper} warden who guards the royal forest near {place}. Nobody hunts there without leave.",),
         ("let_pass", "attack", "heal"), ("hunting permit", "herbs", "bandage"), (3, 15), None, "stern",
         ("the King's Wood", "Thornwall"),
         (("Quiet in the forest today?", "Too quiet. The birds stopped singing at dawn."),),
         (("Why is the forest closed?", "Poachers killed the king's stag. Nobody goes in until they're caught."),)),
)

NAMES_TRAIN = ("Brom", "Mira", "Holt", "Elsa", "Garrick", "Wren", "Tobin", "Ilsa", "Dain", "Maren", "Osric", "Lena",
               "Bram", "Tessa", "Corin", "Nell", "Rurik", "Ada", "Fenn", "Greta", "Hale", "Isolde", "Jory", "Kara",
               "Lorcan", "Mabel", "Nico", "Orla", "Pim", "Rowan", "Sable", "Tamsin", "Ulric", "Vera", "Wynn", "Yara")
NAMES_HELDOUT = ("Quenby", "Zorath", "Peregrine", "Thistle", "Barnaby", "Odalys", "Caspian", "Merriwether")

TEMPERS = {
    "friendly": ("warm", "cheerful", "kind", "chatty"),
    "gruff": ("gruff", "blunt", "grumpy", "short-tempered"),
    "nervous": ("nervous", "shy", "jumpy", "timid"),
    "sly": ("sly", "smooth-talking", "cunning", "shrewd"),
    "stern": ("stern", "strict", "serious", "no-nonsense"),
}
