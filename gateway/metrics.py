"""Prometheus metrics, one registry per app (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Gauge(
            "gateway_connections", "Open client connections", ["transport"], registry=self.registry
        )
        self.events_published = Counter(
            "gateway_events_published", "Events published through this node", registry=self.registry
        )
        self.events_delivered = Counter(
            "gateway_events_delivered", "Events written to clients", ["transport"],
            registry=self.registry,
        )
        self.presence_members = Gauge(
            "gateway_presence_members", "Members in workspaces this node follows",
            registry=self.registry,
        )
        self.presence_sessions = Gauge(
            "gateway_presence_local_holdings",
            "Users with a stream or WebSocket session held by this node, per workspace",
            registry=self.registry,
        )
        self.backend_latency = Histogram(
            "gateway_backend_seconds", "Backend call latency", ["op"], registry=self.registry
        )
        self.slow_consumer_disconnects = Counter(
            "gateway_slow_consumer_disconnects", "Clients closed because their outbox overflowed",
            ["transport"], registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
