"""`fleet flower`, `fleet exporter`, `fleet health`: watch the fleet."""

from __future__ import annotations

import os
import sys

import typer
from prometheus_client import start_http_server

from workers.cli.context import ensure_servers, err
from workers.cli.output import print_json
from workers.health import MAX_DEAD_LETTERS, MAX_STALLED, MAX_TIMER_LAG, run_checks
from workers.metrics import exporter_registry, metrics_dir
from workers.processes import flower_command
from workers.queues import QUEUE_NAMES
from workers.settings import get_settings


def flower(
    port: int = typer.Option(None, help="Port (default FLEET_FLOWER_PORT, 5555)."),
    address: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every "
                                "interface; set FLEET_FLOWER_BASIC_AUTH then)."),
) -> None:
    """Run Flower on the fleet's broker in the foreground (basic auth: FLEET_FLOWER_BASIC_AUTH).

    It is `celery -A workers.celery_app flower`, so it uses the app's broker, key
    prefix and transport options; the servers are the configured or embedded ones.
    Without credentials it is read only: no task can be run or revoked, no worker
    stopped, through its UI or API.
    """
    settings = ensure_servers()
    port = port or settings.flower_port
    argv, env = flower_command(port, address, settings.flower_basic_auth,
                               settings.flower_broker_api)
    auth = "basic auth" if settings.flower_basic_auth else "no auth: read only"
    err.print(f"flower    http://{address}:{port}/ ({auth})")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, {**os.environ, **env})


def exporter(
    port: int = typer.Option(None, help="Port (default FLEET_METRICS_PORT, 9808)."),
    address: str = typer.Option("0.0.0.0", help="Address to listen on."),
) -> None:
    """Serve Prometheus metrics on /metrics: the workers' counters and the fleet's gauges.

    Counters come from the worker processes of this machine (the metrics folder:
    FLEET_METRICS_DIR, default FLEET_HOME/metrics); gauges (executions, queue depths,
    timer lag, outbox, dead letters, partitions) are read from PostgreSQL and the
    broker on every scrape.
    """
    settings = get_settings()
    port = port or settings.metrics_port
    server, thread = start_http_server(port, addr=address, registry=exporter_registry(settings))
    err.print(f"metrics   http://{address}:{port}/metrics (counters from "
                  f"{metrics_dir(settings)})", soft_wrap=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()


def health(
    workers: bool = typer.Option(False, "--workers", help="Also require a worker answering "
                                 "for each queue."),
    queue: list[str] = typer.Option(None, help="With --workers: only these queues (repeatable)."),
    max_timer_lag: float = typer.Option(MAX_TIMER_LAG, help="Seconds a due timer may wait."),
    max_dead_letters: int = typer.Option(MAX_DEAD_LETTERS, help="Pending dead letters allowed."),
    max_stalled: int = typer.Option(MAX_STALLED, help="Stalled executions allowed."),
    timeout: float = typer.Option(1.0, help="Seconds to wait for workers to answer."),
    as_json: bool = typer.Option(False, "--json", help="print JSON: one object per check"),
) -> None:
    """Check the fleet for probes: one line per check; exit 1 if one fails.

    Database and broker reachable, (--workers) a worker for each queue, no partition
    missing, timer lag, pending dead letters and stalled executions under their limits. Starts nothing:
    uses DATABASE_URL / CELERY_BROKER_URL or the running embedded servers.
    """
    settings = get_settings()
    app = None
    queues: list[str] = []
    if workers:
        # Here, not at the top: the Celery app reads the broker's URL from the settings when
        # first imported, which must not happen before another command's ensure_servers().
        from workers.celery_app import app

        queues = list(queue or QUEUE_NAMES)
        if unknown := [q for q in queues if q not in QUEUE_NAMES]:
            raise typer.BadParameter(f"unknown queue {', '.join(unknown)}", param_hint="--queue")
    checks = run_checks(settings, app=app, queues=queues, worker_timeout=timeout,
                        max_timer_lag=max_timer_lag, max_dead_letters=max_dead_letters,
                        max_stalled=max_stalled)
    if as_json:
        print_json([{"name": c.name, "ok": c.ok, "status": c.label, "detail": c.detail}
                    for c in checks])
    else:
        for check in checks:
            typer.echo(check.line())
    if any(check.ok is False for check in checks):
        raise typer.Exit(1)
