"""Prometheus metrics of one daemon, served as text on ``GET /metrics``.

A private registry (not prometheus_client's global one) so two daemons in one process, as in the
tests, never share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("zyke_requests", "Frames handled, by type", ["type"], registry=self.registry)
        self.errors = Counter("zyke_errors", "Error frames sent, by code", ["code"], registry=self.registry)
        self.queue_depth = Gauge("zyke_queue_depth", "npc.say requests waiting for the model",
                                 registry=self.registry)
        self.corrupt_files = Counter("zyke_corrupt_files", "Session files and adapter manifests that did not "
                                     "parse and were moved aside, by kind", ["kind"], registry=self.registry)
        self.connections = Gauge("zyke_connections", "Open WebSocket connections", registry=self.registry)
        self.tokens = Counter("zyke_tokens_generated", "Completion tokens generated", registry=self.registry)
        self.ttft = Histogram("zyke_time_to_first_token_seconds", "Time from start of decoding to the first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("zyke_batch_replies", "Replies decoded together in one lockstep batch",
                                    buckets=(1, 2, 3, 4, 6, 8), registry=self.registry)
        self.latency = Histogram("zyke_request_latency_seconds", "npc.say from arrival to reply, queue included",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
