"""The embedded servers a fresh machine gets: start, reuse, stop, restart with data kept."""

from __future__ import annotations

from pathlib import Path

import psycopg
import redis

from workers.dev.embedded import EmbeddedServices


def test_start_reuse_stop_restart(tmp_path: Path) -> None:
    services = EmbeddedServices(tmp_path / "home")
    try:
        state = services.start()
        with psycopg.connect(state.database_url) as conn:
            conn.execute("CREATE TABLE kept (v int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        assert redis.Redis.from_url(state.broker_url).ping()
        assert services.start() == state  # running servers are reused, not restarted
        assert all(info["running"] for info in services.status().values())

        services.stop()
        assert not any(info["running"] for info in services.status().values())

        again = services.start()
        assert again.postgres_port == state.postgres_port
        with psycopg.connect(again.database_url) as conn:
            assert conn.execute("SELECT v FROM kept").fetchone() == (42,)
    finally:
        services.stop()
