"""A local HTTP endpoint that records webhook deliveries: the receiving end of side effects.

The tests and `fleet chaos` count effects here, where a real receiver would: one
effect per distinct `Idempotency-Key`, and never two deliveries of one key at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Delivery:
    headers: dict[str, str]
    body: Any
    started: float = 0.0  # monotonic clock of this process
    ended: float | None = None


@dataclass
class WebhookServer:
    """Answers with `statuses` in turn (then 200), after `delay` seconds; records every POST."""

    statuses: list[int] = field(default_factory=list)
    delay: float = 0.0
    deliveries: list[Delivery] = field(default_factory=list)
    received: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    @property
    def keys(self) -> list[str]:
        return [d.headers.get("Idempotency-Key", "") for d in self.deliveries]

    def effects(self) -> int:
        """What an idempotent receiver applies: one effect per distinct key."""
        return len(set(self.keys))

    def overlapping(self) -> list[str]:
        """Keys delivered twice at the same time (a second copy of a task running in parallel)."""
        by_key: dict[str, list[Delivery]] = {}
        for delivery in self.deliveries:
            by_key.setdefault(delivery.headers.get("Idempotency-Key", ""), []).append(delivery)
        out = []
        for key, copies in by_key.items():
            spans = sorted((d.started, d.ended if d.ended is not None else float("inf"))
                           for d in copies)
            if any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)):
                out.append(key)
        return out


@contextmanager
def webhook_server(**options: Any) -> Iterator[WebhookServer]:
    state = WebhookServer(**options)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            delivery = Delivery(dict(self.headers), json.loads(body or b"null"), time.monotonic())
            with lock:
                state.deliveries.append(delivery)
                status = state.statuses.pop(0) if state.statuses else 200
            state.received.set()
            time.sleep(state.delay)
            try:
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"{}")
            except OSError:
                pass  # the client went away (a killed worker)
            delivery.ended = time.monotonic()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
