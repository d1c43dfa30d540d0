"""systemd readiness and watchdog notifications, written against $NOTIFY_SOCKET.

The protocol is one datagram of newline-separated KEY=VALUE assignments
to the unix socket named by NOTIFY_SOCKET (a leading "@" means the Linux
abstract namespace). Outside systemd the variable is unset and every call
is a no-op.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_seconds = _watchdog_seconds(env)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *assignments: str) -> bool:
        """Send `READY=1`-style assignments; False when there is no systemd to tell."""
        if not self.address:
            return False
        message = "\n".join(assignments).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(message, self.address)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=flushing the open window")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd match the READY=1 that ends the reload.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


def _watchdog_seconds(env: os._Environ[str] | dict[str, str]) -> float | None:
    """The watchdog interval when systemd set one for this process (WatchdogSec=)."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000
