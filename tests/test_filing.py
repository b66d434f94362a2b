"""Filing never overwrites, keeps relative folders, tags clashes with a content hash; layouts, sizes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath

import pytest

from tests.conftest import fixture_images
from tests.harness import check_exactly_once, png_bytes, read_csv_both, run_once, sha
from watcher.config import Config
from watcher.filing import destination_root, folder_size, place, plan_destination


class TestFiling:
    def test_relative_folders_kept(self, tmp_path: Path) -> None:
        """A nested file keeps its subfolders under the destination root."""
        src = tmp_path / "a.jpg"
        src.write_bytes(b"one")
        dest = plan_destination(tmp_path / "out", PurePosixPath("ward 3/day1/a.jpg"), "ff" * 32)
        place(src, dest)
        assert tmp_path / "out" / "ward 3" / "day1" / "a.jpg" == dest
        assert b"one" == dest.read_bytes()
        assert not src.exists()

    def test_clash_gets_hash_then_counter(self, tmp_path: Path) -> None:
        """A taken name is never overwritten: hash tag, then a counter."""
        root = tmp_path / "out"
        names = []
        for content in (b"first", b"second", b"third"):
            src = tmp_path / "x.png"
            src.write_bytes(content)
            dest = plan_destination(root, PurePosixPath("x.png"), "1234abcd" + "0" * 56)
            place(src, dest)
            names.append(dest.name)
        assert ["x.png", "x.1234abcd.png", "x.1234abcd-2.png"] == names
        assert b"first" == (root / "x.png").read_bytes()

    def test_a_file_where_a_folder_is_needed_gets_the_folder_tagged(self, tmp_path: Path) -> None:
        """`scan1` filed earlier as a file, then `scan1/img.jpeg`: the folder on the way gets
        the hash (as a taken name does), so the planned path can be made; the same for a link
        in the way and for a file planned at that path in the same batch."""
        root, sha = tmp_path / "out", "1234abcd" + "0" * 56
        root.mkdir()
        (root / "scan1").write_bytes(b"an earlier file")
        (root / "elsewhere").mkdir()
        (root / "linked").symlink_to(root / "elsewhere")
        for rel, taken, want in [
            ("scan1/img.jpeg", (), "scan1.1234abcd/img.jpeg"),
            ("linked/img.jpeg", (), "linked.1234abcd/img.jpeg"),
            ("new/img.jpeg", {root / "new"}, "new.1234abcd/img.jpeg"),  # a file `new` planned
            ("new", {root / "new" / "img.jpeg"}, "new.1234abcd"),  # a folder `new` planned
            ("elsewhere/img.jpeg", (), "elsewhere/img.jpeg"),
        ]:
            dest = plan_destination(root, PurePosixPath(rel), sha, taken)
            assert root / want == dest, rel
        src = tmp_path / "img.jpeg"
        src.write_bytes(b"x")
        place(src, plan_destination(root, PurePosixPath("scan1/img.jpeg"), sha))
        assert b"x" == (root / "scan1.1234abcd" / "img.jpeg").read_bytes()

    def test_names_are_cut_to_fit_the_filesystem(self, tmp_path: Path) -> None:
        """A 255-byte name taken: its hash-tagged name is cut to 255 bytes, not refused by the
        filesystem (ENAMETOOLONG, a move retried for ever); a multi-byte name is cut between
        characters."""
        root, sha = tmp_path / "out", "1234abcd" + "0" * 56
        root.mkdir()
        for name in ("a" * 250 + ".jpeg", "é" * 125 + ".jpeg"):
            (root / name).write_bytes(b"first")
            dest = plan_destination(root, PurePosixPath(name), sha)
            assert len(os.fsencode(dest.name)) <= 255 and dest.name.endswith(".1234abcd.jpeg")
            assert dest.name == os.fsencode(dest.name).decode("utf-8")  # no character split
            dest.write_bytes(b"second")
            assert b"first" == (root / name).read_bytes()
        heat = plan_destination(root, PurePosixPath("b" * 251 + ".png"), sha)  # a heat map's name
        assert 255 == len(heat.name) and heat.name.endswith("b.png")

    def test_place_refuses_existing(self, tmp_path: Path) -> None:
        """place() raises rather than replace a file that appeared meanwhile."""
        src, dest = tmp_path / "a", tmp_path / "b"
        src.write_bytes(b"new")
        dest.write_bytes(b"old")
        with pytest.raises(FileExistsError):
            place(src, dest)
        assert b"old" == dest.read_bytes()
        assert src.exists()

    def test_symlink_moved_as_link(self, tmp_path: Path) -> None:
        """A symbolic link is moved as the link itself; its target is untouched."""
        target = tmp_path / "secret.txt"
        target.write_text("do not touch")
        link = tmp_path / "l.jpg"
        link.symlink_to(target)
        dest = tmp_path / "out" / "l.jpg"
        place(link, dest)
        assert dest.is_symlink()
        assert target.read_text() == "do not touch"
        assert not link.exists() and not link.is_symlink()


WHEN = datetime(2026, 3, 1, 23, 30, tzinfo=timezone.utc)


class TestDestinationRoot:
    @pytest.mark.parametrize(
        ("layout", "label", "expected"),
        [
            ("label", "PNEUMONIA", "processed/PNEUMONIA"),
            ("label", None, "processed"),
            ("date/label", "PNEUMONIA", "processed/2026-03-01/PNEUMONIA"),
            ("date/label", None, "processed/2026-03-01"),
        ],
    )
    def test_layouts(self, layout: str, label: str | None, expected: str) -> None:
        """label: base/<LABEL> (failed: base); date/label: base/YYYY-MM-DD/<LABEL> (failed: base/day)."""
        assert Path(expected) == destination_root(Path("processed"), label, layout, WHEN)

    def test_day_is_utc(self) -> None:
        """The day folder is the UTC day, like processed_at, whatever the offset of ``when``."""
        local = WHEN.astimezone(timezone(timedelta(hours=2)))  # already 2 March there
        assert Path("p/2026-03-01/NORMAL") == destination_root(Path("p"), "NORMAL", "date/label", local)
        naive = datetime(2026, 3, 2, 0, 5)
        assert Path("p/2026-03-02/NORMAL") == destination_root(Path("p"), "NORMAL", "date/label", naive)

    @pytest.mark.parametrize("label", ["", ".", "..", "a/b"])
    def test_label_must_be_one_folder_name(self, label: str) -> None:
        """A label that would escape or flatten the folder is refused."""
        with pytest.raises(ValueError, match="cannot be a folder name"):
            destination_root(Path("p"), label, "label", WHEN)

    def test_unknown_layout(self) -> None:
        """A layout other than the two is refused, naming both."""
        with pytest.raises(ValueError, match="expected one of label, date/label"):
            destination_root(Path("p"), "NORMAL", "label/date", WHEN)

    def test_date_layout_places_and_never_overwrites(self, tmp_path: Path) -> None:
        """plan_destination and place work the same under a day folder."""
        root = destination_root(tmp_path / "processed", "NORMAL", "date/label", WHEN)
        placed = []
        for content in (b"one", b"two"):
            src = tmp_path / "a.png"
            src.write_bytes(content)
            dest = plan_destination(root, PurePosixPath("ward/a.png"), "abcdef12" + "0" * 56)
            place(src, dest)
            placed.append(dest.relative_to(tmp_path).as_posix())
        assert [
            "processed/2026-03-01/NORMAL/ward/a.png",
            "processed/2026-03-01/NORMAL/ward/a.abcdef12.png",
        ] == placed


class TestDateLayoutInTheDaemon:
    def test_files_and_heat_maps_go_under_the_day(
        self, make_config: Callable[..., Config], tmp_path: Path
    ) -> None:
        """run --once with ``filing.layout: date/label`` and heat maps: each file under
        processed/<day>/<LABEL>/ (a failed one under failed/<day>/), its heat map under
        heatmaps/<day>/<LABEL>/, as its row says; the day is processed_at's (UTC)."""
        root = tmp_path / "svc"
        root.mkdir()
        shutil.copytree(Path(__file__).parents[1] / "model_store", root / "model_store")  # explainable
        cfg = make_config(filing={"layout": "date/label"}, explain={"enabled": True})
        files = fixture_images()[::4]
        for p in files:
            shutil.copy(p, cfg.inbox / p.name)
        (cfg.inbox / "ward").mkdir()
        (cfg.inbox / "ward" / "broken.jpeg").write_bytes(files[0].read_bytes()[:300])
        proc = run_once(cfg, timeout=180)
        assert 0 == proc.returncode, proc.stderr[-2000:]
        rows = read_csv_both(cfg.results)
        assert len(files) + 1 == len(rows)
        site = cfg.source.parent  # type: ignore[union-attr]
        for row in rows:
            day = datetime.fromisoformat(row["processed_at"].replace("Z", "+00:00")).strftime("%Y-%m-%d")
            dest = Path(row["destination"])
            if row["status"] == "failed":
                assert cfg.failed / day / "ward" / "broken.jpeg" == dest
                assert "" == row["heatmap"]
            else:
                assert cfg.processed / day / row["label"] / row["file"] == dest
                assert f"heatmaps/{day}/{row['label']}/{row['file']}.png" == row["heatmap"]
                assert (site / row["heatmap"]).is_file()
            assert dest.is_file()
        assert [] == list(cfg.inbox.rglob("*.jpeg"))


class TestOneNameTwiceInABatch:
    def test_each_row_names_its_own_file_and_heat_map(
        self, make_config: Callable[..., Config], tmp_path: Path
    ) -> None:
        """Two files of one name claimed apart (a second scan.jpeg dropped while the first
        waited; here as a crash leaves them) are scored in one batch: each is filed where its
        row says, under its own name or its hash-tagged one, and so is its heat map."""
        root = tmp_path / "svc"
        root.mkdir()
        shutil.copytree(Path(__file__).parents[1] / "model_store", root / "model_store")  # explainable
        cfg = make_config(explain={"enabled": True})
        originals = {}
        for claim, image in zip(("aaaa1111", "bbbb2222", "cccc3333"), fixture_images()[:3], strict=True):
            data = image.read_bytes()
            (cfg.work_dir / "claimed" / claim / "ward").mkdir(parents=True)
            (cfg.work_dir / "claimed" / claim / "ward" / "scan.jpeg").write_bytes(data)
            originals[sha(data)] = data
        proc = run_once(cfg, timeout=180)
        assert 0 == proc.returncode, proc.stderr[-2000:]
        rows = check_exactly_once(cfg, originals)  # each file where its row says, once
        assert '"destination_taken"' not in proc.stdout
        site = cfg.source.parent  # type: ignore[union-attr]
        assert 3 == len({r["destination"] for r in rows}) == len({r["heatmap"] for r in rows})
        for row in rows:
            assert Path(row["destination"]).name in ("scan.jpeg", f"scan.{row['sha256'][:8]}.jpeg")
            assert Path(row["heatmap"]).name in ("scan.jpeg.png", f"scan.jpeg.{row['sha256'][:8]}.png")
            assert (site / row["heatmap"]).is_file()


class TestRecoveryKeepsRowDestinations:
    def test_a_fresh_file_never_takes_a_path_an_earlier_row_names(
        self, make_config: Callable[..., Config]
    ) -> None:
        """Killed after the rows of x.png, before its move; at the restart another claim of
        x.png (no row) comes first and the recovery spans several batches: the fresh x.png
        gets its hash, and each file ends where its row says."""
        cfg = make_config()  # batches of 4
        first = png_bytes(1, level=30)
        (cfg.inbox / "x.png").write_bytes(first)
        crashed = run_once(cfg, env={"XRAY_WATCHER_CRASH_AT": "rows_written"}, timeout=180)
        assert crashed.returncode != 0
        (row,) = read_csv_both(cfg.results)
        assert cfg.processed / "NORMAL" / "x.png" == Path(row["destination"])
        claim = cfg.work_dir / "claimed" / "00000000000000000000000000000000"  # sorted first
        claim.mkdir()
        originals = {sha(first): first}
        for i, name in enumerate(["x.png"] + [f"y{i}.png" for i in range(6)]):
            data = png_bytes(10 + i, level=30)
            (claim / name).write_bytes(data)
            originals[sha(data)] = data
        proc = run_once(cfg, timeout=180)
        assert 0 == proc.returncode, proc.stderr[-2000:]
        check_exactly_once(cfg, originals)  # each file where its row says, once
        assert '"destination_taken"' not in proc.stdout
        assert first == (cfg.processed / "NORMAL" / "x.png").read_bytes()


class TestAFileWhereAFolderIsNeeded:
    def test_the_folder_gets_the_hash_and_the_run_ends(self, make_config: Callable[..., Config]) -> None:
        """processed/NORMAL/scan1 is a file (an earlier file without extension) and
        inbox/scan1/img.png comes: it is filed under scan1.<sha8>/, where its row says, and
        run --once ends (it used to plan scan1/img.png and retry the move for ever)."""
        cfg = make_config()
        (cfg.processed / "NORMAL").mkdir()
        (cfg.processed / "NORMAL" / "scan1").write_bytes(b"an earlier file")
        data = png_bytes(3, level=30)  # dark: NORMAL
        (cfg.inbox / "scan1").mkdir()
        (cfg.inbox / "scan1" / "img.png").write_bytes(data)
        proc = run_once(cfg, timeout=180)
        assert 0 == proc.returncode, proc.stderr[-2000:]
        (row,) = read_csv_both(cfg.results)
        assert cfg.processed / "NORMAL" / f"scan1.{sha(data)[:8]}" / "img.png" == Path(row["destination"])
        assert data == Path(row["destination"]).read_bytes()
        assert b"an earlier file" == (cfg.processed / "NORMAL" / "scan1").read_bytes()
        assert [] == [p for p in (cfg.work_dir / "claimed").rglob("*") if p.is_file()]  # none left claimed
        assert not (cfg.inbox / "scan1" / "img.png").exists()


class TestFolderSize:
    def test_counts_files_and_bytes(self, tmp_path: Path) -> None:
        """Every regular file below the folder; a link is neither followed nor counted."""
        (tmp_path / "a" / "b").mkdir(parents=True)
        (tmp_path / "a" / "x.png").write_bytes(b"12345")
        (tmp_path / "a" / "b" / "y.png").write_bytes(b"123")
        (tmp_path / "link").symlink_to(tmp_path / "a")
        size = folder_size(tmp_path / "a")
        assert (8, 2, True) == (size.bytes, size.files, size.complete)
        assert 2 == folder_size(tmp_path).files

    def test_time_budget(self, tmp_path: Path) -> None:
        """With no time to spare the count stops early and says so."""
        for i in range(600):  # the clock is read every 512 entries
            (tmp_path / f"{i}.png").touch()
        size = folder_size(tmp_path, budget_s=0.0)
        assert not size.complete
        assert size.files < 600
        assert folder_size(tmp_path / "missing").complete
