"""Prometheus metrics of one broker, in its own registry (several brokers may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Histogram

from qrelay.broker.store import JobState, JobStore
from qrelay.metrics_http import MetricsServer

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class BrokerMetrics:
    """Queue depth, jobs by state, job latency, executors and slots."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge(
            "qrelay_queue_depth", "Jobs waiting, per backend", ["backend"], registry=self.registry
        )
        self.jobs = Gauge(
            "qrelay_jobs", "Jobs in the store by state", ["state"], registry=self.registry
        )
        self.job_latency = Histogram(
            "qrelay_job_latency_seconds",
            "Submit to terminal state, per backend and final state",
            ["backend", "state"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.executors = Gauge("qrelay_executors", "Connected executors", registry=self.registry)
        self.slots_total = Gauge(
            "qrelay_slots", "Slots of connected executors", registry=self.registry
        )
        self.slots_busy = Gauge("qrelay_slots_busy", "Slots running a job", registry=self.registry)
        self.server: MetricsServer | None = None
        self._backends: set[str] = set()

    def serve(self, host: str, port: int, token: str | None = None) -> MetricsServer:
        """Expose /metrics on host:port (a thread of its own); with `token`, scrapes
        must send `Authorization: Bearer <token>`."""
        self.server = MetricsServer(host, port, registry=self.registry, token=token)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    async def refresh(self, store: JobStore) -> None:
        """Re-read the store's counts (called periodically while metrics are served)."""
        counts = await store.count_by_state()
        for state in JobState:
            self.jobs.labels(state.name).set(counts.get(state, 0))
        lengths = await store.queue_lengths()
        self._backends.update(lengths)
        for backend in self._backends:
            self.queue_depth.labels(backend).set(lengths.get(backend, 0))
