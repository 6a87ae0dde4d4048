"""``streamgmm healthcheck``: GET /healthz of the daemon a config runs.

A container runs it every 15 s beside the daemon, so it imports only the config (PyYAML and
the standard library): through the whole package it took 0.5 s and numpy, scipy and
confluent-kafka (1.8 s where scikit-learn is installed), against a 5 s HEALTHCHECK timeout on
the daemon's busy cores.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

from ..service.config import ConfigError, load_config


def add_parser(sub) -> None:
    hc = sub.add_parser("healthcheck", help="exit 0 when the daemon of this config answers /healthz (for a "
                                            "container's HEALTHCHECK)")
    hc.add_argument("--config", required=True, help="the daemon's YAML config (STREAMGMM_* overrides apply)")
    hc.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer (default 2)")
    hc.set_defaults(func=cmd_healthcheck)


def cmd_healthcheck(args) -> int:
    """0 when the daemon answers /healthz with 200, on this host.  For a container's
    HEALTHCHECK, which cannot know the port from the config (metrics.port, or its environment
    override)."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"streamgmm: configuration error: {exc}", file=sys.stderr)
        return 2
    if not config.metrics.enabled or config.metrics.port == 0:
        # Disabled, or on a port chosen at start: nothing this config can say where to ask.
        print("streamgmm: metrics.enabled is false or metrics.port is 0: no /healthz to ask", file=sys.stderr)
        return 0
    host = config.metrics.host if config.metrics.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{host}:{config.metrics.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"streamgmm: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"streamgmm: {url}: HTTP {status}", file=sys.stderr)
    return 0 if status == 200 else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamgmm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
