"""Command line: run the daemon (default), check a config, query a running daemon."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from . import config as config_module
from .config import FLAG_OVERRIDES, Config, ConfigError

DEFAULT_CONFIG = "config.toml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statsd-aggregator",
        description="StatsD/DogStatsD aggregator with SQLite rollups and a JSON API.",
        epilog="Without a command, runs the daemon.",
    )
    _add_config_flags(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser("run", help="run the daemon (the default)")
    _add_config_flags(run)
    check = commands.add_parser("check-config", help="validate a config file and print it")
    _add_config_flags(check)
    query = commands.add_parser(
        "query", help="query a running daemon's /api/v1/series and print the JSON"
    )
    _add_config_flags(query)
    query.add_argument("metric", help="metric name")
    query.add_argument("--stat", help="stat, e.g. sum, rate, p99, unique")
    query.add_argument("--from", dest="start", default="-1h", help="start (default -1h)")
    query.add_argument("--to", dest="end", default="now", help="end (default now)")
    query.add_argument("--tag", action="append", default=[], help="k:v filter, repeatable")
    query.add_argument("--group-by", help="tag key to group by")
    query.add_argument("--token", default=os.environ.get("STATSD_AGGREGATOR_TOKEN", ""))
    return parser


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS  # so a subcommand's flags do not reset the top level's
    parser.add_argument("--config", default=s, help="config file (default ./config.toml)")
    parser.add_argument("--udp", default=s, metavar="ADDR", help="UDP host:port, '' disables")
    parser.add_argument("--tcp", default=s, metavar="ADDR", help="TCP host:port, '' disables")
    parser.add_argument("--unix", default=s, metavar="PATH", help="unix datagram socket path")
    parser.add_argument("--unix-stream", default=s, metavar="PATH", help="unix stream socket")
    parser.add_argument("--http", default=s, metavar="ADDR", help="HTTP host:port, '' disables")
    parser.add_argument("--db", default=s, metavar="PATH", help="SQLite database file")
    parser.add_argument(
        "--flush-interval", default=s, type=int, metavar="SECONDS", help="seconds per window"
    )
    parser.add_argument(
        "--log-level", default=s, choices=["debug", "info", "warning", "error"], help="log level"
    )


def load_config(args: argparse.Namespace) -> Config:
    path = getattr(args, "config", None)
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    overrides = {
        dotted: getattr(args, flag)
        for flag, dotted in FLAG_OVERRIDES.items()
        if hasattr(args, flag)
    }
    return config_module.load(path, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "info").upper(),
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"statsd-aggregator: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        return _check_config(config)
    if args.command == "query":
        return _query(config, args)
    # SIGHUP re-reads the same file with the same command-line overrides.
    return _run(config, lambda: load_config(args))


def _check_config(config: Config) -> int:
    shown = {name: getattr(config, name) for name in config.__dataclass_fields__ if name != "token"}
    shown["token"] = "(set)" if config.token else ""
    print(f"{config.source}: OK")
    for name, value in shown.items():
        print(f"  {name} = {value!r}")
    return 0


def _run(config: Config, reload: Callable[[], Config] | None = None) -> int:
    from .daemon import Daemon  # imported here so check-config stays light

    try:
        daemon = Daemon(config, reload=reload)
    except Exception as exc:  # storage cannot be opened: one message, no traceback
        print(f"statsd-aggregator: cannot start: {exc}", file=sys.stderr)
        return 1
    try:
        _event_loop_runner(daemon)
    except OSError as exc:
        print(f"statsd-aggregator: cannot start: {exc}", file=sys.stderr)
        return 1
    return daemon.exit_status


def _event_loop_runner(daemon: Any) -> None:
    """Run on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(daemon.run())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(daemon.run())


def _query(config: Config, args: argparse.Namespace) -> int:
    if not config.http:
        print("statsd-aggregator: the HTTP listener is disabled", file=sys.stderr)
        return 2
    params: list[tuple[str, str]] = [
        ("metric", args.metric),
        ("from", args.start),
        ("to", args.end),
    ]
    if args.stat:
        params.append(("stat", args.stat))
    if args.group_by:
        params.append(("group_by", args.group_by))
    params.extend(("tag", tag) for tag in args.tag)
    url = f"http://{config.http}/api/v1/series?{urllib.parse.urlencode(params)}"
    request = urllib.request.Request(url)
    if args.token:
        request.add_header("Authorization", f"Bearer {args.token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        body = json.load(exc)
        print(json.dumps(body, indent=2), file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"statsd-aggregator: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2))
    return 0
