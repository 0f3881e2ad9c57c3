"""Where the embedded servers listen, as recorded in FLEET_HOME/services.json.

Kept apart from `workers.dev.embedded` so every process can read the URLs (settings
do, when DATABASE_URL / CELERY_BROKER_URL are unset) without importing the
server packages.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "services.json"


@dataclass
class ServiceState:
    postgres_port: int
    redis_port: int

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.postgres_port}/postgres"

    @property
    def broker_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"


def read_state(home: Path) -> ServiceState | None:
    """The recorded ports, or None when the servers were never started here."""
    try:
        return ServiceState(**json.loads((home / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def listening(port: int) -> bool:
    """True if something accepts connections on 127.0.0.1:port (a recorded server still runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
