"""Micro-batched ingest never returns with its events unsafe (celery-batches acks on return)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy.exc

from workers.events import micro_batch


class _Flaky:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, session: Any, raws: Any, **kwargs: Any) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionError("db down"))
        return "ingested"


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(micro_batch.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(micro_batch, "session_scope", _NullScope)


class _NullScope:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_transient_failures_are_retried_in_the_same_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    flaky = _Flaky(failures=2)
    monkeypatch.setattr(micro_batch, "ingest", flaky)
    handed: list[list[Any]] = []
    assert micro_batch.ingest_durably([{"e": 1}], "test", handed.append) == "ingested"
    assert flaky.calls == 3 and handed == []


def test_past_the_bound_the_events_are_handed_off_not_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    flaky = _Flaky(failures=1000)
    monkeypatch.setattr(micro_batch, "ingest", flaky)
    handed: list[list[Any]] = []
    raws = [{"e": 1}, {"e": 2}]
    assert micro_batch.ingest_durably(raws, "test", handed.append) is None
    assert handed == [raws] and flaky.calls > 1


def test_when_even_the_hand_off_fails_the_process_exits_unacked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(micro_batch, "ingest", _Flaky(failures=1000))
    exits: list[int] = []
    monkeypatch.setattr(micro_batch.os, "_exit", exits.append)

    def broker_down(raws: list[Any]) -> None:
        raise ConnectionError("broker down")

    micro_batch.ingest_durably([{"e": 1}], "test", broker_down)
    assert exits == [70]


def test_message_event_reads_args_or_kwargs() -> None:
    class Request:
        def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.args, self.kwargs = args, kwargs

    assert micro_batch.message_event(Request(({"a": 1},), {})) == {"a": 1}
    assert micro_batch.message_event(Request((), {"event": {"b": 2}})) == {"b": 2}
    assert micro_batch.message_event(Request((), {})) is None
