"""A tiny text tavern: two NPCs, a purse of gold, streamed replies, save and load.

    python examples/tavern.py                  # play in the terminal (a daemon must run, or --autostart)
    python examples/tavern.py --script lines.txt
    printf 'Hello!\\n/quit\\n' | python examples/tavern.py

Type a line to speak to the NPC you face; commands: /talk brom|mira, /who, /save [FILE], /load [FILE],
/reset, /help, /quit. The NPCs' actions change the game (Mira serving an ale costs gold, Brom's
hammer ends the chat), which is the point: the model picks from actions the game understands.
Lines come from --script FILE, or from stdin when it is not a terminal, so it also runs unattended.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from zyke import Client, DaemonNotRunning, Npc, ZykeError

NPCS: dict[str, dict[str, Any]] = {
    "brom": {
        "name": "Brom",
        "persona": "A grumpy dwarf blacksmith drinking at the tavern after work. He loves his forge, "
                   "hates haggling, and repairs weapons for 5 gold.",
        "actions": ["none", "trade", "repair", "attack"],
        "emotions": ["neutral", "angry", "pleased"],
    },
    "mira": {
        "name": "Mira",
        "persona": "A cheerful elf who runs the Sleepy Griffin tavern. Ale costs 2 gold; she knows "
                   "every rumour in town and loves to share them.",
        "actions": ["none", "serve", "gossip", "throw_out"],
        "emotions": ["happy", "curious", "annoyed"],
    },
}
HELP = "commands: /talk brom|mira, /who, /save [FILE], /load [FILE], /reset, /help, /quit"


class Tavern:
    """The game: who the player faces, their gold, and what NPC actions do to them."""

    def __init__(self, client: Client, save_file: Path, max_tokens: int, out: TextIO) -> None:
        self.out = out
        self.save_file = save_file
        self.max_tokens = max_tokens
        self.gold = 20
        self.npcs: dict[str, Npc] = {
            npc_id: client.npc(npc_id, default_action="none", **spec) for npc_id, spec in NPCS.items()
        }
        self.facing = self.npcs["brom"]

    def say(self, text: str) -> None:
        self.out.write(f"{self.facing.name}: ")
        self.out.flush()
        stream = self.facing.stream(text, state={"location": "tavern", "player_gold": self.gold},
                                    max_tokens=self.max_tokens)
        for piece in stream:  # the line appears as the model writes it
            self.out.write(piece)
            self.out.flush()
        reply = stream.final()
        self.out.write(f"\n  ({reply.emotion}, {reply.action})\n")
        self.apply(reply.action)

    def apply(self, action: str) -> None:
        if action == "serve" and self.gold >= 2:
            self.gold -= 2
            self.out.write(f"  Mira slides you an ale. Gold: {self.gold}\n")
        elif action == "repair" and self.gold >= 5:
            self.gold -= 5
            self.out.write(f"  Brom takes your sword to his forge. Gold: {self.gold}\n")
        elif action in ("attack", "throw_out"):
            other = self.npcs["mira" if self.facing.id == "brom" else "brom"]
            self.out.write(f"  That went badly. You back away towards {other.name}.\n")
            self.facing = other

    def command(self, line: str) -> bool:
        """Run a /command; False when the player quits."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "talk" and arg.lower() in self.npcs:
            self.facing = self.npcs[arg.lower()]
            self.out.write(f"You turn to {self.facing.name}.\n")
        elif name == "who":
            self.out.write(f"You face {self.facing.name}; here: {', '.join(n.name for n in self.npcs.values())}. "
                           f"Gold: {self.gold}\n")
        elif name == "save":
            path = Path(arg) if arg else self.save_file
            data = {"gold": self.gold, "facing": self.facing.id,
                    "npcs": {npc_id: npc.save() for npc_id, npc in self.npcs.items()}}
            path.write_text(json.dumps(data, indent=2), encoding="utf-8")
            self.out.write(f"Saved to {path}.\n")
        elif name == "load":
            path = Path(arg) if arg else self.save_file
            data = json.loads(path.read_text(encoding="utf-8"))
            for npc_id, state in data["npcs"].items():
                self.npcs[npc_id].load(state)
            self.gold, self.facing = data["gold"], self.npcs[data["facing"]]
            self.out.write(f"Loaded {path}. You face {self.facing.name}. Gold: {self.gold}\n")
        elif name == "reset":
            for npc in self.npcs.values():
                npc.reset()
            self.out.write("Everyone forgets you were ever here.\n")
        else:
            self.out.write(HELP + "\n")
        return True


def lines(script: Path | None, interactive: bool) -> Iterator[str]:
    if script is not None:
        yield from script.read_text(encoding="utf-8").splitlines()
    elif interactive:
        while True:
            try:
                yield input("> ")
            except EOFError:
                return
    else:
        yield from (line.rstrip("\n") for line in sys.stdin)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A tiny text tavern with two Zyke NPCs.")
    parser.add_argument("--script", type=Path, help="read the player's lines from this file")
    parser.add_argument("--url", help="daemon URL (default: ZYKE_URL or the running daemon)")
    parser.add_argument("--token", help="daemon token (default: ZYKE_TOKEN or the token file)")
    parser.add_argument("--game", default="tavern", help="namespace of the NPCs on the daemon")
    parser.add_argument("--save-file", type=Path, default=Path("tavern_save.json"))
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--autostart", action="store_true", help="start a local daemon if none runs")
    args = parser.parse_args(argv)
    interactive = args.script is None and sys.stdin.isatty()
    out = sys.stdout
    try:
        with Client(args.url, args.token, game=args.game, autostart=args.autostart) as client:
            tavern = Tavern(client, args.save_file, args.max_tokens, out)
            out.write(f"The Sleepy Griffin. Brom broods by the fire, Mira wipes the bar. {HELP}\n"
                      f"You face {tavern.facing.name}.\n")
            for raw in lines(args.script, interactive):
                line = raw.strip()
                if not line:
                    continue
                if not interactive:
                    out.write(f"> {line}\n")
                try:
                    if line.startswith("/"):
                        if not tavern.command(line):
                            break
                    else:
                        tavern.say(line)
                except ZykeError as exc:  # one failed line must not end the evening
                    out.write(f"\n  [{type(exc).__name__}] {exc}\n")
                except (OSError, ValueError, KeyError) as exc:  # a bad save file path or content
                    out.write(f"  [cannot do that: {exc}]\n")
            out.write("You leave the tavern.\n")
    except DaemonNotRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
