"""The ``recsys`` command line (DESIGN.md, "Command line").

The CLI is the composition root: it is the one place in ``recsys/`` that reaches into
``features``, ``training`` and ``serving``, and it does so lazily, per command, so
``recsys --help`` stays instant and the shared core imports none of them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

from recsys.config import Config, load_config
from recsys.errors import ConfigError, RecsysError
from recsys.rundir import RunDir

log = logging.getLogger("recsys")

STEPS = ("prepare", "embed", "train", "index", "evaluate")
GATE_REFUSED = 3  # exit code of `recsys evaluate --gate` when the candidate is refused (2: an error)


def _call(target: str, *args: Any, **kwargs: Any) -> Any:
    """Import ``module:function`` on demand and call it."""
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)(*args, **kwargs)


STEP_TARGETS: dict[str, str] = {
    "prepare": "features.pipeline:prepare",
    "embed": "features.embed:embed",
    "train": "training.train:train",
    "index": "serving.index:build_index",
    "evaluate": "training.evaluate:evaluate",
}


def run_step(step: str, run: RunDir, **kwargs: Any) -> Any:
    started = time.perf_counter()
    log.info("== %s (%s)", step, run.root)
    result = _call(STEP_TARGETS[step], run, **kwargs)
    log.info("== %s done in %.1f s", step, time.perf_counter() - started)
    return result


def run_pipeline(data_dir: Path, out: Path, cfg: Config) -> RunDir:
    """prepare -> embed -> train -> index -> evaluate into a fresh run directory."""
    if not Path(data_dir).is_dir():
        raise RecsysError(f"--data {data_dir}: no such dataset directory")
    run = RunDir.create(out, cfg, data_dir)
    for step in STEPS:
        run_step(step, run)
    run.write_manifest()
    log.info("run complete: %s (metrics in %s, report in %s)", run.root, run.metrics_path, run.report_html)
    return run


def cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.nproc is not None:
        overrides.append(f"train.nproc={args.nproc}")
    run_pipeline(Path(args.data), Path(args.out), load_config(args.config, overrides))
    return 0


def cmd_step(args: argparse.Namespace) -> int:
    run = RunDir(args.run)
    run.config()  # fails clearly when RUN is not a run directory
    kwargs: dict[str, Any] = {}
    if args.command == "index" and args.compact:  # fold the log of items added at serving time into the files
        print(json.dumps(_call("serving.index:compact_index", run)))
        return 0
    if args.command == "train":
        kwargs = {"resume": args.resume, "nproc": args.nproc}
    if args.command == "evaluate" and (args.gate or args.max_drop):
        return cmd_gate(run, args)
    if args.command == "evaluate" and args.compare:
        kwargs = {"compare": [Path(p) for p in args.compare]}
    run_step(args.command, run, **kwargs)
    if args.command == "evaluate":
        run.write_manifest()
    return 0


def cmd_gate(run: RunDir, args: argparse.Namespace) -> int:
    """`recsys evaluate --run CANDIDATE --gate LIVE`: only the gate comparison (training.gate); exit 3 when refused."""
    if not args.gate:
        raise RecsysError("--max-drop needs --gate LIVE (the run the candidate would replace)")
    if args.compare:
        raise RecsysError("--gate and --compare: run the gate alone, then `recsys evaluate --run RUN --compare ...` for the report")
    max_drop = _call("training.gate:parse_max_drop", args.max_drop)
    options = {"bootstrap": args.bootstrap} if args.bootstrap is not None else {}  # default: training.gate.BOOTSTRAP
    verdict = _call("training.gate:gate", run, RunDir(args.gate), max_drop, seed=args.seed, **options)
    print(_call("training.gate:format_verdict", verdict))
    return 0 if verdict["passed"] else GATE_REFUSED


def cmd_data(args: argparse.Namespace) -> int:
    if args.source_kind == "synth":
        if args.drift is not None and args.days is None:
            raise ConfigError("--drift moves preferences from day to day: it needs --days D (the stream mode)")
        stream = {"days": args.days, **({} if args.drift is None else {"drift": args.drift})} if args.days is not None else {}
        summary = _call(
            "features.synth_stream:synthesize_stream" if stream else "features.synth:synthesize",
            Path(args.out),
            users=args.users,
            items=args.items,
            interactions=args.interactions,
            seed=args.seed,
            images=not args.no_images,
            task_correlation=args.task_correlation,
            **stream,
        )
    elif args.source_kind == "window":
        summary = _call("features.window:assemble_window", Path(args.source), Path(args.out), train=args.train, test=args.test, valid=args.valid)
    else:
        summary = _call("features.movielens:convert", Path(args.source), Path(args.out), split=args.split)
    print(json.dumps(summary, indent=2, default=str))
    return 0


class Stopped(Exception):
    """SIGTERM reached a follower: it stops at the next step boundary (a rerun resumes the generation)."""


def _run_update(base: str | Path, out: str | Path, data: str | None, events: str | None, overrides: list[str] | None, nproc: int | None, stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """The update's steps (``training.update``), each skipped when a killed run already did it; returns RUN2/update.json."""
    run, base_run, cfg, record = _call("training.update:start_update", base, out, data=data, events=events, overrides=overrides, nproc=nproc)
    for step in _call("training.update:steps"):
        if _call("training.update:is_done", run, record, step):
            continue
        if stop():
            raise Stopped(step)
        started = time.perf_counter()
        if step == "prepare":
            log.info("== prepare (update of %s)", base_run.root)
            _call("features.update:prepare_update", run, base_run, cfg.update.replay, cfg.data.seed)
        elif step == "embed":
            _call("training.update:link_cache", base_run, run)
            run_step("embed", run)
        elif step == "train":
            run_step("train", run, resume=_call("training.update:has_checkpoint", run))  # a killed update's training continues
        elif step == "gate":
            _call("training.update:run_gate", run, base_run, cfg, record)
        else:
            run_step(step, run)
        _call("training.update:mark_done", run, record, step, time.perf_counter() - started)
    return _call("training.update:finish_update", run, base_run, cfg, record)


def cmd_update(args: argparse.Namespace) -> int:
    """``recsys update``: one update (exit 3 when the gate refuses it), or ``--follow``: generation after generation."""
    if args.follow:
        return _follow(args)
    record = _run_update(args.run, args.out, args.data, args.events, args.set, args.nproc)
    print(json.dumps({k: record[k] for k in ("parent", "published", "seconds") if k in record} | ({"gate": record["gate"]} if "gate" in record else {}), indent=2, default=str))
    return 0 if record["published"] else 3


def _follow(args: argparse.Namespace) -> int:
    """Tail the live run's event log; each time enough events are past its data, update it into the next generation
    (``OUT/gen-NNNN``) with those events and publish it (``OUT/published.json``) when it passes the gate. SIGTERM
    stops it at the next step boundary; the same command resumes (an unfinished generation first)."""
    import signal

    if args.data is not None or args.events is not None:
        raise RecsysError("recsys update --follow reads the live run's own event log (RUN/events, where `recsys serve` writes): give --run and --out only")
    follow_dir = Path(args.out)
    state = _call("training.update:follow_state", follow_dir, Path(args.run))
    stopping = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stopping.__setitem__("now", True))
    cfg = load_config(None, list(args.set or []), base=RunDir(state["live"]).config()).update
    last_start = 0.0
    log.info("follow: live %s, generations in %s", state["live"], follow_dir)
    while not stopping["now"]:
        unfinished = state["generations"] and "published" not in state["generations"][-1]
        live = RunDir(state["live"])
        count, newest_ms = _call("training.update:pending_events", live)
        due = count >= cfg.follow_min_events and time.monotonic() - last_start >= cfg.follow_every_s
        if not (unfinished or due):
            time.sleep(cfg.follow_poll_s)
            continue
        if unfinished:
            generation = state["generations"][-1]
        else:
            generation = {"generation": len(state["generations"]) + 1, "parent": state["live"], "newest_event_ms": newest_ms}
            generation["run"] = str((follow_dir / f"gen-{generation['generation']:04d}").resolve())
            state["generations"].append(generation)
            _call("training.update:save_follow_state", follow_dir, state)
        last_start = time.monotonic()
        try:
            record = _run_update(generation["parent"], generation["run"], None, generation["parent"], args.set, None, stop=lambda: stopping["now"])
        except Stopped as stopped:
            log.info("follow: stopped before %s of generation %d (rerun to resume it)", stopped, generation["generation"])
            break
        generation["published"] = record["published"]
        if record["published"]:
            generation["publish"] = _call("training.update:publish", follow_dir, RunDir(generation["run"]), generation["generation"], generation["newest_event_ms"])
            state["live"] = generation["run"]
        else:
            log.warning("follow: generation %d refused by the gate (%s); %s stays live", generation["generation"], ", ".join(record["gate"]["refused"]), state["live"])
        _call("training.update:save_follow_state", follow_dir, state)
    log.info("follow: stopped; live %s", state["live"])
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    _call("serving.recommend:main", RunDir(args.run), user=args.user, history=args.history, k=args.k)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    foreign = [o for o in overrides if not o.strip().startswith("serve.")]
    if foreign:  # the model, index and data settings are those the run was built with
        raise ConfigError(f"recsys serve --set takes serve.* keys only, got {', '.join(map(repr, foreign))}: the other sections are fixed by the run's own config.toml")
    run = RunDir(args.run, overrides)
    run.config()  # an unknown key or a bad value fails here, naming it, before anything loads
    _call("serving.app:serve", run, host=args.host, port=args.port, follow=Path(args.follow) if args.follow else None)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    _call("training.experiment:ablation", Path(args.data), Path(args.out), config=args.config, overrides=args.set or [], variants=variants)
    return 0


DEMO_SIZES = {"quick": (300, 200, "train.epochs=1"), "full": (2000, 1000, "train.epochs=4")}


def cmd_demo(args: argparse.Namespace) -> int:
    """Synthetic data -> full run -> a few recommendations -> where the report is."""
    users, items, epochs = DEMO_SIZES["quick" if args.quick else "full"]
    out = Path(args.out)
    data_dir = out / "data"
    if not (data_dir / "interactions.parquet").is_file():
        log.info("== synthesizing %d users x %d items into %s", users, items, data_dir)
        _call("features.synth:synthesize", data_dir, users=users, items=items, interactions=None, seed=0, images=True, task_correlation=0.8)
    run = run_pipeline(data_dir, out / "run", load_config(None, [epochs, *(args.set or [])]))
    user = _call("serving.recommend:sample_user", run)
    print()
    _call("serving.recommend:main", run, user=user, history=None, k=10)
    metrics = json.loads(run.metrics_path.read_text())
    headline = {
        f"{task}.{name}": round(value, 4)
        for task in ("click", "conversion", "ctcvr", "rating", "retrieval")
        for name, value in metrics.get(task, {}).items()
        if isinstance(value, float) and (task != "retrieval" or name.endswith("@20"))
    }
    print("\nTest metrics:", ", ".join(f"{k} {v}" for k, v in headline.items()))
    print(f"Report: {run.report_html.resolve()}  (summary: {run.report_md.resolve()})")
    print(f"Serve it: recsys serve --run {run.root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description="Multi-task, multimodal recommender.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make a dataset directory (synthetic or MovieLens)")
    data_sub = data.add_subparsers(dest="source_kind", required=True)
    synth = data_sub.add_parser("synth", help="synthetic multimodal dataset with ground truth")
    synth.add_argument("--out", required=True)
    synth.add_argument("--users", type=int, default=2000)
    synth.add_argument("--items", type=int, default=1000)
    synth.add_argument("--interactions", type=int, default=None, help="impressions (default 50 per user)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--no-images", action="store_true", help="skip PNG generation (large benchmarks)")
    synth.add_argument("--task-correlation", type=float, default=0.8, help="correlation of click and conversion signals, in [-1, 1]")
    synth.add_argument("--days", type=int, default=None, help="stream mode: OUT/day01 .. dayDD, one dataset per day (items and users arrive, preferences drift)")
    synth.add_argument("--drift", type=float, default=None, help="stream mode: daily random-walk step of user preferences, in [0, 1] (default 0.25)")
    synth.set_defaults(func=cmd_data)
    window = data_sub.add_parser("window", help="day directories (synth --days) -> one dataset with a given split")
    window.add_argument("--source", required=True, help="directory with day01, day02, ...")
    window.add_argument("--train", required=True, help="train days: 1-7, 8, 8,9 or 1-3,5")
    window.add_argument("--valid", default=None, help="valid days (taken out of train)")
    window.add_argument("--test", required=True, help="test days")
    window.add_argument("--out", required=True)
    window.set_defaults(func=cmd_data)
    ml = data_sub.add_parser("movielens", help="MovieLens-100K directory -> dataset contract")
    ml.add_argument("--source", required=True, help="directory with u.data, u.item, u.user")
    ml.add_argument("--out", required=True)
    ml.add_argument("--split", default=None, help="u1..u5, ua, ub (GroupLens split files); default temporal")
    ml.set_defaults(func=cmd_data)

    run = sub.add_parser("run", help="prepare -> embed -> train -> index -> evaluate")
    run.add_argument("--data", required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--config", default=None)
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--nproc", type=int, default=None, help="training processes (torchrun + TorchRec sharding)")
    run.set_defaults(func=cmd_run)

    for step in STEPS:
        p = sub.add_parser(step, help=f"the {step} step on an existing run")
        p.add_argument("--run", required=True)
        if step == "train":
            p.add_argument("--nproc", type=int, default=None)
            p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        if step == "index":
            p.add_argument("--compact", action="store_true", help="fold items added at serving time (RUN/index/added_items.log) into the index files; no rebuild")
        if step == "evaluate":
            p.add_argument("--compare", nargs="*", default=None, help="other run directories to compare against")
            p.add_argument("--gate", default=None, metavar="LIVE", help="only the quality gate: RUN (the candidate) against LIVE, its ancestor; exit 3 when refused")
            p.add_argument("--max-drop", action="append", default=None, metavar="METRIC=DROP,...",
                           help="allowed drops over the defaults, e.g. click.auc=0.002,retrieval.recall@20=0.005 (inf: report only)")
            p.add_argument("--bootstrap", type=int, default=None, help="--gate: paired user resamples (default 1000)")
            p.add_argument("--seed", type=int, default=0, help="--gate: the resamples' seed")
        p.set_defaults(func=cmd_step)

    upd = sub.add_parser("update", help="warm-start a trained run on new logs: vocabularies and tables grow, index refreshed, gated against it")
    upd.add_argument("--run", required=True, help="BASE: the trained run to update")
    upd.add_argument("--data", default=None, help="NEW: a dataset of the interactions since BASE's data, with the current catalogue")
    upd.add_argument("--events", default=None, help="a served run whose event log (RUN/events) holds the new interactions (catalogue: --data, else BASE's dataset)")
    upd.add_argument("--out", required=True, help="RUN2: the updated run (rerun the same command to resume a killed update)")
    upd.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable), e.g. update.replay=0.3")
    upd.add_argument("--nproc", type=int, default=None, help="training processes (the update trains in one)")
    upd.add_argument("--follow", action="store_true", help="keep updating: tail the live run's event log, write generations OUT/gen-NNNN, publish those that pass the gate (OUT/published.json)")
    upd.set_defaults(func=cmd_update)

    rec = sub.add_parser("recommend", help="top-k for one user (or a history of item ids)")
    rec.add_argument("--run", required=True)
    rec.add_argument("--user", default=None)
    rec.add_argument("--history", nargs="*", default=None)
    rec.add_argument("--k", type=int, default=10)
    rec.set_defaults(func=cmd_recommend)

    serve = sub.add_parser("serve", help="HTTP retrieval service")
    serve.add_argument("--run", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--follow", default=None, metavar="DIR", help="reload each generation `recsys update --follow --out DIR` publishes (DIR/published.json)")
    serve.add_argument("--set", action="append", metavar="serve.KEY=VALUE", help="override a serve.* key of the run's config for this process (repeatable; kept across reloads, never written back)")
    serve.set_defaults(func=cmd_serve)

    exp = sub.add_parser("experiment", help="experiment grids")
    exp_sub = exp.add_subparsers(dest="experiment", required=True)
    abl = exp_sub.add_parser("ablation", help="ranker kind, content, ranker input, stop-gradient and task weights, one axis at a time")
    abl.add_argument("--data", required=True)
    abl.add_argument("--out", required=True)
    abl.add_argument("--config", default=None)
    abl.add_argument("--set", action="append", metavar="KEY=VALUE")
    abl.add_argument("--variants", default="", help="comma-separated names of training.experiment.GRID (default: all; the first is the base)")
    abl.set_defaults(func=cmd_experiment)

    demo = sub.add_parser("demo", help="synthetic data -> run -> recommendations -> report")
    demo.add_argument("--out", default="demo")
    demo.add_argument("--quick", action="store_true", help="smaller data, one epoch")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    demo.set_defaults(func=cmd_demo)
    return parser


def setup_logging(quiet: bool = False) -> None:
    """recsys's own loggers at INFO; libraries (fbgemm, faiss, transformers) only when they warn."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("recsys").setLevel(logging.WARNING if quiet else logging.INFO)
    # torch.fx warns on every TorchRec trace check; it is not actionable for users.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except RecsysError as exc:
        print(f"recsys: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recsys: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
