"""Size-capped log files for the processes the supervisor runs (`FLEET_HOME/logs`).

A child writes to a pipe; a thread of the supervisor copies its output into
`NAME.log`, which rolls over to `NAME.log.1` … `NAME.log.N` (the oldest dropped)
when it passes the cap: a fleet left running for weeks keeps at most
`max_bytes × (backups + 1)` per process. Lines are kept whole.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import IO

MAX_BYTES = 10 * 2**20
BACKUPS = 3


class RotatingLog:
    """Append-only writer of one log file that rotates by size."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file = open(path, "ab")  # noqa: SIM115 - closed by close()
        self._size = self._file.tell()

    def write(self, line: bytes) -> None:
        if self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        self._file.write(line)
        self._file.flush()
        self._size += len(line)

    def _rotate(self) -> None:
        self._file.close()
        for index in range(self.backups, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            newer = self.path.with_name(f"{self.path.name}.{index - 1}") if index > 1 else self.path
            if newer.exists():
                newer.replace(older)
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        self._size = 0

    def close(self) -> None:
        self._file.close()


def copy_to_log(stream: IO[bytes], log: RotatingLog) -> threading.Thread:
    """Start a thread copying `stream` line by line into `log` until end of file."""

    def pump() -> None:
        try:
            for line in iter(lambda: stream.readline(65536), b""):
                log.write(line)
        finally:
            stream.close()
            log.close()

    thread = threading.Thread(target=pump, name=f"log {log.path.name}", daemon=True)
    thread.start()
    return thread
