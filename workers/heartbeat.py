"""A liveness file for containers: the worker's main process touches it every few seconds.

`HeartbeatStep` is a worker bootstep (registered in `workers/celery_app.py`) that,
when `FLEET_HEARTBEAT_FILE` is set, rewrites that file every `INTERVAL` seconds from
the worker's timer. With the event loop (prefork pool on Redis or RabbitMQ) that
timer is fired by the same loop that consumes messages, so a hung consumer or a
blocked main process stops the heartbeat, and the exec probe

    python -m workers.heartbeat check /tmp/fleet-heartbeat 60

fails once the file is older than 60 seconds. Unlike `celery inspect ping`, the
probe never touches the broker: no broadcast per probe per pod, and a slow broker
does not make every worker look dead at once.

During a warm shutdown the pool drains its running tasks (up to the longest task's
time limit) while the loop no longer runs, so the file goes stale. That is fine:
the kubelet stops probing a pod that is being deleted (Kubernetes >= 1.21), and
Docker only reports health, it never restarts an unhealthy container.

Notes: while the worker reconnects to a broker that is down the loop does not run
either, so the probe restarts it after `max_age` plus the probe's failure window.
With `--pool solo` a task runs inside the loop: pick `max_age` above the longest
task, or use prefork (as every fleet deployment does).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from celery import bootsteps

INTERVAL = 5.0  # seconds between touches; probes allow many missed beats (e.g. 60 s)


def beat(path: Path) -> None:
    """Atomically rewrite `path` (fresh mtime; a reader never sees a half-written file)."""
    text = f"alive {time.time():.3f} pid={os.getpid()}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check(path: Path, max_age: float, now: float | None = None) -> tuple[bool, str]:
    """(healthy, reason): the file exists and is at most `max_age` seconds old."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False, f"no heartbeat file {path}"
    except OSError as exc:
        return False, f"cannot read {path}: {exc}"
    age = (time.time() if now is None else now) - stat.st_mtime
    if age > max_age:
        return False, f"heartbeat is {age:.0f}s old (max {max_age:.0f}s)"
    return True, f"heartbeat {age:.1f}s old"


class HeartbeatStep(bootsteps.StartStopStep):
    """Touch FLEET_HEARTBEAT_FILE every INTERVAL seconds from the worker's event loop."""

    # Started after the timer (whose entries the event loop fires) and the pool.
    requires = ("celery.worker.components:Timer", "celery.worker.components:Pool")
    label = "Heartbeat file"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        # Here, not at the top: the liveness probe runs this module (`check`) every few
        # seconds and needs no settings (pydantic); only the worker's step reads them.
        from workers.settings import get_settings

        path = get_settings().heartbeat_file
        # FLEET_HEARTBEAT_FILE= (blank) reads as Path("."): treat it as unset.
        self.path: Path | None = path if path is not None and str(path) != "." else None
        self.tref: Any = None
        if self.path is not None:
            # A file left by a previous process (a restarted container keeps its emptyDir)
            # must not vouch for this one before it beats.
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass
        super().__init__(parent, **kwargs)

    def include_if(self, parent: Any) -> bool:
        return self.path is not None

    def _touch(self) -> None:
        assert self.path is not None
        try:
            beat(self.path)
        except OSError:
            pass  # a full or read-only disk must not crash the worker; the probe will notice

    def start(self, parent: Any) -> None:
        self._touch()
        self.tref = parent.timer.call_repeatedly(INTERVAL, self._touch)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None


def main(argv: list[str]) -> int:
    usage = "usage: python -m workers.heartbeat check FILE MAX_AGE_SECONDS"
    if len(argv) != 3 or argv[0] != "check":
        print(usage, file=sys.stderr)
        return 2
    try:
        max_age = float(argv[2])
    except ValueError:
        print(usage, file=sys.stderr)
        return 2
    healthy, reason = check(Path(argv[1]), max_age)
    print(reason, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
