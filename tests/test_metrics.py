"""Prometheus metrics: real HTTP scrapes of a real endpoint on a free port."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from watcher import metrics
from watcher.config import MetricsConfig


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert 200 == resp.status
        return str(resp.read().decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def served() -> Iterator[metrics.Metrics]:
    m = metrics.Metrics()
    m.start("127.0.0.1", 0)
    yield m
    m.stop()


class TestMetrics:
    def test_scrape_before_any_batch(self, served: metrics.Metrics) -> None:
        """Both file series exist at 0 from the start; no model series until one is set."""
        assert served.port
        got = samples(scrape(served.port))
        assert 0 == got[("xray_watcher_files_total", (("status", "ok"),))]
        assert 0 == got[("xray_watcher_files_total", (("status", "failed"),))]
        assert 0 == got[("xray_watcher_queue_depth", ())]
        assert 0 == got[("xray_watcher_second_looks_total", ())]
        assert 0 == got[("xray_watcher_batch_seconds_count", ())]
        assert not [k for k in got if k[0] == "xray_watcher_model_info"]

    def test_values_after_observations(self, served: metrics.Metrics) -> None:
        """Counts, histogram sums and buckets, and the queue gauge after three batches."""
        served.observe_batch(3, 1, 0.4, 0.02, [0.01, 0.01, 0.03, 0.2])
        served.observe_batch(4, 0, 0.6, 0.03, [0.01] * 4, n_second_look=2)
        served.observe_batch(0, 2, 0.05, 0.0, [0.001, 0.002])
        served.set_queue_depth(17)
        assert served.port
        got = samples(scrape(served.port))
        assert 7 == got[("xray_watcher_files_total", (("status", "ok"),))]
        assert 3 == got[("xray_watcher_files_total", (("status", "failed"),))]
        assert 3 == got[("xray_watcher_batch_seconds_count", ())]
        assert 1.05 == pytest.approx(got[("xray_watcher_batch_seconds_sum", ())])
        assert 2 == got[("xray_watcher_batch_seconds_bucket", (("le", "0.5"),))]
        assert 7 == got[("xray_watcher_inference_seconds_count", ())]
        assert 3 * 0.02 + 4 * 0.03 == pytest.approx(got[("xray_watcher_inference_seconds_sum", ())])
        assert 10 == got[("xray_watcher_decode_seconds_count", ())]
        assert 9 == got[("xray_watcher_decode_seconds_bucket", (("le", "0.05"),))]
        assert 17 == got[("xray_watcher_queue_depth", ())]
        assert 2 == got[("xray_watcher_second_looks_total", ())]

    def test_model_switch_clears_the_old_version(self, served: metrics.Metrics) -> None:
        """Only the version being served has a model_info series."""
        served.set_model("v0001")
        served.set_model("v0001")
        served.set_model("v0002")
        assert served.port
        got = samples(scrape(served.port))
        assert {("xray_watcher_model_info", (("version", "v0002"),)): 1.0} == {
            k: v for k, v in got.items() if k[0] == "xray_watcher_model_info"
        }

    def test_registries_are_separate(self, served: metrics.Metrics) -> None:
        """Two Metrics in one process do not share (or clash over) their series."""
        other = metrics.Metrics()
        other.observe_batch(5, 0, 0.1, 0.01, [])
        assert served.port
        assert 0 == samples(scrape(served.port))[("xray_watcher_files_total", (("status", "ok"),))]

    def test_stop_frees_the_port(self) -> None:
        """After stop() nothing answers on the port, and a new endpoint can take it (a restart)."""
        m = metrics.Metrics()
        m.start("127.0.0.1", 0)
        port = m.port
        assert port
        scrape(port)
        m.stop()
        assert None is m.port
        with pytest.raises(OSError):
            scrape(port)
        m.stop()  # a second stop does nothing
        again = metrics.Metrics()
        again.start("127.0.0.1", port)
        try:
            assert "xray_watcher_files_total" in scrape(port)
        finally:
            again.stop()

    def test_start_twice_refused(self, served: metrics.Metrics) -> None:
        """One endpoint per Metrics."""
        with pytest.raises(RuntimeError, match="already started"):
            served.start("127.0.0.1", 0)

    def test_port_in_use(self) -> None:
        """A port taken by another socket raises OSError (the service reports it)."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            with pytest.raises(OSError):
                metrics.create(MetricsConfig(port=sock.getsockname()[1], host="127.0.0.1"))


class TestCreate:
    def test_port_zero_is_a_no_op(self) -> None:
        """metrics.port 0: every method exists and does nothing; nothing listens."""
        m = metrics.create(MetricsConfig(port=0))
        assert isinstance(m, metrics.NoMetrics)
        m.observe_batch(1, 1, 0.1, 0.1, [0.1])
        m.set_queue_depth(3)
        m.set_model("v0001")
        m.stop()

    def test_port_set_serves(self) -> None:
        """A configured port serves /metrics at once."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        m = metrics.create(MetricsConfig(port=port, host="127.0.0.1"))
        try:
            assert isinstance(m, metrics.Metrics)
            m.set_model("v0007")
            assert 'xray_watcher_model_info{version="v0007"} 1.0' in scrape(port)
        finally:
            m.stop()
