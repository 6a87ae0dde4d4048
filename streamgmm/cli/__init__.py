"""Command line and file replay."""

from __future__ import annotations

import signal
import sys

# Stop signals that came while ``run`` was still importing (numpy, scipy and librdkafka: a second
# and more), for cmd_run to act on once it can stop cleanly.
EARLY_SIGNALS: list[int] = []
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _remember(signum, frame) -> None:
    EARLY_SIGNALS.append(signum)


def handle_stop_signals(handler) -> None:
    """``handler`` for SIGTERM, SIGINT and SIGHUP, but a signal the process was started ignoring
    (nohup, a background job) stays ignored: SIGHUP too is a clean stop (a closed terminal),
    which must not undo nohup."""
    for signum in STOP_SIGNALS:
        if signum == signal.SIGTERM or signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    """``streamgmm``'s entry point.  ``healthcheck`` is answered without importing the rest
    (see cli/healthcheck.py); every other command goes through cli/main.py."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["healthcheck"]:
        from .healthcheck import main as healthcheck

        return healthcheck(argv)
    if argv[:1] == ["run"]:
        # Until the daemon's own handlers are in place, a stop signal is remembered: by default
        # one in the first second killed the process outright (SIGHUP, SIGTERM) or printed a
        # traceback (SIGINT), where later ones stop it with the documented exit codes, and a
        # unit killed by SIGHUP is not restarted by Restart=on-failure (helper-63).
        handle_stop_signals(_remember)
    from .main import main as commands

    return commands(argv)


__all__ = ["main"]
