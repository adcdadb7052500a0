"""The main job in one file: start the daemon on the embedded model and hold a short scripted conversation.

    python examples/quickstart.py

``Client(autostart=True)`` starts a local zyke-daemon if none is running (and stops it again at the
end); with a daemon already running (``zyke-daemon start``) it simply connects to it.
"""

from __future__ import annotations

import sys

from zyke import Client

SCRIPT = [
    ("Can you fix my sword?", {"location": "forge", "gold": 12}),
    ("How much will that cost me?", {"location": "forge", "gold": 12}),
    ("Ten gold? You thief!", {"location": "forge", "gold": 12}),
]


def main() -> None:
    with Client(autostart=True, game="quickstart") as client:
        info = client.connect()
        print(f"zyke-daemon {info.daemon_version}: {info.model.name} on {info.backend}\n")
        # The persona carries the facts the NPC must keep to (here his price): a small model does not invent
        # one and then remember it as reliably as it reads it.
        brom = client.npc("brom", name="Brom",
                          persona="A grumpy dwarf blacksmith who loves his forge. Charges 10 gold to mend a blade.",
                          actions=["none", "trade", "repair", "attack"], emotions=["neutral", "angry", "pleased"])
        brom.reset()  # a fresh conversation each run (the daemon keeps history across restarts otherwise)
        for line, state in SCRIPT:
            print(f"You:  {line}")
            print("Brom: ", end="", flush=True)
            stream = brom.stream(line, state=state, max_tokens=80)
            for piece in stream:
                print(piece, end="", flush=True)
            reply = stream.final()
            print(f"\n      [{reply.emotion}, {reply.action}] "
                  f"{reply.usage.completion_tokens} tokens, first after {reply.timings.ttft_ms:.0f} ms\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
