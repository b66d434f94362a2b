"""The static review page: escaping, counts, order, and the page as a real browser shows it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from tests.conftest import fixture_images
from tests.harness import read_csv_both, run_once
from watcher.config import Config
from watcher.review import count_rows, newest_first, relative_href, render_page, safe_href, write_page

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


# ------------------------------------------------------------------ real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
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
