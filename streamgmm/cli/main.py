"""Command line: ``streamgmm run | replay | fit | check-config | inspect | demo``.

Exit codes: 0 success, 2 bad configuration or arguments, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import warnings

import yaml

from .. import __version__
from ..service.checkpoint import CheckpointError, CheckpointStore
from ..service.config import ConfigError, as_dict, load_config, masked

log = logging.getLogger("streamgmm")


class RepeatFilter(logging.Filter):
    """Let the same message through at most once per ``interval`` seconds.

    During an outage kafka-python logs every refused connection; one line per message per
    half minute keeps the cause visible without flooding the journal.
    """

    def __init__(self, interval: float = 30.0):
        super().__init__()
        self.interval = interval
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.msg}"
        now = record.created
        if now - self._last.get(key, -1e18) < self.interval:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = now
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    kafka_logger = logging.getLogger("kafka")
    kafka_logger.setLevel(logging.DEBUG if level == "DEBUG" else logging.ERROR)
    if level != "DEBUG":
        kafka_logger.filters[:] = [RepeatFilter()]


def _load(path):
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"streamgmm: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# ---------------------------------------------------------------------- commands
def cmd_run(args) -> int:
    config = _load(args.config)
    configure_logging(config.logging.level, config.logging.format)
    from ..service.daemon import Daemon

    daemon = Daemon(config)

    def on_signal(signum, frame):
        log.info("received %s: finishing the batch, checkpointing and stopping", signal.Signals(signum).name)
        daemon.stop()
        # A second signal falls through to the default handler and ends the process at once.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon.run()
    except CheckpointError as exc:
        log.error("%s", exc)
        return 1
    return 0


def cmd_replay(args) -> int:
    config = _load(args.config)
    configure_logging("WARNING", "text")
    from .replay import _open, guess_format, replay

    fmt = guess_format(args.input, args.format)
    sink = sys.stdout if args.output in (None, "-") else open(args.output, "w", encoding="utf-8")
    try:
        with _open(args.input) as source:
            summary = replay(config, source, sink, fmt)
    finally:
        if sink is not sys.stdout:
            sink.close()
    print(json.dumps({"summary": summary}), file=sys.stderr)
    return 0


def cmd_fit(args) -> int:
    config = _load(args.config)
    configure_logging(config.logging.level, config.logging.format)
    from ..detection.detector import Detector
    from ..mixture import GaussianMixture
    from ..mixture.online import OnlineGaussianMixture
    from .replay import guess_format, read_matrix

    fmt = guess_format(args.input, args.format)
    X, n_invalid = read_matrix(config, args.input, fmt)
    m = config.model
    if len(X) < max(2, m.n_components):
        print(f"streamgmm: {args.input} has {len(X)} valid rows; need at least {m.n_components}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixture = GaussianMixture(
            m.n_components, covariance_type=m.covariance_type, reg_covar=m.reg_covar,
            n_init=args.n_init, max_iter=args.max_iter, random_state=m.random_state,
        ).fit(X)
    detector = Detector(config)
    detector.model = OnlineGaussianMixture.from_mixture(
        mixture, n_samples_seen=len(X), warmup=m.warmup, alpha=m.alpha, t0=m.t0,
        half_life=m.half_life, min_weight=m.min_weight, rare_weight=m.rare_weight, random_state=m.random_state,
    )
    detector.threshold.update(detector.model)
    path = CheckpointStore(args.output, config.checkpoint.keep).write(detector.state())
    print(json.dumps({
        "checkpoint": str(path), "n_rows": len(X), "n_invalid": n_invalid,
        "mean_log_likelihood": mixture.score(X), "bic": mixture.bic(X), "converged": mixture.converged_,
        "threshold": detector.threshold.value,
    }))
    return 0


def cmd_check_config(args) -> int:
    config = _load(args.file)
    print(f"{args.file}: ok", file=sys.stderr)
    print(yaml.safe_dump(masked(as_dict(config)), sort_keys=False), end="")
    return 0


def inspect_summary(directory: str | None = None, state: dict | None = None, path: str | None = None) -> dict:
    """Summary of a detector state: the newest valid checkpoint in ``directory``, or ``state``."""
    store = CheckpointStore(directory) if directory else None
    if state is None:
        found = store.load_latest()
        if found is None:
            raise CheckpointError(f"no valid checkpoint in {directory}")
        state, path = found
    model = state["model"]
    from ..mixture.online import OnlineGaussianMixture

    weights = OnlineGaussianMixture.from_dict(model).weights_.tolist() if model.get("initialized") else None
    return {
        "path": str(path),
        "format_version": 1,
        "streamgmm_version": state.get("streamgmm_version"),
        "created_at": state.get("created_at"),
        "n_valid": state["counters"]["n_valid"],
        "n_invalid": state["counters"]["n_invalid"],
        "n_anomalies": state["counters"]["n_anomalies"],
        "n_updates": state["counters"]["n_updates"],
        "n_seen": model["n_seen"],
        "initialized": model["initialized"],
        "offsets": state["offsets"],
        "threshold": state["threshold"],
        "model": {k: model["params"][k] for k in ("n_components", "covariance_type", "alpha", "half_life")},
        "weights": weights,
        "checkpoints": [str(p) for p in store.paths()] if store else [],
    }


def topic_summaries(topic: str, bootstrap: str, key: str | None = None) -> dict:
    """Summaries of the newest state record per model key in a checkpoint topic."""
    from ..service.statestore import TopicStateStore

    store = TopicStateStore(topic, {"bootstrap_servers": [bootstrap]}, producer=None)
    keys = set(store.read_all())
    wanted = {key} if key else keys
    states = store.load_many(wanted & keys)
    return {k: inspect_summary(state=v, path=f"{topic}:{k}") for k, v in sorted(states.items())}


def cmd_inspect(args) -> int:
    configure_logging("WARNING", "text")
    try:
        if args.topic:
            if not args.bootstrap:
                print("streamgmm: inspect --topic needs --bootstrap HOST:PORT", file=sys.stderr)
                return 2
            summaries = topic_summaries(args.topic, args.bootstrap, args.key)
            if not summaries:
                raise CheckpointError(f"no readable state record in topic {args.topic}")
            print(json.dumps(summaries) if args.json else "\n".join(f"{k}: {json.dumps(v)}" for k, v in summaries.items()))
            return 0
        if not args.checkpoint_dir:
            print("streamgmm: give a checkpoint directory, or --topic and --bootstrap", file=sys.stderr)
            return 2
        summary = inspect_summary(args.checkpoint_dir)
    except CheckpointError as exc:
        print(f"streamgmm: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"checkpoint   {summary['path']} (format {summary['format_version']}, written {summary['created_at']})")
    print(f"n_valid      {summary['n_valid']}    n_invalid {summary['n_invalid']}    anomalies {summary['n_anomalies']}")
    print(f"n_seen       {summary['n_seen']}    model updates {summary['n_updates']}    initialised {summary['initialized']}")
    print(f"threshold    {summary['threshold']}")
    print(f"model        {summary['model']}")
    for topic, partitions in summary["offsets"].items():
        print(f"offsets      {topic}: " + ", ".join(f"{p}->{o}" for p, o in sorted(partitions.items(), key=lambda x: int(x[0]))))
    if summary["weights"]:
        print("weights      " + " ".join(f"{w:.3f}" for w in summary["weights"]))
    return 0


def cmd_demo(args) -> int:
    from ..dev.demo import run_demo

    configure_logging("WARNING", "text")
    return run_demo(messages=args.messages, rate=args.rate, workdir=args.workdir, metrics_port=args.metrics_port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamgmm", description="Streaming anomaly detection with online Gaussian mixtures.")
    parser.add_argument("--version", action="version", version=f"streamgmm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon (Kafka in, anomalies out)")
    run.add_argument("--config", required=True, help="YAML config file")
    run.set_defaults(func=cmd_run)

    rep = sub.add_parser("replay", help="the same pipeline over a CSV/JSONL file or stdin")
    rep.add_argument("--config", required=True)
    rep.add_argument("--input", required=True, help="PATH or - for stdin")
    rep.add_argument("--output", default="-", help="PATH or - for stdout (JSON lines)")
    rep.add_argument("--format", choices=["csv", "json"], help="default: from the file name (.jsonl -> json)")
    rep.set_defaults(func=cmd_replay)

    fit = sub.add_parser("fit", help="batch EM on recorded data, written as a checkpoint")
    fit.add_argument("--config", required=True)
    fit.add_argument("--input", required=True)
    fit.add_argument("--output", required=True, help="checkpoint directory")
    fit.add_argument("--format", choices=["csv", "json"])
    fit.add_argument("--n-init", type=int, default=3)
    fit.add_argument("--max-iter", type=int, default=300)
    fit.set_defaults(func=cmd_fit)

    chk = sub.add_parser("check-config", help="validate a config file and print the effective config")
    chk.add_argument("file")
    chk.set_defaults(func=cmd_check_config)

    ins = sub.add_parser("inspect", help="summarise the newest valid checkpoint (a directory or a state topic)")
    ins.add_argument("checkpoint_dir", nargs="?")
    ins.add_argument("--topic", help="read state records from this checkpoint topic instead")
    ins.add_argument("--bootstrap", help="HOST:PORT of the Kafka cluster holding --topic")
    ins.add_argument("--key", help="only this model key (e.g. features/3)")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_inspect)

    demo = sub.add_parser("demo", help="live demo on an embedded broker with a synthetic stream")
    demo.add_argument("--messages", type=int, default=200_000)
    demo.add_argument("--rate", type=float, default=20_000.0, help="messages per second produced")
    demo.add_argument("--workdir", default=None, help="where the demo keeps config and checkpoints")
    demo.add_argument("--metrics-port", type=int, default=9464)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
