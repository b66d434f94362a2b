"""The xray-watcher command line: the daemon, the listener, the model store and the tools around them.

Exit codes: 0 success, 1 a runtime failure (no usable model, store or results file),
2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from watcher import __version__, model_store
from watcher.config import DEFAULT_CONFIG, Config, DecodeConfig, load_config
from watcher.errors import ConfigError, WatcherError
from watcher.logs import capture_thread_crashes, configure_logging
from watcher.runtime import import_tensorflow, quiet_tensorflow
from watcher.signals import dump_stacks_on_fatal_signals
from watcher.splits import class_folder_problem

log = structlog.get_logger()

# imported (quietly) up front; the other commands load it only if the version must be served or
# converted by TensorFlow (a GPU host, runtime: tensorflow for ``run`` and ``check``, a version
# without a usable model.onnx)
_NEEDS_TENSORFLOW = {"train"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xray-watcher", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"xray-watcher {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s)")

    run = sub.add_parser("run", help="watch the inbox and process files until SIGTERM/SIGINT")
    with_config(run)
    run.add_argument("--once", action="store_true", help="process what is in the inbox now, then exit")

    pred = sub.add_parser("predict", help="print CSV rows for image files (nothing is moved)")
    with_config(pred)
    pred.add_argument("--store", type=Path, help="model store (default: from the config)")
    pred.add_argument("--model-version", help="a published version (default: current)")
    pred.add_argument(
        "--heatmaps", type=Path, metavar="DIR", help="also write Grad-CAM overlays to DIR/<LABEL>/<file>.png"
    )
    pred.add_argument("files", nargs="+", type=Path)

    ev = sub.add_parser("evaluate", help="metrics of a model on a folder with NORMAL/ and PNEUMONIA/")
    with_config(ev)
    ev.add_argument("--data", type=Path, required=True)
    ev.add_argument("--store", type=Path, help="model store (default: from the config)")
    ev.add_argument("--model-version", help="a published version (default: current)")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.add_argument("--report", type=Path, help="also write metrics.json and plots to this folder")

    tr = sub.add_parser("train", help="train a model on a labelled folder and publish it")
    tr.add_argument("--data", type=Path, required=True, help="folder with NORMAL/ and PNEUMONIA/")
    tr.add_argument("--store", type=Path, default=Path("model_store"))
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--arch", help="architecture (default: the recommended one; 'seed' for the seed CNN)")
    tr.add_argument("--seed", type=int, default=1337)
    tr.add_argument(
        "--split",
        choices=["era", "random"],
        default="era",
        help="patient-level validation split: era (oldest patients held out) or random",
    )
    tr.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="stop training before an epoch would end past this wall time",
    )
    tr.add_argument(
        "--clahe-tiles",
        type=int,
        metavar="N",
        help="CLAHE tile grid N x N (default: the architecture's; dsnet 4, v0002 was trained with 8)",
    )
    tr.add_argument("--promote", action="store_true", help="make the new version current whatever it scores")

    models = sub.add_parser("models", help="list, promote or roll back model versions")
    models.add_argument("--store", type=Path, help="model store (default: from the config)")
    with_config(models)
    msub = models.add_subparsers(dest="action", required=True)

    def models_action(name: str, help: str) -> argparse.ArgumentParser:
        # --store and --config also after the action (`models promote v0005 --config FILE`);
        # SUPPRESS: given there, they replace what came before it, else they leave it be
        action = msub.add_parser(name, help=help)
        action.add_argument("--store", type=Path, default=argparse.SUPPRESS, help="as before the action")
        action.add_argument("--config", default=argparse.SUPPRESS, help="as before the action")
        return action

    models_action("list", "versions with their key validation metrics")
    promote = models_action(
        "promote", "make VERSION current, once it loads as `run` would load it on this host"
    )
    promote.add_argument("version")
    promote.add_argument(
        "--force",
        action="store_true",
        help="skip the check that VERSION loads as `run` would load it on this host",
    )
    models_action("rollback", "go back to the version promoted before the current one")
    imp = models_action(
        "import", "publish a version folder trained elsewhere (a GPU machine, a scratch store)"
    )
    imp.add_argument("source", type=Path, help="a version folder: model.keras + metadata.json")
    imp.add_argument("--promote", action="store_true", help="make it current")

    chk = sub.add_parser("check", help="check the config and the current model; exit 0 or 1")
    with_config(chk)

    st = sub.add_parser("status", help="is the daemon for this config running and healthy? exit 0 or 1")
    with_config(st)
    st.add_argument("--json", action="store_true", help="print the state as JSON")

    lis = sub.add_parser("listen", help="receive DICOM over the network (C-STORE) into the inbox")
    with_config(lis)

    from watcher import backfill, init, site

    ini = sub.add_parser("init", help="lay out config.yaml, folders and the bundled model in DIR")
    init.add_arguments(ini)
    bf = sub.add_parser("backfill", help="score an archive folder into a Parquet dataset (local or Ray)")
    backfill.add_arguments(bf)
    cal = sub.add_parser("calibrate", help="refit calibration and threshold on a labelled local sample")
    site.add_arguments(cal)
    return p


def _store_from(args: argparse.Namespace) -> Path:
    if getattr(args, "store", None):
        return Path(args.store)
    return load_config(args.config).model_store


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    from watcher.service import Service

    capture_thread_crashes()
    dump_stacks_on_fatal_signals()
    service = Service(cfg)
    service.install_signal_handlers(stop_deadline=True)
    return service.run(once=args.once)


def cmd_predict(args: argparse.Namespace) -> int:
    from watcher.inference import serving_predictor
    from watcher.service import Item, load_item

    # the daemon's runtime: on a host without GPU, the version's model.onnx (no TensorFlow)
    predictor = serving_predictor(_store_from(args), args.model_version, with_maps=args.heatmaps is not None)
    limits = DecodeConfig()  # the daemon's default decode limits
    explainer = None
    if args.heatmaps is not None and predictor.onnx is not None:
        explainer = predictor.onnx  # maps from the same ONNX Runtime pass, as in the daemon
    elif args.heatmaps is not None:
        from watcher.explain import ExplainError, GradCam

        try:
            explainer = GradCam(predictor.model)
        except ExplainError as exc:
            raise WatcherError(f"--heatmaps: Grad-CAM cannot explain {predictor.version}: {exc}") from exc
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(
        ["file", "sha256", "status", "label", "probability", "threshold", "model_version", "error"]
    )
    failed = 0
    for path in args.files:
        item = load_item(
            Item(rel=PurePosixPath(str(path)), path=path),
            predictor.spec,
            max_pixels=limits.max_pixels,
            max_bytes=limits.max_file_mb << 20,
            keep_thumbnail=explainer is not None,
        )
        if item.error or item.model_input is None:
            failed += 1
            writer.writerow(
                [
                    str(path),
                    item.sha256,
                    "failed",
                    "",
                    "",
                    f"{predictor.threshold:.6f}",
                    predictor.version,
                    item.error,
                ]
            )
            continue
        pred = _score_one(predictor, explainer, item, limits, args.heatmaps)
        writer.writerow(
            [
                str(path),
                item.sha256,
                "ok",
                pred.label,
                f"{pred.probability:.6f}",
                f"{predictor.threshold:.6f}",
                predictor.version,
                "",
            ]
        )
    return 1 if failed else 0


def _score_one(predictor: Any, explainer: Any, item: Any, limits: DecodeConfig, heatmaps: Path | None) -> Any:
    """Score one decoded file as the daemon does (a borderline fast decode is decoded again in
    full); with ``explainer``, also write its Grad-CAM overlay under ``heatmaps/<LABEL>/``."""
    import numpy as np

    from watcher.explain import overlay_png, write_overlay
    from watcher.filing import plan_destination
    from watcher.service import second_look_inputs

    def score() -> tuple[Any, Any]:
        if explainer is None:
            return predictor.predict([item.model_input])[0], None
        raw, cams = explainer.predict_and_explain(item.model_input[np.newaxis], upsample=False)
        return predictor.predictions(raw)[0], cams[0]

    pred, cam = score()
    full = second_look_inputs([item], [pred.probability], predictor.spec, limits)
    if full:
        item.model_input = full[0]
        pred, cam = score()
    if explainer is not None and heatmaps is not None:
        dest = plan_destination(heatmaps / pred.label, PurePosixPath(item.path.name + ".png"), item.sha256)
        write_overlay(dest, overlay_png(item.thumb, cam, pred.label, pred.probability, predictor.threshold))
    return pred


def cmd_evaluate(args: argparse.Namespace) -> int:
    from watcher.evaluation import evaluate_folder, format_report
    from watcher.inference import serving_predictor

    predictor = serving_predictor(_store_from(args), args.model_version)  # the daemon's answers
    metrics = evaluate_folder(predictor, args.data, report_dir=args.report)
    if args.json:
        print(model_store.json_text(metrics))
    else:
        print(format_report(metrics))
    return 0


def _usage_errors(args: argparse.Namespace) -> None:
    """Mistakes in the command line that show without TensorFlow, raised before it loads (5 s)."""
    if args.command in ("train", "evaluate", "calibrate"):
        problem = class_folder_problem(Path(args.data))
        if problem:
            raise WatcherError(f"--data: {problem}")
    if args.command == "train":
        _train_options(args)
    if args.command in ("predict", "evaluate", "calibrate"):
        store = _store_from(args)
        version = getattr(args, "model_version", None) or getattr(args, "base", None)
        model_store.read_metadata(store, version or model_store.current_version(store))


def _train_options(args: argparse.Namespace) -> Any:
    """``TrainOptions`` from the command line; an unknown --arch or a bad --clahe-tiles is a
    usage error, not a traceback."""
    import dataclasses

    from watcher.architectures import DEFAULT_ARCH, defaults
    from watcher.train import TrainOptions

    kwargs = {
        "data": args.data,
        "store": args.store,
        "epochs": args.epochs,
        "seed": args.seed,
        "promote": args.promote,
        "split": args.split,
        "time_budget_s": args.time_budget,
    }
    arch = kwargs["arch"] = args.arch or DEFAULT_ARCH
    try:
        spec = defaults(arch).spec
    except ValueError as exc:
        raise WatcherError(str(exc)) from exc
    if args.clahe_tiles is not None:
        if spec.equalize != "clahe":
            raise WatcherError(f"--clahe-tiles: architecture {arch!r} does not use CLAHE")
        try:
            kwargs["spec"] = dataclasses.replace(spec, clahe_tiles=args.clahe_tiles)
        except ValueError as exc:
            raise WatcherError(f"--clahe-tiles: {exc}") from exc
    return TrainOptions(**kwargs)


def cmd_train(args: argparse.Namespace) -> int:
    from watcher.train import train

    print(train(_train_options(args)))
    return 0


def _refuse_unless_it_loads(args: argparse.Namespace, store: Path, version: str, hint: str) -> None:
    """Load ``version`` as ``run`` would on this host (with the config's ``runtime`` and
    ``explain.enabled`` where the store comes from the config, else as with ``runtime: auto``);
    a ``WatcherError`` naming the version, why it cannot serve, and ``hint`` where it cannot."""
    from watcher.inference import serving_predictor

    setting, with_maps = "auto", False
    if not getattr(args, "store", None):
        cfg = load_config(args.config)
        setting, with_maps = cfg.runtime, cfg.explain.enabled
    try:
        serving_predictor(store, version, with_maps=with_maps, setting=setting)
    except Exception as exc:  # whatever stops it loading stops the daemon too
        why = str(exc) if isinstance(exc, WatcherError) else f"{type(exc).__name__}: {exc}"
        raise WatcherError(
            f"{version} not made current: it does not load as `run` would load it here: {why} ({hint})"
        ) from exc


def cmd_models(args: argparse.Namespace) -> int:
    store = _store_from(args)
    if args.action == "promote":
        try:
            current: str | None = model_store.current_version(store)
        except WatcherError:
            current = None
        # an unknown version: set_current's error; the current one: nothing to change or check
        if not args.force and args.version != current and args.version in model_store.list_versions(store):
            _refuse_unless_it_loads(args, store, args.version, "--force promotes it anyway")
        model_store.set_current(store, args.version, reason="promoted by hand")
        print(args.version)
        return 0
    if args.action == "rollback":
        print(model_store.rollback(store))
        return 0
    if args.action == "import":
        version = model_store.import_version(store, args.source)
        if args.promote:
            _refuse_unless_it_loads(args, store, version, f"it is published as {version}, not current")
            model_store.set_current(store, version, reason=f"imported from {args.source}")
        print(version)
        return 0
    versions = model_store.list_versions(store)  # a store that is not there: the error alone
    try:
        current = model_store.current_version(store)
    except WatcherError:
        current = None
    print(
        f"{'':2}{'version':8} {'arch':10} {'created':20} {'val_auc':>8} {'val_acc':>8} {'sens':>6} "
        f"{'spec':>6} {'thresh':>7}"
    )
    for version in versions:
        mark = "* " if version == current else "  "
        try:
            meta = model_store.read_metadata(store, version)
        except WatcherError as exc:
            print(f"{mark}{version:8} unreadable: {exc}")
            continue
        threshold = meta.get("threshold")
        if not _is_number(threshold):
            print(f"{mark}{version:8} unreadable: threshold {json.dumps(threshold)} is not a number")
            continue
        val = meta.get("validation")
        val = val if isinstance(val, dict) else {}

        def fmt(key: str, val: dict[str, object] = val) -> str:
            v = val.get(key)
            return f"{v:.3f}" if _is_number(v) else "-"

        print(
            f"{mark}{version:8} {meta.get('architecture', '?')!s:10} {meta.get('created_at', '')!s:20.19} "
            f"{fmt('roc_auc'):>8} {fmt('accuracy'):>8} {fmt('sensitivity'):>6} {fmt('specificity'):>6} "
            f"{threshold:>7.3f}"
        )
    return 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def cmd_check(cfg: Config) -> int:
    from watcher.inference import serving_predictor

    # the model loaded as `run` loads it on this host (the stored graph, converted, or TensorFlow)
    predictor = serving_predictor(cfg.model_store, with_maps=cfg.explain.enabled, setting=cfg.runtime)
    if predictor.onnx_graph == "model.onnx":
        graph = "usable: run serves it without loading TensorFlow"
    elif predictor.onnx_graph_problem:
        how = "converts model.keras with TensorFlow at start" if predictor.onnx else "serves with TensorFlow"
        graph = f"not used ({predictor.onnx_graph_problem}): run {how}"
    else:
        why = "runtime: tensorflow" if cfg.runtime == "tensorflow" else "a GPU host"
        graph = f"not used: run serves with TensorFlow ({why})"
    log.info(
        "check_ok",
        config=str(cfg.source),
        model_version=predictor.version,
        inbox=str(cfg.inbox),
        onnx_graph=graph,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xray-watcher`` console script."""
    args = _parser().parse_args(argv)
    publishing = args.command in ("train", "calibrate", "init") or (
        args.command == "models" and args.action == "import"
    )
    with _exit_on_hangup_or_term() if publishing else contextlib.nullcontext():
        return _main(args)


# a publisher's `except BaseException: remove_build(...)` runs on an exception, SystemExit
# included, but not where a signal's default action ends the process
_PUBLISHER_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _exit_on_hangup_or_term() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``SystemExit(128 + signum)`` (exit 143 and 129, as the shell
    reports a death by those signals) while a publishing command runs, so that its hidden
    ``.build-*`` folder is removed: ``timeout``, ``systemd-run --wait``, a dropped ssh session.
    """

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():  # only it may set handlers
        yield
        return
    # a signal the caller ignores stays ignored: `nohup xray-watcher train ...` survives a hang-up
    before = {
        sig: signal.signal(sig, leave)
        for sig in _PUBLISHER_SIGNALS
        if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _main(args: argparse.Namespace) -> int:
    cfg: Config | None = None
    try:
        if args.command in ("run", "check", "status", "listen"):
            cfg = load_config(args.config)
            configure_logging(cfg.log.level, cfg.log.format)
            quiet_tensorflow(cfg.log.level)
        else:
            configure_logging("info", "auto", stream=sys.stderr)
            quiet_tensorflow("info")
        _usage_errors(args)
        if args.command in _NEEDS_TENSORFLOW:
            import_tensorflow()
        if args.command == "run":
            assert cfg is not None
            return cmd_run(args, cfg)
        if args.command == "check":
            assert cfg is not None
            return cmd_check(cfg)
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "train":
            return cmd_train(args)
        if args.command == "models":
            return cmd_models(args)
        if args.command == "status":
            from watcher import status

            assert cfg is not None
            return status.cli_main(cfg, args.json)
        if args.command == "listen":
            from watcher import listener

            assert cfg is not None
            capture_thread_crashes()
            dump_stacks_on_fatal_signals()
            return listener.cli_main(cfg)
        if args.command == "init":
            from watcher import init

            return init.cli_main(args)
        if args.command == "backfill":
            from watcher import backfill

            return backfill.cli_main(args)
        if args.command == "calibrate":
            from watcher import site

            args.store = _store_from(args)
            return site.cli_main(args)
    except ConfigError as exc:
        print(f"xray-watcher: configuration error: {exc}", file=sys.stderr)
        return 2
    except (WatcherError, OSError) as exc:  # OSError: a read-only store, a full disk, ...
        log.error("fatal_error", error=str(exc), error_type=type(exc).__name__)
        print(f"xray-watcher: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")
