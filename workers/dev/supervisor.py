"""Run the fleet's processes (workers, beat, Flower) in the foreground, and stop them cleanly.

Children run in their own sessions so a terminal's Ctrl-C reaches only the
supervisor, which then asks each child for a warm shutdown (SIGTERM: finish the
current task, ack it, exit) and kills what is still alive after the grace period.
Their output goes to size-capped, rotating files in the log folder (logfile.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from workers.dev.logfile import BACKUPS, MAX_BYTES, RotatingLog, copy_to_log
from workers.processes import celery_argv, flower_command
from workers.queues import QUEUE_NAMES, worker_options
from workers.settings import Settings


@dataclass
class ProcessSpec:
    name: str
    argv: list[str]
    ready: Callable[[], bool] | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Supervisor:
    specs: list[ProcessSpec]
    log_dir: Path
    env: dict[str, str]
    log_max_bytes: int = MAX_BYTES
    log_backups: int = BACKUPS
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    pumps: dict[str, threading.Thread] = field(default_factory=dict)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for spec in self.specs:
            self._spawn(spec)

    def _spawn(self, spec: ProcessSpec) -> None:
        log = RotatingLog(self.log_dir / f"{spec.name}.log", self.log_max_bytes, self.log_backups)
        proc = subprocess.Popen(
            spec.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**self.env, **spec.env}, start_new_session=True,
        )
        assert proc.stdout is not None
        self.procs[spec.name] = proc
        self.pumps[spec.name] = copy_to_log(proc.stdout, log)

    def _reaped(self, name: str) -> None:
        """After the process ended: its last output is in the log file."""
        self.pumps[name].join(timeout=5)

    def restart(self, name: str) -> None:
        """Start `name` again (after it died or was killed) with the same command."""
        spec = next(s for s in self.specs if s.name == name)
        if self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is still running")
        self._spawn(spec)

    def kill(self, name: str) -> None:
        """SIGKILL the process and everything in its session, as a lost machine or pod would."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        self._reaped(name)

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is not None]

    def wait_ready(self, timeout: float) -> float:
        """Seconds until every process reports ready; raises if one dies or time runs out."""
        started = time.monotonic()
        pending = {spec.name: spec for spec in self.specs}
        while pending:
            if dead := self.dead():
                raise RuntimeError(f"{', '.join(dead)} exited during start; see {self.log_dir}")
            for name, spec in list(pending.items()):
                if spec.ready is None or spec.ready():
                    del pending[name]
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"not ready after {timeout:.0f}s: {', '.join(pending)}")
            if pending:
                time.sleep(0.25)
        return time.monotonic() - started

    def stop(self, grace: float = 30.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            self._reaped(name)

    def run_until_signal(self) -> str:
        """Block until SIGINT/SIGTERM or until a child dies; returns why it stopped."""
        stop_reason: list[str] = []

        def _handler(signum: int, _frame: object) -> None:
            stop_reason.append(signal.Signals(signum).name)

        previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop_reason:
                if dead := self.dead():
                    return f"{', '.join(dead)} exited"
                time.sleep(0.5)
            return stop_reason[0]
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def worker_spec(queue: str, concurrency: int, ping: Callable[[str], bool],
                loglevel: str = "INFO") -> ProcessSpec:
    hostname = f"{queue}@{os.uname().nodename}"
    return ProcessSpec(
        name=f"worker-{queue}",
        argv=celery_argv("worker", "-Q", queue, "-n", hostname, "-c", str(concurrency),
                         *worker_options(queue), "--loglevel", loglevel),
        ready=lambda: ping(hostname),
    )


def beat_spec(home: Path, loglevel: str = "INFO") -> ProcessSpec:
    schedule = home / "celerybeat-schedule"
    return ProcessSpec(
        name="beat",
        argv=celery_argv("beat", "--schedule", str(schedule), "--loglevel", loglevel),
        ready=lambda: any(home.glob("celerybeat-schedule*")),
    )


def flower_ready(port: int) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    return ready


def fleet_specs(home: Path, concurrency: int, flower_port: int, flower_auth: str | None,
                ping: Callable[[str], bool]) -> list[ProcessSpec]:
    """A worker per queue, one beat and Flower: the whole fleet on one machine."""
    specs = [worker_spec(queue, concurrency, ping) for queue in QUEUE_NAMES]
    specs.append(beat_spec(home))
    flower, flower_env = flower_command(flower_port, basic_auth=flower_auth)
    specs.append(ProcessSpec(name="flower", argv=flower, ready=flower_ready(flower_port),
                             env=flower_env))
    return specs


def start_fleet(settings: Settings, concurrency: int, ready_timeout: float,
                flower_port: int | None = None) -> Supervisor:
    """Start a worker per queue, one beat and Flower; return once every process is ready."""
    from workers.celery_app import app as celery

    def ping(hostname: str) -> bool:
        return bool(celery.control.ping(destination=[hostname], timeout=0.5))

    specs = fleet_specs(settings.home.resolve(), concurrency, flower_port or settings.flower_port,
                        settings.flower_basic_auth, ping)
    supervisor = Supervisor(specs, settings.home.resolve() / "logs", dict(os.environ))
    supervisor.start()
    try:
        supervisor.wait_ready(ready_timeout)
    except BaseException:
        supervisor.stop()
        raise
    return supervisor
