"""Prometheus metrics: the only module that knows about prometheus-client.

``create(cfg.metrics)`` returns ``Metrics`` serving ``/metrics`` on ``host:port``, or
``NoMetrics`` (every method does nothing) when ``port`` is 0, so the service calls the same
methods either way. Each ``Metrics`` has its own ``CollectorRegistry`` (never the global
one), so several can live in one process (tests).

Exposed: ``xray_watcher_files_total{status="ok|failed"}``, ``xray_watcher_batch_seconds``,
``xray_watcher_decode_seconds`` and ``xray_watcher_inference_seconds`` (per file, histograms),
``xray_watcher_second_looks_total`` (files decoded again in full because their fast decode
scored near 0.5), ``xray_watcher_queue_depth`` and ``xray_watcher_model_info{version="v0002"} 1``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from watcher.config import MetricsConfig

BATCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PER_FILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class MetricsSink(Protocol):
    """What the service calls; ``Metrics`` and ``NoMetrics`` both provide it."""

    def observe_batch(
        self,
        n_ok: int,
        n_failed: int,
        batch_s: float,
        infer_s_per_file: float,
        decode_s_list: Iterable[float],
        n_second_look: int = 0,
    ) -> None: ...

    def set_queue_depth(self, n: int) -> None: ...

    def set_model(self, version: str) -> None: ...

    def stop(self) -> None: ...


class NoMetrics:
    """The metrics endpoint is off (``metrics.port: 0``): every call does nothing."""

    def observe_batch(
        self,
        n_ok: int,
        n_failed: int,
        batch_s: float,
        infer_s_per_file: float,
        decode_s_list: Iterable[float],
        n_second_look: int = 0,
    ) -> None:
        pass

    def set_queue_depth(self, n: int) -> None:
        pass

    def set_model(self, version: str) -> None:
        pass

    def stop(self) -> None:
        pass


class Metrics:
    """The daemon's counters, gauges and histograms in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.files = Counter(
            "xray_watcher_files",
            "Files given a results.csv row, by status (ok: scored; failed: unreadable)",
            ["status"],
            registry=self.registry,
        )
        for status in ("ok", "failed"):
            self.files.labels(status=status)  # both series exist from the start, at 0
        self.batch_seconds = Histogram(
            "xray_watcher_batch_seconds",
            "Time to infer, report and file one batch",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.decode_seconds = Histogram(
            "xray_watcher_decode_seconds",
            "Time to read, hash, decode and preprocess one file",
            buckets=PER_FILE_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "xray_watcher_inference_seconds",
            "Model time per scored file (the batch's inference time divided by its files)",
            buckets=PER_FILE_BUCKETS,
            registry=self.registry,
        )
        self.second_looks = Counter(
            "xray_watcher_second_looks",
            "Files decoded DCT-scaled whose score fell in [m, 1 - m] (m: decode.second_look_margin), "
            "then decoded in full and scored again",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "xray_watcher_queue_depth",
            "Files seen in the inbox and not yet given a row",
            registry=self.registry,
        )
        self.model_info = Gauge(
            "xray_watcher_model_info",
            "The model version being served (value 1)",
            ["version"],
            registry=self.registry,
        )
        self._model: str | None = None
        self._lock = threading.Lock()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ what the service calls

    def observe_batch(
        self,
        n_ok: int,
        n_failed: int,
        batch_s: float,
        infer_s_per_file: float,
        decode_s_list: Iterable[float],
        n_second_look: int = 0,
    ) -> None:
        """One finished batch: its file counts, its duration and the per-file timings."""
        if n_second_look:
            self.second_looks.inc(n_second_look)
        if n_ok:
            self.files.labels(status="ok").inc(n_ok)
        if n_failed:
            self.files.labels(status="failed").inc(n_failed)
        self.batch_seconds.observe(batch_s)
        for _ in range(n_ok):
            self.inference_seconds.observe(infer_s_per_file)
        for seconds in decode_s_list:
            self.decode_seconds.observe(seconds)

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def set_model(self, version: str) -> None:
        """Serve ``version`` from now on: its series is 1, the previous one is removed."""
        with self._lock:
            if version == self._model:
                return
            if self._model is not None:
                self.model_info.remove(self._model)
            self.model_info.labels(version=version).set(1)
            self._model = version

    # ------------------------------------------------------------ the HTTP endpoint

    def start(self, host: str, port: int) -> WSGIServer:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns the server."""
        if self._server is not None:
            raise RuntimeError("the metrics endpoint is already started")
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = server, thread
        return server

    @property
    def port(self) -> int | None:
        """The port served (useful after ``start(host, 0)``: a free one)."""
        return int(self._server.server_address[1]) if self._server is not None else None

    def stop(self) -> None:
        """Stop serving and free the port."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5)


def create(cfg: MetricsConfig, keep: Metrics | None = None) -> Metrics | NoMetrics:
    """``Metrics`` serving on ``cfg.host:cfg.port``, or ``NoMetrics`` when the port is 0.

    ``keep``: a stopped ``Metrics`` whose counts carry on (a reload that moves the endpoint:
    Prometheus would read counters back at 0 as a restart, and they would disagree with
    ``status``). Raises OSError when the port cannot be bound (in use, or not allowed).
    """
    if cfg.port == 0:
        return NoMetrics()
    metrics = keep if keep is not None else Metrics()
    metrics.start(cfg.host, cfg.port)
    return metrics
