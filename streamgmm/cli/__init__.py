"""Command line and file replay."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """``streamgmm``'s entry point.  ``healthcheck`` is answered without importing the rest
    (see cli/healthcheck.py); every other command goes through cli/main.py."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["healthcheck"]:
        from .healthcheck import main as healthcheck

        return healthcheck(argv)
    from .main import main as commands

    return commands(argv)


__all__ = ["main"]
