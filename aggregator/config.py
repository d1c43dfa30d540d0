"""Configuration: config.toml -> a frozen Config.

Every setting is declared once in SETTINGS, with its default and its help
text; config.toml and the README's configuration reference are checked
against this table by the tests. A wrong key, type or value raises
ConfigError with one message that names the file and the key.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .dashboards import BUILTIN as BUILTIN_DASHBOARDS
from .dashboards import Dashboard, DefinitionError, parse_dashboards
from .limits import Limits

#: the default of every [limits] setting (limits.py holds them)
DEFAULT_LIMITS = Limits()


class ConfigError(Exception):
    """A configuration problem; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class Setting:
    section: str
    key: str
    default: Any
    help: str
    check: Callable[[Any], Any]  # returns the normalised value or raises ValueError

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"


@dataclass(frozen=True, slots=True)
class Tier:
    """A storage resolution: rollups of `resolution` seconds kept `retention` seconds."""

    resolution: int
    retention: int


@dataclass(frozen=True, slots=True)
class Config:
    udp: str
    tcp: str
    unix: str
    unix_stream: str
    http: str
    udp_receive_buffer: int
    max_line_length: int
    flush_interval: int
    percentiles: tuple[float, ...]
    gauge_deltas: bool
    clean_names: bool
    storage_path: str
    raw_retention: int
    downsample: tuple[Tier, ...]
    token: str
    allow_unauthenticated: bool
    default_dashboard: str  # served by /api/metrics/dashboard; "" for none
    dashboards: tuple[Dashboard, ...]
    prometheus_expire_after: int  # seconds; 0 = never
    graphite_enabled: bool  # a [forward.graphite] table is present
    graphite_address: str
    graphite_prefix: str
    graphite_tags: str  # "graphite" | "fold"
    graphite_buffer: int  # lines
    relay_enabled: bool  # a [forward.relay] table is present
    relay_address: str
    relay_protocol: str  # "udp" | "tcp"
    relay_buffer: int  # bytes
    source: str  # the file it came from, or "built-in defaults"
    # Operations (README "Operations"): socket file mode and the [limits].
    unix_mode: int = 0o660
    workers: int = 0  # ingest processes reading the datagram sockets (worker.py)
    max_series: int = DEFAULT_LIMITS.max_series
    max_series_per_metric: int = DEFAULT_LIMITS.max_series_per_metric
    max_tags: int = DEFAULT_LIMITS.max_tags
    max_tag_length: int = DEFAULT_LIMITS.max_tag_length
    max_name_length: int = DEFAULT_LIMITS.max_name_length
    max_timestamp_age: int = DEFAULT_LIMITS.max_timestamp_age
    max_timestamp_future: int = DEFAULT_LIMITS.max_timestamp_future
    max_datagram_size: int = DEFAULT_LIMITS.max_datagram_size
    max_connections: int = DEFAULT_LIMITS.max_connections
    idle_timeout: int = DEFAULT_LIMITS.idle_timeout
    max_query_cost: int = DEFAULT_LIMITS.max_query_cost

    def limits(self) -> Limits:
        """The [limits] section as the object the aggregator, listeners and API share."""
        return Limits(**{f.name: getattr(self, f.name) for f in fields(Limits)})

    def dashboard(self, name: str) -> Dashboard | None:
        return next((d for d in self.dashboards if d.name == name), None)

    @property
    def tiers(self) -> tuple[Tier, ...]:
        """Every storage tier, finest (the flush interval) first.

        A downsample tier at the flush resolution itself is the raw tier,
        kept for the longer of the two retentions (so flush_interval = 60
        works with the default "1m:30d").
        """
        raw = Tier(self.flush_interval, self.raw_retention)
        coarser = []
        for tier in self.downsample:
            if tier.resolution == self.flush_interval:
                raw = Tier(raw.resolution, max(raw.retention, tier.retention))
            else:
                coarser.append(tier)
        return (raw, *coarser)


# ---------------------------------------------------------------- value checks

_DURATION = re.compile(r"^(\d+)(s|m|h|d|w|y)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def parse_duration(text: str) -> int:
    """'10s', '1m', '2d', '2y' -> seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration like 10s, 5m, 2d or 1y")
    return int(match.group(1)) * _UNITS[match.group(2)]


def _address(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError('must be a string "host:port" (or "" to disable)')
    if value == "":
        return value
    split_address(value)
    return value


def split_address(value: str) -> tuple[str, int]:
    """'127.0.0.1:8125' or '[::1]:8125' -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f'{value!r} is not "host:port" with a port from 0 to 65535')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _required_address(value: Any) -> str:
    if not _address(value):
        raise ValueError('must be "host:port"')
    return str(value)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("must be a whole number greater than 0")
    return value


#: more ingest workers than this is a typo, not a machine
MAX_WORKERS = 64


def _worker_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WORKERS:
        raise ValueError(f"must be a whole number from 0 to {MAX_WORKERS}")
    return value


def _percentiles(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of numbers between 0 and 100")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | float) or not 0 < item <= 100:
            raise ValueError(f"{item!r} is not a percentile in (0, 100]")
        out.append(float(item))
    return tuple(sorted(set(out)))


def _gauge_mode(value: Any) -> bool:
    if value not in ("delta", "absolute"):
        raise ValueError('must be "delta" or "absolute"')
    return bool(value == "delta")


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError("must be " + " or ".join(f'"{c}"' for c in choices))
        return str(value)

    return check


def _graphite_prefix(value: Any) -> str:
    if not isinstance(value, str) or any(c.isspace() or c == ";" for c in value):
        raise ValueError('must be a string without spaces or ";" (e.g. "stats", or "")')
    return value.strip(".")


def _file_mode(value: Any) -> int:
    if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}", value):
        raise ValueError('must be an octal file mode as a string, like "0660"')
    return int(value, 8)


def _duration(value: Any) -> int:
    if not isinstance(value, str):
        raise ValueError("must be a duration string like 10s, 5m, 2d or 1y")
    return parse_duration(value)


def _downsample(value: Any) -> tuple[Tier, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError('must be a list of "resolution:retention" strings')
    tiers = []
    for item in value:
        resolution, sep, keep = item.partition(":")
        if not sep:
            raise ValueError(f'{item!r} is not "resolution:retention", e.g. "1m:30d"')
        tiers.append(Tier(parse_duration(resolution), parse_duration(keep)))
    for finer, coarser in itertools.pairwise(tiers):
        if coarser.resolution <= finer.resolution or coarser.resolution % finer.resolution:
            raise ValueError(
                f"each resolution must be a multiple of the one before "
                f"({coarser.resolution}s after {finer.resolution}s)"
            )
    return tuple(tiers)


# ---------------------------------------------------------------- the settings

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "listen", "udp", "127.0.0.1:8125", "UDP address for StatsD/DogStatsD datagrams", _address
    ),
    Setting("listen", "tcp", "127.0.0.1:8125", "TCP address for newline-delimited lines", _address),
    Setting("listen", "unix", "", "path of a unix datagram socket (DogStatsD UDS)", _string),
    Setting(
        "listen", "unix_stream", "", "path of a unix stream socket (newline-delimited)", _string
    ),
    Setting("listen", "http", "127.0.0.1:8126", "JSON API, dashboard page and /metrics", _address),
    Setting(
        "listen",
        "udp_receive_buffer",
        32 * 1024 * 1024,
        "bytes of kernel receive buffer asked for on the UDP and unix datagram sockets",
        _positive_int,
    ),
    Setting(
        "listen",
        "max_line_length",
        65536,
        "longest line accepted on TCP and unix stream connections (bytes)",
        _positive_int,
    ),
    Setting(
        "listen",
        "unix_mode",
        "0660",
        "permissions of the unix socket files (octal): owner and group may send, others not",
        _file_mode,
    ),
    Setting(
        "listen",
        "workers",
        0,
        "processes that read the UDP and unix datagram sockets, each with its own window, "
        "merged at flush (0: the daemon reads them itself)",
        _worker_count,
    ),
    Setting(
        "aggregation",
        "flush_interval",
        10,
        "seconds per window; windows are aligned to multiples of it",
        _positive_int,
    ),
    Setting(
        "aggregation",
        "percentiles",
        [50, 90, 95, 99],
        "percentiles computed for timers, histograms and distributions",
        _percentiles,
    ),
    Setting(
        "aggregation",
        "gauge_mode",
        "delta",
        '"delta": a gauge value with a leading + or - changes the last value (Etsy); '
        '"absolute": it is the new value',
        _gauge_mode,
    ),
    Setting(
        "aggregation",
        "clean_names",
        True,
        "clean metric names as Etsy statsd does (white space -> _, / -> -, drop other symbols)",
        _bool,
    ),
    Setting("storage", "path", "data/metrics.db", "the SQLite database file", _string),
    Setting(
        "storage",
        "raw_retention",
        "2d",
        "how long rollups at the flush resolution are kept",
        _duration,
    ),
    Setting(
        "storage",
        "downsample",
        ["1m:30d", "1h:2y"],
        'coarser tiers as "resolution:retention", finest first; each resolution a multiple '
        "of the one before and of aggregation.flush_interval",
        _downsample,
    ),
    Setting(
        "limits",
        "max_series",
        DEFAULT_LIMITS.max_series,
        "distinct series in one flush window, all metrics together (persisted gauges "
        "included); the samples of further new series are dropped and counted",
        _positive_int,
    ),
    Setting(
        "limits",
        "max_series_per_metric",
        DEFAULT_LIMITS.max_series_per_metric,
        "distinct series of one metric name in one flush window",
        _positive_int,
    ),
    Setting("limits", "max_tags", DEFAULT_LIMITS.max_tags, "tags on one series", _positive_int),
    Setting(
        "limits",
        "max_tag_length",
        DEFAULT_LIMITS.max_tag_length,
        'characters of one tag, "key:value"',
        _positive_int,
    ),
    Setting(
        "limits",
        "max_name_length",
        DEFAULT_LIMITS.max_name_length,
        "characters of a metric name",
        _positive_int,
    ),
    Setting(
        "limits",
        "max_timestamp_age",
        "2d",
        "a |T timestamp older than this (before the open window) is dropped",
        _duration,
    ),
    Setting(
        "limits",
        "max_timestamp_future",
        "10m",
        "a |T timestamp further ahead than this is dropped",
        _duration,
    ),
    Setting(
        "limits",
        "max_datagram_size",
        DEFAULT_LIMITS.max_datagram_size,
        "bytes of one UDP or unix datagram; a larger one is dropped and counted",
        _positive_int,
    ),
    Setting(
        "limits",
        "max_connections",
        DEFAULT_LIMITS.max_connections,
        "open TCP and unix stream connections together; further ones are closed at once",
        _positive_int,
    ),
    Setting(
        "limits",
        "idle_timeout",
        "5m",
        "a TCP or unix stream connection that completes no line for this long is closed",
        _duration,
    ),
    Setting(
        "limits",
        "max_query_cost",
        DEFAULT_LIMITS.max_query_cost,
        "GET /api/v1/series answers 400 when buckets x matching series exceeds this",
        _positive_int,
    ),
    Setting(
        "http",
        "token",
        "",
        'when set, /api/* requires the header "Authorization: Bearer <token>"',
        _string,
    ),
    Setting(
        "http",
        "allow_unauthenticated",
        False,
        "allow the API on a non-loopback address without a token",
        _bool,
    ),
    Setting(
        "http",
        "dashboard",
        "sigma_playground",
        "the dashboard (a [dashboards.<name>] table) that /api/metrics/dashboard answers "
        'and the page at / opens; "" for none',
        _string,
    ),
    Setting(
        "prometheus",
        "expire_after",
        "5m",
        "a series that received nothing for this long leaves GET /metrics; \"0s\" keeps "
        "every series until the daemon stops",
        _duration,
    ),
    Setting(
        "forward.graphite",
        "address",
        "127.0.0.1:2003",
        "carbon's plaintext protocol (TCP); the [forward.graphite] table turns forwarding on",
        _required_address,
    ),
    Setting(
        "forward.graphite",
        "prefix",
        "stats",
        'first path segment of every line (Etsy\'s globalPrefix); "" for none',
        _graphite_prefix,
    ),
    Setting(
        "forward.graphite",
        "tags",
        "graphite",
        '"graphite": tags as Graphite tags (path;k=v); "fold": one path segment k_v per tag',
        _one_of("graphite", "fold"),
    ),
    Setting(
        "forward.graphite",
        "buffer",
        1_000_000,
        "lines held while carbon is unreachable; beyond it the oldest are dropped and counted",
        _positive_int,
    ),
    Setting(
        "forward.relay",
        "address",
        "",
        "another StatsD/DogStatsD server that gets every received line (required when the "
        "[forward.relay] table is present)",
        _address,
    ),
    Setting("forward.relay", "protocol", "udp", '"udp" or "tcp"', _one_of("udp", "tcp")),
    Setting(
        "forward.relay",
        "buffer",
        8 * 1024 * 1024,
        "bytes held while a tcp relay target is unreachable; beyond it the oldest are dropped",
        _positive_int,
    ),
)

#: Sections that only hold sub-tables: [forward.graphite] is the section
#: "forward.graphite". Such a table is optional; its presence turns the
#: feature on (Config.graphite_enabled, Config.relay_enabled).
NESTED_SECTIONS = ("forward",)

#: The [dashboards.<name>] tables are structured definitions, not settings:
#: dashboards.py parses them and documents their keys (dashboards.KEYS).
#: Without a [dashboards] table in the file, the built-in ones apply.
DASHBOARDS_SECTION = "dashboards"

_FIELD = {
    "listen.udp": "udp",
    "listen.tcp": "tcp",
    "listen.unix": "unix",
    "listen.unix_stream": "unix_stream",
    "listen.http": "http",
    "listen.udp_receive_buffer": "udp_receive_buffer",
    "listen.max_line_length": "max_line_length",
    "listen.unix_mode": "unix_mode",
    "listen.workers": "workers",
    "limits.max_series": "max_series",
    "limits.max_series_per_metric": "max_series_per_metric",
    "limits.max_tags": "max_tags",
    "limits.max_tag_length": "max_tag_length",
    "limits.max_name_length": "max_name_length",
    "limits.max_timestamp_age": "max_timestamp_age",
    "limits.max_timestamp_future": "max_timestamp_future",
    "limits.max_datagram_size": "max_datagram_size",
    "limits.max_connections": "max_connections",
    "limits.idle_timeout": "idle_timeout",
    "limits.max_query_cost": "max_query_cost",
    "aggregation.flush_interval": "flush_interval",
    "aggregation.percentiles": "percentiles",
    "aggregation.gauge_mode": "gauge_deltas",
    "aggregation.clean_names": "clean_names",
    "storage.path": "storage_path",
    "storage.raw_retention": "raw_retention",
    "storage.downsample": "downsample",
    "http.token": "token",
    "http.allow_unauthenticated": "allow_unauthenticated",
    "http.dashboard": "default_dashboard",
    "prometheus.expire_after": "prometheus_expire_after",
    "forward.graphite.address": "graphite_address",
    "forward.graphite.prefix": "graphite_prefix",
    "forward.graphite.tags": "graphite_tags",
    "forward.graphite.buffer": "graphite_buffer",
    "forward.relay.address": "relay_address",
    "forward.relay.protocol": "relay_protocol",
    "forward.relay.buffer": "relay_buffer",
}

#: command-line flag -> setting it overrides
FLAG_OVERRIDES = {
    "udp": "listen.udp",
    "tcp": "listen.tcp",
    "unix": "listen.unix",
    "unix_stream": "listen.unix_stream",
    "http": "listen.http",
    "db": "storage.path",
    "flush_interval": "aggregation.flush_interval",
}

_LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


def is_loopback(host: str) -> bool:
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


# ---------------------------------------------------------------- loading


def load(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read `path` (None: built-in defaults) and apply `overrides` (dotted key -> value)."""
    source = str(path) if path is not None else "built-in defaults"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError as exc:
            raise ConfigError(f"{source}: no such file") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    values = _read_settings(raw, source)
    values["dashboards"] = _read_dashboards(raw, source)
    for dotted, value in (overrides or {}).items():
        setting = _by_name(dotted)
        values[_FIELD[dotted]] = _checked(setting, value, "command line")
    _check_together(values, source)
    return Config(source=source, **values)


def _by_name(dotted: str) -> Setting:
    for setting in SETTINGS:
        if setting.dotted == dotted:
            return setting
    raise KeyError(dotted)


def _sections(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The file's tables, with [forward.graphite] as the section "forward.graphite"."""
    out: dict[str, Any] = {}
    for section, table in raw.items():
        if section in NESTED_SECTIONS:
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: [{section}] must be a table")
            out.update({f"{section}.{name}": sub for name, sub in table.items()})
        else:
            out[section] = table
    return out


def _read_settings(raw: dict[str, Any], source: str) -> dict[str, Any]:
    known_sections = {s.section for s in SETTINGS}
    raw = _sections(raw, source)
    for section, table in raw.items():
        if section == DASHBOARDS_SECTION:
            continue
        if section not in known_sections:
            raise ConfigError(f"{source}: unknown section [{section}]")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        for key in table:
            if not any(s.section == section and s.key == key for s in SETTINGS):
                raise ConfigError(f"{source}: unknown key {section}.{key}")
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        value = raw.get(setting.section, {}).get(setting.key, setting.default)
        values[_FIELD[setting.dotted]] = _checked(setting, value, source)
    values["graphite_enabled"] = "forward.graphite" in raw
    values["relay_enabled"] = "forward.relay" in raw
    return values


def _read_dashboards(raw: dict[str, Any], source: str) -> tuple[Dashboard, ...]:
    try:
        return parse_dashboards(raw.get(DASHBOARDS_SECTION, BUILTIN_DASHBOARDS), parse_duration)
    except DefinitionError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def _checked(setting: Setting, value: Any, source: str) -> Any:
    try:
        return setting.check(value)
    except ValueError as exc:
        raise ConfigError(f"{source}: {setting.dotted} {exc}") from exc


def _check_relay(values: dict[str, Any], source: str) -> None:
    if not values["relay_enabled"]:
        return
    target = values["relay_address"]
    if not target:
        raise ConfigError(
            f"{source}: forward.relay.address is required when [forward.relay] is present"
        )
    own = values["udp"] if values["relay_protocol"] == "udp" else values["tcp"]
    if own and not own.endswith(":0") and split_address(own) == split_address(target):
        raise ConfigError(
            f"{source}: forward.relay.address {target!r} is this daemon's own listener "
            "(every line would come back forever)"
        )


def _check_workers(values: dict[str, Any], source: str) -> None:
    if not values["workers"]:
        return
    if values["relay_enabled"]:
        raise ConfigError(
            f"{source}: listen.workers cannot be used with [forward.relay]: the relay "
            "forwards the datagrams the daemon reads itself; set workers = 0"
        )
    if not values["udp"] and not values["unix"]:
        raise ConfigError(
            f"{source}: listen.workers reads the datagram sockets, but neither "
            "listen.udp nor listen.unix is set"
        )


def _check_together(values: dict[str, Any], source: str) -> None:
    _check_relay(values, source)
    _check_workers(values, source)
    interval = values["flush_interval"]
    for tier in values["downsample"]:
        if tier.resolution % interval:
            raise ConfigError(
                f"{source}: storage.downsample resolution {tier.resolution}s is not a multiple "
                f"of aggregation.flush_interval ({interval}s)"
            )
    served = values["default_dashboard"]
    defined = [d.name for d in values["dashboards"]]
    if served and served not in defined:
        raise ConfigError(
            f"{source}: http.dashboard {served!r} is not defined "
            f"(dashboards: {', '.join(defined) or 'none'})"
        )
    http = values["http"]
    if http and not values["token"] and not values["allow_unauthenticated"]:
        host, _ = split_address(http)
        if not is_loopback(host):
            raise ConfigError(
                f"{source}: listen.http {http!r} is not a loopback address; set http.token, "
                "or http.allow_unauthenticated = true to serve the API to anyone"
            )
