"""Zyke: NPCs that talk, served by a local daemon. This package is the light Python client SDK.

    from zyke import Client
    client = Client()
    brom = client.npc("brom", persona="A grumpy dwarf blacksmith.", actions=["none", "repair"])
    print(brom.say("Can you fix my sword?").say)

Only websockets, pydantic and platformdirs are imported: no model runtime, no numpy.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # one version, pyproject.toml's: the SDK, the daemon and zyke-train all report this one
    __version__ = version("zyke")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

from .aio import AsyncClient, AsyncNpc, AsyncReplyStream
from .client import Client, Npc, ReplyStream
from .errors import (
    AdapterRejected,
    AuthenticationError,
    BadLabel,
    Cancelled,
    ConnectionLost,
    DaemonNotRunning,
    ExperienceFull,
    Expired,
    GenerationFailed,
    NotRecording,
    ProtocolError,
    QueueFull,
    UnknownAction,
    UnknownAdapter,
    UnknownNpc,
    UnknownReply,
    ZykeError,
    ZykeTimeout,
)
from .protocol import (
    AdapterInfo,
    Choice,
    ErrorCode,
    FeedbackLabel,
    GenerationOptions,
    NpcReply,
    NpcSpec,
    NpcState,
    Timings,
    Turn,
    Usage,
)
from .response import NpcResponse

__all__ = [
    "AdapterInfo",
    "AdapterRejected",
    "AsyncClient",
    "AsyncNpc",
    "AsyncReplyStream",
    "AuthenticationError",
    "BadLabel",
    "Cancelled",
    "Choice",
    "Client",
    "ConnectionLost",
    "DaemonNotRunning",
    "ErrorCode",
    "ExperienceFull",
    "Expired",
    "FeedbackLabel",
    "GenerationFailed",
    "GenerationOptions",
    "NotRecording",
    "Npc",
    "NpcReply",
    "NpcResponse",
    "NpcSpec",
    "NpcState",
    "ProtocolError",
    "QueueFull",
    "ReplyStream",
    "Timings",
    "Turn",
    "UnknownAction",
    "UnknownAdapter",
    "UnknownNpc",
    "UnknownReply",
    "Usage",
    "ZykeError",
    "ZykeTimeout",
    "__version__",
]
