"""Leases: which process owns an in-flight run, so several processes and hosts can share one results store.

A run in flight is the directory <kind>/.<key>.partial/ with a `.lease.json` inside: host, pid, boot id, a random
token, and a heartbeat the owner rewrites every `timeout / 5` seconds from a background thread. A lease is
*fresh* while its heartbeat is younger than the timeout (env DEFTLAB_LEASE_TIMEOUT, seconds, default 300); a fresh
lease is never taken, whichever host owns it. A lease is *stale* when its heartbeat is older, when its owner
released it (Ctrl-C), or at once when the owner is a dead pid on this same host and boot. A stale lease is taken
over: exactly one taker wins (it creates `.takeover-<old token>` with os.mkdir, which is atomic on local and NFS
file systems), writes a new lease and resumes the run in the same directory. Heartbeats compare wall clocks, so
hosts sharing a store need clocks in sync to well within the timeout (NTP).

The host name is socket.gethostname() unless DEFTLAB_HOST names it (two processes on one machine can act as two
hosts, which is how the tests exercise takeover across hosts).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from deftlab.errors import DeftlabError
from deftlab.manifest import write_json_atomic

log = logging.getLogger(__name__)

LEASE_FILE = ".lease.json"
TIMEOUT_ENV = "DEFTLAB_LEASE_TIMEOUT"
HOST_ENV = "DEFTLAB_HOST"
DEFAULT_TIMEOUT_S = 300.0


class RunInProgressError(DeftlabError):
    """Another live process holds the run's lease."""

    def __init__(self, ref: str, owner: dict, age_s: float):
        self.owner = owner
        super().__init__(f"run {ref} is in progress on host {owner.get('host')} (pid {owner.get('pid')}, "
                         f"heartbeat {age_s:.0f} s ago)",
                         f"wait for it, or stop that process; a lease older than {lease_timeout():.0f} s "
                         f"({TIMEOUT_ENV}) is taken over")


class LeaseLostError(DeftlabError):
    pass


def lease_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise DeftlabError(f"{TIMEOUT_ENV}={raw!r} is not a number", f"set {TIMEOUT_ENV} to seconds, e.g. 300")
    if value <= 0:
        raise DeftlabError(f"{TIMEOUT_ENV}={raw!r} must be positive", f"set {TIMEOUT_ENV} to seconds, e.g. 300")
    return value


def launch_id() -> str | None:
    """The multi-process launch this process belongs to (torchrun's / Lightning's rendezvous address), or None: the
    other ranks of a launch join only a run whose lease their own rank 0 wrote (deftlab.experiments.runner)."""
    if "MASTER_PORT" not in os.environ:
        return None
    return ":".join(os.environ.get(v, "") for v in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))


def host_name() -> str:
    return os.environ.get(HOST_ENV) or socket.gethostname()


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lease(run_dir: Path) -> dict | None:
    try:
        data = json.loads((run_dir / LEASE_FILE).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def lease_state(run_dir: Path, timeout: float | None = None) -> tuple[str, dict | None, float]:
    """("fresh" | "stale", lease or None, heartbeat age in seconds) of an in-flight directory."""
    timeout = lease_timeout() if timeout is None else timeout
    lease = read_lease(run_dir)
    now = time.time()
    if lease is None:  # being created right now, or left by a crash before its lease was written
        try:
            age = now - run_dir.stat().st_mtime
        except OSError:
            return "stale", None, float("inf")
        return ("fresh" if age < timeout else "stale"), None, age
    age = now - float(lease.get("heartbeat", 0))
    if lease.get("released"):
        return "stale", lease, age
    if lease.get("host") == host_name() and lease.get("boot_id") == boot_id() and not pid_alive(lease.get("pid")):
        return "stale", lease, age
    return ("fresh" if age < timeout else "stale"), lease, age


@dataclass
class Lease:
    """This process's claim on one in-flight run directory; renew it with `start()` (a heartbeat thread)."""

    run_dir: Path
    ref: str
    attempt: int = 1
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    started_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    lost: bool = False

    def payload(self, released: bool = False) -> dict:
        return {"host": host_name(), "pid": os.getpid(), "boot_id": boot_id(), "token": self.token,
                "started_at": self.started_at, "heartbeat": time.time(), "attempt": self.attempt,
                "released": released, "launch": launch_id()}

    def write(self, released: bool = False) -> None:
        write_json_atomic(self.run_dir / LEASE_FILE, self.payload(released))

    def renew(self) -> None:
        current = read_lease(self.run_dir)
        if current is not None and current.get("token") != self.token:
            self.lost = True
            log.error("run %s: another process took over this run's lease (%s on %s)", self.ref,
                      current.get("pid"), current.get("host"))
            self._stop.set()
            return
        self.write()

    def start(self, interval: float | None = None) -> "Lease":
        interval = interval or max(0.5, lease_timeout() / 5)

        def beat():
            while not self._stop.wait(interval):
                try:
                    self.renew()
                except OSError as e:  # a store on a flaky mount: keep trying
                    log.warning("run %s: could not renew the lease: %s", self.ref, e)

        self._thread = threading.Thread(target=beat, name=f"lease-{self.ref}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def check(self) -> None:
        current = read_lease(self.run_dir)
        if self.lost or (current is not None and current.get("token") != self.token):
            raise LeaseLostError(f"run {self.ref}: its lease was taken over by another process while it ran",
                                 f"the other process owns {self.run_dir} now; raise {TIMEOUT_ENV} if this "
                                 "host stalls for longer than the timeout")

    def release(self) -> None:
        """Give the run up (Ctrl-C): the directory stays for a later resume, marked free at once."""
        self.stop()
        current = read_lease(self.run_dir)
        if current is None or current.get("token") == self.token:
            self.write(released=True)


def claim(run_dir: Path, ref: str, timeout: float | None = None) -> Lease:
    """Claim the in-flight directory `run_dir` (created when absent); raises RunInProgressError when a fresh
    lease holds it. The returned lease is written but its heartbeat is not started."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(run_dir)
        lease = Lease(run_dir, ref)
        lease.write()
        return lease
    except FileExistsError:
        pass
    state, old, age = lease_state(run_dir, timeout)
    if state == "fresh":
        raise RunInProgressError(ref, old or {"host": "?", "pid": "?"}, age)
    marker = run_dir / f".takeover-{(old or {}).get('token', 'none')}"
    try:
        os.mkdir(marker)
    except FileExistsError:  # another process won the takeover a moment ago
        raise RunInProgressError(ref, read_lease(run_dir) or {"host": "?", "pid": "?"}, 0.0) from None
    lease = Lease(run_dir, ref, attempt=int((old or {}).get("attempt", 1)) + 1)
    lease.write()
    log.warning("run %s: resuming the interrupted attempt in %s (owner %s pid %s, heartbeat %.0f s ago)", ref,
                run_dir, (old or {}).get("host"), (old or {}).get("pid"), age)
    return lease
