"""The command line as a user runs it: real subprocesses, real files, a tiny real model."""

from __future__ import annotations

import csv
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import pytest
import yaml

from tests.conftest import FULLRES, TRAIN_FIXTURES, fixture_images, publish_tiny

SHIPPED_STORE = Path(__file__).parents[1] / "model_store"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watcher", *args], capture_output=True, text=True, timeout=180, cwd=cwd
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "store"
    path.mkdir()
    publish_tiny(path, threshold=0.5)
    publish_tiny(path, bias=-8.0, threshold=0.6)
    return path


class TestCheck:
    def test_says_whether_run_can_serve_the_stored_graph(self, tmp_path: Path) -> None:
        """check loads the config and the current version, and says whether `run` will serve
        the version's model.onnx (no TensorFlow) or convert model.keras, and why."""
        import shutil

        store = tmp_path / "model_store"
        shutil.copytree(
            Path(__file__).parents[1] / "model_store", store, ignore=shutil.ignore_patterns("*.png")
        )
        for name in ("inbox", "processed", "failed"):
            (tmp_path / name).mkdir()
        config = tmp_path / "config.yaml"
        config.write_text(
            "inbox: inbox\nprocessed: processed\nfailed: failed\nresults: results.csv\n"
            f"model_store: {store}\nlog: {{format: json}}\nexplain: {{enabled: true}}\n"
        )

        def check_event() -> tuple[str, bool]:
            [(rc, out, err)], tensorflow_loaded = cli_in_one_process(["check", "--config", str(config)])
            assert 0 == rc, err[-2000:]
            (event,) = [json.loads(line) for line in out.splitlines() if '"check_ok"' in line]
            return event["onnx_graph"], tensorflow_loaded

        graph, tensorflow_loaded = check_event()
        assert graph.startswith("usable") and not tensorflow_loaded  # loaded as run loads it
        version = (store / "CURRENT").read_text().strip()
        (store / version / "model.onnx").unlink()
        graph, tensorflow_loaded = check_event()
        assert f"not used ({version} has no model.onnx): run converts" in graph and tensorflow_loaded


class TestPredict:
    def test_prints_csv_rows_and_moves_nothing(self, store: Path, tmp_path: Path) -> None:
        """predict writes one CSV row per file to stdout (logs elsewhere) and leaves files alone."""
        good = fixture_images()[0]
        bad = tmp_path / "bad, name.jpg"
        bad.write_bytes(b"not an image at all")
        proc = cli("predict", "--store", str(store), str(good), str(bad))
        assert 1 == proc.returncode  # one file failed
        rows = list(csv.DictReader(io.StringIO(proc.stdout)))
        assert [str(good), str(bad)] == [r["file"] for r in rows]
        assert ["ok", "failed"] == [r["status"] for r in rows]
        assert "v0002" == rows[0]["model_version"]
        assert 0.0 <= float(rows[0]["probability"]) <= 1.0
        assert "the file is text, not an image" in rows[1]["error"]
        assert good.exists() and bad.exists()

    def test_heatmaps_written_beside_the_rows(self, tmp_path: Path) -> None:
        """predict --heatmaps DIR with the shipped model writes one decodable overlay per scored file."""
        repo_store = Path(__file__).parents[1] / "model_store"
        files = [FULLRES[0], fixture_images()[-1]]
        out = tmp_path / "maps"
        proc = cli("predict", "--store", str(repo_store), "--heatmaps", str(out), *map(str, files))
        assert 0 == proc.returncode, proc.stderr[-2000:]
        rows = list(csv.DictReader(io.StringIO(proc.stdout)))
        written = sorted(out.rglob("*.png"))
        assert sorted(out / r["label"] / (Path(r["file"]).name + ".png") for r in rows) == written
        for png in written:
            assert cv2.imread(str(png), cv2.IMREAD_COLOR) is not None

    def test_serves_the_versions_graph_without_tensorflow(self, store: Path, tmp_path: Path) -> None:
        """predict answers from the version's model.onnx as the daemon does, heat maps from the
        same pass, TensorFlow never imported; with the graph gone it converts model.keras (and
        says why) and gives the same rows."""
        mine = tmp_path / "store"  # the shipped model: its head lets ONNX Runtime give the maps
        shutil.copytree(SHIPPED_STORE, mine, ignore=shutil.ignore_patterns("*.png"))
        files = [str(p) for p in fixture_images()[:4]]

        def predict(maps: Path) -> tuple[list[dict[str, str]], str, bool]:
            argv = ["predict", "--store", str(mine), "--heatmaps", str(maps), *files]
            [(rc, out, err)], tensorflow_loaded = cli_in_one_process(argv)
            assert 0 == rc, err[-2000:]
            assert sorted(
                maps / r["label"] / (Path(r["file"]).name + ".png") for r in csv.DictReader(io.StringIO(out))
            ) == sorted(maps.rglob("*.png"))
            return list(csv.DictReader(io.StringIO(out))), err, tensorflow_loaded

        stored, err, tensorflow_loaded = predict(tmp_path / "maps")
        assert not tensorflow_loaded
        assert "onnx_graph_unused" not in err
        version = mine / (mine / "CURRENT").read_text().strip()
        (version / "model.onnx").unlink()
        converted, err, tensorflow_loaded = predict(tmp_path / "maps2")
        assert tensorflow_loaded
        assert "onnx_graph_unused" in err and "has no model.onnx" in err
        assert [(r["file"], r["sha256"], r["label"]) for r in stored] == [
            (r["file"], r["sha256"], r["label"]) for r in converted
        ]
        for a, b in zip(stored, converted, strict=True):
            assert float(a["probability"]) == pytest.approx(float(b["probability"]), abs=1e-5)

    def test_heatmaps_of_a_model_without_convolution_refused_in_one_line(
        self, store: Path, tmp_path: Path
    ) -> None:
        """--heatmaps with a version Grad-CAM cannot explain: exit 1 and why, before any row."""
        proc = cli(
            "predict", "--store", str(store), "--heatmaps", str(tmp_path / "maps"), str(fixture_images()[0])
        )
        assert 1 == proc.returncode
        assert "" == proc.stdout
        assert "cannot explain" in proc.stderr and "no 2-D convolutional layer" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "maps").exists()


class TestModels:
    def test_list_promote_rollback(self, store: Path, tmp_path: Path) -> None:
        """models list marks the current version; promote and rollback move the pointer."""
        import shutil

        mine = tmp_path / "store"
        shutil.copytree(store, mine)
        listing = cli("models", "--store", str(mine), "list")
        assert 0 == listing.returncode, listing.stderr
        assert "* v0002" in listing.stdout
        assert "v0001" in listing.stdout
        assert "v0001" == cli("models", "--store", str(mine), "rollback").stdout.strip()
        assert "v0001" == (mine / "CURRENT").read_text().strip()
        assert 0 == cli("models", "--store", str(mine), "promote", "v0002").returncode
        assert "v0002" == (mine / "CURRENT").read_text().strip()
        bad = cli("models", "--store", str(mine), "promote", "v0099")
        assert 1 == bad.returncode
        assert "no published version" in bad.stderr

    def test_store_and_config_also_after_the_action(self, store: Path, tmp_path: Path) -> None:
        """`models promote V --config FILE` as an operator types it: the options after the
        action count, and override those before it."""
        import shutil

        mine = tmp_path / "store"
        shutil.copytree(store, mine)
        config = tmp_path / "config.yaml"
        for name in ("inbox", "processed", "failed"):
            (tmp_path / name).mkdir()
        settings = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())
        config.write_text(yaml.safe_dump({**settings, "model_store": str(mine)}))
        assert "v0001" == cli("models", "rollback", "--config", str(config)).stdout.strip()
        assert "v0001" == (mine / "CURRENT").read_text().strip()
        promoted = cli(
            "models", "--store", str(tmp_path / "elsewhere"), "promote", "v0002", "--store", str(mine)
        )
        assert 0 == promoted.returncode, promoted.stderr
        assert "v0002" == (mine / "CURRENT").read_text().strip()
        assert "* v0002" in cli("models", "list", "--store", str(mine)).stdout
        missing = cli("models", "list", "--store", str(tmp_path / "nowhere"))
        assert (1, "") == (missing.returncode, missing.stdout)
        assert f"xray-watcher: error: model store {tmp_path / 'nowhere'} is not a folder\n" in missing.stderr

    def test_import_publishes_a_version_trained_elsewhere(self, store: Path, tmp_path: Path) -> None:
        """models import copies a version folder from another store as the next version, records
        where it came from, promotes only when asked, and refuses a folder that is not a model."""
        import hashlib
        import shutil

        mine, other = tmp_path / "store", tmp_path / "other"
        shutil.copytree(store, mine)
        shutil.copytree(store, other)
        source = other / "v0001"
        before = sorted(p.name for p in mine.iterdir())
        proc = cli("models", "--store", str(mine), "import", str(source))
        assert 0 == proc.returncode, proc.stderr
        assert "v0003" == proc.stdout.strip()
        assert "v0002" == (mine / "CURRENT").read_text().strip()  # not promoted
        broken = tmp_path / "broken"
        shutil.copytree(source, broken)
        (broken / "model.keras").write_bytes(b"not a model")
        empty = tmp_path / "empty"
        empty.mkdir()
        (promoted, predicted, *refused), _ = cli_in_one_process(
            ["models", "--store", str(mine), "import", str(source), "--promote"],
            ["predict", "--store", str(mine), str(fixture_images()[0])],
            ["models", "--store", str(mine), "import", str(broken)],
            ["models", "--store", str(mine), "import", str(empty)],
        )
        meta = json.loads((mine / "v0003" / "metadata.json").read_text())
        assert "v0003" == meta["version"]
        sha = hashlib.sha256((source / "model.keras").read_bytes()).hexdigest()
        assert {"path": str(source.resolve()), "version": "v0001", "model_sha256": sha} == meta[
            "imported_from"
        ]
        assert (source / "model.keras").read_bytes() == (mine / "v0003" / "model.keras").read_bytes()
        graph = json.loads((mine / "v0003" / "model.onnx.json").read_text())  # exported at import
        assert sha == graph["source_sha256"]
        assert "v0004" == promoted[1].strip() == (mine / "CURRENT").read_text().strip()
        assert 0 == predicted[0] and ",v0004," in predicted[1], predicted[2]
        (rc, _, err), (rc_empty, _, err_empty) = refused
        assert 1 == rc and "model.keras is damaged or not a .keras file" in err
        assert 1 == rc_empty and "not a model version" in err_empty
        after = sorted(p.name for p in mine.iterdir())
        assert sorted([*before, "v0003", "v0004"]) == after  # no build folder left behind

    def test_promote_refuses_a_version_that_does_not_load(self, store: Path, tmp_path: Path) -> None:
        """promote loads the version as `run` would first: one that cannot serve (a copy of
        v0001 with threshold 1.5) is refused with exit 1 and why, CURRENT and history.jsonl
        untouched; --force promotes it all the same."""
        mine = tmp_path / "store"
        shutil.copytree(store, mine)
        shutil.copytree(mine / "v0001", mine / "v0003")
        meta_path = mine / "v0003" / "metadata.json"
        meta_path.write_text(
            json.dumps({**json.loads(meta_path.read_text()), "version": "v0003", "threshold": 1.5})
        )
        history = (mine / "history.jsonl").read_bytes()
        [refused], _ = cli_in_one_process(["models", "--store", str(mine), "promote", "v0003"])
        assert 1 == refused[0], refused
        last = refused[2].strip().splitlines()[-1]
        assert last.startswith("xray-watcher: error: v0003 not made current: it does not load")
        assert "threshold 1.5" in last and "--force" in last
        assert "v0002" == (mine / "CURRENT").read_text().strip()
        assert history == (mine / "history.jsonl").read_bytes()
        [forced], _ = cli_in_one_process(["models", "--store", str(mine), "promote", "v0003", "--force"])
        assert (0, "v0003\n") == forced[:2], forced
        assert "v0003" == (mine / "CURRENT").read_text().strip()
        assert history == (mine / "history.jsonl").read_bytes()[: len(history)]
        assert 1 == len((mine / "history.jsonl").read_bytes()[len(history) :].splitlines())  # --force's

    def test_promote_of_the_current_version_is_a_no_op(self, store: Path, tmp_path: Path) -> None:
        """Promoting what is current records nothing: the next rollback really goes back."""
        mine = tmp_path / "store"
        shutil.copytree(store, mine)
        history = (mine / "history.jsonl").read_bytes()
        (promoted, rolled_back), _ = cli_in_one_process(
            ["models", "--store", str(mine), "promote", "v0002"], ["models", "--store", str(mine), "rollback"]
        )
        assert (0, "v0002\n") == promoted[:2] and "model_already_current" in promoted[2]
        assert (0, "v0001\n") == rolled_back[:2], rolled_back
        assert "v0001" == (mine / "CURRENT").read_text().strip()
        assert history == (mine / "history.jsonl").read_bytes()[: len(history)]

    def test_list_shows_a_version_with_a_null_threshold_as_unreadable(
        self, store: Path, tmp_path: Path
    ) -> None:
        """models list with a metadata.json whose threshold is null, or whose validation is not
        an object: that row says so (or "-"), the others print, exit 0."""
        mine = tmp_path / "store"
        shutil.copytree(store, mine)
        for version, change in (("v0001", {"threshold": None}), ("v0002", {"validation": "n/a"})):
            path = mine / version / "metadata.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
        listing = cli("models", "--store", str(mine), "list")
        assert 0 == listing.returncode, listing.stderr
        rows = listing.stdout.splitlines()[1:]
        assert "  v0001    unreadable: threshold null is not a number" == rows[0]
        assert rows[1].startswith("* v0002    tiny-test") and ["-"] * 4 + ["0.600"] == rows[1].split()[-5:]

    def test_os_errors_are_one_line(self, store: Path, tmp_path: Path) -> None:
        """An OSError (a read-only store, a full disk; here history.jsonl made a folder) ends
        promote and rollback with one line and exit 1, not a traceback."""
        mine = tmp_path / "store"
        shutil.copytree(store, mine)
        (mine / "history.jsonl").unlink()
        (mine / "history.jsonl").mkdir()
        for action in (["promote", "v0001"], ["rollback"]):
            proc = cli("models", "--store", str(mine), *action)
            assert 1 == proc.returncode, proc.stderr
            assert "Traceback" not in proc.stderr
            assert (
                f"xray-watcher: error: [Errno 21] Is a directory: '{mine / 'history.jsonl'}'"
                == (proc.stderr.strip().splitlines()[-1])
            )
        assert "v0002" == (mine / "CURRENT").read_text().strip()

    @staticmethod
    def _import_signalled(
        store: Path, tmp_path: Path, sig: signal.Signals, disposition: Any
    ) -> tuple[subprocess.Popen[str], str, str, Path]:
        """`models import` into a copy of ``store``, ``sig`` sent once its hidden build folder is
        there; the child starts with ``disposition`` for ``sig`` (as a shell or nohup leaves it)."""
        mine = tmp_path / "store"
        shutil.copytree(store, mine)
        argv = [
            sys.executable,
            "-m",
            "watcher",
            "models",
            "--store",
            str(mine),
            "import",
            str(store / "v0001"),
        ]
        with subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(sig, disposition),
        ) as proc:
            deadline = time.monotonic() + 60
            while not list(mine.glob(".build-*")):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "no build folder within 60 s"
                time.sleep(0.01)
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=120)
        return proc, out, err, mine

    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
    def test_import_stopped_by_a_signal_leaves_no_build_folder(
        self, store: Path, tmp_path: Path, sig: signal.Signals
    ) -> None:
        """`models import` ended by SIGTERM (timeout, systemd) or SIGHUP (a dropped ssh session)
        while its hidden build folder is in the store removes that folder and exits 128 + N.
        (The signal's default disposition in the child: a suite run under nohup passes SIGHUP on
        ignored.)"""
        proc, _, err, mine = self._import_signalled(store, tmp_path, sig, signal.SIG_DFL)
        assert 128 + sig == proc.returncode, err[-2000:]
        assert [] == list(mine.glob(".build-*"))
        assert ["v0001", "v0002"] == sorted(p.name for p in mine.glob("v*"))

    def test_import_under_nohup_survives_a_hang_up(self, store: Path, tmp_path: Path) -> None:
        """A hang-up the caller ignores (`nohup xray-watcher train ...`) stays ignored: the
        command goes on and publishes."""
        proc, out, err, mine = self._import_signalled(store, tmp_path, signal.SIGHUP, signal.SIG_IGN)
        assert 0 == proc.returncode, err[-2000:]
        assert "v0003" == out.strip()
        assert ["v0001", "v0002", "v0003"] == sorted(p.name for p in mine.glob("v*"))


IN_ONE_PROCESS = """
import contextlib, io, json, sys
from watcher.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    out.append([rc, stdout.getvalue(), stderr.getvalue()])
print(json.dumps({"results": out, "tensorflow_loaded": "tensorflow" in sys.modules}))
"""


def cli_in_one_process(*argvs: list[str]) -> tuple[list[tuple[int, str, str]], bool]:
    """Several command lines through ``watcher.cli.main`` in one fresh Python: (exit code,
    stdout, stderr) of each, and whether TensorFlow got imported. TensorFlow loads once
    instead of once per command (5 s each)."""
    proc = subprocess.run(
        [sys.executable, "-c", IN_ONE_PROCESS, json.dumps(argvs)], capture_output=True, text=True, timeout=300
    )
    assert 0 == proc.returncode, proc.stderr[-2000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    return [(rc, out, err) for rc, out, err in got["results"]], bool(got["tensorflow_loaded"])


class TestUsageErrors:
    def test_reported_before_tensorflow_loads_and_nothing_published(
        self, store: Path, tmp_path: Path
    ) -> None:
        """An unknown --arch, --clahe-tiles on an architecture without CLAHE or out of range, a
        --data folder that is missing or lacks a class, a store without a current version, an
        unknown version: exit 1 with one line saying why, no traceback, nothing published, and
        TensorFlow (5 s of loading) never imported."""
        empty_store = tmp_path / "store"
        empty_store.mkdir()
        one_class = tmp_path / "one_class"
        (one_class / "NORMAL").mkdir(parents=True)
        missing = tmp_path / "nowhere"
        for name in ("inbox", "processed", "failed"):
            (tmp_path / name).mkdir()
        config = tmp_path / "config.yaml"
        settings = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())
        config.write_text(yaml.safe_dump({**settings, "model_store": str(empty_store)}))
        train = ["train", "--data", str(TRAIN_FIXTURES), "--store", str(empty_store)]
        cases = [
            ([*train, "--arch", "foo"], "unknown architecture 'foo'"),
            ([*train, "--arch", "seed", "--clahe-tiles", "4"], "does not use CLAHE"),
            ([*train, "--clahe-tiles", "0"], "clahe_tiles must be 1 to 32"),
            (["train", "--data", str(missing), "--store", str(empty_store)], "missing: the folder itself"),
            (["evaluate", "--store", str(store), "--data", str(one_class)], "missing: PNEUMONIA"),
            (["calibrate", "--store", str(store), "--data", str(missing)], "missing: the folder itself"),
            (["predict", "--store", str(empty_store), str(fixture_images()[0])], "no CURRENT pointer"),
            (
                [
                    "evaluate",
                    "--store",
                    str(store),
                    "--model-version",
                    "v0099",
                    "--data",
                    str(TRAIN_FIXTURES),
                ],
                "v0099",
            ),
            (["calibrate", "--store", str(store), "--base", "v0099", "--data", str(TRAIN_FIXTURES)], "v0099"),
            (
                ["predict", "--store", str(store), "--model-version", "v0099", str(fixture_images()[0])],
                f"no model version v0099 in {store} (versions: v0001, v0002)",
            ),
            # calibrate finds the store in the config, as the other commands do
            (
                ["calibrate", "--config", str(config), "--data", str(TRAIN_FIXTURES)],
                f"{empty_store} has no CURRENT",
            ),
        ]
        before = sorted(p.name for p in store.iterdir())
        results, tensorflow_loaded = cli_in_one_process(*(argv for argv, _ in cases))
        for (argv, message), (rc, _, err) in zip(cases, results, strict=True):
            assert 1 == rc, (argv, err)
            assert message in err, (argv, err)
            assert "Traceback" not in err
        assert not tensorflow_loaded
        assert [] == list(empty_store.iterdir())
        assert before == sorted(p.name for p in store.iterdir())

    def test_the_console_script_says_why(self, tmp_path: Path) -> None:
        """The same through the installed entry point: exit 1, the reason on stderr, no traceback."""
        proc = cli("train", "--data", str(tmp_path / "nowhere"), "--store", str(tmp_path))
        assert 1 == proc.returncode
        assert "--data: " in proc.stderr and "missing: the folder itself" in proc.stderr
        assert "Traceback" not in proc.stderr


class TestEvaluate:
    def test_json_metrics_on_a_labelled_folder(self, store: Path, tmp_path: Path) -> None:
        """evaluate --json prints the metrics and --report writes metrics.json and plots; the
        model answers as the daemon's does (its model.onnx here: TensorFlow never loaded)."""
        argv = ["evaluate", "--store", str(store), "--data", str(TRAIN_FIXTURES), "--json"]
        [(rc, out, err)], tensorflow_loaded = cli_in_one_process([*argv, "--report", str(tmp_path / "rep")])
        assert 0 == rc, err[-2000:]
        assert not tensorflow_loaded

        def refuse(token: str) -> None:
            raise AssertionError(f"{token} is not JSON")

        # strict JSON (jq, browsers): an undefined figure such as an empty reliability bin is null
        metrics = json.loads(out, parse_constant=refuse)
        saved = json.loads((tmp_path / "rep" / "metrics.json").read_text(), parse_constant=refuse)
        assert None in [
            b["mean_probability"] for b in metrics["reliability"]
        ]  # the fixtures leave bins empty
        assert metrics["reliability"] == saved["reliability"]
        n = len(fixture_images())
        flat = json.dumps(metrics)
        for key in ("accuracy", "sensitivity", "specificity", "roc_auc"):
            assert key in flat
        assert (tmp_path / "rep" / "metrics.json").is_file()
        assert list((tmp_path / "rep").glob("*.png"))
        assert str(n) in flat


class TestQuietStartUp:
    def test_no_tensorflow_noise_unless_debug(self, store: Path, tmp_path: Path) -> None:
        """predict prints its CSV and nothing of TensorFlow's C++ start-up (CUDA probes, oneDNN, absl),
        where it loads TensorFlow: a version without model.onnx, converted at load."""
        import os

        mine = tmp_path / "store"
        shutil.copytree(store, mine)
        (mine / (mine / "CURRENT").read_text().strip() / "model.onnx").unlink()
        env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "ABSL_MIN_LOG_LEVEL")}
        proc = subprocess.run(
            [sys.executable, "-m", "watcher", "predict", "--store", str(mine), str(fixture_images()[0])],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
        assert 0 == proc.returncode, proc.stderr[-2000:]
        assert "onnx_graph_unused" in proc.stderr  # TensorFlow was loaded to convert the model
        for noise in ("cuInit", "oneDNN", "absl::InitializeLog", "cuda_drivers", "I0000", "E0000"):
            assert noise not in proc.stderr + proc.stdout, noise
