"""Stable, machine-readable error codes of the protocol (mirrors ``ErrorCode`` in schemas/common.json)."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_JSON = "bad_json"
    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    FRAME_TOO_LARGE = "frame_too_large"
    NOT_AUTHENTICATED = "not_authenticated"
    UNAUTHORIZED = "unauthorized"
    DUPLICATE_ID = "duplicate_id"
    UNKNOWN_NPC = "unknown_npc"
    UNKNOWN_ADAPTER = "unknown_adapter"
    UNKNOWN_ACTION = "unknown_action"
    ADAPTER_REJECTED = "adapter_rejected"
    UNKNOWN_REQUEST = "unknown_request"
    QUEUE_FULL = "queue_full"
    TOO_LONG = "too_long"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    GENERATION_FAILED = "generation_failed"
    MODEL_ERROR = "model_error"
    INTERNAL = "internal"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    UNKNOWN_REPLY = "unknown_reply"
    NOT_RECORDING = "not_recording"
    BAD_LABEL = "bad_label"
    EXPERIENCE_FULL = "experience_full"
