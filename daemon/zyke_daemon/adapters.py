"""The adapter registry, as the daemon imports it. It lives in ``zyke_models.adapters`` (shared with training)."""

from __future__ import annotations

from zyke_models.adapters import MANIFEST as MANIFEST
from zyke_models.adapters import PEFT_FILES as PEFT_FILES
from zyke_models.adapters import SHIPPED_ADAPTERS as SHIPPED_ADAPTERS
from zyke_models.adapters import AdapterEntry as AdapterEntry
from zyke_models.adapters import AdapterRegistry as AdapterRegistry
from zyke_models.adapters import Manifest as Manifest
