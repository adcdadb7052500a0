"""Typed errors of the daemon. Each carries the protocol error code the client will see.

Defined in ``zyke_models.errors``, because the adapter registry and the embedded model raise them too; the
daemon's modules import them from here.
"""

from __future__ import annotations

from zyke_models.errors import DaemonError as DaemonError
from zyke_models.errors import ModelLoadError as ModelLoadError
