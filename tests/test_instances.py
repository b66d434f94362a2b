"""Several instances on one inbox: each file is claimed by exactly one of them."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

from tests.harness import check_exactly_once, png_bytes, sha, wait_for
from tests.test_service import Daemon
from watcher.config import Config, load_config
from watcher.report import read_rows


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
