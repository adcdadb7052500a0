"""``hypothesis_jsonschema.from_schema`` working with the hypothesis this project installs.

hypothesis-jsonschema 0.23.1 (the newest) draws an object's properties with hypothesis' private
``conjecture.utils.many`` through its old ``more()`` / ``reject()`` methods; newer hypothesis releases (6.170 here,
which schemathesis needs) replaced them with an iterator, so every object schema fails with ``AttributeError: 'many'
object has no attribute 'more'``. This gives hypothesis-jsonschema, and only it, the old interface, written on the
same private ``ConjectureData`` calls the old ``many`` made. Drop it once hypothesis-jsonschema supports the new one.
"""

from __future__ import annotations

import types
from typing import Any

import hypothesis.internal.conjecture.utils as _cu
import hypothesis_jsonschema._from_schema as _hjs
from hypothesis_jsonschema import from_schema

__all__ = ["from_schema"]


class _Many:
    """hypothesis' ``many`` before 6.1xx: ``while elements.more(): ...`` with ``elements.reject()``."""

    def __init__(self, data: Any, min_size: int, max_size: float, average_size: float) -> None:
        self.data, self.min_size, self.max_size = data, min_size, max_size
        self.p_continue = _cu._calc_p_continue(average_size - min_size, max_size - min_size)
        self.count = self.rejections = 0
        self.drawn = self.force_stop = False

    def more(self) -> bool:
        if self.drawn:
            self.data.stop_span()
        self.drawn = True
        self.data.start_span(_cu.ONE_FROM_MANY_LABEL)
        if self.min_size == self.max_size:
            go = self.count < self.min_size
        else:
            forced = False if self.force_stop or self.count >= self.max_size else (
                True if self.count < self.min_size else None)
            go = self.data.draw_boolean(self.p_continue, forced=forced)
        if go:
            self.count += 1
            return True
        self.data.stop_span()
        return False

    def reject(self, why: str | None = None) -> None:
        self.count -= 1
        self.rejections += 1
        if self.rejections > max(3, 2 * self.count):
            if self.count < self.min_size:
                self.data.mark_invalid(why)
            else:
                self.force_stop = True


if not hasattr(_cu.many, "more"):
    _hjs.cu = types.SimpleNamespace(many=_Many)  # type: ignore[attr-defined]
