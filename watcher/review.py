"""The review page: one static, self-contained HTML file rendered from results.csv rows.

No server, no external scripts, fonts or style sheets, and no JavaScript: the page opens
from a shared drive in any browser. The filters (all, PNEUMONIA, NORMAL, failed, warnings)
are links to ``#pneumonia`` etc.; CSS ``:target`` rules hide the other cards, so a filtered
view can also be bookmarked or sent as ``review.html#failed``.

Every value from a row is data, never markup: each one goes through ``html.escape``
(file names may hold ``<``, quotes, control characters or undecodable bytes). A
Content-Security-Policy meta tag forbids scripts on the page as a second line of defence.
Image links are relative paths to PNG files beside the page (or ``data:image/...`` URIs);
anything else is dropped.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from watcher.fsutil import atomic_write_text

if TYPE_CHECKING:
    from watcher.config import Config

log = structlog.get_logger()

Row = Mapping[str, str]
HrefFn = Callable[[Row], "str | None"]

LABELS = ("PNEUMONIA", "NORMAL")
FILTERS = (("pneumonia", "PNEUMONIA"), ("normal", "NORMAL"), ("failed", "failed"), ("warnings", "warnings"))
METRICS = (("roc_auc", "ROC AUC"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
           ("accuracy", "accuracy"))  # fmt: skip
UID_FIELDS = (("study_instance_uid", "study"), ("series_instance_uid", "series"), ("sop_instance_uid", "SOP"))

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

CSP = (
    "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)

_CSS = """
:root { --pn: #b3261e; --no: #1b6e3a; --fail: #5f6368; --warn: #8a5a00; --ink: #1f1f1f; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: #f4f4f6; }
header { background: #fff; border-bottom: 1px solid #ddd; padding: 12px 20px; }
h1 { font-size: 20px; margin: 0 0 6px; }
.sub { color: #555; margin: 0; }
.stats { display: flex; flex-wrap: wrap; gap: 8px 24px; margin: 10px 0 0; padding: 0; list-style: none; }
.stats b { font-size: 18px; }
.model { margin-top: 8px; color: #333; }
.model span { margin-right: 16px; white-space: nowrap; }
.anchor { display: block; height: 0; }
nav { padding: 10px 20px; position: sticky; top: 0; background: #f4f4f6ee; z-index: 1; }
nav a { display: inline-block; padding: 4px 12px; margin: 0 6px 6px 0; border-radius: 14px;
        border: 1px solid #bbb; color: var(--ink); text-decoration: none; background: #fff; }
nav a.all { background: var(--ink); color: #fff; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: 14px;
       padding: 0 20px 20px; }
.card { background: #fff; border-radius: 8px; border: 1px solid #ddd; border-top: 5px solid var(--fail);
        overflow: hidden; }
.card.label-pneumonia { border-top-color: var(--pn); }
.card.label-normal { border-top-color: var(--no); }
.card .img { display: block; background: #111; aspect-ratio: 1 / 1; }
.card img { display: block; width: 100%; height: 100%; object-fit: contain; }
.card .noimg { display: flex; align-items: center; justify-content: center; height: 100%; color: #aaa; }
.body { padding: 8px 10px 10px; }
.file { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; overflow-wrap: anywhere; }
.label { font-weight: 700; font-size: 16px; }
.label-pneumonia .label { color: var(--pn); }
.label-normal .label { color: var(--no); }
.status-failed .label { color: var(--fail); }
.bar { position: relative; height: 8px; background: #e6e6e6; border-radius: 4px; margin: 4px 0 2px; }
.bar span { position: absolute; left: 0; top: 0; bottom: 0; border-radius: 4px; background: var(--no); }
.label-pneumonia .bar span { background: var(--pn); }
.bar i { position: absolute; top: -3px; bottom: -3px; width: 2px; background: #000; }
.meta { color: #555; font-size: 12px; }
dl { margin: 6px 0 0; font-size: 11px; display: grid; grid-template-columns: auto 1fr; gap: 0 6px; }
dt { color: #777; } dd { margin: 0; overflow-wrap: anywhere; font-family: ui-monospace, monospace; }
.warning, .error { margin-top: 6px; padding: 4px 6px; border-radius: 4px; font-size: 12px;
                   overflow-wrap: anywhere; }
.warning { background: #fff4d6; color: var(--warn); }
.error { background: #fde8e7; color: var(--pn); }
.empty { padding: 20px; color: #666; }
footer { padding: 0 20px 20px; color: #777; font-size: 12px; }
#pneumonia:target ~ main .card:not(.label-pneumonia),
#normal:target ~ main .card:not(.label-normal),
#failed:target ~ main .card:not(.status-failed),
#warnings:target ~ main .card:not(.has-warning) { display: none; }
#pneumonia:target ~ nav a.all, #normal:target ~ nav a.all, #failed:target ~ nav a.all,
#warnings:target ~ nav a.all { background: #fff; color: var(--ink); }
#pneumonia:target ~ nav a.f-pneumonia, #normal:target ~ nav a.f-normal,
#failed:target ~ nav a.f-failed, #warnings:target ~ nav a.f-warnings { background: var(--ink); color: #fff; }
"""


def _raw(s: str) -> bytes:
    """The bytes ``s`` stands for, never raising.

    A lone surrogate U+DC80..U+DCFF is an undecodable byte of a file name (``os.fsdecode``,
    ``surrogateescape``) and becomes that byte; any other lone surrogate has no bytes on disk
    and becomes its (invalid) UTF-8 form.
    """
    try:
        return s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return b"".join(
            c.encode("utf-8", "surrogateescape" if "\udc80" <= c <= "\udcff" else "surrogatepass") for c in s
        )


def _text(value: object) -> str:
    """A printable, encodable string: undecodable bytes and control characters become U+FFFD."""
    s = "" if value is None else str(value)
    return _CONTROL.sub("\ufffd", _raw(s).decode("utf-8", "replace"))


def esc(value: object) -> str:
    """HTML-escape any value for element text or a double-quoted attribute."""
    return html.escape(_text(value), quote=True)


def safe_href(href: str | None) -> str | None:
    """``href`` if it is a relative URL or a ``data:image/`` URI, else None (no javascript: etc.)."""
    if not href:
        return None
    href = _text(href).strip()
    if href.lower().startswith("data:image/"):
        return href
    parts = urllib.parse.urlsplit(href)
    if parts.scheme or parts.netloc or href.startswith(("/", "\\")):
        return None
    return href


def relative_href(target: Path, page: Path) -> str:
    """A percent-encoded relative URL from the page's folder to ``target`` (POSIX separators).

    The URL names the bytes on disk: an undecodable byte of a name (a lone surrogate, as
    ``os.fsdecode`` gives it) becomes its own escape, e.g. ``caf\\udce9`` -> ``caf%E9``. Never raises.
    """
    rel = Path(os.path.relpath(target, page.parent)).as_posix()
    return urllib.parse.quote(_raw(rel), safe="/")


def count_rows(rows: Iterable[Row]) -> dict[str, int]:
    """Counts for the header: total, per label, failed and with a warning."""
    out = {"total": 0, "PNEUMONIA": 0, "NORMAL": 0, "failed": 0, "warnings": 0}
    for row in rows:
        out["total"] += 1
        if row.get("status") == "failed":
            out["failed"] += 1
        elif row.get("label") in LABELS:
            out[str(row.get("label"))] += 1
        if row.get("warning"):
            out["warnings"] += 1
    return out


def newest_first(rows: Iterable[Row], max_rows: int) -> list[Row]:
    """The ``max_rows`` most recent rows, newest first (ties: later in the file first)."""
    indexed = list(enumerate(rows))
    indexed.sort(key=lambda ir: (ir[1].get("processed_at") or "", ir[0]), reverse=True)
    return [r for _, r in indexed[: max(max_rows, 0)]]


def _float(value: object) -> float | None:
    try:
        out = float(str(value))
    except (TypeError, ValueError):
        return None
    return out if out == out and abs(out) != float("inf") else None


def _pct(x: float) -> str:
    return f"{min(max(x, 0.0), 1.0) * 100:.1f}%"


def _card(row: Row, heatmap_href: HrefFn, thumb_href: HrefFn) -> str:
    status = "failed" if row.get("status") == "failed" else "ok"
    label = row.get("label") or ""
    classes = ["card", f"status-{status}"]
    if status == "ok" and label in LABELS:
        classes.append(f"label-{label.lower()}")
    warning = row.get("warning") or ""
    if warning:
        classes.append("has-warning")
    file_name = row.get("file") or ""
    src = safe_href(heatmap_href(row)) or safe_href(thumb_href(row))
    if src:
        image = (
            f'<a class="img" href="{esc(src)}"><img src="{esc(src)}" '
            f'alt="{esc("image of " + file_name)}"></a>'
        )
    else:
        image = '<div class="img"><div class="noimg">no image</div></div>'

    prob, thr = _float(row.get("probability")), _float(row.get("threshold"))
    if status == "failed":
        headline = '<div class="label">failed</div>'
        score = ""
    else:
        headline = f'<div class="label">{esc(label or "?")}</div>'
        if prob is not None:
            thr_txt = f" (threshold {thr:.3f})" if thr is not None else ""
            marker = f'<i style="left:{_pct(thr)}" title="threshold"></i>' if thr is not None else ""
            score = (
                f'<div class="bar" title="probability {prob:.3f}{esc(thr_txt)}">'
                f'<span style="width:{_pct(prob)}"></span>{marker}</div>'
                f'<div class="meta">p = {prob:.3f}{esc(thr_txt)}</div>'
            )
        else:
            score = ""
    uids = "".join(f"<dt>{name}</dt><dd>{esc(row.get(key))}</dd>" for key, name in UID_FIELDS if row.get(key))
    parts = [
        f'<article class="{" ".join(classes)}">',
        image,
        '<div class="body">',
        headline,
        score,
        f'<div class="file" title="file name"><bdi>{esc(file_name)}</bdi></div>',
        f'<div class="meta"><time>{esc(row.get("processed_at"))}</time>'
        + (f" · model {esc(row.get('model_version'))}" if row.get("model_version") else "")
        + (f" · {esc(row.get('width'))}×{esc(row.get('height'))}" if row.get("width") else "")
        + "</div>",
        f"<dl>{uids}</dl>" if uids else "",
        f'<div class="warning">⚠ {esc(warning)}</div>' if warning else "",
        f'<div class="error">{esc(row.get("error") or "unknown error")}</div>' if status == "failed" else "",
        "</div></article>",
    ]
    return "".join(p for p in parts if p)


def _model_block(model: Mapping[str, Any]) -> str:
    metrics = model.get("validation") or model.get("metrics") or {}
    bits = [f"<span>model <b>{esc(model.get('version') or '?')}</b></span>"]
    thr = _float(model.get("threshold"))
    if thr is not None:
        bits.append(f"<span>threshold {thr:.3f}</span>")
    for key, name in METRICS:
        value = _float(metrics.get(key)) if isinstance(metrics, Mapping) else None
        if value is not None:
            bits.append(f"<span>{name} {value:.3f}</span>")
    if isinstance(metrics, Mapping) and metrics.get("split"):
        bits.append(f"<span>(validation split: {esc(metrics.get('split'))})</span>")
    return f'<div class="model">{"".join(bits)}</div>'


def render_page(
    rows: list[dict[str, str]],
    *,
    model: Mapping[str, Any],
    counts: Mapping[str, object],
    heatmap_href: HrefFn,
    thumb_href: HrefFn,
    generated_at: str,
    max_rows: int = 200,
    title: str = "xray-watcher review",
    counts_of: str = "",
) -> str:
    """The whole page as a string: header with counts and model figures, newest rows as cards.

    Args:
        rows: results.csv rows (dicts keyed by column name; newer columns may be missing).
        model: ``version``, ``threshold`` and ``validation`` (or ``metrics``) with
            ``roc_auc``, ``sensitivity``, ``specificity``, ``accuracy`` (metadata.json fits).
        counts: shown as is in the header, e.g. ``count_rows(all_rows)``.
        counts_of: what ``counts`` cover, in words before them (e.g. "in the 200 rows shown:");
            say so whenever they are not counts of every row ever processed.
        heatmap_href, thumb_href: a row's image URL relative to the page, or None; the heat
            map is preferred (its overlay already shows the radiograph).
    """
    shown = newest_first(rows, max_rows)
    stats = f"<li>{esc(counts_of)}</li>" if counts_of else ""
    stats += "".join(f"<li>{esc(key)} <b>{esc(value)}</b></li>" for key, value in counts.items())
    of_rows = f" of {len(rows)}" if len(shown) < len(rows) else ""
    anchors = "".join(f'<span class="anchor" id="{fid}"></span>' for fid, _ in FILTERS)
    nav = '<a class="all" href="#all">all</a>' + "".join(
        f'<a class="f-{fid}" href="#{fid}">{name}</a>' for fid, name in FILTERS
    )
    cards = "\n".join(_card(r, heatmap_href, thumb_href) for r in shown)
    if not cards:
        cards = '<p class="empty">No files processed yet.</p>'
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="xray-watcher">
<title>{esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header id="all">
<h1>{esc(title)}</h1>
<p class="sub">Generated {esc(generated_at)} · showing the {len(shown)} most recent{of_rows} rows,
newest first. Heat maps show where the model found evidence for PNEUMONIA; they are a screening
aid, not a diagnosis.</p>
<ul class="stats">{stats}</ul>
{_model_block(model)}
</header>
{anchors}
<nav>{nav}</nav>
<main>
{cards}
</main>
<footer>Static page written by xray-watcher; it refreshes when the daemon rewrites it (reload).</footer>
</body>
</html>
"""


def write_page(path: Path, page: str) -> None:
    """Write the page atomically (readers see the old page or the new one), readable by all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page, mode=0o644)  # others open the page from a share


def seed_rows(results: Path, max_rows: int) -> list[dict[str, str]]:
    """The newest ``max_rows`` rows of the results set, oldest first, reading only tails.

    results.csv first, then the rotated files newest first (``report.results_files``), until
    ``max_rows`` rows are found: right after a rotation the new file holds only a few rows. A
    file that cannot be read is logged and skipped (the page is a view, never a reason to stop).
    """
    from watcher.report import results_files, tail_rows

    out: list[dict[str, str]] = []
    try:
        files = results_files(results)
    except OSError as exc:
        log.warning("review_seed_failed", path=str(results), error=f"{type(exc).__name__}: {exc}")
        return out
    for file in reversed(files):
        need = max_rows - len(out)
        if need <= 0:
            break
        try:
            out = tail_rows(file, need) + out
        except (OSError, ValueError, csv.Error) as exc:
            log.warning("review_seed_failed", path=str(file), error=f"{type(exc).__name__}: {exc}")
    return out


class ReviewPage:
    """The daemon's review page: the newest rows in memory, rewritten at most every few seconds.

    Seeded at start-up with the newest ``max_rows`` rows of the results set (``seed_rows``:
    the tails of results.csv and, after a rotation, of the rotated files before it; never a
    whole file); each batch adds its rows; ``maybe_write`` renders and writes atomically when
    ``review.interval_s`` has passed since the last write. A failure to write is logged, never
    raised: the page is a view of results.csv, which stays the record. Its counts are of the
    rows shown (true totals would mean reading every file whole).
    """

    def __init__(self, path: Path, cfg: Config, max_rows: int = 200) -> None:
        from collections import deque

        self.path = path
        self.cfg = cfg
        self.base = cfg.source.parent if cfg.source is not None else Path.cwd()
        self.rows: deque[dict[str, str]] = deque(seed_rows(cfg.results, max_rows), maxlen=max(max_rows, 0))
        self.interval_s = cfg.review.interval_s
        self._last_write = 0.0
        self._dirty = True

    def add(self, rows: Iterable[Any]) -> None:
        """Rows of a batch (``ResultRow`` objects or dicts)."""
        for row in rows:
            self.rows.append(dict(row) if isinstance(row, Mapping) else dataclasses.asdict(row))
        self._dirty = True

    def maybe_write(self, predictor: Any) -> None:
        """Rewrite the page if rows were added and ``interval_s`` has passed."""
        if self._dirty and time.monotonic() - self._last_write >= self.interval_s:
            self.write(predictor)

    def _heatmap_href(self, row: Mapping[str, str]) -> str | None:
        """The link to a row's heat map; None when it is gone (old day folders may be deleted:
        the card then says "no image" rather than show a broken picture)."""
        rel = row.get("heatmap") or ""
        path = self.base / rel
        return relative_href(path, self.path) if rel and path.is_file() else None

    def write(self, predictor: Any) -> None:
        """Render and write the page now."""
        rows = list(self.rows)
        model = dict(predictor.metadata) if predictor is not None else {}
        if predictor is not None:
            model.update(version=predictor.version, threshold=predictor.threshold)
        try:
            page = render_page(
                rows,
                model=model,
                counts=count_rows(rows),
                heatmap_href=self._heatmap_href,
                thumb_href=lambda row: None,
                generated_at=datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
                max_rows=len(rows),
                counts_of=f"in the {len(rows)} rows shown:",  # older rows are only in the results files
            )
            write_page(self.path, page)
        except Exception as exc:  # the page never stops the service
            log.error("review_page_failed", path=str(self.path), error=f"{type(exc).__name__}: {exc}")
        self._last_write = time.monotonic()
        self._dirty = False
