"""The static review page: escaping, counts, order, and the page as a real browser shows it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from tests.conftest import fixture_images
from tests.harness import read_csv_both, run_once
from watcher import report
from watcher.config import Config, ReportConfig, load_config
from watcher.report import COLUMNS, ResultRow, ResultsWriter, format_utc
from watcher.review import (
    ReviewPage,
    count_rows,
    newest_first,
    relative_href,
    render_page,
    safe_href,
    write_page,
)

HOSTILE = "<script>alert(1)</script>\"'é.png"
HOSTILE_NAME = "<script>alert(1)<script>\"'é 胸部.png"  # the same, as a file name (no slash)
MODEL = {
    "version": "v0002",
    "threshold": 0.5784,
    "validation": {"roc_auc": 0.9936, "sensitivity": 0.9728, "specificity": 0.9611, "accuracy": 0.9701},
}


def row(i: int, **over: str) -> dict[str, str]:
    """A results.csv row processed at minute ``i`` (old columns only unless overridden)."""
    base = {
        "processed_at": f"2026-11-25T10:{i:02d}:00.000Z",
        "file": f"file{i:02d}.jpeg",
        "sha256": "ab" * 32,
        "status": "ok",
        "label": "PNEUMONIA" if i % 2 else "NORMAL",
        "probability": "0.9" if i % 2 else "0.1",
        "threshold": "0.5784",
        "model_version": "v0002",
        "destination": "processed",
        "error": "",
        "width": "224",
        "height": "224",
        "bytes": "1234",
        "instance": "test",
        "claim": f"c{i}",
    }
    return {**base, **over}


def render(rows: list[dict[str, str]], **kw: Any) -> str:
    """The page with images taken from each row's ``heatmap`` column."""
    return render_page(
        rows,
        model=kw.pop("model", MODEL),
        counts=kw.pop("counts", count_rows(rows)),
        heatmap_href=lambda r: r.get("heatmap") or None,
        thumb_href=lambda r: r.get("thumb") or None,
        generated_at="2026-11-25T11:00:00Z",
        **kw,
    )


NAME_BYTES = b"caf\xe9 <b>.jpeg"  # Latin-1 on disk: not UTF-8, so Python names it with a lone surrogate
NAME = os.fsdecode(NAME_BYTES)  # 'caf\udce9 <b>.jpeg'


def service_config(tmp_path: Path) -> Config:
    """A real config.yaml with real folders (the page needs no model); results in results/."""
    root = tmp_path / "svc"
    for name in ("inbox", "processed", "failed", "model_store", "results"):
        (root / name).mkdir(parents=True, exist_ok=True)
    raw = {
        "inbox": "inbox",
        "processed": "processed",
        "failed": "failed",
        "results": "results/results.csv",
        "model_store": "model_store",
        "instance_id": "test",
    }
    (root / "config.yaml").write_text(yaml.safe_dump(raw))
    return load_config(root / "config.yaml")


def result_row(name: str, at: datetime, **over: str) -> ResultRow:
    """A results.csv row as the daemon writes it."""
    base = dict.fromkeys(COLUMNS, "")
    base.update(processed_at=format_utc(at), file=name, sha256="ab" * 32, status="ok", label="NORMAL",
                probability="0.1", threshold="0.5", model_version="v0002", destination=f"processed/{name}",
                instance="test", claim=f"c-{name}")  # fmt: skip
    base.update(over)
    return ResultRow(**base)


def png_bytes() -> bytes:
    ok, buf = cv2.imencode(".png", np.full((16, 16, 3), 200, np.uint8))
    assert ok
    return buf.tobytes()


class Cards(HTMLParser):
    """Collects each card's classes, text and image sources from a page."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict[str, Any]] = []
        self.scripts = 0
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "article":
            self.cards.append({"classes": (a.get("class") or "").split(), "text": "", "imgs": []})
            self._depth = 1
        elif self._depth and tag == "img":
            self.cards[-1]["imgs"].append(a.get("src"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "article":
            self._depth = 0

    def handle_data(self, data: str) -> None:
        if self._depth:
            self.cards[-1]["text"] += data


def parse(page: str) -> Cards:
    parser = Cards()
    parser.feed(page)
    return parser


class TestRenderPage:
    def test_hostile_file_name_is_text(self) -> None:
        """A file name is data: no markup from it, and it reads back exactly."""
        page = render([row(1, file=HOSTILE, heatmap="h.png")])
        assert "<script>alert" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;é.png" in page
        parsed = parse(page)
        assert 0 == parsed.scripts
        assert HOSTILE in parsed.cards[0]["text"]

    def test_every_field_is_escaped(self) -> None:
        """Error, warning, UIDs, label, time, model fields and counts are all escaped."""
        evil = '<img src=x onerror="alert(2)">'
        r = row(1, status="failed", label="", error=evil, warning=evil, study_instance_uid=evil)
        r2 = row(2, label=evil, processed_at=evil, model_version=evil, sop_instance_uid=evil)
        page = render([r, r2], model={**MODEL, "version": evil}, counts={evil: evil})
        assert "<img src=x" not in page
        assert page.count("&lt;img src=x onerror=&quot;alert(2)&quot;&gt;") >= 8

    def test_undecodable_and_control_characters(self, tmp_path: Path) -> None:
        """Lone surrogates (undecodable bytes in a name) and control characters become U+FFFD."""
        page = render([row(1, file="bad\udcff\x00\x1bname\u202e.png")])
        assert "bad\ufffd\ufffd\ufffdname\u202e.png" in parse(page).cards[0]["text"]
        write_page(tmp_path / "p.html", page)  # encodable as UTF-8
        assert "<bdi>bad" in (tmp_path / "p.html").read_text(encoding="utf-8")

    def test_undecodable_name_links_to_its_file(self, tmp_path: Path) -> None:
        """A name that is not UTF-8 (lone surrogates) renders: its heat-map link is the bytes on disk
        (%E9) and resolves to the real file; name, warning and reason show as text, never raise."""
        folder = os.path.join(os.fsencode(tmp_path), b"heatmaps", b"NORMAL")
        os.makedirs(folder)
        with open(os.path.join(folder, NAME_BYTES + b".png"), "wb") as f:
            f.write(png_bytes())
        ok = row(1, file=NAME, heatmap=f"heatmaps/NORMAL/{NAME}.png", warning=f"odd name {NAME} \ud800")
        failed = row(2, status="failed", label="", file=NAME, error=f"cannot read {NAME}: \udfff")
        page = render_page(
            [ok, failed],
            model=MODEL,
            counts=count_rows([ok, failed]),
            heatmap_href=lambda r: (
                relative_href(tmp_path / r["heatmap"], tmp_path / "review.html") if r.get("heatmap") else None
            ),
            thumb_href=lambda r: None,
            generated_at="2026-11-25T11:00:00Z",
        )
        cards = parse(page).cards
        assert "heatmaps/NORMAL/caf%E9%20%3Cb%3E.jpeg.png" == cards[1]["imgs"][0]
        on_disk = os.path.join(os.fsencode(tmp_path), urllib.parse.unquote_to_bytes(cards[1]["imgs"][0]))
        assert os.path.isfile(on_disk)
        assert (
            "caf\ufffd <b>.jpeg" in cards[1]["text"]
            and "odd name caf\ufffd <b>.jpeg \ufffd" in cards[1]["text"]
        )
        assert "cannot read caf\ufffd <b>.jpeg: \ufffd" in cards[0]["text"]
        assert "<b>.jpeg" not in page and "caf\ufffd &lt;b&gt;.jpeg" in page
        write_page(tmp_path / "review.html", page)  # encodable as UTF-8
        assert page == (tmp_path / "review.html").read_text(encoding="utf-8")

    def test_daemon_page_with_an_undecodable_name(self, tmp_path: Path) -> None:
        """The daemon's page, seeded from a results.csv row (real writer) of such a name, is written,
        with a link to the heat map that resolves; no review_page_failed."""
        cfg = daemon_page_with_undecodable_name(tmp_path)
        assert cfg.review_page is not None
        page = cfg.review_page.read_text(encoding="utf-8")
        cards = parse(page).cards
        assert 1 == len(cards) and "caf\ufffd <b>.jpeg" in cards[0]["text"]
        assert "../heatmaps/NORMAL/caf%E9%20%3Cb%3E.jpeg.png" == cards[0]["imgs"][0]
        src = urllib.parse.unquote_to_bytes(cards[0]["imgs"][0])
        assert os.path.isfile(os.path.join(os.fsencode(cfg.review_page.parent), src))

    def test_counts_and_model_figures_in_the_header(self) -> None:
        """The header shows each count and the version, threshold and validation figures."""
        rows = [row(1), row(2), row(3), row(4, status="failed", label="", error="truncated")]
        counts = count_rows(rows)
        assert {"total": 4, "PNEUMONIA": 2, "NORMAL": 1, "failed": 1, "warnings": 0} == counts
        header = render(rows).split("<nav>")[0]
        for text in ("total <b>4</b>", "PNEUMONIA <b>2</b>", "NORMAL <b>1</b>", "failed <b>1</b>"):
            assert text in header
        for text in ("<b>v0002</b>", "threshold 0.578", "ROC AUC 0.994", "sensitivity 0.973",
                     "specificity 0.961", "accuracy 0.970"):  # fmt: skip
            assert text in header

    def test_newest_first_and_max_rows(self) -> None:
        """Cards are the max_rows most recent rows, newest first, whatever the input order."""
        rows = [row(i) for i in (3, 1, 7, 5, 2, 6, 4)]
        cards = parse(render(rows, max_rows=4)).cards
        assert ["file07.jpeg", "file06.jpeg", "file05.jpeg", "file04.jpeg"] == [
            re.search(r"file\d\d\.jpeg", c["text"]).group(0)  # type: ignore[union-attr]
            for c in cards
        ]
        assert "showing the 4 most recent of 7 rows" in render(rows, max_rows=4)
        assert "showing the 7 most recent rows," in render(rows) and " of 7 " not in render(rows)

    def test_same_timestamp_keeps_file_order_reversed(self) -> None:
        """Rows with equal times: the later line in results.csv is newer."""
        rows = [row(1, file="a"), row(1, file="b")]
        assert ["b", "a"] == [r["file"] for r in newest_first(rows, 10)]
        assert [] == newest_first(rows, 0)

    def test_card_contents(self) -> None:
        """Label, probability against threshold, time, UIDs, warning and failure reason."""
        ok = row(1, study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", sop_instance_uid="1.2.3.4.5",
                 warning="image is small", heatmap="heatmaps/a.png")  # fmt: skip
        failed = row(2, status="failed", label="", probability="", error="JPEG is truncated")
        cards = parse(render([ok, failed])).cards
        assert ["card", "status-failed"] == cards[0]["classes"]
        assert "JPEG is truncated" in cards[0]["text"] and [] == cards[0]["imgs"]
        assert ["card", "status-ok", "label-pneumonia", "has-warning"] == cards[1]["classes"]
        for text in ("PNEUMONIA", "p = 0.900 (threshold 0.578)", "2026-11-25T10:01:00.000Z",
                     "1.2.3.4.5", "image is small"):  # fmt: skip
            assert text in cards[1]["text"]
        assert ["heatmaps/a.png"] == cards[1]["imgs"]
        assert 'style="width:90.0%"' in render([ok]) and 'style="left:57.8%"' in render([ok])

    def test_old_rows_without_new_columns(self) -> None:
        """Rows from before the UID/warning/heatmap columns render; thumbnails stand in."""
        r = row(1, thumb="data:image/png;base64,iVBORw0KGgo=")
        cards = parse(render([r])).cards
        assert ["data:image/png;base64,iVBORw0KGgo="] == cards[0]["imgs"]

    def test_empty_page(self) -> None:
        """No rows yet: a page that says so."""
        assert "No files processed yet." in render([])

    def test_self_contained(self) -> None:
        """No external resources, no scripts, and a CSP that forbids them."""
        page = render([row(i, heatmap=f"h{i}.png") for i in range(5)])
        assert not re.search(r"(src|href)=\"(https?:|//)", page)
        assert "<script" not in page and "<link" not in page and "@import" not in page
        assert "default-src 'none'" in page

    @pytest.mark.parametrize(
        ("href", "expected"),
        [
            ("heatmaps/a%20b.png", "heatmaps/a%20b.png"),
            ("data:image/png;base64,AAAA", "data:image/png;base64,AAAA"),
            ("javascript:alert(1)", None),
            ("JaVaScRiPt:alert(1)", None),
            ("https://example.org/x.png", None),
            ("//example.org/x.png", None),
            ("/etc/passwd", None),
            ("", None),
            (None, None),
        ],
    )
    def test_safe_href(self, href: str | None, expected: str | None) -> None:
        """Only relative URLs and data:image URIs become image sources."""
        assert expected == safe_href(href)

    def test_relative_href_is_percent_encoded(self, tmp_path: Path) -> None:
        """A path beside the page becomes a relative URL with # ? % and spaces encoded."""
        assert "heatmaps/a%20%23%3F%25.png" == relative_href(
            tmp_path / "heatmaps" / "a #?%.png", tmp_path / "review.html"
        )

    def test_write_page_atomic(self, tmp_path: Path) -> None:
        """The page replaces the old one whole and is readable by others."""
        target = tmp_path / "out" / "review.html"
        write_page(target, "old")
        write_page(target, render([row(1)]))
        assert target.read_text(encoding="utf-8").startswith("<!doctype html>")
        assert ["review.html"] == [p.name for p in target.parent.iterdir()]
        assert 0o644 == target.stat().st_mode & 0o777


def daemon_page_with_undecodable_name(tmp_path: Path) -> Config:
    """results.csv holding a row of ``NAME`` (real writer), its heat map on disk under its bytes, and
    the daemon's page (``ReviewPage``) written from it; asserts the write logged no failure."""
    from structlog.testing import capture_logs

    cfg = service_config(tmp_path)
    assert cfg.source is not None and cfg.review_page is not None
    folder = os.path.join(os.fsencode(cfg.source.parent), b"heatmaps", b"NORMAL")
    os.makedirs(folder)
    with open(os.path.join(folder, NAME_BYTES + b".png"), "wb") as f:
        f.write(png_bytes())
    writer = ResultsWriter(cfg.results, ReportConfig()).open()
    writer.append([result_row(NAME, datetime.now(timezone.utc), heatmap=f"heatmaps/NORMAL/{NAME}.png")])
    writer.close()
    with capture_logs() as logs:
        ReviewPage(cfg.review_page, cfg, max_rows=cfg.review.max_rows).write(None)
    assert [] == [e for e in logs if e["event"] == "review_page_failed"], logs
    return cfg


MONTHS = {"results-2026-01.csv": 30, "results-2026-02.csv": 4, "results.csv": 2}


@pytest.fixture
def rotated(tmp_path: Path) -> Config:
    """A results set after two monthly rotations, written by the real writer: 30 rows in January,
    4 in February, 2 in March (the current file)."""
    cfg = service_config(tmp_path)
    now = [datetime(2026, 1, 10, tzinfo=timezone.utc)]
    writer = ResultsWriter(cfg.results, ReportConfig(rotate="monthly"), now=lambda: now[0]).open()
    for month, n in zip((1, 2, 3), MONTHS.values(), strict=True):
        for i in range(n):
            now[0] = datetime(2026, month, 10, tzinfo=timezone.utc) + timedelta(minutes=i)
            writer.append([result_row(f"m{month}-{i:02d}.jpeg", now[0])])
    writer.close()
    assert list(MONTHS) == [p.name for p in report.results_files(cfg.results)]
    return cfg


class TestDaemonPage:
    def test_seeded_from_the_newest_rows_of_the_set(
        self, rotated: Config, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """After a restart right after a rotation the page holds the newest max_rows rows of the
        whole set (March's 2, February's 4, January's last 4), reading only the tails it needs."""
        calls: list[tuple[str, int]] = []
        real = report.tail_rows

        def spy(path: Path, n: int) -> list[dict[str, str]]:
            calls.append((path.name, n))
            return real(path, n)

        monkeypatch.setattr(report, "tail_rows", spy)
        assert rotated.review_page is not None
        page = ReviewPage(rotated.review_page, rotated, max_rows=10)
        expected = [*(f"m1-{i:02d}.jpeg" for i in range(26, 30)), *(f"m2-{i:02d}.jpeg" for i in range(4))]
        assert [*expected, "m3-00.jpeg", "m3-01.jpeg"] == [r["file"] for r in page.rows]
        assert [("results.csv", 10), ("results-2026-02.csv", 8), ("results-2026-01.csv", 4)] == calls
        page.write(None)
        html_text = rotated.review_page.read_text(encoding="utf-8")
        cards = parse(html_text).cards
        assert 10 == len(cards)
        assert "m3-01.jpeg" in cards[0]["text"] and "m1-26.jpeg" in cards[-1]["text"]

    def test_counts_say_what_they_cover(self, rotated: Config) -> None:
        """The header does not pass the rows in memory off as the total: it says the counts are of
        the rows shown, and claims no 'N of N'."""
        assert rotated.review_page is not None
        ReviewPage(rotated.review_page, rotated, max_rows=10).write(None)
        header = rotated.review_page.read_text(encoding="utf-8").split("<nav>")[0]
        assert "showing the 10 most recent rows," in header
        assert "<li>in the 10 rows shown:</li><li>total <b>10</b></li>" in header
        assert " of 10 rows" not in header

    def test_fewer_rows_than_max_reads_every_file(self, rotated: Config) -> None:
        """A set smaller than max_rows: every row of every file, oldest first; max_rows 0: none."""
        assert rotated.review_page is not None
        page = ReviewPage(rotated.review_page, rotated, max_rows=200)
        assert sum(MONTHS.values()) == len(page.rows)
        assert "m1-00.jpeg" == page.rows[0]["file"] and "m3-01.jpeg" == page.rows[-1]["file"]
        assert 0 == len(ReviewPage(rotated.review_page, rotated, max_rows=0).rows)

    def test_a_deleted_heat_map_shows_no_image_not_a_broken_one(self, tmp_path: Path) -> None:
        """Old heat-map day folders may be deleted (README): a row whose picture is gone gets
        "no image"; the others keep theirs."""
        cfg = service_config(tmp_path)
        assert cfg.source is not None and cfg.review_page is not None
        (cfg.source.parent / "heatmaps" / "NORMAL").mkdir(parents=True)
        (cfg.source.parent / "heatmaps" / "NORMAL" / "kept.jpeg.png").write_bytes(png_bytes())
        writer = ResultsWriter(cfg.results, ReportConfig()).open()
        now = datetime.now(timezone.utc)
        writer.append(
            [result_row(n, now, heatmap=f"heatmaps/NORMAL/{n}.png") for n in ("gone.jpeg", "kept.jpeg")]
        )
        writer.close()
        ReviewPage(cfg.review_page, cfg, max_rows=10).write(None)
        cards = parse(cfg.review_page.read_text(encoding="utf-8")).cards
        by = {("kept" if "kept.jpeg" in c["text"] else "gone"): c for c in cards}
        assert ["../heatmaps/NORMAL/kept.jpeg.png"] == by["kept"]["imgs"]
        assert [] == by["gone"]["imgs"] and "no image" in by["gone"]["text"]

    def test_no_results_yet(self, tmp_path: Path) -> None:
        """No results.csv at all: an empty page, no error."""
        cfg = service_config(tmp_path)
        assert cfg.review_page is not None
        page = ReviewPage(cfg.review_page, cfg, max_rows=10)
        assert 0 == len(page.rows)
        page.write(None)
        assert "No files processed yet." in cfg.review_page.read_text(encoding="utf-8")


# ------------------------------------------------------------------ real browser


def _working_chromium() -> str | None:
    """A chromium that answers --version (a snap stub on the PATH does not, in a container)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is None:
            continue
        try:
            done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0 and "chrom" in done.stdout.lower():
            return path
    return None


CHROMIUM = _working_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed: run scripts/ensure-chromium.sh (apt-get install chromium)",
)

HARNESS = """<script nonce="t3st">
window.__errors = [];
window.alert = function (m) { __errors.push("alert:" + m); };
window.addEventListener("error", function (e) {
  __errors.push("error:" + (e.message || (e.target && (e.target.src || e.target.tagName))));
}, true);
var origError = console.error;
console.error = function () {
  __errors.push("console:" + Array.from(arguments).join(" "));
  origError.apply(console, arguments);
};
window.addEventListener("load", function () {
  function visible() {
    return Array.from(document.querySelectorAll("article.card"))
      .filter(function (c) { return getComputedStyle(c).display !== "none"; }).length;
  }
  var out = {hash: location.hash, initial: visible(), filters: {}};
  ["#all", "#pneumonia", "#normal", "#failed", "#warnings"].forEach(function (h) {
    location.hash = h; out.filters[h] = visible();
  });
  out.images = Array.from(document.images).map(function (i) { return i.complete ? i.naturalWidth : -1; });
  out.files = Array.from(document.querySelectorAll(".file")).map(function (f) { return f.textContent; });
  out.scripts = document.scripts.length;
  out.errors = __errors;
  var pre = document.createElement("pre"); pre.id = "harness"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def chromium(url: str, user_data: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium once on ``url`` (console messages go to stderr)."""
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={user_data}", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=5000", *extra, url,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture(scope="module")
def review_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    """A page beside real Grad-CAM overlays of the fixtures (shipped model), plus hostile rows."""
    import keras

    from watcher.explain import GradCam, overlay_png, write_overlay
    from watcher.imaging import PreprocessSpec, decode_image, preprocess
    from watcher.inference import calibrate

    store = Path(__file__).parents[1] / "model_store" / "v0002"
    meta = json.loads((store / "metadata.json").read_text())
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    model = keras.saving.load_model(store / "model.keras", compile=False)
    paths = fixture_images()[::2]  # 9 of the 17, both classes
    images = [decode_image(p) for p in paths]
    raw, maps = GradCam(model).predict_and_explain(np.stack([preprocess(i, spec) for i in images]))
    probs = calibrate(raw, float(meta["temperature"]))
    thr = float(meta["threshold"])
    site = tmp_path_factory.mktemp("site")
    rows = []
    for i, (path, image, p, cam) in enumerate(zip(paths, images, probs, maps, strict=True)):
        label = "PNEUMONIA" if p >= thr else "NORMAL"
        name = HOSTILE if i == 0 else path.name
        rel = f"heatmaps/{i:03d}.png"
        write_overlay(site / rel, overlay_png(image, cam, label, float(p), thr))
        rows.append(row(i, file=name, label=label, probability=f"{p:.4f}", threshold=f"{thr:.4f}",
                        heatmap=rel, sop_instance_uid=f"1.2.826.0.1.{i}"))  # fmt: skip
    rows[1]["warning"] = "image is 224 px, smaller than recommended"
    rows.append(row(20, status="failed", label="", probability="", error="JPEG ends early: truncated"))
    page = render_page(
        rows,
        model=meta,
        counts=count_rows(rows),
        heatmap_href=lambda r: (
            relative_href(site / r["heatmap"], site / "review.html") if r.get("heatmap") else None
        ),
        thumb_href=lambda r: None,
        generated_at="2026-11-25T11:00:00Z",
    )
    write_page(site / "review.html", page)
    return site, rows


@needs_chromium
class TestInBrowser:
    def test_cards_images_filters_and_hostile_name(
        self, review_site: tuple[Path, list[dict[str, str]]], tmp_path: Path
    ) -> None:
        """Chromium shows every card, loads every heat map, filters by #fragment, runs no script."""
        site, rows = review_site
        page = (site / "review.html").read_text(encoding="utf-8")
        # a test-only copy: the harness script is allowed by a nonce, the page's CSP stays in force
        probe = page.replace("default-src 'none';", "default-src 'none'; script-src 'nonce-t3st';", 1)
        probe = probe.replace("</head>", HARNESS + "</head>", 1)
        (site / "probe.html").write_text(probe, encoding="utf-8")

        done = chromium((site / "probe.html").as_uri() + "#pneumonia", tmp_path / "profile", "--dump-dom")
        assert 0 == done.returncode, done.stderr[-2000:]
        found = re.search(r'<pre id="harness">(.*?)</pre>', done.stdout, re.S)
        assert found, f"harness did not report; stderr: {done.stderr[-2000:]}"
        import html as html_mod

        result = json.loads(html_mod.unescape(found.group(1)))
        n_pneu = sum(r["label"] == "PNEUMONIA" for r in rows)
        n_normal = sum(r["label"] == "NORMAL" for r in rows)
        assert n_pneu >= 1 and n_normal >= 1
        assert n_pneu == result["initial"]  # opened as review.html#pneumonia: no JS on the page
        assert {"#all": len(rows), "#pneumonia": n_pneu, "#normal": n_normal, "#failed": 1,
                "#warnings": 1} == result["filters"]  # fmt: skip
        assert len(rows) - 1 == len(result["images"])
        assert all(w == 224 for w in result["images"]), result["images"]
        assert [] == result["errors"]
        assert 1 == result["scripts"]  # the harness only
        assert HOSTILE in result["files"]
        assert [] == console_lines(done.stderr)

    def test_undecodable_name_loads_its_heat_map(self, tmp_path: Path) -> None:
        """The daemon's page for a file name that is not UTF-8 loads the heat map in Chromium."""
        cfg = daemon_page_with_undecodable_name(tmp_path)
        assert cfg.review_page is not None
        probe = cfg.review_page.read_text(encoding="utf-8")
        probe = probe.replace("default-src 'none';", "default-src 'none'; script-src 'nonce-t3st';", 1)
        probe = probe.replace("</head>", HARNESS + "</head>", 1)
        (cfg.review_page.parent / "probe.html").write_text(probe, encoding="utf-8")
        done = chromium((cfg.review_page.parent / "probe.html").as_uri(), tmp_path / "profile", "--dump-dom")
        found = re.search(r'<pre id="harness">(.*?)</pre>', done.stdout, re.S)
        assert found, f"harness did not report; stderr: {done.stderr[-2000:]}"
        import html as html_mod

        result = json.loads(html_mod.unescape(found.group(1)))
        assert [16] == result["images"]
        assert [] == result["errors"]
        assert ["caf\ufffd <b>.jpeg"] == result["files"]

    def test_screenshot(self, review_site: tuple[Path, list[dict[str, str]]], tmp_path: Path) -> None:
        """The real page renders to a 1280x2000 screenshot a person can look at; no console output."""
        site, _ = review_site
        shot = tmp_path / "review.png"
        done = chromium(
            (site / "review.html").as_uri(),
            tmp_path / "profile",
            f"--screenshot={shot}",
            "--window-size=1280,2000",
        )
        assert 0 == done.returncode, done.stderr[-2000:]
        img = cv2.imread(str(shot), cv2.IMREAD_COLOR)
        assert (2000, 1280, 3) == img.shape
        assert float(np.std(img)) > 10  # not a blank page
        assert [] == console_lines(done.stderr)


@needs_chromium
class TestLiveDaemon:
    def test_page_of_a_live_daemon_run_in_chromium(
        self, make_config: Callable[..., Config], tmp_path: Path
    ) -> None:
        """run --once with heat maps on the fixtures: the daemon's own page shows a card and a loading
        heat map per file, filters, no console errors, the hostile name as text; a screenshot is kept."""
        root = tmp_path / "svc"
        root.mkdir()
        shutil.copytree(Path(__file__).parents[1] / "model_store", root / "model_store")
        cfg = make_config(explain={"enabled": True}, review={"interval_s": 0.1})
        files = fixture_images()[::3]
        names = [HOSTILE_NAME if i == 0 else p.name for i, p in enumerate(files)]
        for name, p in zip(names, files, strict=True):
            (cfg.inbox / name).write_bytes(p.read_bytes())
        (cfg.inbox / "broken.jpeg").write_bytes(files[0].read_bytes()[:500])
        proc = run_once(cfg)
        assert 0 == proc.returncode, proc.stderr[-3000:]
        rows = read_csv_both(cfg.results)
        assert len(files) + 1 == len(rows)
        ok = [r for r in rows if r["status"] == "ok"]
        assert all(r["heatmap"] and (cfg.source.parent / r["heatmap"]).is_file() for r in ok)  # type: ignore[union-attr]
        page = cfg.results.parent / "review.html"
        probe = page.read_text(encoding="utf-8")
        probe = probe.replace("default-src 'none';", "default-src 'none'; script-src 'nonce-t3st';", 1)
        probe = probe.replace("</head>", HARNESS + "</head>", 1)
        (page.parent / "probe.html").write_text(probe, encoding="utf-8")
        done = chromium((page.parent / "probe.html").as_uri(), tmp_path / "profile", "--dump-dom")
        found = re.search(r'<pre id="harness">(.*?)</pre>', done.stdout, re.S)
        assert found, f"harness did not report; stderr: {done.stderr[-2000:]}"
        import html as html_mod

        result = json.loads(html_mod.unescape(found.group(1)))
        labels = [r["label"] for r in ok]
        assert {"#all": len(rows), "#pneumonia": labels.count("PNEUMONIA"), "#normal": labels.count("NORMAL"),
                "#failed": 1, "#warnings": 0} == result["filters"]  # fmt: skip
        assert len(ok) == len(result["images"])
        assert all(w > 0 for w in result["images"]), result["images"]
        assert [] == result["errors"]
        assert HOSTILE_NAME in result["files"]
        assert [] == console_lines(done.stderr)
        shot = tmp_path / "review-live.png"
        chromium(page.as_uri(), tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1280,1600")
        assert (1600, 1280, 3) == cv2.imread(str(shot), cv2.IMREAD_COLOR).shape
