"""backfill: the daemon's answers for an archive folder, as Parquet, on both engines, resumable."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import FULLRES, TRAIN_FIXTURES
from tests.harness import drop_file_mode_override, read_csv_both, run_once
from watcher import backfill as bf
from watcher.config import Config, load_config
from watcher.report import COLUMNS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

LINK_ERROR = "the file is a symbolic link; links are not followed"


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every entry under ``root`` (links not followed): relative path -> (sha256 or link text, mtime)."""
    out = {}
    for dirpath, dirs, names in os.walk(root):
        for name in names + dirs:
            path = Path(dirpath) / name
            st = path.lstat()
            if path.is_symlink():
                digest = os.readlink(path)
            elif path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                digest = "dir"
            out[str(path.relative_to(root))] = (digest, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An archive folder: the fixture radiographs, a truncated JPEG, a link, and non-candidates."""
    root = tmp_path_factory.mktemp("archive") / "archive"
    shutil.copytree(TRAIN_FIXTURES, root / "train")
    (root / "fullres" / "2019").mkdir(parents=True)
    for path in FULLRES:
        shutil.copy(path, root / "fullres" / "2019" / path.name)
    whole = (TRAIN_FIXTURES / "NORMAL" / "IM-0115-0001.jpeg").read_bytes()
    (root / "broken").mkdir()
    (root / "broken" / "truncated.jpeg").write_bytes(whole[: len(whole) // 2])
    os.symlink("../train/NORMAL/IM-0117-0001.jpeg", root / "broken" / "link.jpeg")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpeg").write_bytes(whole)
    (root / "upload.jpeg.part").write_bytes(whole)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_store_template: Path) -> Path:
    """The tiny real Keras model store of conftest."""
    dest = tmp_path_factory.mktemp("store") / "model_store"
    shutil.copytree(tiny_store_template, dest)
    return dest


@pytest.fixture(scope="module")
def daemon_rows(
    tmp_path_factory: pytest.TempPathFactory, archive: Path, store: Path
) -> dict[str, dict[str, str]]:
    """results.csv rows of a real ``run --once`` over a copy of the archive, by file."""
    root = tmp_path_factory.mktemp("svc")
    shutil.copytree(archive, root / "inbox", symlinks=True)
    for name in ("processed", "failed"):
        (root / name).mkdir()
    raw = {
        "inbox": "inbox",
        "processed": "processed",
        "failed": "failed",
        "results": "results.csv",
        "model_store": str(store),
        "batch": {"max_size": 4, "max_wait_ms": 100},
        "ingest": {"settle_ms": 0},
        "instance_id": "test",
        "log": {"format": "json"},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(raw))
    cfg: Config = load_config(root / "config.yaml")
    proc = run_once(cfg)
    assert 0 == proc.returncode, proc.stdout + proc.stderr
    return {row["file"]: row for row in read_csv_both(cfg.results)}


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """One local Ray instance for the module (2 CPUs, no dashboard)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def read_output(out: Path) -> pd.DataFrame:
    frame = pd.read_parquet(out)
    assert list(bf.output_columns()) == list(frame.columns)
    return frame


def check_exactly_once(frame: pd.DataFrame, expected_files: set[str]) -> None:
    counts = frame["path"].value_counts()
    assert {} == {p: n for p, n in counts.items() if n != 1}, "files scored more than once"
    assert expected_files == set(frame["path"])


class TestColumns:
    def test_derived_from_report(self) -> None:
        """results.csv's columns, less destination and claim, plus path."""
        expected = [c for c in COLUMNS if c not in ("destination", "claim")] + ["path"]
        assert expected == list(bf.output_columns())

    def test_import_does_not_import_ray(self) -> None:
        """The daemon's modules never pull in Ray."""
        code = "import sys, watcher.backfill, watcher.service; print('ray' in sys.modules)"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert "False" == proc.stdout.strip()


def check_same_answers(frame: pd.DataFrame, daemon_rows: dict[str, dict[str, str]]) -> None:
    """Every row equals run --once's row for the same file; probabilities within 1e-5."""
    check_exactly_once(frame, set(daemon_rows))
    for row in frame.to_dict("records"):
        want = daemon_rows[row["path"]]
        assert row["path"] == row["file"]
        for col in (
            "sha256",
            "status",
            "label",
            "threshold",
            "model_version",
            "error",
            "width",
            "height",
            "bytes",
        ):
            assert want[col] == row[col], (row["path"], col)
        if want["status"] == "ok":
            assert abs(float(want["probability"]) - float(row["probability"])) <= 1e-5
    by_path = frame.set_index("path")
    assert ("failed", LINK_ERROR) == tuple(by_path.loc["broken/link.jpeg", ["status", "error"]])
    assert "truncated" in by_path.loc["broken/truncated.jpeg", "error"]


class TestSameAnswers:
    def test_local_matches_run_once(
        self, tmp_path: Path, archive: Path, store: Path, daemon_rows: dict[str, dict[str, str]]
    ) -> None:
        """--engine local: run --once's rows for every file, in several parts; DIR untouched."""
        before = _snapshot(archive)
        out = tmp_path / "out"
        summary = bf.backfill(archive, out, engine="local", store=store, batch_size=4, part_rows=4)
        assert before == _snapshot(archive)
        assert (len(daemon_rows), 0, 2) == (summary["scored"], summary["skipped"], summary["failed"])
        assert summary["parts"] >= 2
        check_same_answers(read_output(out), daemon_rows)
        assert not (out / bf.STAGING).exists()

    def test_local_serves_the_versions_graph_without_tensorflow(
        self, tmp_path: Path, archive: Path, store: Path
    ) -> None:
        """As the daemon on a host without GPU: the version's model.onnx, TensorFlow never imported."""
        code = (
            "import sys; from pathlib import Path; from watcher import backfill as bf; "
            "s = bf.backfill(Path(sys.argv[1]), Path(sys.argv[2]), store=Path(sys.argv[3]), batch_size=8); "
            "print(s['scored'], 'tensorflow' in sys.modules)"
        )
        argv = [sys.executable, "-c", code, str(archive), str(tmp_path / "out"), str(store)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        assert 0 == proc.returncode, proc.stderr[-2000:]
        scored, tensorflow_loaded = proc.stdout.split()[-2:]
        assert int(scored) > 0
        assert "False" == tensorflow_loaded

    def test_ray_matches_run_once_and_resumes(
        self,
        ray_local: None,
        tmp_path: Path,
        archive: Path,
        store: Path,
        daemon_rows: dict[str, dict[str, str]],
    ) -> None:
        """--engine ray completes an output that lost all parts but one: run --once's rows, each file once."""
        out = tmp_path / "out"
        bf.backfill(archive, out, engine="local", store=store, batch_size=4, part_rows=4)
        *lost, _kept = sorted(out.glob("*.parquet"))
        for part in lost:
            part.unlink()
        kept = len(read_output(out))
        before = _snapshot(archive)
        summary = bf.backfill(archive, out, engine="ray", store=store, batch_size=4, part_rows=4)
        assert before == _snapshot(archive)
        assert (kept, len(daemon_rows) - kept) == (summary["skipped"], summary["scored"])
        assert summary["parts"] >= 2
        frame = read_output(out)
        assert set(frame["instance"]) == {f"backfill@{socket.gethostname()}"}
        check_same_answers(frame, daemon_rows)
        assert not (out / bf.STAGING).exists()


class TestResume:
    def test_killed_run_resumes(self, tmp_path: Path, archive: Path, store: Path) -> None:
        """SIGKILL between staging and publishing a part; the rerun adopts it and scores only the rest."""
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "watcher.backfill", "--data", str(archive), "--output", str(out)]
        cmd += ["--store", str(store), "--batch-size", "2", "--rows-per-part", "2", "--workers", "1"]
        env = {**os.environ, "XRAY_WATCHER_CRASH_AT": "backfill_part_staged:3"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert -signal.SIGKILL == proc.returncode, proc.stderr
        assert 2 == len(list(out.glob("*.parquet")))
        assert 1 == len(list((out / bf.STAGING).rglob("*.parquet")))
        dead = out / bf.STAGING / "dead"  # a part cut off mid-write by an earlier kill
        dead.mkdir()
        (dead / "part-dead-000000.parquet").write_bytes(b"PAR1" + b"\0" * 100)

        summary = bf.backfill(archive, out, engine="local", store=store, batch_size=2, part_rows=2)
        assert 6 == summary["skipped"]
        frame = read_output(out)
        check_exactly_once(frame, set(_candidates(archive)))
        assert not (out / bf.STAGING).exists()

        again = bf.backfill(archive, out, engine="local", store=store, batch_size=2, part_rows=2)
        assert (len(frame), 0, 0) == (again["skipped"], again["scored"], again["parts"])

    def test_changed_file_is_scored_again(self, tmp_path: Path, store: Path) -> None:
        """A file whose bytes changed since (same path, new sha256) gets a row of its own."""
        data = tmp_path / "data"
        data.mkdir()
        shutil.copy(FULLRES[0], data / "a.jpeg")
        out = tmp_path / "out"
        bf.backfill(data, out, store=store)
        shutil.copy(FULLRES[1], data / "a.jpeg")
        summary = bf.backfill(data, out, store=store)
        assert (1, 0) == (summary["scored"], summary["skipped"])
        assert 2 == len(set(read_output(out)["sha256"]))


def _candidates(archive: Path) -> list[str]:
    from watcher.config import IngestConfig
    from watcher.ingest import scan_inbox

    return [p.relative_to(archive).as_posix() for p in scan_inbox(archive, IngestConfig().extensions)]


class TestCli:
    def parse(self, *argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        bf.add_arguments(parser)
        return parser.parse_args(list(argv))

    def test_output_inside_data_is_refused(
        self, archive: Path, store: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Nothing is ever written under --data: exit 2."""
        args = self.parse("--data", str(archive), "--output", str(archive / "out"), "--store", str(store))
        assert 2 == bf.cli_main(args)
        assert "inside --data" in capsys.readouterr().err
        assert not (archive / "out").exists()

    def test_ray_missing_names_the_extra(
        self, tmp_path: Path, archive: Path, store: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """--engine ray without Ray installed: exit 2 and the pip command."""
        monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
        args = self.parse(
            "--data",
            str(archive),
            "--output",
            str(tmp_path / "out"),
            "--store",
            str(store),
            "--engine",
            "ray",
        )
        assert 2 == bf.cli_main(args)
        assert "pip install 'xray-watcher[ray]'" in capsys.readouterr().err

    def test_other_model_version_is_refused(
        self, tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """One model version per dataset: a rerun with another version into the same output exits 2."""
        data = tmp_path / "data"
        data.mkdir()
        shutil.copy(FULLRES[0], data / "a.jpeg")
        out = tmp_path / "out"
        bf.backfill(data, out, store=store)
        pd.DataFrame(
            {c: ["v9999"] if c == "model_version" else [""] for c in bf.output_columns()}
        ).to_parquet(out / "other.parquet")
        args = self.parse("--data", str(data), "--output", str(out), "--store", str(store))
        assert 2 == bf.cli_main(args)
        assert "v9999" in capsys.readouterr().err


ODD_NAME = b"bad\xff.jpeg"  # not valid UTF-8: Python names it "bad\udcff.jpeg"
ODD_TEXT = "bad\\xff.jpeg"  # as the dataset stores it: the byte backslash-escaped
ODD_SOURCE = TRAIN_FIXTURES / "NORMAL" / "IM-0115-0001.jpeg"


class TestOddNames:
    @pytest.mark.parametrize("engine", ["local", "ray"])
    def test_name_not_utf8_is_scored_once_and_skipped_on_rerun(
        self, request: pytest.FixtureRequest, tmp_path: Path, store: Path, engine: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """A file name that is not valid UTF-8: one row, its path escaped; a rerun skips it."""
        if engine == "ray":
            request.getfixturevalue("ray_local")
        data = tmp_path / "data"
        (data / "sub").mkdir(parents=True)
        shutil.copy(FULLRES[0], data / "a.jpeg")
        shutil.copy(FULLRES[1], data / "sub" / "b.jpeg")
        with open(os.path.join(os.fsencode(data), ODD_NAME), "wb") as fh:
            fh.write(ODD_SOURCE.read_bytes())
        out = tmp_path / "out"
        parser = argparse.ArgumentParser()
        bf.add_arguments(parser)
        argv = ["--data", str(data), "--output", str(out), "--store", str(store), "--engine", engine]
        assert 0 == bf.cli_main(parser.parse_args(argv)), capsys.readouterr().err
        frame = read_output(out)
        check_exactly_once(frame, {"a.jpeg", "sub/b.jpeg", ODD_TEXT})
        row = frame.set_index("path").loc[ODD_TEXT]
        assert (ODD_TEXT, "ok") == (row["file"], row["status"])
        assert hashlib.sha256(ODD_SOURCE.read_bytes()).hexdigest() == row["sha256"]

        again = bf.backfill(data, out, engine=engine, store=store)
        assert (3, 0, 0) == (again["skipped"], again["scored"], again["parts"])

    def test_name_text(self) -> None:
        """Valid names unchanged; undecodable bytes backslash-escaped, as text Arrow accepts."""
        assert "sub/é.jpeg" == bf.name_text("sub/é.jpeg")
        assert ODD_TEXT == bf.name_text(os.fsdecode(ODD_NAME))
        assert "x\\ud800" == bf.name_text("x\ud800")  # a surrogate no file name decodes to


class TestBadOutput:
    def run_cli(self, data: Path, out: Path, store: Path, *extra: str) -> int:
        parser = argparse.ArgumentParser()
        bf.add_arguments(parser)
        argv = ["--data", str(data), "--output", str(out), "--store", str(store), *extra]
        return bf.cli_main(parser.parse_args(argv))

    @pytest.fixture
    def data(self, tmp_path: Path) -> Path:
        data = tmp_path / "data"
        data.mkdir()
        shutil.copy(FULLRES[0], data / "a.jpeg")
        return data

    def test_unreadable_part_is_named_in_one_line(
        self, tmp_path: Path, data: Path, store: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A file in OUT that is no Parquet part: exit 1, one line naming it, before any scoring."""
        out = tmp_path / "out"
        out.mkdir()
        (out / "x.parquet").write_text("junk\n")
        assert 1 == self.run_cli(data, out, store)
        err = capsys.readouterr().err
        line = f"xray-watcher backfill: error: {out / 'x.parquet'} is not a readable backfill part ("
        assert [line] == [x[: len(line)] for x in err.splitlines() if x.startswith("xray-watcher backfill:")]
        assert "move it aside" in err
        assert "Traceback" not in err
        assert ["x.parquet"] == sorted(p.name for p in out.glob("*.parquet"))

    def test_part_missing_columns_is_named_the_same_way(self, tmp_path: Path) -> None:
        """Every reader of OUT's parts (versions, scored rows, counts) gives the same error."""
        out = tmp_path / "out"
        out.mkdir()
        pd.DataFrame({"other": ["x"]}).to_parquet(out / "y.parquet")
        for read in (lambda: bf._versions(bf._parts(out)), lambda: bf.scored(out)):
            with pytest.raises(bf.WatcherError, match=r"y\.parquet is not a readable backfill part"):
                read()

    @pytest.mark.parametrize(
        "where, reason",
        [("file", "it exists and is not a folder"), ("file/sub", "a folder above it is a file")],
    )
    def test_output_that_cannot_be_a_folder(
        self, tmp_path: Path, data: Path, store: Path, capsys: pytest.CaptureFixture[str], where: str,
        reason: str,
    ) -> None:  # fmt: skip
        """--output a file, or under one: exit 2 and one line naming the folder and why."""
        (tmp_path / "file").write_text("not a folder")
        out = tmp_path / where
        assert 2 == self.run_cli(data, out, store)
        err = capsys.readouterr().err
        assert f"xray-watcher backfill: --output {out} cannot be used: {reason}\n" == err
        assert "not a folder" == (tmp_path / "file").read_text()

    def test_output_not_writable(self, tmp_path: Path, data: Path, store: Path) -> None:
        """A folder the user may not write to (its lock cannot be created): exit 2, one line."""
        out = tmp_path / "out"
        out.mkdir()
        out.chmod(0o555)
        preexec = drop_file_mode_override if os.geteuid() == 0 else None
        probe = [sys.executable, "-c", f"open({str(out / 'probe')!r}, 'w')"]
        try:
            if 0 == subprocess.run(probe, preexec_fn=preexec, capture_output=True, timeout=60).returncode:
                pytest.skip("this user writes into a read-only folder (root keeps its override here)")
            cmd = [sys.executable, "-m", "watcher.backfill", "--data", str(data), "--output", str(out)]
            cmd += ["--store", str(store)]
            proc = subprocess.run(cmd, preexec_fn=preexec, capture_output=True, text=True, timeout=120)
        except subprocess.SubprocessError as exc:
            pytest.skip(f"cannot take the write-any-file capability away from a root child here: {exc}")
        finally:
            out.chmod(0o755)
        assert 2 == proc.returncode, proc.stderr[-2000:]
        line = f"xray-watcher backfill: --output {out} cannot be used: cannot create its lock file .lock ("
        assert line in proc.stderr
        assert "Traceback" not in proc.stderr

    @pytest.mark.parametrize("option", ["--model-version", "--store"])
    def test_missing_model_version_or_store(
        self, tmp_path: Path, data: Path, store: Path, capsys: pytest.CaptureFixture[str], option: str
    ) -> None:
        """As the README says: a model version or store that does not exist is exit 2, one line."""
        out = tmp_path / "out"
        if option == "--model-version":
            code = self.run_cli(data, out, store, "--model-version", "v0099")
            want = f"--model-version v0099: no such version in {store} (versions: "
        else:
            code = self.run_cli(data, out, tmp_path / "nostore")
            want = f"model store {tmp_path / 'nostore'} is not a folder"
        assert 2 == code
        err = capsys.readouterr().err
        assert err.startswith(f"xray-watcher backfill: {want}"), err
        assert 1 == len(err.splitlines())
        assert not out.exists()
