"""The file operations Zyke's state depends on: an atomic, fsynced write and moving a bad file aside.

Sessions, adapter manifests and the shared trainer's store share them so all keep the same promises: a crash
mid-write never leaves a torn file, and a file that does not parse is kept for a human to look at
(``<name>.corrupt-<unix time>``) instead of taking an NPC, or every request, down with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, fsync it and rename it over ``path``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it and rename it over ``path``: a crash leaves
    the old file or the new one, never half of one (sessions, manifests, the shared trainer's store)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every platform)
        fsync_dir(path.parent)


def write_bytes_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` in place and fsync it: for a file inside a temporary directory that is renamed
    into place whole afterwards (a checkpoint), where the rename is what makes it atomic."""
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a directory, so the renames and creations in it survive a crash; raises ``OSError`` where the platform
    cannot (``atomic_write_bytes`` tolerates that, the shared trainer's store does not)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: What ``atomic_write_bytes`` names its temporary files: ``.<name>.<mkstemp's 8 characters>.tmp``.
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temp_files(root: Path) -> int:
    """Delete the temporary files a killed process left under ``root`` (a kill -9 between mkstemp and the rename);
    returns how many. Run at start-up, before anything writes there: a live writer's file would match too."""
    if not root.is_dir():
        return 0
    removed = 0
    for path in root.rglob("*.tmp"):
        if _TEMP_NAME.match(path.name) and path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    if removed:
        log.info("removed %d temporary file(s) an interrupted write left under %s", removed, root)
    return removed


def move_aside(path: Path, why: object) -> Path | None:
    """Rename an unreadable file (or a directory squatting on its name) to ``<name>.corrupt-<unix time>``, log it
    once, and return the new path; None (logged) when even that fails, e.g. on a read-only folder."""
    reason = str(why)[:300]  # a pydantic error can quote the whole file
    stamp = int(time.time())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists() or aside.is_symlink():
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    try:
        path.rename(aside)
    except OSError as exc:
        log.error("%s does not parse (%s) and could not be moved aside: %s", path, reason, exc)
        return None
    log.warning("%s does not parse (%s); moved it aside to %s", path, reason, aside.name)
    return aside
