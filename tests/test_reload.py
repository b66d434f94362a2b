"""A model swapped between decoding and inference: files decoded for the old model's input size
are decoded again for the new one (the service keeps no full-size image to redo it from)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np

from tests.conftest import fixture_images
from watcher import model_store
from watcher.config import Config
from watcher.imaging import PreprocessSpec
from watcher.inference import Predictor
from watcher.report import read_rows
from watcher.service import Item, Service, load_item


def publish_sized(store: Path, side: int) -> str:
    """Publish a tiny real Keras model whose input is ``side`` x ``side`` and make it current."""
    import keras

    inputs = keras.Input((side, side, 1))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    out = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inputs, out)
    model.layers[-1].set_weights([np.array([[20.0]], dtype="float32"), np.array([-10.0], dtype="float32")])
    build = model_store.new_build_dir(store)
    model.save(build / model_store.MODEL_FILE)
    meta = {
        "architecture": "tiny-test",
        "preprocessing": PreprocessSpec(height=side, width=side).to_dict(),
        "threshold": 0.5,
        "temperature": 1.0,
        "class_names": ["NORMAL", "PNEUMONIA"],
    }
    (build / model_store.METADATA_FILE).write_text(json.dumps(meta))

    def stamp(version: str) -> None:
        (build / model_store.METADATA_FILE).write_text(json.dumps({**meta, "version": version}))

    version = model_store.publish(store, build, stamp)
    model_store.set_current(store, version, reason="test")
    return version


class TestSwapBetweenDecodeAndInference:
    def test_items_decoded_for_the_old_model_are_decoded_again(
        self, make_config: Callable[..., Config]
    ) -> None:
        """Decoded at 32x32, scored by a 16x16 model: decoded again from the claimed file, rows ok."""
        cfg = make_config()
        old = Predictor(cfg.model_store)
        new_version = publish_sized(cfg.model_store, 16)
        new = Predictor(cfg.model_store, new_version)
        svc = Service(cfg, predictor=old)
        svc.results.open()
        claim = cfg.work_dir / "claimed" / "c1"
        claim.mkdir(parents=True)
        items = []
        for img in fixture_images()[:3]:
            shutil.copy(img, claim / img.name)
            item = Item(rel=PurePosixPath(img.name), path=claim / img.name, claim_dir=claim)
            load_item(item, old.spec, max_pixels=10**8, max_bytes=1 << 30)
            assert item.model_input is not None and (32, 32, 1) == item.model_input.shape
            items.append(item)
        svc.predictor = new  # what _maybe_reload does when a new version is promoted
        svc._report(svc._infer(items))  # stages 2 and 3, in this thread
        rows = [dict(r) for r in read_rows(cfg.results)]
        assert [new_version] * 3 == [r["model_version"] for r in rows]
        assert ["ok"] * 3 == [r["status"] for r in rows], [r["error"] for r in rows]
        assert {("224", "224")} == {(r["width"], r["height"]) for r in rows}
        assert all(Path(r["destination"]).is_file() for r in rows)
        assert not claim.exists()


class TestConfigReload:
    def test_sighup_rereads_config_live_keys_change_others_wait_bad_config_kept(
        self, make_config: Callable[..., Config]
    ) -> None:
        """SIGHUP: batch size and log level change live, instance_id is named as needing a restart,
        a broken config.yaml keeps the running one with one error event; files keep flowing."""
        import signal

        import yaml

        from tests.harness import Daemon, png_bytes, wait_for

        cfg = make_config(ingest={"settle_ms": 100})
        assert cfg.source is not None
        raw = yaml.safe_load(cfg.source.read_text())
        d = Daemon(cfg)
        try:
            wait_for(lambda: bool(d.events("watching")), 120, "the daemon to watch")
            raw["batch"]["max_size"] = 7
            raw["log"]["level"] = "debug"
            raw["instance_id"] = "another"
            cfg.source.write_text(yaml.safe_dump(raw))
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: bool(d.events("config_reloaded")), 30, "config_reloaded")
            (event,) = d.events("config_reloaded")
            assert ["batch.max_size", "log.level"] == event["changed"]
            assert ["instance_id"] == event["needs_restart"]
            assert "warning" == event["level"]  # a change waiting for a restart is worth a look
            cfg.source.write_text("batch: [not, a, mapping\n")
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: bool(d.events("config_reload_failed")), 30, "config_reload_failed")
            (cfg.inbox / "after.png").write_bytes(png_bytes(5))
            wait_for(lambda: bool(d.events("batch_done")), 30, "a batch after the failed reload")
        finally:
            assert 0 == d.stop()
        assert d.proc.returncode == 0
        assert any(e.get("level") == "debug" for e in d.lines), "log.level: debug did not apply"

    def test_metrics_moved_by_sighup_keep_their_counts(self, make_config: Callable[..., Config]) -> None:
        """metrics.port changed and SIGHUP: the endpoint moves and its counters carry on (they
        restarted at 0, which Prometheus reads as a daemon restart and `status` contradicts)."""
        import signal
        import socket

        import yaml

        from tests.harness import Daemon, png_bytes, wait_for
        from tests.test_metrics import samples, scrape

        def free_port() -> int:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                return int(sock.getsockname()[1])

        first, second = free_port(), free_port()
        cfg = make_config(ingest={"settle_ms": 100}, metrics={"port": first, "host": "127.0.0.1"})
        assert cfg.source is not None
        ok = ("xray_watcher_files_total", (("status", "ok"),))
        d = Daemon(cfg)
        try:
            wait_for(lambda: bool(d.events("watching")), 120, "the daemon to watch")
            (cfg.inbox / "a.png").write_bytes(png_bytes(3))
            wait_for(lambda: bool(d.events("batch_done")), 60, "the first batch")
            assert 1.0 == samples(scrape(first))[ok]
            raw = yaml.safe_load(cfg.source.read_text())
            raw["metrics"]["port"] = second
            cfg.source.write_text(yaml.safe_dump(raw))
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: bool(d.events("config_reloaded")), 30, "config_reloaded")
            assert 1.0 == samples(scrape(second))[ok]
        finally:
            assert 0 == d.stop()

    def test_a_config_no_parser_takes_keeps_the_running_one(self, make_config: Callable[..., Config]) -> None:
        """SIGHUP with a config.yaml that is not UTF-8 (a comment saved in Latin-1) or holds a NUL
        in a path killed the daemon with a traceback (and every restart after). Now each is one
        config_reload_failed event, files keep flowing; a listener key is named for the listener."""
        import signal

        import yaml

        from tests.harness import Daemon, png_bytes, wait_for

        cfg = make_config(ingest={"settle_ms": 100})
        assert cfg.source is not None
        good = cfg.source.read_bytes()
        d = Daemon(cfg)
        try:
            wait_for(lambda: bool(d.events("watching")), 120, "the daemon to watch")
            cfg.source.write_bytes(good + b"# Radiolog\xeda\n")
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: len(d.events("config_reload_failed")) == 1, 30, "config_reload_failed")
            assert "is not UTF-8 text (byte 0xed)" in str(d.events("config_reload_failed")[0]["error"])
            raw = yaml.safe_load(good)
            raw["explain"] = {"folder": "heat\0maps"}
            cfg.source.write_text(yaml.safe_dump(raw))
            d.proc.send_signal(signal.SIGHUP)
            wait_for(
                lambda: len(d.events("config_reload_failed")) == 2, 30, "the second config_reload_failed"
            )
            assert "key 'explain.folder' holds a NUL character" in str(
                d.events("config_reload_failed")[1]["error"]
            )
            raw = yaml.safe_load(good)
            raw["listener"] = {"port": 11199}
            cfg.source.write_text(yaml.safe_dump(raw))
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: bool(d.events("config_reloaded")), 30, "config_reloaded")
            (event,) = d.events("config_reloaded")
            assert ([], [], ["listener.port"]) == (
                event["needs_restart"],
                event["changed"],
                event["for_the_listener"],
            )
            assert "info" == event["level"]
            (cfg.inbox / "after.png").write_bytes(png_bytes(5))
            wait_for(lambda: bool(d.events("batch_done")), 30, "a batch after the failed reloads")
        finally:
            assert 0 == d.stop()

    def test_a_metrics_port_in_use_keeps_the_endpoint_and_is_tried_again(
        self, make_config: Callable[..., Config]
    ) -> None:
        """The new metrics.port is taken: the old endpoint went away for good, and a later SIGHUP
        (the port freed) retried nothing. Now the old one keeps serving, the key is reported as
        failed, and the next SIGHUP moves the endpoint."""
        import signal
        import socket

        import yaml

        from tests.harness import Daemon, wait_for
        from tests.test_metrics import scrape

        def free_port() -> int:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                return int(sock.getsockname()[1])

        first, second = free_port(), free_port()
        cfg = make_config(metrics={"port": first, "host": "127.0.0.1"})
        assert cfg.source is not None
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", second))
        blocker.listen()
        d = Daemon(cfg)
        try:
            wait_for(lambda: bool(d.events("watching")), 120, "the daemon to watch")
            raw = yaml.safe_load(cfg.source.read_text())
            raw["metrics"]["port"] = second
            cfg.source.write_text(yaml.safe_dump(raw))
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: bool(d.events("config_reloaded")), 30, "config_reloaded")
            (event,) = d.events("config_reloaded")
            assert ([], ["metrics.port"]) == (event["changed"], event["failed"])
            assert d.events("metrics_restart_failed")
            assert "xray_watcher_files_total" in scrape(first)
            blocker.close()
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: len(d.events("config_reloaded")) == 2, 30, "the second config_reloaded")
            assert ["metrics.port"] == d.events("config_reloaded")[1]["changed"]
            assert "xray_watcher_files_total" in scrape(second)
        finally:
            blocker.close()
            assert 0 == d.stop()

    def test_status_with_an_edited_instance_id_finds_the_running_daemon(
        self, make_config: Callable[..., Config]
    ) -> None:
        """instance_id edited (it waits for a restart) and SIGHUP: `status` with the edited file
        looked in the new instance's folder and said "not running" (exit 1) while the daemon
        scored files. The daemon leaves word there; status reports it, with the pending restart."""
        import signal

        import yaml

        from tests.harness import Daemon, wait_for
        from watcher import status
        from watcher.config import load_config

        cfg = make_config()
        assert cfg.source is not None
        d = Daemon(cfg)
        try:
            wait_for(lambda: bool(d.events("watching")), 120, "the daemon to watch")
            wait_for(lambda: bool(status.check(cfg)["healthy"]), 30, "healthy")
            raw = yaml.safe_load(cfg.source.read_text())
            raw["instance_id"] = "renamed"
            cfg.source.write_text(yaml.safe_dump(raw))
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: bool(d.events("config_reloaded")), 30, "config_reloaded")
            edited = load_config(cfg.source)
            report = status.check(edited)
            assert (True, True) == (report["running"], report["healthy"]), report["summary"]
            assert "restart pending (instance_id changed" in report["summary"]
            assert d.proc.pid == report["state"]["pid"]
        finally:
            assert 0 == d.stop()
        assert not status.check(edited)["running"]  # the daemon is gone: its word no longer holds
