"""The experience recorder: appends the lines the core builds to ``<data dir>/experience/experience.jsonl``.

The core (core.py) decides what is recorded and builds each line (a reply's record, or a feedback line), sans
I/O; this module only puts lines on disk, on a thread of its own so the event loop and the model thread never
wait for the disk. What it guarantees (docs/EXPERIENCE.md):

- **Whole lines.** Each line goes out in one ``write`` on an ``O_APPEND`` descriptor, so a kill -9 leaves at
  most a torn last line (which readers skip, and which the next daemon cuts off before appending).
- **Only valid lines.** Every line is checked with the reader's own models (``zyke.experience``) before it is
  written: a line the reader would refuse is logged and dropped, never written.
- **Bounded.** Recording stops at the format's caps (``Limits``: file size, record count); the last MiB below
  the size cap is kept for feedback on replies already recorded. ``zyke-daemon experience export|clear`` are the
  way out.
- **Cleared while running.** The file is reopened for each line, and a file that changed under the recorder
  (deleted by ``experience clear``, replaced) is re-read: feedback on a record no longer in it is refused
  (``unknown_reply``) instead of leaving a feedback line that names nothing.

The server calls two functions: ``record_reply`` when a reply is sent and ``record_feedback`` for a
``RecordFeedback`` action. Recording costs the loop a dict lookup and a queue put per reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from zyke.experience import ExperienceRecord, FeedbackLine, Limits
from zyke.paths import data_dir
from zyke.protocol import ErrorCode, Ok, dump_frame

from .core import DaemonCore, RecordFeedback, SayJob, error_frame
from .errors import DaemonError

log = logging.getLogger(__name__)

FILE_NAME = "experience.jsonl"
#: Bytes below the file cap kept for feedback lines once records stop, so a game can still rate the last replies.
FEEDBACK_RESERVE_BYTES = 1 << 20

Key = tuple[str, str, str]


def experience_dir() -> Path:
    """Where experience is recorded: ``<data dir>/experience`` (the player's own machine, nowhere else)."""
    return data_dir() / "experience"


def experience_path() -> Path:
    return experience_dir() / FILE_NAME


class ExperienceRecorder:
    """Appends experience lines to one file from one writer thread, in the order they were submitted (so a
    feedback line always follows the record it rates)."""

    def __init__(self, path: Path, limits: Limits | None = None,
                 feedback_reserve: int = FEEDBACK_RESERVE_BYTES) -> None:
        self.path = path
        self.limits = limits = limits or Limits()
        self.feedback_reserve = min(feedback_reserve, limits.max_file_bytes // 4)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zyke-experience")
        self._lock = threading.Lock()  # the state below belongs to the writer thread; the lock is for tests
        self._identity: tuple[int, int] | None = None
        self._size = 0
        self._records = 0
        #: keys of the records in the file as this recorder knows it (those it wrote since the file appeared)
        self._written: set[Key] = set()
        self._full_logged = False

    @property
    def records(self) -> int:
        """Records in the file when the recorder last wrote (for tests and logs)."""
        return self._records

    def record(self, key: Key, line: bytes) -> Future[bool]:
        """Append a reply's record (fire and forget); the future says whether it was written."""
        return self._pool.submit(self._append_record, key, line)

    def feedback(self, key: Key, line: bytes) -> Future[None]:
        """Append a feedback line; the future raises ``DaemonError`` (``unknown_reply``, ``experience_full``) when
        it cannot be, or ``OSError`` when the disk refused it."""
        return self._pool.submit(self._append_feedback, key, line)

    def close(self) -> None:
        """Wait for the lines already submitted (the daemon is stopping)."""
        self._pool.shutdown(wait=True)

    # -- the writer thread

    def _append_record(self, key: Key, line: bytes) -> bool:
        try:
            ExperienceRecord.model_validate_json(line)
        except ValueError as exc:  # a bug in the core's builder: never write what the reader refuses
            log.error("experience: not recording reply %r, the record is invalid: %s", key[2], exc)
            return False
        with self._lock:
            fd = self._open()
            try:
                if (self._records >= self.limits.max_records
                        or self._size + len(line) > self.limits.max_file_bytes - self.feedback_reserve):
                    if not self._full_logged:
                        self._full_logged = True
                        log.warning("experience: %s is full (%d records, %d bytes); not recording more replies. "
                                    "Export and clear it: zyke-daemon experience export --out FILE; zyke-daemon "
                                    "experience clear", self.path, self._records, self._size)
                    return False
                self._write(fd, line)
                self._records += 1
                self._written.add(key)
                return True
            finally:
                os.close(fd)

    def _append_feedback(self, key: Key, line: bytes) -> None:
        try:
            FeedbackLine.model_validate_json(line)
        except ValueError as exc:
            raise DaemonError(ErrorCode.INTERNAL, f"the feedback line is invalid: {exc}") from None
        with self._lock:
            fd = self._open()
            try:
                if key not in self._written:
                    raise DaemonError(ErrorCode.UNKNOWN_REPLY, f"the record of reply {key[2]!r} is not in the "
                                      "experience file (it was full, or has been cleared since)")
                if self._size + len(line) > self.limits.max_file_bytes:
                    raise DaemonError(ErrorCode.EXPERIENCE_FULL, f"the experience file is full "
                                      f"({self.limits.max_file_bytes} bytes); export and clear it")
                self._write(fd, line)
            finally:
                os.close(fd)

    def _write(self, fd: int, line: bytes) -> None:
        """One write of the whole line. A short write (disk full) is cut off again, so no torn line stays."""
        written = os.write(fd, line)
        if written != len(line):
            os.ftruncate(fd, self._size)
            raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes; disk full?)")
        self._size += written

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._identity or st.st_size != self._size:
                self._resync(fd, st.st_size)
                self._identity = (st.st_dev, st.st_ino)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _resync(self, fd: int, size: int) -> None:
        """A file this recorder did not just write (the first line of a run, a cleared or replaced file): cut
        off a torn last line a killed daemon left, and count the records already there."""
        if (self._identity is not None) and size < self._size:
            log.info("experience: %s was cleared or replaced; recording into the new file", self.path)
        self._written.clear()
        self._full_logged = False
        records = 0
        end = 0
        with open(fd, "rb", closefd=False) as fh:
            fh.seek(0)
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break
                end += len(raw)
                try:
                    records += json.loads(raw).get("kind") is None
                except (ValueError, AttributeError):
                    pass  # the reader reports it; the recorder only counts
        if end < size:
            log.warning("experience: removing a torn last line (%d bytes) of %s, left by a daemon stopped "
                        "mid-write", size - end, self.path)
            os.ftruncate(fd, end)
        self._size, self._records = end, records


_recorders: weakref.WeakKeyDictionary[DaemonCore, ExperienceRecorder] = weakref.WeakKeyDictionary()


def recorder_for(core: DaemonCore) -> ExperienceRecorder:
    """The recorder of a daemon (one per ``DaemonCore``), made on first use in the data dir of that moment."""
    recorder = _recorders.get(core)
    if recorder is None:
        recorder = _recorders[core] = ExperienceRecorder(experience_path(), core.experience_limits)
    return recorder


def record_reply(core: DaemonCore, job: SayJob) -> None:
    """The server sent ``job``'s reply: queue its record, if the core built one (loop thread, never blocks)."""
    if job.experience is None:
        return
    key, line = job.experience
    job.experience = None
    recorder_for(core).record(key, line).add_done_callback(_log_failure)


def record_feedback(core: DaemonCore, action: RecordFeedback, send: Callable[[dict[str, Any]], None]) -> None:
    """Append a feedback line off the loop, then answer through ``send`` on the loop: ``ok``, or why not."""
    loop = asyncio.get_running_loop()

    def done(future: Future[None]) -> None:
        try:
            future.result()
            frame = dump_frame(Ok(id=action.request_id))
        except DaemonError as exc:
            frame = error_frame(exc.code, exc.message, action.request_id)
        except Exception:
            log.exception("experience: could not record feedback %s", action.request_id)
            frame = error_frame(ErrorCode.INTERNAL, "could not write the experience file; see the daemon log",
                                action.request_id)
        if not loop.is_closed():
            loop.call_soon_threadsafe(send, frame)

    recorder_for(core).feedback(action.key, action.line).add_done_callback(done)


def _log_failure(future: Future[bool]) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("experience: could not record a reply: %s", exc)
