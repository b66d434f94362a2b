"""Configuration loading: types, unknown keys, missing folders, path resolution, exit code."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from watcher.config import Config, load_config
from watcher.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _layout(tmp_path: Path) -> None:
    for name in ("inbox", "processed", "failed", "model_store"):
        (tmp_path / name).mkdir(exist_ok=True)


BASE = "inbox: inbox\nprocessed: processed\nfailed: failed\nresults: results.csv\nmodel_store: model_store\n"


class TestLoadConfig:
    def test_shipped_config_loads(self) -> None:
        """The config.yaml in the repo works as shipped."""
        cfg = load_config(ROOT / "config.yaml")
        assert ROOT / "inbox" == cfg.inbox
        assert 32 == cfg.batch.max_size

    def test_relative_paths_resolve_against_config_folder(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Relative paths are relative to the file, not the working directory."""
        _layout(tmp_path)
        (tmp_path / "c.yaml").write_text(BASE)
        monkeypatch.chdir("/")
        cfg = load_config(tmp_path / "c.yaml")
        assert tmp_path / "inbox" == cfg.inbox
        assert tmp_path / "results.csv" == cfg.results

    def test_defaults_and_nested_values(self, tmp_path: Path) -> None:
        """Nested sections are typed; missing ones get defaults; extensions are normalised."""
        _layout(tmp_path)
        (tmp_path / "c.yaml").write_text(BASE + "batch: {max_size: 3}\ningest: {extensions: [PNG, .JPG]}\n")
        cfg = load_config(tmp_path / "c.yaml")
        assert 3 == cfg.batch.max_size
        assert 500 == cfg.batch.max_wait_ms
        assert (".png", ".jpg") == cfg.ingest.extensions

    @pytest.mark.parametrize(
        ("extra", "key"),
        [
            ("colour: blue\n", "colour"),
            ("batch: {max_size: 4, maxsize: 3}\n", "batch.maxsize"),
            ("batch: {max_size: big}\n", "batch.max_size"),
            ("batch: {max_size: 0}\n", "batch.max_size"),
            ("batch: {max_wait_ms: 1.5}\n", "batch.max_wait_ms"),
            ("batch: 16\n", "batch"),
            ("ingest: {observer: magic}\n", "ingest.observer"),
            ("ingest: {extensions: .png}\n", "ingest.extensions"),
            ("decode: {workers: true}\n", "decode.workers"),
        ],
    )
    def test_bad_keys_name_the_key(self, tmp_path: Path, extra: str, key: str) -> None:
        """Unknown keys and wrong types give one error naming the dotted key."""
        _layout(tmp_path)
        (tmp_path / "c.yaml").write_text(BASE + extra)
        with pytest.raises(ConfigError, match=f"'{key}'"):
            load_config(tmp_path / "c.yaml")

    @pytest.mark.parametrize("key", ["inbox", "processed", "failed", "model_store"])
    def test_missing_folder_names_the_key(self, tmp_path: Path, key: str) -> None:
        """A folder that does not exist is an error naming its key."""
        _layout(tmp_path)
        (tmp_path / key).rmdir()
        (tmp_path / "c.yaml").write_text(BASE)
        with pytest.raises(ConfigError, match=f"key '{key}' names a folder that does not exist"):
            load_config(tmp_path / "c.yaml")

    def test_missing_required_key(self, tmp_path: Path) -> None:
        """A required key that is absent is named."""
        _layout(tmp_path)
        (tmp_path / "c.yaml").write_text(BASE.replace("results: results.csv\n", ""))
        with pytest.raises(ConfigError, match="'results' is missing"):
            load_config(tmp_path / "c.yaml")

    def test_processed_inside_inbox_is_refused(self, tmp_path: Path) -> None:
        """Outputs inside the inbox would be picked up again."""
        _layout(tmp_path)
        (tmp_path / "inbox" / "out").mkdir()
        (tmp_path / "c.yaml").write_text(BASE.replace("processed: processed", "processed: inbox/out"))
        with pytest.raises(ConfigError, match="'processed' must not be inside the inbox"):
            load_config(tmp_path / "c.yaml")

    @pytest.mark.parametrize(
        ("old", "new", "key"),
        [
            ("failed: failed", "failed: inbox/.out", "failed"),
            ("results: results.csv", "results: inbox/results.csv", "results"),
            ("results: results.csv", "results: inbox/.out/results.csv", "results"),
            ("results: results.csv", "results: inbox/sub/../results.csv", "results"),
            (
                "model_store: model_store",
                "model_store: model_store\nreview: {page: inbox/review.html}",
                "review.page",
            ),
            (
                "model_store: model_store",
                "model_store: model_store\nreview: {page: {inbox}/.r/p.html}",
                "review.page",
            ),
            (
                "model_store: model_store",
                "model_store: model_store\nexplain: {enabled: true, folder: inbox/heatmaps}",
                "explain.folder",
            ),
            (
                "model_store: model_store",
                "model_store: model_store\nexplain: {enabled: true, folder: inbox/.heatmaps}",
                "explain.folder",
            ),
            (
                "model_store: model_store",
                "model_store: model_store\nexplain: {enabled: true, folder: '{inbox}'}",
                "explain.folder",
            ),
            (
                "model_store: model_store",
                "model_store: model_store\nexplain: {enabled: true, folder: link/heatmaps}",
                "explain.folder",
            ),
        ],
    )
    def test_outputs_inside_inbox_are_refused(self, tmp_path: Path, old: str, new: str, key: str) -> None:
        """Anything the daemon writes inside the inbox (hidden folders too, or reached through a
        link) would be picked up again: heat maps, results, the review page, failed files."""
        _layout(tmp_path)
        (tmp_path / "inbox" / ".out").mkdir()
        (tmp_path / "inbox" / "sub").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "inbox")
        text = BASE.replace(old, new.replace("{inbox}", str(tmp_path / "inbox")))
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ConfigError, match=f"key '{key}' must not be inside the inbox") as info:
            load_config(tmp_path / "c.yaml")
        assert "taken again" in str(info.value)

    def test_heatmaps_inside_inbox_allowed_when_explain_is_off(self, tmp_path: Path) -> None:
        """With explain off nothing is written to explain.folder, so its place does not matter."""
        _layout(tmp_path)
        (tmp_path / "c.yaml").write_text(BASE + "explain: {enabled: false, folder: inbox/heatmaps}\n")
        cfg = load_config(tmp_path / "c.yaml")
        assert tmp_path / "inbox" / "heatmaps" == cfg.explain.folder

    def test_outputs_beside_inbox_sharing_its_prefix_are_allowed(self, tmp_path: Path) -> None:
        """Paths are compared by parts: /x/in and /x/inbox2/... are different folders."""
        for name in ("in", "inbox2", "inbox2/processed", "inbox2/failed", "model_store"):
            (tmp_path / name).mkdir()
        (tmp_path / "c.yaml").write_text(
            "inbox: in\nprocessed: inbox2/processed\nfailed: inbox2/failed\nresults: inbox2/results.csv\n"
            "model_store: model_store\nexplain: {enabled: true, folder: inbox2/heatmaps}\n"
            f"review: {{page: {tmp_path / 'in2.html'}}}\n"
        )
        cfg = load_config(tmp_path / "c.yaml")
        assert tmp_path / "inbox2" / "heatmaps" == cfg.explain.folder
        assert tmp_path / "inbox2" / "results.csv" == cfg.results
        assert tmp_path / "in2.html" == cfg.review_page

    def test_default_heatmap_folder_resolves_against_config_folder(self, tmp_path: Path) -> None:
        """explain.folder left out is heatmaps/ beside the config file, outside the inbox: it loads."""
        _layout(tmp_path)
        (tmp_path / "c.yaml").write_text(BASE + "explain: {enabled: true}\n")
        assert tmp_path / "heatmaps" == load_config(tmp_path / "c.yaml").explain.folder

    def test_not_yaml(self, tmp_path: Path) -> None:
        """Broken YAML is a ConfigError, not a traceback."""
        (tmp_path / "c.yaml").write_text("inbox: [unclosed\n")
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_config(tmp_path / "c.yaml")

    def test_not_utf8_names_the_line(self, tmp_path: Path) -> None:
        """A comment saved in Latin-1 raised UnicodeDecodeError (a traceback, and a dead daemon
        on SIGHUP); now a ConfigError naming the line."""
        _layout(tmp_path)
        (tmp_path / "c.yaml").write_bytes(BASE.encode() + b"# Radiolog\xeda\n")
        with pytest.raises(ConfigError, match=r"line \d+ is not UTF-8 text \(byte 0xed\)"):
            load_config(tmp_path / "c.yaml")

    def test_nul_in_a_value_names_the_key(self, tmp_path: Path) -> None:
        """A NUL in a path raised ValueError from the path code; now a ConfigError naming the key."""
        _layout(tmp_path)
        (tmp_path / "c.yaml").write_text(BASE + 'explain: {enabled: true, folder: "heat\\0maps"}\n')
        with pytest.raises(ConfigError, match=r"key 'explain\.folder' holds a NUL character"):
            load_config(tmp_path / "c.yaml")

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing config file is a ConfigError."""
        with pytest.raises(ConfigError, match="cannot read config file"):
            load_config(tmp_path / "nope.yaml")

    def test_instance_defaults_to_hostname(self, make_config: Callable[..., Config]) -> None:
        """An empty instance_id becomes the host name."""
        import socket

        cfg = make_config(instance_id="")
        assert socket.gethostname() == cfg.instance_id


class TestCliExitCode:
    def test_bad_config_exits_2_naming_the_key(self, tmp_path: Path) -> None:
        """`xray-watcher run` with a bad config exits 2 with one clear message."""
        _layout(tmp_path)
        (tmp_path / "c.yaml").write_text(BASE + "batch: {max_size: -1}\n")
        proc = subprocess.run(
            [sys.executable, "-m", "watcher", "run", "--config", str(tmp_path / "c.yaml")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert 2 == proc.returncode
        assert "batch.max_size" in proc.stderr
        assert "Traceback" not in proc.stderr
