"""The coordinator's and agents' clocks, in one place, injectable for tests.

Production uses the defaults; tests pass ``Batch(timings=Timings(node_timeout_s=1.5))``
(or ``Batch(heartbeat_s=...)``-style keywords) so they never wait out these constants.
"""

from __future__ import annotations

import dataclasses
import math

from hpcbatch.errors import ValidationError


@dataclasses.dataclass(frozen=True)
class Timings:
    heartbeat_s: float = 1.0  # an agent reports (and the coordinator pings) this often
    node_timeout_s: float = 4.0  # no word from an agent this long: its node is lost
    lease_s: float = 4.0  # an agent that hears nothing this long kills its tasks and exits
    reconnect_min_s: float = 1.0  # a lost node is tried again after 1, 2, 4 .. s
    reconnect_max_s: float = 10.0  # .. at most this
    pool_grace_s: float = 30.0  # job.wait gives up after a pool had no usable node this long
    kill_grace_s: float = 2.0  # SIGTERM, then SIGKILL this much later
    work_poll_s: float = 1.0  # work written by other processes is looked for this often

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                    or v <= 0:
                raise ValidationError(f"timings.{f.name}", f"{v!r} must be a number of "
                                      "seconds > 0")
        if self.node_timeout_s <= self.heartbeat_s:
            raise ValidationError("timings.node_timeout_s", "must be longer than heartbeat_s")

    @property
    def fence_wait_s(self) -> float:
        """After a node is declared lost, how long until its agent has surely killed what
        it ran (its lease ran out, then the kill grace): only then are its tasks requeued
        elsewhere, unless the provider could make sure sooner (a local agent is killed)."""
        return self.lease_s + self.kill_grace_s + self.heartbeat_s

    def replace(self, **kw: float) -> Timings:
        return dataclasses.replace(self, **kw)
