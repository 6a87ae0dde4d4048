"""Command line: ``streamgmm run | replay | fit | check-config | inspect``.

Exit codes: 0 success, 2 bad configuration or arguments, 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gzip
import json
import logging
import os
import re
import shlex
import signal
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import orjson

from .. import __version__
from ..detection.records import iso_time
from ..mixture.online import FINAL_N_INIT_FACTOR, WARMUP_N_INIT
from ..service.state import CheckpointError, CheckpointStore, LocalStateStore, read_checkpoint_file
from ..service.config import ConfigError, as_dict, load_config, masked, to_yaml
from . import EARLY_SIGNALS, handle_stop_signals
from .healthcheck import add_parser as add_healthcheck_parser

log = logging.getLogger("streamgmm")


class RepeatFilter(logging.Filter):
    """Let the same message through at most once per ``interval`` seconds.

    During an outage librdkafka reports every refused connection; one line per message per
    half minute keeps the cause visible without flooding the journal.  Warnings and errors
    only: an INFO line is an event (a partition assigned, revoked) that happened again.  A line
    that says an episode ended (``extra={"ends_repeats": True}``: "checkpoints written again")
    also ends what its logger held back: the same "checkpoint failed (1 in a row)" 20 s later is
    a new episode, which was hidden (the log's last word was that checkpoints worked;
    helper-67).  Not every INFO line: a routine "checkpoint written" every 2 s let a failing
    local copy's warning through 30 times a minute (review).
    """

    def __init__(self, interval: float = 30.0):
        super().__init__()
        self.interval = interval
        self._last: dict[str, dict[str, float]] = {}  # logger -> message -> when last let through

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "ends_repeats", False):
            self._last.pop(record.name, None)
        if record.levelno < logging.WARNING or getattr(record, "event", False):
            return True  # events (assigned, revoked, lost, checkpoint written) are never repeats to hide
        seen = self._last.setdefault(record.name, {})
        message, now = record.getMessage(), record.created
        if now - seen.get(message, -1e18) < self.interval:
            return False
        if len(seen) > 1000:
            seen.clear()
        seen[message] = now
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    level = level.upper()  # (the config takes debug as DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s",
                                      "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    if level != "DEBUG":
        handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # librdkafka's own log lines (connection refused ...) only at DEBUG: its errors reach us
    # through the clients' error callback as well.
    logging.getLogger("librdkafka").setLevel(logging.DEBUG if level == "DEBUG" else logging.ERROR)


def _load(path, kafka: bool = False):
    """The config, or exit 2 with one line saying what to fix.  ``kafka``: also have
    librdkafka check the pass-through settings (no broker needed)."""
    try:
        config = load_config(path)
        if kafka:
            from ..service.kafka import check_settings

            check_settings(config)
        return config
    except ConfigError as exc:
        print(f"streamgmm: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def read_env_file(path) -> dict[str, str]:
    """KEY=value lines as systemd's EnvironmentFile= reads them: # comments and blank lines
    skipped, one pair of surrounding quotes taken off the value."""
    values = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.removeprefix("export ").strip()] = value
    return values


# systemd's specifiers a unit may use in these settings (systemd.unit(5), for a system unit).
UNIT_DIRECTORIES = {"S": "/var/lib", "C": "/var/cache", "L": "/var/log", "t": "/run", "T": "/tmp", "V": "/var/tmp",
                    "E": "/etc"}


def read_unit(path, instance: str | None = None) -> tuple[dict[str, str], dict[str, list[str]]]:
    """What a systemd unit gives its service: the environment (Environment= assignments, then the
    EnvironmentFile= files, which override them; a leading - makes a file optional) and the
    [Service] settings, as systemd reads them: the unit file, then its drop-ins (``NAME.d/*.conf``,
    the template's too, in file-name order), lines continued with a backslash, an empty
    assignment resetting a list, the specifiers of UNIT_DIRECTORIES and %i %I %n %N %p %P %%.
    (Not systemd's C escapes inside values.)  For check-config: with --env-file alone it left
    out the unit's own STREAMGMM_CHECKPOINT__DIR, said ok, and the service exited 2 on the real
    directory's checkpoint (helper-78)."""
    unit = Path(path)
    name, suffix = unit.name.rsplit(".", 1) if "." in unit.name else (unit.name, "service")
    templated = name.endswith("@")
    if templated and not instance:
        raise ValueError(f"{path} is a template: name the instance with --instance (streamgmm@9465: 9465)")
    if instance and not templated:
        raise ValueError(f"--instance goes with a template unit (a name ending in @.{suffix}); {unit.name} is not one")
    full = f"{name}{instance or ''}.{suffix}"
    prefix = name.rstrip("@")
    names = {"i": instance or "", "I": instance or "", "n": full, "N": full.rsplit(".", 1)[0], "p": prefix,
             "P": prefix, "%": "%", **UNIT_DIRECTORIES}

    def expand(value: str) -> str:
        return re.sub(r"%(.)", lambda m: names.get(m.group(1), m.group(0)), value)

    drop_ins = [unit.parent / f"{unit.name}.d"] + ([unit.parent / f"{full}.d"] if templated else [])
    files = [unit] + sorted((f for d in drop_ins if d.is_dir() for f in d.glob("*.conf")), key=lambda f: f.name)
    settings: dict[str, list[str]] = {}
    for file in files:
        section = None
        for line in re.sub(r"\\\n", " ", file.read_text(encoding="utf-8")).splitlines():
            line = line.strip()
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
            elif section == "Service" and "=" in line and not line.startswith(("#", ";")):
                key, value = (part.strip() for part in line.split("=", 1))
                if value:
                    settings.setdefault(key, []).append(expand(value))
                else:
                    settings[key] = []  # an empty assignment resets what came before
    environment: dict[str, str] = {}
    for value in settings.get("Environment", []):
        for assignment in shlex.split(value):
            if "=" in assignment:
                key, val = assignment.split("=", 1)
                environment[key] = val
    for value in settings.get("EnvironmentFile", []):
        optional, file = value.startswith("-"), value.removeprefix("-")
        try:
            environment.update(read_env_file(file))
        except FileNotFoundError:
            if not optional:
                raise
    return environment, settings


def unit_sandbox_problem(config, settings: dict[str, list[str]]) -> str | None:
    """A path the config names that the unit's sandbox hides from the service or keeps read-only,
    which check-config, run outside it, cannot see: PrivateTmp= (/tmp, /var/tmp), ProtectHome=
    (yes, tmpfs: /home, /root, /run/user hidden; read-only), ProtectSystem=strict (all but the
    StateDirectory= and ReadWritePaths= read-only, for checkpoint.dir); DynamicUser=yes implies
    PrivateTmp=yes, ProtectHome=read-only and ProtectSystem=strict.  A relative path is the
    service's WorkingDirectory= (/ by default)."""
    def last(key, default="no"):
        return settings.get(key, [default])[-1].lower() if settings.get(key) else default

    dynamic = last("DynamicUser") in ("yes", "true", "1", "on")
    private_tmp = last("PrivateTmp", "yes" if dynamic else "no") in ("yes", "true", "1", "on")
    protect_home = last("ProtectHome", "read-only" if dynamic else "no")
    protect_system = last("ProtectSystem", "strict" if dynamic else "no")
    workdir = last("WorkingDirectory", "/").lstrip("-") or "/"
    hidden = [*(("/tmp/", "/var/tmp/") if private_tmp else ()),
              *(("/home/", "/root/", "/run/user/") if protect_home in ("yes", "true", "1", "on", "tmpfs") else ())]
    read_only_home = ("/home/", "/root/", "/run/user/") if protect_home == "read-only" else ()

    def where(value: str) -> str:
        return os.path.normpath(os.path.join(workdir, value)) + "/"

    paths = {"model.init_from": config.model.init_from, "checkpoint.dir": config.checkpoint.dir,
             **{f"kafka.security.{k}": v for k, v in config.kafka.security.items()
                if isinstance(v, str) and (k.endswith("_file") or k.endswith(".location"))}}
    for key, value in paths.items():
        if value and where(value).startswith(tuple(hidden)):
            return (f"{key}={value}: the unit's PrivateTmp=/ProtectHome= (or DynamicUser=, which implies them) hides "
                    "it from the service; move it (e.g. under /etc/streamgmm or /var/lib)")
    if config.checkpoint.dir and where(config.checkpoint.dir).startswith(read_only_home):
        return (f"checkpoint.dir={config.checkpoint.dir}: the unit's ProtectHome=read-only (or DynamicUser=) keeps it "
                "read-only; use the unit's StateDirectory=")
    if protect_system == "strict" and config.checkpoint.dir:
        writable = [f"/var/lib/{d}/" for v in settings.get("StateDirectory", []) for d in v.split()]
        writable += [d.lstrip("-+").rstrip("/") + "/" for v in settings.get("ReadWritePaths", []) for d in v.split()]
        if not any(where(config.checkpoint.dir).startswith(w) for w in writable):
            shown = " or ".join(w.rstrip("/") for w in writable) or "a StateDirectory="
            return (f"checkpoint.dir={config.checkpoint.dir}: the unit's ProtectSystem=strict (or DynamicUser=) keeps it "
                    f"read-only; use {shown}, or add it to ReadWritePaths=")
    return None


def _fail(message: str) -> int:
    """One line saying what to fix; exit code 2, as for a configuration error."""
    print(f"streamgmm: {message}", file=sys.stderr)
    return 2


# Set by an operator, these choose the BLAS threads themselves.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def one_blas_thread() -> None:
    """The loop's matrices are small (a batch by K x D): a second BLAS thread costs more to wake
    than it saves, and takes the core librdkafka fetches on.  Measured in-process on 2 cores,
    D=16, batches of 5,000: warm-up 0.25 against 0.35-0.43 s, the next 95,000 points 0.12
    against 0.17-0.21 s.  An operator's own *_NUM_THREADS wins."""
    if any(os.environ.get(name) for name in BLAS_THREAD_VARIABLES):
        return
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


# ---------------------------------------------------------------------- commands
def cmd_run(args) -> int:
    config = _load(args.config)  # the daemon's start-up checks the Kafka settings
    configure_logging(config.logging.level, config.logging.format)
    # A crash in native code (librdkafka segfaulted on Tansu's answer for a deleted topic) left
    # nothing in the daemon's log but the exit status (helper-52): the Python stacks go to stderr.
    faulthandler.enable()
    one_blas_thread()
    from ..service.daemon import Daemon, StartupError

    # No `*_created` series beside each counter and histogram (the client's default): they
    # doubled the series count and no dashboard or alert here reads them (helper-67).  Here, not
    # in Metrics(): the setting is the whole process's, and a library user's own metrics keep it.
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
    daemon = Daemon(config)

    signalled = []

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if signalled:
            # A second signal: out at once.  The checkpoints on disk stand; what came after the
            # last one is read and learned again at the next start.
            log.warning("received %s again: stopping at once, without a checkpoint", name)
            logging.shutdown()
            os._exit(128 + signum)
        signalled.append(signum)
        log.info("received %s: finishing the batch, checkpointing and stopping", name)
        daemon.stop()

    handle_stop_signals(on_signal)
    # Those that came while starting (see cli/__init__.py) now stop it as a later one would: the
    # loop sees the stop before it reads anything.
    early, EARLY_SIGNALS[:] = EARLY_SIGNALS[:2], []  # (taken once: an in-process caller may run again)
    for signum in early:
        on_signal(signum, None)
    code = 0
    try:
        daemon.run()
        # 1: stopped without its last checkpoint, or by a fatal client error (both logged).
        code = 0 if daemon.clean_stop and daemon.fatal_error is None else 1
        if code == 0 and signalled == [signal.SIGHUP]:
            # The habit of `kill -HUP` to reload: exit 0 left a Restart=on-failure unit down for
            # good (helper-41).  129, as a shell reports it, restarts it on the new config.
            log.info("stopped on SIGHUP: exit 129, so that systemd's Restart=on-failure starts it again "
                     "(the way to reload the configuration)")
            code = 128 + signal.SIGHUP
    except (StartupError, ConfigError) as exc:
        # Raised before the loop, or by it when a partition's stored state does not fit this config.
        what = "stopped" if daemon.started else "cannot start"
        print(f"streamgmm: {what}: {exc}", file=sys.stderr)
        code = 2
    finally:
        if daemon.source_wedged:
            # librdkafka would wait for the commit still in flight when the interpreter tears the
            # consumer down: leave without that.
            logging.shutdown()
            sys.stderr.flush()
            os._exit(code if sys.exc_info()[0] is None else 1)
    return code


def _checkpoint_under(directory: str) -> Path | None:
    """The directory of a checkpoint file under ``directory`` (a partition model's is below it),
    or None."""
    try:
        found = next(Path(directory).rglob("checkpoint-*.sgmm"), None)
    except OSError:
        return None
    return None if found is None else found.parent


# A gzip-compressed input cut short (EOFError), with a bad header or checksum (BadGzipFile, an
# OSError without strerror: "cannot read --input X: None"), or with damaged data (zlib.error).
DAMAGED_GZIP = (EOFError, gzip.BadGzipFile, zlib.error)


def _damaged(path: str, exc: Exception) -> str:
    return f"{path}: the compressed input cannot be read to its end ({exc}); check the file (gzip -t)"


def cmd_replay(args) -> int:
    config = _load(args.config)
    configure_logging("WARNING", "text")
    one_blas_thread()
    from .replay import InitFromError, InputError, guess_format, open_input, replay

    fmt = guess_format(args.input, args.format, config.input.format)
    if args.output not in (None, "-") and args.input != "-" and Path(args.output).exists() \
            and Path(args.input).exists() and os.path.samefile(args.input, args.output):
        return _fail(f"--output {args.output} is the --input file: opening it for writing would empty it; "
                     "write elsewhere")
    with contextlib.ExitStack() as files:
        try:
            source = files.enter_context(open_input(args.input))
        except OSError as exc:
            return _fail(f"cannot read --input {args.input}: {exc.strerror}; fix the path")
        try:
            sink = (sys.stdout if args.output in (None, "-")
                    else files.enter_context(open(args.output, "w", encoding="utf-8")))
        except OSError as exc:
            return _fail(f"cannot write --output {args.output}: {exc.strerror}; create its directory or fix the path")
        try:
            summary = replay(config, source, sink, fmt)
        except InputError as exc:
            return _fail(f"{args.input}: {exc}")
        except InitFromError as exc:
            return _fail(str(exc))
        except DAMAGED_GZIP as exc:
            return _fail(_damaged(args.input, exc))
    if not config.model.init_from and summary["model_initialized"] and (
            found := _checkpoint_under(config.checkpoint.dir)) is not None:
        # An operator replaying with the daemon's own config expected the live model, got a new
        # one warmed up on the file's first rows, and no word of it (helper-52).
        print(f"streamgmm: replay made a new model from the first {config.model.warmup} valid rows; the model in "
              f"checkpoint.dir {config.checkpoint.dir} was not read (set model.init_from: {found} to score with "
              "it; replay never writes there)", file=sys.stderr)
    print(json.dumps({"summary": summary}), file=sys.stderr)
    if not summary["n_records"]:
        print(f"streamgmm: {args.input} holds no records (empty, or a header only)", file=sys.stderr)
    if summary["n_records"] and not summary["n_valid"]:
        first = summary.get("first_invalid", {})
        print(f"streamgmm: none of the {summary['n_records']} records was valid as {fmt} with "
              f"input.dimension={config.input.dimension} (the first: {first.get('reason')}, {first.get('detail')}); "
              "check --format, input.dimension and input.fields (JSON input is one document per line)",
              file=sys.stderr)
        return 1
    if summary["n_valid"] and not summary["model_initialized"]:  # (with model.init_from it was made before)
        print(f"streamgmm: only {summary['n_valid']} valid record(s), fewer than the warm-up "
              f"(model.warmup={config.model.warmup}): no model was made and nothing was scored; "
              "replay more data or set a smaller model.warmup", file=sys.stderr)
    return 0


def _how_the_threshold_was_set(threshold: dict) -> str:
    """For ``inspect``: what a quantile threshold's last estimate read (README, Threshold)."""
    if threshold.get("mode") != "quantile" or not threshold.get("tail_from"):
        return ""
    scores = ("the stream's scores as the current model gives them" if threshold["tail_from"] == "now"
              else "the stream's scores as they were scored")
    held = ", at the window's own quantile (the fitted tail overshot it)" if threshold.get("held_to_the_window") else ""
    return f" (q = {threshold.get('quantile'):g}, from {scores}{held})"


def _calibrate_on_the_file(threshold, log_density: np.ndarray, X: np.ndarray, batch: int = 1000) -> None:
    """The fitted model's scores of the file through the threshold, batch by batch as the daemon
    would have scored them: a daemon started from this checkpoint (model.init_from) is calibrated
    from its first point.  Otherwise the stream threshold calibrates on the stream's first
    points, where a share of anomalies over q is taken for the tail and mostly not flagged;
    calibrated, it flags them and keeps them out (README, Threshold).  Fit on clean data."""
    for start in range(0, len(log_density), batch):
        scores = log_density[start:start + batch]
        threshold.observe(scores, threshold.classify(scores), points=X[start:start + batch])


def cmd_fit(args) -> int:
    config = _load(args.config)
    configure_logging(config.logging.level, config.logging.format)
    from ..detection.detector import Detector, rare_weight
    from ..mixture import GaussianMixture
    from ..mixture.online import OnlineGaussianMixture
    from .replay import InputError, guess_format, read_matrix

    problem = _a_daemons_checkpoints(args.output)  # before the fit: a refusal after it wasted it
    if problem:
        return _fail(problem)
    fmt = guess_format(args.input, args.format, config.input.format)
    try:
        X, n_invalid, first_invalid = read_matrix(config, args.input, fmt)
    except DAMAGED_GZIP as exc:
        return _fail(_damaged(args.input, exc))
    except OSError as exc:
        return _fail(f"cannot read --input {args.input}: {exc.strerror}; fix the path")
    except InputError as exc:
        return _fail(f"{args.input}: {exc}")
    m = config.model
    if len(X) < m.warmup:
        # 3 rows made a model that then flagged 100 points in 300 as "1 in 1.3" (helper-37).
        why = f"; the first invalid: {first_invalid}" if first_invalid else ""
        return _fail(f"{args.input} has {len(X)} valid rows ({n_invalid} invalid{why}), fewer than model.warmup="
                     f"{m.warmup}, the fewest the daemon builds a model from; fit on more rows or lower model.warmup")
    detector = Detector(config)
    if "auto" in (m.n_components, m.covariance_type):
        # The warm-up's own search (BIC over K and covariance types, MAP EM), over the whole file.
        search = {"warmup": len(X)}
        if args.n_init is not None:
            search["warmup_n_init"] = args.n_init
        if args.max_iter is not None:
            search["warmup_iter"] = args.max_iter
        mixture = detector.model.set_params(**search)
        mixture.partial_fit(X)
        report = {"n_components": int(mixture.weights_.shape[0]), "covariance_type": mixture.covariance_type_,
                  "n_init": mixture.warmup_n_init, "max_iter": mixture.warmup_iter}
    else:
        n_init = FIT_N_INIT if args.n_init is None else args.n_init
        max_iter = FIT_MAX_ITER if args.max_iter is None else args.max_iter
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batch = GaussianMixture(
                m.n_components, covariance_type=m.covariance_type, reg_covar=m.reg_covar,
                n_init=n_init, max_iter=max_iter, random_state=m.random_state,
            ).fit(X)
        detector.model = OnlineGaussianMixture.from_mixture(
            batch, n_samples_seen=len(X), warmup=m.warmup, alpha=m.alpha, t0=m.t0,
            half_life=m.half_life, min_weight=m.min_weight, rare_weight=rare_weight(config), random_state=m.random_state,
        )
        report = {"n_components": m.n_components, "covariance_type": m.covariance_type,
                  "n_init": n_init, "max_iter": max_iter, "bic": batch.bic(X), "converged": batch.converged_}
    detector.threshold.update(detector.model)
    _calibrate_on_the_file(detector.threshold, detector.model.score_samples(X), X)
    try:
        # Not into a running daemon's directory: its next start would take this model (helper-38).
        LocalStateStore(args.output, config.checkpoint.keep).lock()
        path = CheckpointStore(args.output, config.checkpoint.keep).write(detector.state(time.time()))
    except CheckpointError as exc:
        return _fail(f"{exc}; fix --output")
    print(json.dumps({
        "checkpoint": str(path), "n_rows": len(X), "n_invalid": n_invalid,
        "mean_log_likelihood": float(np.mean(detector.model.score_samples(X))), **report,
        "threshold": detector.threshold.value,
    }))
    return 0


def _a_daemons_checkpoints(directory) -> str | None:
    """Why ``fit --output`` must not write into ``directory``: its newest checkpoint is a model
    that has read messages.  A stopped daemon's directory took the fit as its newest checkpoint,
    its next start restored it without a word (offsets {}: no other-pipeline check), and
    checkpoint.keep then pruned the learned model (helper-49).  A directory of earlier fits is
    fine."""
    try:
        found = CheckpointStore(directory).newest_valid()[0]
    except OSError:
        return None  # unreadable: the write says so
    if found is None:
        return None
    state, path = found
    n_valid = int(state.get("counters", {}).get("n_valid", 0))
    if not state.get("offsets") and n_valid == 0:
        return None
    return (f"--output {directory} holds the checkpoints of a daemon that has read {n_valid:,} messages "
            f"(newest: {path.name}): this fit would replace its model at its next start; write the fit to a "
            "new directory and start from it with model.init_from")


def cmd_check_config(args) -> int:
    unit_settings = None
    if args.unit:
        try:
            environment, unit_settings = read_unit(args.unit, args.instance)
        except OSError as exc:
            return _fail(f"cannot read --unit {args.unit} or a file it names: {exc.filename}: {exc.strerror}")
        except ValueError as exc:
            return _fail(str(exc))
        # The service does not inherit this shell's environment: a STREAMGMM_* set here is not its.
        for key in [k for k in os.environ if k.startswith("STREAMGMM_")]:
            del os.environ[key]
        os.environ.update(environment)
    if args.env_file:
        try:
            os.environ.update(read_env_file(args.env_file))
        except OSError as exc:
            return _fail(f"cannot read --env-file {args.env_file}: {exc.strerror}")
    config = _load(args.file, kafka=True)
    if unit_settings is not None and (problem := unit_sandbox_problem(config, unit_settings)):
        return _fail(problem)
    # What `run` refuses before its loop and needs no broker (it said ok to each; helper-41).
    # Not the metrics port: the daemon being checked may hold it.
    from ..service.metrics import address_problem
    from ..service.state import initial_state, writable_without_writing

    problems = []
    if not (config.model.scope == "partition" and config.checkpoint.topic):  # else the files are a copy: run warns
        problems.append(writable_without_writing(config.checkpoint.dir))
    if config.metrics.enabled:
        problems.append(address_problem(config.metrics.host))
    if config.model.init_from:
        from ..detection.detector import Detector

        try:
            Detector(config).restore(initial_state(config.model.init_from)[0])
        except CheckpointError as exc:
            problems.append(str(exc))
        except (ValueError, KeyError, TypeError) as exc:  # a model of other inputs, as run says
            problems.append(f"model.init_from={config.model.init_from}: {exc}")
    from ..service.daemon import warmup_record_problem

    problems.append(warmup_record_problem(config))
    problems.append(_checkpoint_problem(config))
    for problem in filter(None, problems):
        return _fail(problem)
    print(f"{args.file}: ok", file=sys.stderr)
    # What `run` refuses only if no other process holds it then: said, not failed (the daemon being
    # checked holds both; check-config said a bare "ok" to a second daemon's config, helper-83).
    for note in _held_now(config):
        print(f"note: {note}", file=sys.stderr)
    print(to_yaml(masked(as_dict(config))), end="")
    return 0


def _held_now(config):
    """The checkpoint.dir lock and the metrics port, where another process holds them now."""
    import fcntl
    import socket

    lock = Path(config.checkpoint.dir) / ".lock"
    try:
        with open(lock) as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                holder = handle.read().strip() or "another process"
                yield (f"checkpoint.dir {config.checkpoint.dir} is in use by {holder} now: `run` exits 2 while it is "
                       "(fine if that is the daemon this config is for; else give each daemon its own checkpoint.dir)")
    except OSError:
        pass  # no lock file: nothing holds it
    if config.metrics.enabled and config.metrics.port:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
            try:
                probe.bind((config.metrics.host, config.metrics.port))
            except OSError:
                yield (f"metrics port {config.metrics.host}:{config.metrics.port} is taken now: `run` exits 2 while it "
                       "is (fine if that is the daemon this config is for; else set metrics.port)")


def _checkpoint_problem(config) -> str | None:
    """What `run` would refuse in the global model's newest checkpoint in checkpoint.dir: a model
    of another input.dimension, input.fields or pipeline.  check-config said ok to both and the
    restart then exited 2, which the unit's RestartPreventExitStatus=2 leaves down (helper-44).
    Read without the lock: the daemon being checked holds it."""
    from ..detection.detector import Detector
    from ..service.models import another_pipelines_model

    if config.model.scope != "global":
        return None  # partition models are checked as their partitions are assigned
    try:
        found = CheckpointStore(config.checkpoint.dir).newest_valid()[0]
    except OSError:
        return None  # unreadable: the writability check speaks of the directory
    if found is None:
        return None
    state, path = found
    detector = Detector(config)
    try:
        detector.restore(state)
    except (ValueError, KeyError, TypeError) as exc:
        return f"checkpoint {path}: {exc}"
    return another_pipelines_model(config, detector.offsets)


def _summarised(value):
    """Checkpoint values as JSON: small arrays as lists, large ones as their shape."""
    if isinstance(value, dict):
        return {k: _summarised(v) for k, v in value.items()}
    if hasattr(value, "shape") and hasattr(value, "tolist"):
        return value.tolist() if value.size <= 16 else f"array of shape {list(value.shape)}"
    return value


def read_checkpoint(target: str) -> tuple[dict, Path, list[Path]]:
    """The checkpoint file ``target``, or the newest valid one in the directory ``target``:
    (state, its path, the directory's checkpoint files).  CheckpointError saying why not."""
    target_path = Path(target)
    if target_path.is_file():
        return read_checkpoint_file(target_path), target_path, [target_path]
    if not target_path.is_dir():
        raise CheckpointError(f"{target} does not exist: pass a checkpoint directory or a checkpoint file in one")
    store = CheckpointStore(target_path)
    found, skipped = store.newest_valid(_summary_problem)  # (passed over as the daemon passes them)
    reasons = "; ".join(why for _, why in skipped)
    if found is not None:
        if skipped:
            log.warning("%s; showing the newest valid one, %s", reasons, found[1].name)
        return (*found, store.paths())
    if not skipped:
        partitions = sorted(p.name for p in (target_path / "partitions").glob("*") if p.is_dir())
        if partitions:  # model.scope: partition keeps one directory per partition
            others = f" (or {', '.join(partitions[1:4])}{' ...' if len(partitions) > 4 else ''})" if partitions[1:] else ""
            raise CheckpointError(f"{target} holds one model per partition (model.scope: partition): inspect "
                                  f"{target_path / 'partitions' / partitions[0]}{others}, or the state topic with "
                                  "--topic")
        raise CheckpointError(f"no valid checkpoint in {target}: it holds no checkpoint-*.sgmm files")
    raise CheckpointError(f"no valid checkpoint in {target}: {reasons}; there is no older one to fall back to")


def _summary_problem(state: dict) -> str | None:
    """Why ``state`` has no summary (it holds what no streamgmm model holds), or None."""
    try:
        inspect_summary(state, "")
    except CheckpointError as exc:
        return str(exc)
    return None


def inspect_summary(state: dict, path: str | Path, checkpoints: list[Path] = ()) -> dict:
    """Summary of a detector state read from ``path`` (``checkpoints``: its directory's files);
    CheckpointError if it holds what no streamgmm model holds (a valid checksum over content of
    another shape: a traceback before, review of the eleventh session)."""
    try:
        return _summary(state, path, checkpoints)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError, ArithmeticError) as exc:
        raise CheckpointError(f"{path or 'the checkpoint'} holds no streamgmm model state "
                              f"({type(exc).__name__}: {exc})") from None


def _summary(state: dict, path: str | Path, checkpoints: list[Path] = ()) -> dict:
    model = state["model"]
    from ..mixture.online import OnlineGaussianMixture

    weights = means = far = None
    if model.get("initialized"):
        from ..detection.explain import model_geometry, outlying_components

        online = OnlineGaussianMixture.from_dict(model)
        weights, means = online.weights_.tolist(), online.means_.tolist()
        # (helper-83: `inspect` showed weights only, and a 0.5% component of CPU spikes the warm-up
        # had taken in for normal looked like any other.)
        far = {o.index: round(o.distance_sd, 1) for o in outlying_components(model_geometry(online))}
    configured = {k: model["params"][k] for k in ("n_components", "covariance_type")}
    return {
        "path": str(path),
        "format_version": state.get("checkpoint_format", 1),  # (it said 1 of every file; helper-43)
        "streamgmm_version": state.get("streamgmm_version"),
        "created_at": state.get("created_at"),
        **{name: state["counters"][name] for name in ("n_valid", "n_invalid", "n_anomalies", "n_updates")},
        "n_flagged_learned": int(state["counters"].get("n_flagged_learned", 0)),
        "n_seen": model["n_seen"],
        "initialized": model["initialized"],
        "offsets": state["offsets"],
        # Which configurations it fits: input.dimension and input.fields must match to use it.
        "input": {k: state.get("input", {}).get(k) for k in ("format", "dimension", "fields")},
        "threshold": _summarised(state["threshold"]),
        # What the model has (chosen at warm-up when the config said auto), and what the config said.
        "model": {**configured, **model.get("chosen", {}),
                  **{k: model["params"][k] for k in ("alpha", "half_life")}, "configured": configured},
        "weights": weights,
        "means": means,  # per component, in the input's units and order
        "far_components": far,  # {component: sd from the nearest other}, for light ones far from the rest
        "checkpoints": [str(p) for p in checkpoints],
    }


def topic_summaries(topic: str, bootstrap: str, key: str | None = None, group: str | None = None,
                    security: dict | None = None, timeout: float = 30.0) -> dict:
    """Summaries of the newest state record per model key in a checkpoint topic; with ``group``,
    of the record that group's members restore (the newest at or past its commit, see
    ``TopicStateStore.load_many``), each with the group's commit beside it.  ``security``:
    librdkafka's settings to reach a secured cluster (the config's kafka.security)."""
    from ..service.state import TopicStateStore

    settings = {**(security or {}), "bootstrap.servers": bootstrap}
    store = TopicStateStore(topic, settings, producer=None)
    keys = None if key is None else {key}
    # Records passed over as the daemon passes them: no summary of one it cannot use.
    commits = {} if group is None else _group_commits(
        settings, group, store.load_many(keys, timeout=timeout, restore_problem=_summary_problem))
    states = store.load_many(keys, timeout=timeout, floors={k: {tp: offset} for k, (tp, offset) in commits.items()},
                             restore_problem=_summary_problem)
    summaries = {k: inspect_summary(v, f"{topic}:{k}") for k, v in sorted(states.items())}
    for k, (_, offset) in commits.items():
        if k in summaries:
            summaries[k]["group_commit"] = offset
    return summaries


def _group_commits(settings: dict, group: str, states: dict) -> dict:
    """{model key: ((topic, partition), the group's committed offset)} for the partition-scope
    keys ("topic/partition") of ``states`` that the group has committed."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    partitions = {}
    for key in states:
        topic, _, partition = key.rpartition("/")
        if topic and partition.isdigit():
            partitions[key] = TopicPartition(topic, int(partition))
    if not partitions:
        return {}
    consumer = Consumer({**settings, "group.id": group, "enable.auto.commit": False})
    try:
        found = consumer.committed(list(partitions.values()), timeout=10)
    except KafkaException as exc:
        raise CheckpointError(f"cannot read the commits of group {group}: {exc.args[0].str()}") from None
    finally:
        consumer.close()
    by_partition = {(tp.topic, tp.partition): tp.offset for tp in found if tp.error is None and tp.offset >= 0}
    return {key: ((tp.topic, tp.partition), by_partition[(tp.topic, tp.partition)])
            for key, tp in partitions.items() if (tp.topic, tp.partition) in by_partition}


def _describe_model(initialized: bool, model: dict) -> str:
    """'ready; 3 component(s), full covariances', saying which of them the warm-up chose."""
    auto = [f"model.{k} auto" for k, v in model["configured"].items() if v == "auto"]
    if not initialized:
        if auto:
            return (f"warming up; n_components {model['n_components']}, covariance_type {model['covariance_type']} "
                    "(auto: chosen at warm-up)")
        return f"warming up; {model['n_components']} component(s), {model['covariance_type']} covariances"
    # (A covariance type chosen at warm-up other than full may have turned full since.)
    chosen = f" (chosen from the data: {', '.join(auto)})" if auto else ""
    return f"ready; {model['n_components']} component(s), {model['covariance_type']} covariances{chosen}"


def _describe(summary: dict) -> str:
    """A checkpoint summary for people: one fact a line, each in words."""
    threshold, model = summary["threshold"], summary["model"]
    value = threshold.get("value")
    lines = [
        f"checkpoint        {summary['path']}",
        f"written           {summary['created_at']} by streamgmm {summary['streamgmm_version']} (format {summary['format_version']})",
        f"messages          {summary['n_valid'] + summary['n_invalid']:,} read: {summary['n_valid']:,} valid, "
        f"{summary['n_invalid']:,} invalid (dead-lettered)",
        f"anomalies         {summary['n_anomalies']:,} flagged",
        f"input             dimension {summary['input']['dimension']}, "
        + (f"fields {', '.join(summary['input']['fields'])}" if summary["input"]["fields"] else "no field names")
        + " (a config using this model must say the same)",
        f"points learned    {summary['n_seen']:,} (n_seen: valid points the model learned from; flagged ones "
        f"are not, unless adopted as a new regime or just past a threshold that flagged far more than asked: "
        f"{summary['n_flagged_learned']:,} of them)",
        f"model             {_describe_model(summary['initialized'], model)}, forgetting half-life "
        f"{model['half_life'] if model['half_life'] else 'none'}; {summary['n_updates']:,} updates",
        f"threshold         {threshold.get('mode')}: flags log-density below "
        f"{'(not set yet)' if value is None else f'{value:.4g}'}{_how_the_threshold_was_set(threshold)}",
    ]
    for topic, partitions in summary["offsets"].items():
        resume = ", ".join(f"partition {p} at offset {o:,}" for p, o in sorted(partitions.items(), key=lambda x: int(x[0])))
        lines.append(f"resumes           {topic}: {resume}")
    if "group_commit" in summary:
        lines.append(f"group commit      {summary['group_commit']:,} (a member of the group resumes at the later of "
                     "the two)")
    if summary["weights"]:
        lines.append("component weights " + " ".join(f"{w:.3f}" for w in summary["weights"]))
        names = summary["input"].get("fields") or [f"f{j}" for j in range(len(summary["means"][0]))]
        for k in np.argsort(summary["weights"])[::-1]:
            mean = ", ".join(f"{name} {value:.4g}" for name, value in zip(names[:MEANS_SHOWN], summary["means"][k]))
            more = f", ... ({len(names) - MEANS_SHOWN} more)" if len(names) > MEANS_SHOWN else ""
            far = summary["far_components"].get(int(k))
            note = f"  <- {far:g} sd from every other component: a mode of the data, or anomalies taken in" if far else ""
            lines.append(f"  component {k}: weight {summary['weights'][k]:.3f}, mean {mean}{more}{note}")
    return "\n".join(lines)


MEANS_SHOWN = 8  # features of each component's mean in `inspect` (--json has them all)


def _strict_json(value) -> str:
    """JSON any parser reads: a value that is not finite (a threshold level of -inf) is null.
    json.dumps wrote -Infinity, which JavaScript's JSON.parse and strict parsers refuse
    (helper-49)."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS).decode()


def cmd_inspect(args) -> int:
    configure_logging("WARNING", "text")
    try:
        security, topic, bootstrap = {}, args.topic, args.bootstrap
        if args.config:
            # The daemon's own: its cluster, its security settings (a SASL/TLS cluster refused
            # --bootstrap alone; helper-78) and its state topic.
            config = _load(args.config, kafka=True)
            from ..service.kafka import client_settings

            security = {k: v for k, v in client_settings(config, "admin").items() if k not in ("client.id",)}
            bootstrap = bootstrap or security.pop("bootstrap.servers")
            topic = topic or (None if args.checkpoint else config.checkpoint.topic)
            if not topic:
                args.checkpoint = args.checkpoint or config.checkpoint.dir
        if topic:
            if not bootstrap:
                print("streamgmm: inspect --topic needs --bootstrap HOST:PORT (or --config)", file=sys.stderr)
                return 2
            from confluent_kafka import KafkaException

            from ..service.kafka import kafka_error_text

            try:
                summaries = topic_summaries(topic, bootstrap, args.key, args.group, security, args.timeout)
            except KafkaException as exc:
                # (A traceback after 30 s with the broker unreachable; helper-78.)
                print(f"streamgmm: cannot read state topic {topic} at {bootstrap}: {kafka_error_text(exc)}",
                      file=sys.stderr)
                return 1
            if not summaries:
                raise CheckpointError(f"no readable state record in topic {topic}")
            print(_strict_json(summaries) if args.json else "\n\n".join(f"model {k}\n{_describe(v)}"
                                                                     for k, v in summaries.items()))
            return 0
        if not args.checkpoint:
            print("streamgmm: give a checkpoint directory or file, or --topic and --bootstrap", file=sys.stderr)
            return 2
        if args.group:
            print("streamgmm: inspect --group goes with --topic (a checkpoint directory has no group)", file=sys.stderr)
            return 2
        summary = inspect_summary(*read_checkpoint(args.checkpoint))
    except CheckpointError as exc:
        print(f"streamgmm: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(_strict_json(summary))
        return 0
    print(_describe(summary))
    return 0


FORMAT_HELP = ("how to read --input (default: from its name, .jsonl/.json/.ndjson -> json, .csv -> csv; "
               "otherwise input.format if it is csv or json, else csv)")
# streamgmm fit's EM with a fixed model.n_components and covariance_type.
FIT_N_INIT = 3
FIT_MAX_ITER = 300


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamgmm", description="Streaming anomaly detection with online Gaussian mixtures.")
    parser.add_argument("--version", action="version", version=f"streamgmm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon (Kafka in, anomalies out)")
    run.add_argument("--config", required=True, help="YAML config file")
    run.set_defaults(func=cmd_run)

    rep = sub.add_parser("replay", help="the same pipeline over a CSV/JSONL file or stdin")
    rep.add_argument("--config", required=True, help="YAML config file (input, model and threshold are used)")
    rep.add_argument("--input", required=True, help="PATH of a CSV or JSON-lines file, or - for stdin")
    rep.add_argument("--output", default="-", help="PATH, or - for stdout: one JSON line per record (default: -)")
    rep.add_argument("--format", choices=["csv", "json"], help=FORMAT_HELP)
    rep.set_defaults(func=cmd_replay)

    fit = sub.add_parser("fit", help="batch EM on recorded data, written as a checkpoint")
    fit.add_argument("--config", required=True, help="YAML config file (input, model, threshold and checkpoint.keep)")
    fit.add_argument("--input", required=True, help="PATH of a CSV or JSON-lines file, or - for stdin")
    fit.add_argument("--output", required=True, help="checkpoint directory to write (created if missing); "
                                                     "start the daemon from it with model.init_from")
    fit.add_argument("--format", choices=["csv", "json"], help=FORMAT_HELP)
    fit.add_argument("--n-init", type=_positive_int, metavar="N",
                     help=f"EM starts, the best kept (default: {FIT_N_INIT}); when model.n_components or "
                          "covariance_type is auto, starts per candidate of the warm-up's BIC search, whose final "
                          f"refit takes {FINAL_N_INIT_FACTOR} x N in all (default: the warm-up's own, {WARMUP_N_INIT})")
    fit.add_argument("--max-iter", type=_positive_int, metavar="N",
                     help=f"EM iterations per start at most (default: {FIT_MAX_ITER}); when model.n_components or "
                          "covariance_type is auto, per candidate of the warm-up's BIC search (default: the "
                          "warm-up's own, 100)")
    fit.set_defaults(func=cmd_fit)

    chk = sub.add_parser("check-config", help="validate a config file and print the effective config")
    chk.add_argument("file", help="YAML config file (STREAMGMM_* environment overrides apply)")
    chk.add_argument("--env-file", default=None,
                     help="also apply STREAMGMM_* settings from this file of KEY=value lines, as systemd's "
                          "EnvironmentFile= gives them to the daemon (/etc/streamgmm/streamgmm.env)")
    chk.add_argument("--unit", default=None,
                     help="check what this systemd unit runs: its Environment= and EnvironmentFile= settings "
                          "(before --env-file), and paths its sandbox hides or keeps read-only "
                          "(/etc/systemd/system/streamgmm.service)")
    chk.add_argument("--instance", default=None, help="with a template --unit (streamgmm@.service): the instance, "
                                                      "e.g. 9465")
    chk.set_defaults(func=cmd_check_config)

    add_healthcheck_parser(sub)

    ins = sub.add_parser("inspect", help="summarise the newest valid checkpoint (a directory or a state topic)")
    ins.add_argument("checkpoint", nargs="?", metavar="PATH",
                     help="a checkpoint directory (its newest valid checkpoint) or one checkpoint file")
    ins.add_argument("--topic", help="read state records from this checkpoint topic instead")
    ins.add_argument("--bootstrap", help="HOST:PORT of the Kafka cluster holding --topic")
    ins.add_argument("--config", help="the daemon's YAML config: its cluster, kafka.security settings (a secured "
                                      "cluster) and checkpoint.topic, for --topic and --bootstrap left out")
    ins.add_argument("--key", help="only this model key, e.g. features/3 (default: every key in --topic)")
    ins.add_argument("--group", help="with --topic: show the record this consumer group's members restore (the "
                                     "newest at or past the group's commit) and the commit beside it")
    ins.add_argument("--timeout", type=float, default=30.0,
                     help="with --topic: seconds to wait for the broker's answers (default 30)")
    ins.add_argument("--json", action="store_true", help="print the summary as one JSON document instead of in words")
    ins.set_defaults(func=cmd_inspect)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("streamgmm: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # `streamgmm replay ... | head`: the reader has what it wanted. Quietly, as a command
        # killed by SIGPIPE would end (and no second error when Python flushes stdout at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
