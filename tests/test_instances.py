"""Several instances on one inbox: each file is claimed by exactly one of them."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

from tests.conftest import fixture_images
from tests.harness import (
    Daemon,
    check_exactly_once,
    leftovers,
    png_bytes,
    read_csv_both,
    run_once,
    sha,
    wait_for,
)
from watcher.config import Config, load_config
from watcher.inference import Predictor
from watcher.report import read_rows
from watcher.service import Service


class TestTwoInstances:
    def test_two_daemons_on_one_inbox_process_each_file_once(
        self, make_config: Callable[..., Config], tmp_path: Path
    ) -> None:
        """A native-observer and a polling daemon share an inbox: 300 files, each processed exactly once."""
        cfg_a = make_config(instance_id="host-a", ingest={"settle_ms": 100})
        assert cfg_a.source is not None
        raw = yaml.safe_load(cfg_a.source.read_text())
        raw["instance_id"] = "host-b"
        raw["ingest"] = {**raw["ingest"], "observer": "polling", "poll_interval_ms": 100, "settle_ms": 50}
        source_b = cfg_a.source.with_name("config-b.yaml")
        source_b.write_text(yaml.safe_dump(raw))
        cfg_b = load_config(source_b)

        stage = tmp_path / "stage"
        stage.mkdir()
        originals = {}
        for i in range(300):
            data = png_bytes(i) if i % 10 else b"not an image %d" % i
            (stage / f"f{i:03d}.png").write_bytes(data)
            originals[sha(data)] = data
        daemons = [Daemon(cfg_a), Daemon(cfg_b)]
        try:
            for d in daemons:
                wait_for(lambda d=d: bool(d.events("watching")), 120, "both daemons to watch")  # type: ignore[misc]
            paths = sorted(stage.iterdir())
            for k in range(0, len(paths), 20):  # 20 files every 50 ms
                for path in paths[k : k + 20]:
                    path.rename(cfg_a.inbox / path.name)
                time.sleep(0.05)
            wait_for(lambda: len(read_rows(cfg_a.results)) >= len(originals), 60, "a row for every file")
            time.sleep(1.0)  # a late duplicate would show up now
        finally:
            rcs = [d.stop() for d in daemons]
        assert [0, 0] == rcs
        rows = check_exactly_once(cfg_a, originals)
        per_instance = Counter(r["instance"] for r in rows)
        print(f"files per instance: {dict(per_instance)}")
        assert set(per_instance) <= {"host-a", "host-b"}
        for d in daemons:
            assert not d.events("decoder_crashed")


class TestSharedResultsFile:
    def test_an_instance_killed_mid_write_does_not_garble_the_others_rows(
        self, make_config: Callable[..., Config], tiny_store_template: Path
    ) -> None:
        """A dies mid-append to the shared results.csv while B runs: B cuts the torn line first."""
        cfg_a = make_config(
            instance_id="host-a", batch={"max_size": 4, "max_wait_ms": 100}, ingest={"settle_ms": 0}
        )
        assert cfg_a.source is not None
        raw = yaml.safe_load(cfg_a.source.read_text())
        raw["instance_id"], raw["inbox"] = "host-b", "inbox-b"  # its own inbox, the same results.csv
        (cfg_a.source.parent / "inbox-b").mkdir()
        source_b = cfg_a.source.with_name("config-b.yaml")
        source_b.write_text(yaml.safe_dump(raw))
        cfg_b = load_config(source_b)
        predictor = Predictor(tiny_store_template)
        originals = {}
        for i, img in enumerate(fixture_images()[:8]):
            data = img.read_bytes()
            (cfg_a.inbox if i < 4 else cfg_b.inbox).joinpath(img.name).write_bytes(data)
            originals[sha(data)] = data
        b = Service(cfg_b, predictor=predictor)
        ready = threading.Event()
        b_thread = threading.Thread(target=b.run, kwargs={"on_ready": ready.set})
        b_thread.start()
        try:
            assert ready.wait(30)
            wait_for(lambda: len(read_rows(cfg_b.results)) == 4, 30, "B's first rows")
            proc = run_once(cfg_a, env={"XRAY_WATCHER_CRASH_AT": "torn_write:1"})
            assert -signal.SIGKILL == proc.returncode, proc.stderr[-3000:]
            assert not cfg_a.results.read_bytes().endswith(b"\n")  # A left a torn line
            more = fixture_images()[8:10]
            for img in more:  # B appends after the torn line
                data = img.read_bytes()
                (cfg_b.inbox / img.name).write_bytes(data)
                originals[sha(data)] = data

            def b_rows() -> int:
                return sum(r["instance"] == "host-b" for r in read_rows(cfg_b.results))

            wait_for(lambda: 6 == b_rows(), 30, "B's rows after A died")
            rows = read_csv_both(cfg_b.results)  # before A restarts: B itself cut the torn line
            assert 6 == sum(r["instance"] == "host-b" for r in rows)
        finally:
            b.request_stop()
            b_thread.join(30)
        assert 0 == Service(cfg_a, predictor=predictor).run(once=True)  # A restarts and recovers
        check_exactly_once(cfg_a, originals)
        assert [] == leftovers(cfg_b)
