"""Typed configuration: ``load_config(path) -> Config``.

The YAML file maps onto nested frozen dataclasses. Unknown keys, wrong types and missing
folders raise one ``ConfigError`` naming the file and the dotted key. Relative paths are
resolved against the folder holding the config file, so the service behaves the same
whatever its working directory.
"""

from __future__ import annotations

import dataclasses
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from watcher.errors import ConfigError

DEFAULT_CONFIG = "config.yaml"  # what --config defaults to: config.yaml in the current folder


@dataclass(frozen=True)
class BatchConfig:
    """How files are grouped for the model."""

    max_size: int = 32
    max_wait_ms: int = 500


@dataclass(frozen=True)
class IngestConfig:
    """How the inbox is watched."""

    observer: Literal["native", "polling"] = "native"
    settle_ms: int = 1000
    poll_interval_ms: int = 1000
    rescan_interval_s: float = 60.0
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".dcm", ".dicom")


@dataclass(frozen=True)
class DecodeConfig:
    """Limits and parallelism of image decoding."""

    workers: int = 2
    max_pixels: int = 100_000_000
    max_file_mb: int = 512
    # a JPEG decoded DCT-scaled whose probability lands in [m, 1 - m] is decoded again in full
    # and scored again (the sigmoid is steepest there); 0 turns the second look off
    second_look_margin: float = 0.05


@dataclass(frozen=True)
class LogConfig:
    """Log level and format (auto: console on a TTY, JSON otherwise)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True)
class DicomConfig:
    """Which DICOM objects are scored."""

    accept_any_body_part: bool = False  # score non-chest BodyPartExamined / non-radiograph modalities too


@dataclass(frozen=True)
class ListenerConfig:
    """The DICOM Storage SCP (``xray-watcher listen``)."""

    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "XRAY_WATCHER"
    allowed_calling_aets: tuple[str, ...] = ()  # empty: any calling AE title is accepted
    stop_timeout_s: float = 25.0  # still alive this long after SIGTERM: stacks to stderr, exit 1


@dataclass(frozen=True)
class ExplainConfig:
    """Grad-CAM heat maps for each scored file."""

    enabled: bool = False
    folder: Path = Path("heatmaps")  # relative: against the config file's folder


@dataclass(frozen=True)
class ReviewConfig:
    """The static review page."""

    page: str = "review.html"  # relative: beside results.csv; empty: no page
    max_rows: int = 200
    interval_s: float = 5.0  # rewritten at most this often while files arrive


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint (port 0: off)."""

    port: int = 0
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class ReportConfig:
    """Rotation and retention of results.csv, and the disk-space warning."""

    rotate: Literal["never", "daily", "monthly", "size"] = "monthly"
    max_mb: int = 100  # rotate: size
    keep: int = 0  # rotated files kept; 0: all
    min_free_mb: int = 1024  # warn when the results' filesystem has less free


@dataclass(frozen=True)
class FilingConfig:
    """How processed/ and failed/ are laid out."""

    layout: Literal["label", "date/label"] = "label"


@dataclass(frozen=True)
class Config:
    """The whole service configuration; every path is absolute."""

    inbox: Path
    processed: Path
    failed: Path
    results: Path
    model_store: Path
    batch: BatchConfig = field(default_factory=BatchConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    filing: FilingConfig = field(default_factory=FilingConfig)
    instance_id: str = ""
    model_poll_s: float = 10.0
    stop_timeout_s: float = 90.0
    # the model's runtime: auto = ONNX Runtime on a host without GPU when it converts and
    # matches TensorFlow (else TensorFlow); tensorflow; onnxruntime (TensorFlow if it cannot)
    runtime: Literal["auto", "tensorflow", "onnxruntime"] = "auto"
    source: Path | None = None

    @property
    def work_dir(self) -> Path:
        """This instance's claim folder inside the inbox (hidden, so never scanned)."""
        return self.inbox / ".xray-watcher" / self.instance_id

    @property
    def review_page(self) -> Path | None:
        """The review page's path (relative names: beside results.csv), or None when off."""
        if not self.review.page:
            return None
        page = Path(self.review.page).expanduser()
        return page if page.is_absolute() else self.results.parent / page

    @property
    def status_file(self) -> Path:
        """The state file the daemon rewrites for ``xray-watcher status``."""
        return self.work_dir / "status.json"


_FOLDER_KEYS = ("inbox", "processed", "failed", "model_store")
_POSITIVE_KEYS = {
    "batch.max_size",
    "batch.max_wait_ms",
    "ingest.poll_interval_ms",
    "ingest.rescan_interval_s",
    "decode.workers",
    "decode.max_pixels",
    "decode.max_file_mb",
    "model_poll_s",
    "stop_timeout_s",
    "review.max_rows",
    "review.interval_s",
    "report.max_mb",
    "listener.port",
    "listener.stop_timeout_s",
}
_NON_NEGATIVE_KEYS = {"ingest.settle_ms", "metrics.port", "report.keep", "report.min_free_mb"}


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (tuple, list):
        return f"a list of {_type_name(get_args(tp)[0])}"
    if tp is Path:
        return "a path (string)"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: Path) -> Any:
    """Check ``value`` against ``tp``, converting where the YAML form differs."""

    def bad() -> ConfigError:
        return ConfigError(
            f"{source}: key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )

    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, key + ".", source)
    if origin is Literal:
        if value not in get_args(tp):
            raise bad()
        return value
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise bad()
        (item_tp, *_) = get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise bad()  # unions are internal-only fields
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise bad()
        path = Path(value).expanduser()
        return path if path.is_absolute() else (source.parent / path)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise bad()


def _build(cls: Any, raw: dict[str, Any], prefix: str, source: Path) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    for k in raw:
        if k not in known:
            raise ConfigError(
                f"{source}: unknown key '{prefix}{k}' (known keys here: {', '.join(sorted(known))})"
            )
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: required key '{prefix}{f.name}' is missing")
            continue
        key = prefix + f.name
        value = _convert(raw[f.name], hints[f.name], key, source)
        if key in _POSITIVE_KEYS and value <= 0:
            raise ConfigError(f"{source}: key '{key}' must be greater than 0, got {value!r}")
        if key in _NON_NEGATIVE_KEYS and value < 0:
            raise ConfigError(f"{source}: key '{key}' must be 0 or more, got {value!r}")
        kwargs[f.name] = value
    return cls(**kwargs)


def _refuse_nul(value: Any, key: str, source: Path) -> None:
    """A NUL character can be in no path or name the system takes: refused with its key."""
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_nul(v, f"{key}.{k}" if key else str(k), source)
    elif isinstance(value, list):
        for v in value:
            _refuse_nul(v, key, source)
    elif isinstance(value, str) and "\0" in value:
        raise ConfigError(f"{source}: key '{key}' holds a NUL character ({value!r})")


def load_config(path: str | Path) -> Config:
    """Read, check and resolve a config file."""
    source = Path(path).expanduser().absolute()
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {source}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:  # e.g. a comment saved in Latin-1 by an editor
        line = source.read_bytes()[: exc.start].count(b"\n") + 1
        byte = exc.object[exc.start]
        raise ConfigError(
            f"{source}: line {line} is not UTF-8 text (byte 0x{byte:02x}): save it as UTF-8"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    _refuse_nul(raw, "", source)
    cfg: Config = _build(Config, raw, "", source)
    for key in _FOLDER_KEYS:
        folder: Path = getattr(cfg, key)
        if not folder.is_dir():
            raise ConfigError(f"{source}: key '{key}' names a folder that does not exist: {folder}")
    if not cfg.results.parent.is_dir():
        raise ConfigError(f"{source}: key 'results' is in a folder that does not exist: {cfg.results.parent}")
    if cfg.results.is_dir():
        raise ConfigError(f"{source}: key 'results' must name a file, not a folder: {cfg.results}")
    explain_folder = cfg.explain.folder.expanduser()
    if not explain_folder.is_absolute():
        explain_folder = source.parent / explain_folder
    # Nothing the daemon writes may land under the inbox, not even in a hidden folder: its own
    # outputs would come back as new inbox files, again and again. Compared by resolved path
    # parts, so a sibling that merely shares a prefix (/srv/in and /srv/inbox2) is fine.
    inbox = cfg.inbox.resolve()
    outputs: list[tuple[str, Path, str]] = [
        ("processed", cfg.processed, "the scored files"),
        ("failed", cfg.failed, "the unreadable files"),
        # results.csv, its rotated files and their temporary files are all written beside it
        ("results", cfg.results.parent, "results.csv and its rotated files"),
    ]
    page = cfg.review_page
    if page is not None:
        outputs.append(("review.page", page.parent, "the review page"))
    if cfg.explain.enabled:
        outputs.append(("explain.folder", explain_folder, "the heat-map PNGs"))
    for key, dest_path, what in outputs:
        dest = dest_path.resolve()
        if dest == inbox or inbox in dest.parents:
            raise ConfigError(
                f"{source}: key '{key}' must not be inside the inbox ({inbox}): the daemon writes {what}"
                " there, and what it writes inside the inbox can be taken again as new files"
            )
    for key in ("listener.port", "metrics.port"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) > 65535:
            raise ConfigError(f"{source}: key '{key}' must be a TCP port (0-65535)")
    margin = cfg.decode.second_look_margin
    if not 0.0 <= margin < 0.5:
        raise ConfigError(f"{source}: key 'decode.second_look_margin' must be in [0, 0.5), got {margin!r}")
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in cfg.ingest.extensions)
    instance = cfg.instance_id or socket.gethostname() or "local"
    if "/" in instance or instance.startswith("."):
        raise ConfigError(f"{source}: key 'instance_id' must be a plain name, got {instance!r}")
    return dataclasses.replace(
        cfg,
        ingest=dataclasses.replace(cfg.ingest, extensions=exts),
        explain=dataclasses.replace(cfg.explain, folder=explain_folder),
        instance_id=instance,
        source=source,
    )
