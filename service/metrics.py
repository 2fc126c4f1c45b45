"""Prometheus metrics of one app instance (its own registry, so several apps can coexist).

Exposed at ``GET /metrics``:

- ``jrs_http_requests_total{route,method,status}`` and
  ``jrs_http_request_duration_seconds{route,method}``: per route template (never a raw path).
- ``jrs_job_stage_duration_seconds{stage}``: ``upload``, ``validate``, ``queue_wait``, ``run``.
- ``jrs_job_outcomes_total{outcome}``: jobs succeeded/failed, requests rejected/busy.
- ``jrs_queue_depth``: jobs waiting for a worker; ``jrs_jobs_running``: jobs being run.
- ``jrs_jobs{state}``: jobs in the store by state (read from SQLite at scrape time).
- ``jrs_execution_provider{provider,device}``: 1 for the provider the model runs on.
- ``jrs_model_ready``: 1 when the runner is ready.
- ``jrs_storage_free_bytes``: free bytes of the data folder's file system (read at scrape time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class _JobStateCollector(Collector):
    """Reads the number of jobs per state from the store when scraped."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("jrs_jobs", "Jobs in the store by state.", labels=["state"])
        try:
            counts = dict(self._counts())
        except Exception:  # a scrape must never fail because of the store
            counts = {}
        for state in ("queued", "running", "succeeded", "failed"):
            family.add_metric([state], float(counts.get(state, 0)))
        yield family


class Metrics:
    """The metrics of one app.

    Attributes:
        registry: the Prometheus registry the metrics live in.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "jrs_http_requests", "HTTP requests.", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "jrs_http_request_duration_seconds",
            "HTTP request latency.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "jrs_job_stage_duration_seconds",
            "Duration of the stages of a re-contouring job.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.jobs = Counter("jrs_job_outcomes", "Jobs by outcome.", ["outcome"], registry=r)
        self.queue_depth = Gauge("jrs_queue_depth", "Jobs waiting for a worker.", registry=r)
        self.running = Gauge("jrs_jobs_running", "Jobs being run.", registry=r)
        self.provider = Gauge(
            "jrs_execution_provider",
            "Execution provider of the model (1 for the active one).",
            ["provider", "device"],
            registry=r,
        )
        self.ready = Gauge("jrs_model_ready", "1 when the model is loaded.", registry=r)
        self.storage_free = Gauge(
            "jrs_storage_free_bytes", "Free bytes of the data folder's file system.", registry=r
        )
        self._state_collector: _JobStateCollector | None = None

    def watch_job_states(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Report ``jrs_jobs{state}`` from `counts` at each scrape (replaces a previous source).

        Args:
            counts: returns state -> number of jobs.
        """
        if self._state_collector is not None:
            self.registry.unregister(self._state_collector)
        self._state_collector = _JobStateCollector(counts)
        self.registry.register(self._state_collector)

    def set_provider(self, provider: str, device: str) -> None:
        """Record the execution provider in use.

        Args:
            provider: e.g. ``CUDAExecutionProvider``, ``CPUExecutionProvider`` or ``none``.
            device: the configured device.
        """
        self.provider.clear()
        self.provider.labels(provider=provider, device=device).set(1)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)
