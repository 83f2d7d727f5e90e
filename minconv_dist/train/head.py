"""The driver's watch on the Ray head. A driver attached to a cluster (RAY_ADDRESS: a driver that does not run
on the head) outlives a lost head only briefly: Ray's client in it retries for `gcs_rpc_server_reconnect_timeout_s`
(60 s), hangs any Ray call meanwhile, then ends the process with a C++ abort that says nothing of the run.
`HeadWatch` probes the head's GCS port from the driver's main thread instead (a TCP connect: it answers at
once), and raises `HeadLost` once the head has been silent for `lost_after_s`, so that `fit` can end the run in
one line with the command that continues it, within Ray's minute. Ray Train's controller actor lives on the
head, so its loss often shows first as an `ActorUnavailableError` of the driver's call to it: `confirm` tells.
A driver that runs on the head (`ray job submit`) goes down with it: its `ray job` client sees the connection
end (docs/cluster.md, "Failure modes").
"""
from __future__ import annotations

import socket
import time


class HeadLost(RuntimeError):
    """The Ray head stopped answering; Ray's client ends this process within a minute of the loss."""


class HeadWatch:
    def __init__(self, address: str, lost_after_s: float = 10.0, probe_s: float = 2.0):
        host, _, port = address.rpartition(":")
        self.address, self.target = address, (host, int(port))
        self.lost_after_s, self.probe_s = lost_after_s, probe_s
        self.silent_since: float | None = None

    def check(self) -> bool:
        """Probe the head once (at most `probe_s`): True if it answers; raise `HeadLost` if it has been silent for
        `lost_after_s`."""
        try:
            socket.create_connection(self.target, timeout=self.probe_s).close()
            self.silent_since = None
            return True
        except OSError as err:
            now = time.monotonic()
            self.silent_since = self.silent_since or now
            if now - self.silent_since >= self.lost_after_s:
                raise HeadLost(f"lost the Ray head at {self.address} (no answer for {now - self.silent_since:.0f} s: "
                               f"{err.strerror or err})") from None
            return False

    def confirm(self) -> None:
        """Return once the head answers; raise `HeadLost` if it stays silent for `lost_after_s`."""
        while not self.check():
            time.sleep(self.probe_s)
