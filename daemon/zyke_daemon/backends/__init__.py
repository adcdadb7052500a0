"""Model backends. Each turns a prompt plus a reply schema into constrained, streamed text."""

from .base import Backend, GenerationRequest, GenerationResult

__all__ = ["Backend", "GenerationRequest", "GenerationResult"]
