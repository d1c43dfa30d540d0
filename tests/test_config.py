"""config.toml -> Config: defaults, the shipped file, and one clear error per mistake."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from aggregator import config, dashboards
from aggregator.config import DASHBOARDS_SECTION, SETTINGS, ConfigError, Tier

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_without_a_file() -> None:
    cfg = config.load(None)
    assert cfg.udp == "127.0.0.1:8125"
    assert cfg.http == "127.0.0.1:8126"
    assert cfg.flush_interval == 10
    assert cfg.percentiles == (50.0, 90.0, 95.0, 99.0)
    assert cfg.tiers == (Tier(10, 2 * 86400), Tier(60, 30 * 86400), Tier(3600, 2 * 365 * 86400))
    assert cfg.gauge_deltas is True
    assert cfg.source == "built-in defaults"


def with_optional_blocks(text: str) -> str:
    """config.toml with its commented-out optional tables ("# [forward.graphite]"
    up to the next blank line) switched on."""
    out, inside = [], False
    for line in text.splitlines():
        if re.match(r"^# \[forward\.\w+\]", line):
            inside = True
        elif not line.strip():
            inside = False
        out.append(line[2:] if inside and line.startswith("# ") else line)
    return "\n".join(out) + "\n"


def flat_settings(raw: dict[str, object]) -> dict[str, object]:
    """{"section.key": value}, with [forward.graphite] as the section "forward.graphite"."""
    shown: dict[str, object] = {}
    for section, table in raw.items():
        if section == DASHBOARDS_SECTION:
            continue
        assert isinstance(table, dict)
        for key, value in table.items():
            if section in config.NESTED_SECTIONS:
                shown.update({f"{section}.{key}.{k}": v for k, v in value.items()})
            else:
                shown[f"{section}.{key}"] = value
    return shown


def test_shipped_config_shows_every_setting_with_its_default() -> None:
    # Optional tables ([forward.*]) are shown commented out: absent means off.
    raw = tomllib.loads(with_optional_blocks((ROOT / "config.toml").read_text()))
    assert flat_settings(raw) == {s.dotted: s.default for s in SETTINGS}


def test_shipped_config_leaves_forwarding_off() -> None:
    cfg = config.load(ROOT / "config.toml")
    assert (cfg.graphite_enabled, cfg.relay_enabled) == (False, False)
    assert "forward" not in tomllib.loads((ROOT / "config.toml").read_text())


def test_a_forward_table_turns_its_feature_on(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[forward.graphite]\n[forward.relay]\naddress = '127.0.0.1:9125'\n")
    cfg = config.load(path)
    assert (cfg.graphite_enabled, cfg.graphite_address, cfg.graphite_prefix) == (
        True,
        "127.0.0.1:2003",
        "stats",
    )
    assert (cfg.relay_enabled, cfg.relay_address, cfg.relay_protocol) == (
        True,
        "127.0.0.1:9125",
        "udp",
    )


def test_shipped_config_shows_the_builtin_dashboards() -> None:
    # The dashboard tables are structured definitions, not settings: the
    # shipped file shows exactly the built-in ones (tests/test_dashboards.py
    # checks what they compute).
    raw = tomllib.loads((ROOT / "config.toml").read_text())
    assert raw[DASHBOARDS_SECTION] == dashboards.BUILTIN
    assert config.load(ROOT / "config.toml").dashboards == config.load(None).dashboards


def test_shipped_config_comments_every_key() -> None:
    for line in (ROOT / "config.toml").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line, f"config.toml line without a comment: {line}"


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [s.dotted for s in SETTINGS if f"`{s.dotted}`" not in readme]
    assert missing == []


BAD_CONFIGS = [
    ("unknown section", "[nope]\nx = 1\n", "unknown section [nope]"),
    ("unknown key", "[listen]\nudpp = '127.0.0.1:1'\n", "unknown key listen.udpp"),
    ("wrong type", "[aggregation]\nflush_interval = '10'\n", "aggregation.flush_interval"),
    ("zero interval", "[aggregation]\nflush_interval = 0\n", "aggregation.flush_interval"),
    ("bool interval", "[aggregation]\nflush_interval = true\n", "aggregation.flush_interval"),
    ("bad address", "[listen]\nudp = 'localhost'\n", "listen.udp"),
    ("negative workers", "[listen]\nworkers = -1\n", "listen.workers"),
    ("workers as text", "[listen]\nworkers = '2'\n", "listen.workers"),
    (
        "workers with the relay",
        "[listen]\nworkers = 2\n[forward.relay]\naddress = '127.0.0.1:9'\n",
        "listen.workers cannot be used with [forward.relay]",
    ),
    (
        "workers with no datagram socket",
        "[listen]\nworkers = 2\nudp = ''\n",
        "listen.workers reads the datagram sockets",
    ),
    ("port too big", "[listen]\ntcp = '127.0.0.1:70000'\n", "listen.tcp"),
    ("percentile 0", "[aggregation]\npercentiles = [0, 50]\n", "aggregation.percentiles"),
    ("percentile text", "[aggregation]\npercentiles = ['p99']\n", "aggregation.percentiles"),
    ("gauge mode", "[aggregation]\ngauge_mode = 'relative'\n", "aggregation.gauge_mode"),
    ("bad duration", "[storage]\nraw_retention = '2 days'\n", "storage.raw_retention"),
    ("tier shape", "[storage]\ndownsample = ['1m']\n", "storage.downsample"),
    ("tier order", "[storage]\ndownsample = ['1h:2y', '1m:30d']\n", "storage.downsample"),
    (
        "tier not a multiple of the interval",
        "[aggregation]\nflush_interval = 7\n",
        "storage.downsample",
    ),
    (
        "open API without a token",
        "[listen]\nhttp = '0.0.0.0:8126'\n",
        "listen.http",
    ),
    (
        "unknown forward table",
        "[forward.carbon]\naddress = 'h:1'\n",
        "unknown section [forward.carbon]",
    ),
    ("forward not a table", "forward = 1\n", "[forward] must be a table"),
    ("graphite address", "[forward.graphite]\naddress = ''\n", "forward.graphite.address"),
    ("graphite tags", "[forward.graphite]\ntags = 'influx'\n", "forward.graphite.tags"),
    ("graphite prefix", "[forward.graphite]\nprefix = 'a b'\n", "forward.graphite.prefix"),
    ("graphite buffer", "[forward.graphite]\nbuffer = 0\n", "forward.graphite.buffer"),
    ("relay without address", "[forward.relay]\nprotocol = 'tcp'\n", "forward.relay.address"),
    (
        "relay protocol",
        "[forward.relay]\naddress = 'h:1'\nprotocol = 'x'\n",
        "forward.relay.protocol",
    ),
    (
        "relay to itself",
        "[listen]\nudp = '127.0.0.1:9999'\n[forward.relay]\naddress = '127.0.0.1:9999'\n",
        "forward.relay.address",
    ),
    ("expire_after", "[prometheus]\nexpire_after = 5\n", "prometheus.expire_after"),
    ("not toml", "[listen\n", "not valid TOML"),
    ("section not a table", "listen = 3\n", "[listen] must be a table"),
]


@pytest.mark.parametrize(
    ("text", "needle"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_config_names_the_key_and_file(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert needle in message
    assert message.startswith(str(path))
    assert "\n" not in message


def test_open_api_is_allowed_with_a_token_or_explicitly(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[listen]\nhttp = '0.0.0.0:8126'\n[http]\ntoken = 's3cret'\n")
    assert config.load(path).token == "s3cret"
    path.write_text("[listen]\nhttp = '0.0.0.0:8126'\n[http]\nallow_unauthenticated = true\n")
    assert config.load(path).allow_unauthenticated is True


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[listen]\nudp = '127.0.0.1:9000'\n[aggregation]\nflush_interval = 10\n")
    cfg = config.load(path, {"listen.udp": "", "aggregation.flush_interval": 1})
    assert (cfg.udp, cfg.flush_interval) == ("", 1)
    assert cfg.tiers[0] == Tier(1, 2 * 86400)


def test_bad_flag_value_names_the_command_line() -> None:
    with pytest.raises(ConfigError, match=re.escape("command line: listen.tcp")):
        config.load(None, {"listen.tcp": "nowhere"})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10), ("5m", 300), ("1h", 3600), ("2d", 172800), ("1w", 604800), ("2y", 63072000)],
)
def test_durations(text: str, seconds: int) -> None:
    assert config.parse_duration(text) == seconds


def test_a_downsample_tier_at_the_flush_resolution_extends_the_raw_tier(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[aggregation]\nflush_interval = 60\n")
    assert config.load(path).tiers == (Tier(60, 30 * 86400), Tier(3600, 2 * 365 * 86400))
