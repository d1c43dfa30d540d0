"""The relay: a daemon repeats every line it receives to another StatsD
server (here a second daemon), over UDP or TCP, and still aggregates them
itself. Both must hold exactly what was sent."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

import pytest

from .harness import Daemon, config_text, wait_for

DaemonFactory = Callable[..., Daemon]

pytestmark = pytest.mark.e2e

DATAGRAMS = [
    b"relay.hits:1|c|#env:prod",
    b"relay.hits:2|c|#env:prod\nrelay.lat:10|ms\nrelay.lat:30|ms",
    b"relay.temp:21.5|g\nrelay.users:alice|s\nrelay.users:bob|s",
    b"_e{6,4}:deploy|v1.2|#env:prod",
    b"_sc|relay.db|1|m:slow",
]
STREAM = b"relay.hits:4|c|#env:prod\nrelay.lat:20|ms\n"


def self_counter(d: Daemon, name: str) -> float:
    with urllib.request.urlopen(d.http + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"statsd_aggregator_{name}_total "):
                return float(line.split()[1])
    return -1.0


def holds_everything(d: Daemon) -> bool:
    events = d.get("/api/v1/events")["events"]
    checks = d.get("/api/v1/checks")["checks"]
    return (
        d.value("relay.hits", tag="env:prod") == 7
        and d.value("relay.lat", stat="count") == 3
        and d.value("relay.lat", stat="sum") == 60
        and d.value("relay.temp") == 21.5
        and d.value("relay.users") == 2
        and [(e["title"], e["text"]) for e in events] == [("deploy", "v1.2")]
        and [(c["name"], c["status"], c["message"]) for c in checks] == [("relay.db", 1, "slow")]
    )


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_every_line_reaches_the_next_server_and_stays_here_too(
    start_daemon: DaemonFactory, protocol: str
) -> None:
    upstream = start_daemon()
    target = upstream.addresses[protocol]
    extra = f'[forward.relay]\naddress = "{target}"\nprotocol = "{protocol}"\n'
    edge = start_daemon(config_text(extra=extra))
    edge.send_udp(*DATAGRAMS)
    edge.send_tcp(STREAM)
    wait_for(lambda: holds_everything(upstream), 20, "the relayed lines upstream")
    wait_for(lambda: holds_everything(edge), 20, "the lines at the relaying daemon")
    relayed = sum(map(len, DATAGRAMS)) + len(STREAM)
    wait_for(
        lambda: self_counter(edge, "relay_bytes_sent") == relayed, 20, f"{relayed} bytes relayed"
    )
    assert self_counter(edge, "relay_bytes_dropped") == 0
