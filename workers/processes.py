"""The command lines of the fleet's own processes, as this interpreter runs them.

Here and not in `workers.dev.supervisor` because `fleet flower` runs Flower the
same way in production as `fleet dev` does on a laptop: read only on loopback
without credentials, basic auth otherwise.
"""

from __future__ import annotations

import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def celery_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", *args]


def flower_command(port: int, address: str = "127.0.0.1", basic_auth: str | None = None,
                   broker_api: str | None = None) -> tuple[list[str], dict[str, str]]:
    """Flower's argv and the environment it adds, on the fleet's broker."""
    argv = celery_argv("flower", f"--port={port}", f"--address={address}")
    env: dict[str, str] = {}
    if broker_api:
        # Flower's --broker_api (RabbitMQ's management API, for the Broker page), given
        # through the environment: the URL carries a password, the argv is public (ps).
        env["FLOWER_BROKER_API"] = broker_api
    if basic_auth:
        # Flower then refuses cross-site requests (another Origin, Sec-Fetch-Site).
        argv.append(f"--basic-auth={basic_auth}")
    else:
        # Local tools may read Flower's HTTP API without credentials, but nothing may
        # change state (run or revoke a task, stop a worker): any web page open in a
        # browser on this machine could send such a request.
        argv.append("--read_only=True")
        if address in LOOPBACK:  # the API is open without credentials only on loopback
            env["FLOWER_UNAUTHENTICATED_API"] = "true"
    return argv, env
