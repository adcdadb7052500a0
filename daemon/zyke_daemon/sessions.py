"""NPC sessions: definition plus bounded history, persisted so a daemon restart loses no conversation.

One JSON file per NPC under ``<data dir>/npcs/<game>/<npc id>.json`` holding exactly the protocol's
``NpcState``, so what is on disk is what ``npc.state.get`` exports and ``npc.state.set`` imports.
Files are written to a temporary name and renamed, so a crash never leaves a torn session.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from zyke.protocol import NpcSpec, NpcState, Turn

log = logging.getLogger(__name__)


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

    def __init__(self, root: Path | None, default_max_history: int = 12) -> None:
        self.root = root
        self.default_max_history = default_max_history
        self._sessions: dict[tuple[str, str], NpcSession] = {}

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
        self.save(game, session)
        return session

    def restore(self, game: str, state: NpcState) -> NpcSession:
        max_history = state.npc.max_history if state.npc.max_history is not None else self.default_max_history
        session = NpcSession(spec=state.npc, history=list(state.history[-max_history:] if max_history else []),
                             max_history=max_history)
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
            self.save(game, session)

    # --- persistence ---------------------------------------------------------------------------

    def _path(self, game: str, npc_id: str) -> Path | None:
        return None if self.root is None else self.root / game / f"{npc_id}.json"

    def save(self, game: str, session: NpcSession) -> None:
        path = self._path(game, session.spec.id)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(session.state().model_dump_json(exclude_none=True))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load(self, game: str, npc_id: str) -> NpcSession | None:
        path = self._path(game, npc_id)
        if path is None or not path.exists():
            return None
        try:
            state = NpcState.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValidationError) as exc:
            log.warning("ignoring unreadable session file %s: %s", path, exc)
            return None
        max_history = state.npc.max_history if state.npc.max_history is not None else self.default_max_history
        return NpcSession(spec=state.npc, history=list(state.history), max_history=max_history)
