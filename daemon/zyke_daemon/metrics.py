"""Prometheus metrics of one daemon, served as text on ``GET /metrics``.

A private registry (not prometheus_client's global one) so two daemons in one process, as in the
tests, never share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from zyke.protocol import Safety

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
        self.closed_by_cap = Counter("zyke_connections_closed_by_cap", "Connections the daemon closed because a "
                                     "documented cap was reached, by reason (max_connections, hello_timeout, "
                                     "max_auth_failures, max_send_queue_bytes)", ["reason"], registry=self.registry)
        self.tokens = Counter("zyke_tokens_generated", "Completion tokens generated", registry=self.registry)
        self.ttft = Histogram("zyke_time_to_first_token_seconds", "Time from start of decoding to the first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("zyke_batch_replies", "Replies decoded together in one lockstep batch",
                                    buckets=(1, 2, 3, 4, 6, 8), registry=self.registry)
        self.safety_blocked = Counter("zyke_safety_blocked", "Replies a safety rail intervened on, by category and "
                                      "stage (input: the player's line deflected; decode: words kept out)",
                                      ["category", "stage"], registry=self.registry)
        self.latency = Histogram("zyke_request_latency_seconds", "npc.say from arrival to reply, queue included",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        # priorities (docs/SCHEDULING.md): is the foreground waiting, is background work dropped or paused
        self.queue_depth_by_priority = Gauge("zyke_queue_depth_by_priority", "npc.say requests waiting for the "
                                             "model, by priority", ["priority"], registry=self.registry)
        self.queue_wait = Histogram("zyke_queue_wait_seconds", "Time an npc.say waited in the queue before decoding "
                                    "started, by priority", ["priority"], buckets=(0.01, *_LATENCY_BUCKETS),
                                    registry=self.registry)
        self.expired = Counter("zyke_expired", "Queued requests dropped at their deadline (error expired), by "
                               "priority", ["priority"], registry=self.registry)
        self.preemptions = Counter("zyke_preemptions", "Running replies paused (KV slot kept) so that a foreground "
                                   "reply could start at the next decode step", registry=self.registry)

    def count_safety(self, safety: Safety | None) -> None:
        """Count a reply's safety interventions (``SayJob.safety``: None when no rail intervened)."""
        for block in safety.blocks if safety is not None else ():
            self.safety_blocked.labels(block.category, block.stage).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
