"""NPC sessions: definition plus bounded history, persisted so a daemon restart loses no conversation.

One JSON file per NPC under ``<data dir>/npcs/<game>/<npc id>.json`` holding exactly the protocol's
``NpcState``, so what is on disk is what ``npc.state.get`` exports and ``npc.state.set`` imports.
Files are written to a temporary name and renamed, so a crash never leaves a torn session. A game or NPC id
is a file name here, so every path is checked to stay inside the sessions folder, and a file that does not
parse is moved aside (``files.move_aside``) so the NPC can be defined again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zyke.protocol import ErrorCode, NpcSpec, NpcState, Turn
from zyke_models.files import atomic_write_text, move_aside

from .errors import DaemonError

log = logging.getLogger(__name__)

#: Room a ``npc.state.set`` frame needs around its ``state``: ``{"v": 1, "type": "npc.state.set", "id": ...,
#: "state": ...}`` with the longest id (64 characters, 12 bytes each when escaped as a surrogate pair).
STATE_FRAME_ENVELOPE_BYTES = 1024


def json_size(value: object) -> int:
    """Bytes of ``value`` as the most verbose common encoder writes it: Python's ``json.dumps`` defaults (``", "``
    and ``": "`` separators, every non-ASCII character escaped). Compact or raw-UTF-8 JSON is never larger."""
    return len(json.dumps(value, ensure_ascii=True))


@dataclass
class NpcSession:
    spec: NpcSpec
    history: list[Turn]
    max_history: int

    def state(self) -> NpcState:
        return NpcState(npc=self.spec, history=list(self.history))

    def append(self, turn: Turn) -> None:
        self.history.append(turn)
        del self.history[: max(0, len(self.history) - self.max_history)]


class SessionStore:
    """All NPC sessions of one daemon, keyed by (game, npc id)."""

    def __init__(self, root: Path | None, default_max_history: int = 12,
                 on_corrupt: Callable[[Path], None] | None = None, max_frame_bytes: int | None = None) -> None:
        self.root = root.expanduser().resolve() if root is not None else None
        self.default_max_history = default_max_history
        #: the protocol's frame cap: a session's state is kept small enough to travel back in one npc.state.set
        #: (the DaemonCore sets it from its config when left None)
        self.max_frame_bytes = max_frame_bytes
        #: told about each session file that does not parse (the server counts them in /metrics)
        self.on_corrupt = on_corrupt
        self._sessions: dict[tuple[str, str], NpcSession] = {}
        self._reported: set[Path] = set()

    def get(self, game: str, npc_id: str) -> NpcSession | None:
        key = (game, npc_id)
        if key not in self._sessions:
            loaded = self._load(game, npc_id)
            if loaded is None:
                return None
            self._sessions[key] = loaded
        return self._sessions[key]

    def define(self, game: str, spec: NpcSpec) -> NpcSession:
        """Create or update an NPC; an existing conversation is kept (a game re-defines NPCs on every start)."""
        session = self.get(game, spec.id)
        max_history = spec.max_history if spec.max_history is not None else self.default_max_history
        if session is None:
            session = NpcSession(spec=spec, history=[], max_history=max_history)
            self._sessions[(game, spec.id)] = session
        else:
            session.spec = spec
            session.max_history = max_history
            del session.history[: max(0, len(session.history) - max_history)]
            self._fit(session)
        self.save(game, session)
        return session

    def restore(self, game: str, state: NpcState) -> NpcSession:
        max_history = state.npc.max_history if state.npc.max_history is not None else self.default_max_history
        session = NpcSession(spec=state.npc, history=list(state.history[-max_history:] if max_history else []),
                             max_history=max_history)
        self._fit(session)
        self._sessions[(game, state.npc.id)] = session
        self.save(game, session)
        return session

    def reset(self, game: str, npc_id: str) -> NpcSession | None:
        session = self.get(game, npc_id)
        if session is not None:
            session.history.clear()
            self.save(game, session)
        return session

    def record(self, game: str, npc_id: str, turn: Turn) -> None:
        session = self.get(game, npc_id)
        if session is not None:
            session.append(turn)
            self._fit(session)
            self.save(game, session)

    def _fit(self, session: NpcSession) -> None:
        """Drop the oldest turns until the session's state fits one ``npc.state.set`` frame, so every save a game
        gets from ``npc.state.get`` can be restored (issue 14: 200 turns weighed 93 KB against a 64 KiB cap).

        The prompt already drops the oldest turns to fit the context, so what goes is what the model sees least;
        a single turn too large to fit (a 4,000-character line with 16 KiB of state) is dropped too."""
        if self.max_frame_bytes is None or not session.history:
            return
        budget = self.max_frame_bytes - STATE_FRAME_ENVELOPE_BYTES
        size = json_size(NpcState(npc=session.spec, history=[]).model_dump(mode="json", exclude_none=True))
        turns = [json_size(t.model_dump(mode="json", exclude_none=True)) + 2 for t in session.history]  # + ", "
        total = size + sum(turns)
        drop = 0
        while drop < len(turns) and total > budget:
            total -= turns[drop]
            drop += 1
        if drop:
            log.debug("NPC %s: dropped the %d oldest turns so its state fits a %d-byte frame", session.spec.id, drop,
                      self.max_frame_bytes)
            del session.history[:drop]

    # --- persistence ---------------------------------------------------------------------------

    def _path(self, game: str, npc_id: str) -> Path | None:
        """``<root>/<game>/<npc id>.json``, refused unless it stays there: the protocol's patterns refuse ids made
        of dots, and this is the second lock (a game named ``..`` once overwrote the daemon's runtime file)."""
        if self.root is None:
            return None
        path = self.root / game / f"{npc_id}.json"
        if (game in {"", ".", ".."} or not npc_id.strip(".") or "/" in game + npc_id or "\\" in game + npc_id
                or not path.resolve().is_relative_to(self.root / game) or path.parent.parent != self.root):
            raise DaemonError(ErrorCode.BAD_FRAME,
                              f"game {game[:64]!r} and NPC {npc_id[:64]!r} do not name a session file in the "
                              "sessions folder")
        return path

    def save(self, game: str, session: NpcSession) -> None:
        path = self._path(game, session.spec.id)
        if path is not None:
            atomic_write_text(path, session.state().model_dump_json(exclude_none=True))

    def _load(self, game: str, npc_id: str) -> NpcSession | None:
        path = self._path(game, npc_id)
        if path is None or not (path.exists() or path.is_symlink()):
            return None
        try:
            state = NpcState.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8, bad JSON, not an NpcState
            self._corrupt(path, exc)
            return None
        max_history = state.npc.max_history if state.npc.max_history is not None else self.default_max_history
        session = NpcSession(spec=state.npc, history=list(state.history), max_history=max_history)
        self._fit(session)  # a file an older daemon saved may hold more than a frame carries
        return session

    def _corrupt(self, path: Path, why: BaseException) -> None:
        """Move a session file that does not load aside (logged once), so defining the NPC again starts afresh
        instead of failing on that file for every request."""
        if path in self._reported:
            return
        if move_aside(path, why) is None:
            self._reported.add(path)  # stays in place: do not log it on every request
        if self.on_corrupt is not None:
            self.on_corrupt(path)
