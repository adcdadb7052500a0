"""Pydantic models of the protocol frames.

They mirror schemas/ field for field; tests/test_schemas.py fails on any drift. The schemas stay the
source of truth (the daemon validates raw frames against them); these models give Python code typed
access and build outgoing frames.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .errors import ErrorCode

RequestId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


def _not_only_dots(value: str) -> str:
    """An NPC id or game name is also a file or folder name, and ``.``/``..`` would leave the sessions folder.

    The schemas say the same with ``"not": {"pattern": "^[.]+$"}``; pydantic's regex engine has no
    look-ahead to put it in the pattern itself.
    """
    if not value.strip("."):
        raise ValueError("an id made only of dots is not allowed")
    return value


#: Patterns use ``$`` as JSON Schema (ECMA-262) reads it, the end of the text: pydantic's Rust regex engine does
#: too, and the daemon's schema validator is made to (Python's ``re`` would let a trailing newline through).
NpcId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$"), AfterValidator(_not_only_dots)]
Label = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]
#: ``NpcSpec.name``: anything but C0/C1 control characters and the Unicode line and paragraph separators
NPC_NAME_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f\u2028\u2029]+$"
AdapterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


def _unique(items: list[str]) -> list[str]:
    if len(set(items)) != len(items):
        raise ValueError("items must be unique")
    return items


UniqueLabels = Annotated[list[Label], AfterValidator(_unique)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Choice(_Model):
    """An action or emotion with a description the model reads ("trade": "buy or sell goods").

    Descriptions are what let a game use labels the model never saw in training: the prompt renders
    them, so ``ferry_across: take the player over the river`` is as readable as ``trade``.
    """

    name: Label
    description: Annotated[str, StringConstraints(min_length=1, max_length=200)]


def label_name(item: str | Choice) -> str:
    """The label of a declared action or emotion, whether it came as a bare name or a ``Choice``."""
    return item if isinstance(item, str) else item.name


def _unique_names(items: list[str | Choice]) -> list[str | Choice]:
    """Names must be unique across both forms (``"trade"`` and ``{"name": "trade", ...}`` clash).

    JSON Schema's uniqueItems only compares whole items, so this is the one check the schemas cannot
    make; the message names the clashing labels because the daemon sends it back as ``bad_frame``.
    """
    seen: set[str] = set()
    repeated: set[str] = set()
    for item in items:  # one pass: a quadratic check here once let one frame freeze the daemon
        name = label_name(item)
        (repeated if name in seen else seen).add(name)
    if repeated:
        raise ValueError(f"names must be unique; declared more than once: {', '.join(sorted(repeated))}")
    return items


#: A declared action or emotion list: bare labels, described labels, or a mix; names unique.
Choices = Annotated[list[Label | Choice], AfterValidator(_unique_names)]


class GenerationOptions(_Model):
    max_tokens: int | None = Field(None, ge=1, le=1024)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1000)
    seed: int | None = Field(None, ge=0, le=4294967295)
    repeat_penalty: float | None = Field(None, ge=1, le=2)
    no_repeat_ngram: int | None = Field(None, ge=0, le=16)
    stop: list[Annotated[str, StringConstraints(min_length=1, max_length=32)]] | None = Field(None, max_length=4)


#: How soon the daemon serves a line (``Priority`` in schemas/common.json); docs/SCHEDULING.md.
Priority = Literal["foreground", "normal", "background"]


class NpcDefaults(_Model):
    emotion: Label | None = None
    action: Label | None = None
    options: GenerationOptions | None = None
    #: the priority of this NPC's lines when npc.say gives none
    priority: Priority | None = None


#: Who the game is for, strictest first (``Audience`` in schemas/common.json); docs/SAFETY.md.
Audience = Literal["minor", "teen", "adult"]
#: What a safety rail blocked (``SafetyCategory``); ``jailbreak`` only on the player's line.
SafetyCategory = Literal["profanity", "sexual", "hate", "self_harm", "drugs", "weapons_crime", "personal_data",
                         "jailbreak", "custom"]


class NpcSpec(_Model):
    id: NpcId
    #: no control characters or line breaks: a name with a newline could forge a line of the prompt's script
    name: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=NPC_NAME_PATTERN)] | None = None
    persona: Annotated[str, StringConstraints(min_length=1, max_length=4000)]
    actions: Choices = Field(min_length=1, max_length=64)
    emotions: Choices = Field(min_length=1, max_length=64)
    defaults: NpcDefaults | None = None
    adapter: AdapterName | None = None
    max_history: int | None = Field(None, ge=0, le=200)
    #: who this NPC speaks to; only narrows the daemon's audience (the stricter applies), docs/SAFETY.md
    audience: Audience | None = None
    #: the declared action a deflected reply takes (default: ``refuse`` when declared, else ``none``)
    refusal_action: Label | None = None
    #: extra words or phrases this NPC never says, on top of its audience's lists (they only block more)
    blocked_words: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=64)]],
                             AfterValidator(_unique)] | None = Field(None, max_length=64)
    #: opt in to experience recording: this NPC's replies are recorded when the daemon records too
    #: (``zyke-daemon start --record-experience``; docs/EXPERIENCE.md). Never changes the prompt.
    record: bool | None = None

    @property
    def display_name(self) -> str:
        return self.name or self.id

    @property
    def action_names(self) -> list[str]:
        """The declared actions' labels, in declaration order (what decoding may choose from)."""
        return [label_name(a) for a in self.actions]

    @property
    def emotion_names(self) -> list[str]:
        """The declared emotions' labels, in declaration order."""
        return [label_name(e) for e in self.emotions]


class NpcReply(_Model):
    say: str = Field(max_length=600)
    emotion: Label
    action: Label
    target: Annotated[str, StringConstraints(max_length=64)] | None = None
    args: dict[str, Any] | None = None


class FeedbackLabel(_Model):
    """What would have been right (``feedback``'s label): at least one field. ``action`` is the common case
    ("should have been refuse"); it must be one the turn allowed, ``emotion`` one the NPC declared."""

    action: Label | None = None
    emotion: Label | None = None
    say: Annotated[str, StringConstraints(max_length=600)] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> FeedbackLabel:
        if self.action is None and self.emotion is None and self.say is None:
            raise ValueError("a label needs at least one of action, emotion, say")
        return self


#: Who rated a reply (``FeedbackSource`` in schemas/common.json).
FeedbackSource = Literal["game", "player", "simulated"]


class SafetyBlock(_Model):
    """One rail's intervention on a reply: ``input`` (the player's line was deflected) or ``decode`` (``count``
    candidate tokens were kept out of the line)."""

    stage: Literal["input", "decode"]
    category: SafetyCategory
    count: int | None = Field(None, ge=1)


class Safety(_Model):
    """On a reply when a safety rail intervened (absent otherwise); never carries the offending text."""

    intervened: bool
    audience: Audience
    blocks: list[SafetyBlock]


class Usage(_Model):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    cached_tokens: int | None = Field(None, ge=0)


class Timings(_Model):
    queue_ms: float = Field(ge=0)
    ttft_ms: float = Field(ge=0)
    total_ms: float = Field(ge=0)
    tokens_per_s: float | None = Field(None, ge=0)


class Turn(_Model):
    player: str = Field(max_length=4000)
    state: dict[str, Any] | None = None
    #: The actions the game allowed for this turn, when it narrowed them (kept so the turn renders as it did).
    allowed_actions: UniqueLabels | None = Field(None, min_length=1, max_length=64)
    reply: NpcReply


class NpcState(_Model):
    v: Literal[1] = 1
    npc: NpcSpec
    history: list[Turn] = Field(max_length=200)


class AdapterInfo(_Model):
    name: AdapterName
    base: str | None = None
    rank: int | None = Field(None, ge=1)
    loaded: bool | None = None
    targets: list[str] | None = None


class ModelInfo(_Model):
    name: str
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    n_ctx: int | None = Field(None, ge=1)


class ClientInfo(_Model):
    name: Annotated[str, StringConstraints(max_length=64)]
    version: Annotated[str, StringConstraints(max_length=32)] | None = None


class Limits(_Model):
    max_frame_bytes: int | None = None
    max_queued_per_client: int | None = None
    request_timeout_s: float | None = None


# --- frames -----------------------------------------------------------------------------------


class Frame(_Model):
    v: Literal[1] = 1


class Hello(Frame):
    type: Literal["hello"] = "hello"
    id: RequestId
    token: Annotated[str, StringConstraints(max_length=256)]
    protocol: int = Field(ge=1)
    game: NpcId | None = None
    client: ClientInfo | None = None


class NpcDefine(Frame):
    type: Literal["npc.define"] = "npc.define"
    id: RequestId
    npc: NpcSpec


class NpcSay(Frame):
    type: Literal["npc.say"] = "npc.say"
    id: RequestId
    npc: NpcId
    input: str = Field(max_length=4000)
    state: dict[str, Any] | None = None
    options: GenerationOptions | None = None
    stream: bool | None = None
    adapter: AdapterName | None = None
    allowed_actions: UniqueLabels | None = Field(None, min_length=1, max_length=64)
    priority: Priority | None = None
    #: drop the line (``expired``) if it has not started decoding this long after it arrived
    deadline_ms: int | None = Field(None, ge=1, le=3600000)
    #: put the ``safety`` field on the reply when a rail intervened (capability ``safety``; the opt-in keeps an
    #: older client, whose strict models would refuse an unknown field, from ever seeing it)
    safety_report: bool | None = None


class Cancel(Frame):
    type: Literal["cancel"] = "cancel"
    id: RequestId
    target: RequestId


class NpcReset(Frame):
    type: Literal["npc.reset"] = "npc.reset"
    id: RequestId
    npc: NpcId


class NpcStateGet(Frame):
    type: Literal["npc.state.get"] = "npc.state.get"
    id: RequestId
    npc: NpcId


class NpcStateSet(Frame):
    type: Literal["npc.state.set"] = "npc.state.set"
    id: RequestId
    state: NpcState


class AdapterList(Frame):
    type: Literal["adapter.list"] = "adapter.list"
    id: RequestId


class AdapterLoad(Frame):
    type: Literal["adapter.load"] = "adapter.load"
    id: RequestId
    name: AdapterName


class AdapterUnload(Frame):
    type: Literal["adapter.unload"] = "adapter.unload"
    id: RequestId
    name: AdapterName


class Ping(Frame):
    type: Literal["ping"] = "ping"
    id: RequestId


class Feedback(Frame):
    """A rating of an earlier reply (``reply_id``: the npc.say's id), recorded with it when experience recording
    is on for the daemon and the NPC (capability ``feedback``; docs/EXPERIENCE.md). Answered ``ok``."""

    type: Literal["feedback"] = "feedback"
    id: RequestId
    npc: NpcId
    reply_id: RequestId
    reward: float = Field(ge=-1, le=1)
    label: FeedbackLabel | None = None
    source: FeedbackSource | None = None
    note: Annotated[str, StringConstraints(max_length=200)] | None = None


class Welcome(Frame):
    type: Literal["welcome"] = "welcome"
    id: RequestId
    protocol: int = Field(ge=1)
    daemon_version: str
    model: ModelInfo
    backend: str
    capabilities: list[str]
    limits: Limits | None = None


class NpcDefined(Frame):
    type: Literal["npc.defined"] = "npc.defined"
    id: RequestId
    npc: NpcId
    history_turns: int = Field(ge=0)


class ReplyDelta(Frame):
    type: Literal["reply.delta"] = "reply.delta"
    id: RequestId
    npc: NpcId
    text: str
    index: int = Field(ge=0)


class Reply(Frame):
    type: Literal["reply"] = "reply"
    id: RequestId
    npc: NpcId
    reply: NpcReply
    finish_reason: Literal["stop", "length"]
    adapter: AdapterName | None = None
    usage: Usage
    timings: Timings
    #: present when a safety rail intervened (docs/SAFETY.md)
    safety: Safety | None = None


class NpcStateFrame(Frame):
    type: Literal["npc.state"] = "npc.state"
    id: RequestId
    state: NpcState


class Adapters(Frame):
    type: Literal["adapters"] = "adapters"
    id: RequestId
    adapters: list[AdapterInfo]


class Pong(Frame):
    type: Literal["pong"] = "pong"
    id: RequestId


class Ok(Frame):
    type: Literal["ok"] = "ok"
    id: RequestId


class Error(Frame):
    type: Literal["error"] = "error"
    id: RequestId | None
    code: ErrorCode
    message: str
    details: dict[str, Any] | None = None


#: Every frame a client may send, as a plain union: what a ``match`` over client frames must cover.
AnyClientFrame = (Hello | NpcDefine | NpcSay | Cancel | NpcReset | NpcStateGet | NpcStateSet | AdapterList | AdapterLoad
                  | AdapterUnload | Ping | Feedback)
ClientFrame = Annotated[AnyClientFrame, Field(discriminator="type")]
ServerFrame = Annotated[
    Welcome | NpcDefined | ReplyDelta | Reply | NpcStateFrame | Adapters | Pong | Ok | Error,
    Field(discriminator="type"),
]

CLIENT_FRAMES: dict[str, type[Frame]] = {
    m.model_fields["type"].default: m
    for m in (Hello, NpcDefine, NpcSay, Cancel, NpcReset, NpcStateGet, NpcStateSet, AdapterList, AdapterLoad,
              AdapterUnload, Ping, Feedback)
}
SERVER_FRAMES: dict[str, type[Frame]] = {
    m.model_fields["type"].default: m
    for m in (Welcome, NpcDefined, ReplyDelta, Reply, NpcStateFrame, Adapters, Pong, Ok, Error)
}


def dump_frame(frame: Frame) -> dict[str, Any]:
    """The JSON-ready dict of a frame, leaving out unset optional fields as the schemas expect."""
    return frame.model_dump(mode="json", exclude_none=True) | (
        {"id": None} if isinstance(frame, Error) and frame.id is None else {}
    )
