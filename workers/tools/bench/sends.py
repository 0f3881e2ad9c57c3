"""`fleet bench sends`: what the send gateway costs an operator call, measured in one run.

Against the configured servers (a scratch database of its own, harness.py), with a
workflow of one `send_message` service task deployed by `fleet apply`'s own code
with a policy that makes the gateway evaluate every rule (MESSAGING, WORKFLOW_CAPS):
a send window open all day, three caps (program: 3 per 24 h and 1 email per day in
the user's zone; workflow: 2 per 7 d) that no user reaches, a 0% holdout (the hash
is still computed) and the consent attribute. Users have time zones, some an opt-out
of sms in the attribute, half a consent row (subscribed to email), and each
`HISTORY_PER_USER` older sends, outside every cap window, so the cap query reads a
filled index. Every decision must be `sent` (checked afterwards, else the run fails).

The deliveries are made as the fleet makes them: one execution per user (each user
gets one send, so none is capped), stepped in this process (`stepper.step_many`)
until each waits on its send, leaving a pending `action_deliveries` row. The calls
are then run in this process, one at a time, as the actions task runs them:
`run_action(key)` in a transaction of its own, committed (timed: session open to
commit), with the logging the bench worker has (harness.py's WARNING: at a fleet's
default INFO each call also writes its `send.decided` and `action.succeeded` lines).
That is the whole call but for the task's own part (receive, ack, the follow-up
step's send after commit), which the gateway does not touch: a call run by a worker
costs more, so the gateway's share of it is smaller than the share measured here.

(a) with the gateway: `run_action` as deployed; inside it, `gate()` (the user's load
    and `check()`: consent lookup, holdout hash, window, the advisory lock and the cap
    count, the `sends` upsert) is timed on its own;
(b) without: the same number of identical deliveries (other users, same shape) with
    `workers.operators.messages.gate` replaced, in this process only and only for
    (b), by a bypass that records `sent` on the context and returns
    `Decision("sent")` without a query. Nothing else changes: the channel still
    writes `message_log`, the delivery is still marked.
(a) and (b) alternate in chunks of `CHUNK` calls (a b, b a, a b, ...), so a noisy
machine's drift falls on both alike; both are preceded by untimed warm-up calls
(`WARMUP` each), during which the SQL statements of each kind of call are counted.

Figures:
- sends_per_s_with_gateway / _without_gateway: calls / the sum of their call times;
- operator_call_ms_p50 / _p99 (with the gateway), operator_call_ms_p50_without_gateway;
- gateway_ms_p50 / _p99: `gate()` alone, per call of (a);
- gateway_share_of_operator_call = 1 - with / without (the rates), i.e. the part of a
  call with the gateway that the gateway adds, commit included (its upsert is WAL
  the commit flushes): the issue's criterion (under 0.2);
- gateway_share_timed_inside = sum of `gate()` times / sum of call times in (a): the
  same share seen from inside, without the commit's extra part; the two should agree
  within noise;
- statements_per_call_with_gateway / _without_gateway: SQL statements per call;
- worker_sends_per_s_with_gateway: a real actions worker (`worker_concurrency`
  pool processes, started after (a) and (b) so it does not compete with them) drains
  `worker_sends` more deliveries with the gateway, sent while its consumer is paused;
  the rate from the resume to the last delivery done. There is no bypass there (the
  worker runs the fleet's code unchanged), so it has no without-figure. None if skipped.
- sends, concurrency (1: the calls of (a) and (b) run one at a time), chunk, the
  history per user, what the bypass is, and the policy (JSON).

The policy cache (`POLICIES`) is process-wide: it is cleared before and after, so it
holds neither another database's policy nor the scratch one's afterwards.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.orm import Session, sessionmaker

from db.models import User
from workers.operators import messages
from workers.operators.context import OperatorContext
from workers.operators.gate import gate as gateway
from workers.queues import ACTIONS, TaskNames
from workers.sends.gateway import Decision
from workers.tools.bench.harness import BenchEnvironment

WORKFLOW = "bench-send"
SEND_BPMN = """<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
                  xmlns:spiffworkflow="http://spiffworkflow.org/bpmn/schema/1.0/core"
                  id="bench-send-definitions" targetNamespace="http://lifecycle-fleet/bench">
  <bpmn:process id="bench_send" isExecutable="true">
    <bpmn:startEvent id="start"><bpmn:outgoing>f1</bpmn:outgoing></bpmn:startEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="start" targetRef="send"/>
    <bpmn:serviceTask id="send" name="send one email">
      <bpmn:extensionElements>
        <spiffworkflow:serviceTaskOperator id="send_message" resultVariable="sent">
          <spiffworkflow:parameters>
            <spiffworkflow:parameter id="channel" type="str" value="&quot;email&quot;"/>
            <spiffworkflow:parameter id="subject" type="str" value="&quot;Welcome&quot;"/>
            <spiffworkflow:parameter id="body" type="str" value="&quot;Hello, and welcome.&quot;"/>
          </spiffworkflow:parameters>
        </spiffworkflow:serviceTaskOperator>
      </bpmn:extensionElements>
      <bpmn:incoming>f1</bpmn:incoming><bpmn:outgoing>f2</bpmn:outgoing>
    </bpmn:serviceTask>
    <bpmn:sequenceFlow id="f2" sourceRef="send" targetRef="end"/>
    <bpmn:endEvent id="end"><bpmn:incoming>f2</bpmn:incoming></bpmn:endEvent>
  </bpmn:process>
</bpmn:definitions>
"""
MESSAGING: dict[str, Any] = {
    "timezone": "Europe/Paris",
    "send_window": {"hours": "00:00-24:00"},
    "caps": [{"max": 3, "per": "24h"}, {"max": 1, "per": "day", "channel": "email"}],
    "holdout": {"percent": 0, "salt": "bench"},
    "consent_attribute": "unsubscribed",
}
WORKFLOW_CAPS: list[dict[str, Any]] = [{"max": 2, "per": "7d"}]
HISTORY_PER_USER = 10  # older sends per user, 10 to 37 days ago: outside every cap window
CHUNK = 50  # calls per chunk of (a) or (b); the two alternate
WARMUP = 20  # untimed calls of each kind first
STEP_BATCH = 200  # executions stepped per transaction while preparing
GATEWAY_BYPASS = "workers.operators.messages.gate -> Decision('sent'), no query (bench only)"

Gate = Callable[..., Decision]  # gate(ctx, channel, address, transactional, user)


@dataclass
class SendsBenchResult:
    sends_per_s_with_gateway: float
    sends_per_s_without_gateway: float
    operator_call_ms_p50: float
    operator_call_ms_p99: float
    operator_call_ms_p50_without_gateway: float
    gateway_ms_p50: float
    gateway_ms_p99: float
    gateway_share_of_operator_call: float
    gateway_share_timed_inside: float
    statements_per_call_with_gateway: float
    statements_per_call_without_gateway: float
    worker_sends_per_s_with_gateway: float | None
    sends: int
    concurrency: int
    chunk: int
    worker_sends: int
    worker_concurrency: int
    history_sends_per_user: int
    gateway_bypass: str
    policy: str


def seed_users(env: BenchEnvironment, count: int) -> list[uuid.UUID]:
    """Users with time zones (a quarter without: the program's), a third opted out of sms
    in the consent attribute, half with a consent row subscribing them to email."""
    with env.engine.begin() as conn:
        ids = list(conn.execute(text(
            "INSERT INTO users (email, current_lifecycle_stage, attributes) "
            "SELECT 'sendbench' || i || '@example.com', 'Activation', jsonb_strip_nulls("
            "jsonb_build_object('timezone', (ARRAY['Europe/Paris', 'America/New_York', "
            "'Asia/Tokyo', NULL])[1 + i % 4], 'unsubscribed', "
            "CASE WHEN i % 3 = 0 THEN '[\"sms\"]'::jsonb END, 'plan', "
            "CASE WHEN i % 2 = 0 THEN 'pro' ELSE 'free' END)) "
            "FROM generate_series(1, :n) AS i RETURNING id"), {"n": count}).scalars())
        conn.execute(text(
            "INSERT INTO user_consents (user_id, channel, subscribed, changed_at) "
            "SELECT id, 'email', true, now() - interval '30 days' FROM unnest(:ids) "
            "WITH ORDINALITY AS u(id, n) WHERE n % 2 = 0"), {"ids": ids})
    return ids


def deploy(env: BenchEnvironment) -> None:
    """The workflow and the program's policy, stored by `fleet apply`'s own code."""
    from workers.definitions import Definitions, WorkflowDef, WorkflowSource, apply
    from workers.sends.config import MessagingDef

    doc = Definitions(messaging=MessagingDef.model_validate(MESSAGING), workflows=[
        WorkflowDef.model_validate({"name": WORKFLOW, "file": Path(f"{WORKFLOW}.bpmn"),
                                    "caps": WORKFLOW_CAPS})])
    with Session(env.engine) as session, session.begin():
        apply(session, doc, {WORKFLOW: WorkflowSource(SEND_BPMN)})


def seed_history(env: BenchEnvironment, users: list[uuid.UUID]) -> None:
    """`HISTORY_PER_USER` old `sent` rows per user, all on one unstepped execution."""
    from workers.engine import control

    with Session(env.engine) as session, session.begin():
        execution_id = control.start(session, WORKFLOW, users[0])
    with env.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO sends (key, execution_id, workflow_id, user_id, channel, outcome, "
            "transactional, created_at, decided_at, sent_at) "
            "SELECT 'bench-history:' || u || ':' || h, e.id, e.workflow_id, u, 'email', "
            "'sent', false, t, t, t FROM workflow_executions e, unnest(:users) AS u, "
            "generate_series(1, :h) AS h, "
            "LATERAL (SELECT now() - (7 + 3 * h) * interval '1 day' AS t) AS s "
            "WHERE e.id = :e"), {"users": users, "h": HISTORY_PER_USER, "e": execution_id})


def prepare(env: BenchEnvironment, users: Sequence[uuid.UUID]) -> list[str]:
    """One execution per user, stepped here until it waits on its send: the delivery keys."""
    from workers.engine import control, stepper

    with Session(env.engine) as session, session.begin():
        pending = [(control.start(session, WORKFLOW, user), 0) for user in users]
    keys: list[str] = []
    while pending:
        after: list[tuple[uuid.UUID, int]] = []
        for i in range(0, len(pending), STEP_BATCH):
            batch = pending[i:i + STEP_BATCH]
            with Session(env.engine) as session, session.begin():
                results = stepper.step_many(session, batch)
            for (execution_id, _), result in zip(batch, results, strict=True):
                if result.action_key is not None:
                    keys.append(result.action_key)
                elif result.next_version is not None:
                    after.append((execution_id, result.next_version))
                else:
                    raise RuntimeError(f"execution {execution_id} did not reach its send: "
                                       f"{result.outcome} {result.reason or ''}")
        pending = after
    return keys


@contextmanager
def gate_as(replacement: Gate) -> Iterator[None]:
    """`send_message` calls `replacement` instead of the gateway while inside (this process)."""
    original = messages.gate
    messages.gate = replacement
    try:
        yield
    finally:
        messages.gate = original


def timed_gate(times: list[float]) -> Gate:
    """The real gateway, each call's duration appended to `times`."""
    def gate(ctx: OperatorContext, channel: str, address: str | None,
             transactional: bool, user: User | None = None) -> Decision:
        began = time.perf_counter()
        try:
            return gateway(ctx, channel, address, transactional, user)
        finally:
            times.append(time.perf_counter() - began)
    return gate


def bypass_gate(ctx: OperatorContext, channel: str, address: str | None,
                transactional: bool, user: User | None = None) -> Decision:
    """What (b) calls instead of the gateway: `sent`, as the gateway records it, no query."""
    ctx.send = (channel, "sent")
    return Decision("sent")


def run_calls(factory: sessionmaker[Session], keys: Sequence[str], times: list[float]) -> None:
    """Each delivery's operator call in a transaction of its own, as the actions task runs
    it; appends each call's time (session open to commit) to `times`."""
    from workers.operators.deliveries import run_action

    for key in keys:
        began = time.perf_counter()
        with factory.begin() as session:
            result = run_action(session, key)
        times.append(time.perf_counter() - began)
        if result.status != "succeeded" or result.send != ("email", "sent"):
            raise RuntimeError(f"delivery {key}: {result.status} {result.send}")


@contextmanager
def counting_statements(env: BenchEnvironment) -> Iterator[list[int]]:
    """Counts the SQL statements run on the scratch engine while inside."""
    count = [0]

    def on_execute(*_: Any) -> None:
        count[0] += 1

    event.listen(env.engine, "before_cursor_execute", on_execute)
    try:
        yield count
    finally:
        event.remove(env.engine, "before_cursor_execute", on_execute)


def warm_up(env: BenchEnvironment, factory: sessionmaker[Session], gated: list[str],
            bypassed: list[str], gate_times: list[float]) -> tuple[float, float]:
    """Untimed calls of each kind; (statements per call with, without the gateway)."""
    with counting_statements(env) as with_count, gate_as(timed_gate(gate_times)):
        run_calls(factory, gated, [])
    with counting_statements(env) as without_count, gate_as(bypass_gate):
        run_calls(factory, bypassed, [])
    gate_times.clear()
    return with_count[0] / len(gated), without_count[0] / len(bypassed)


def alternate(factory: sessionmaker[Session], gated: list[str], bypassed: list[str],
              gate_times: list[float]) -> tuple[list[float], list[float]]:
    """(a) and (b) in alternating chunks; (call times with, without the gateway)."""
    with_times: list[float] = []
    without_times: list[float] = []
    timed = timed_gate(gate_times)
    for n, i in enumerate(range(0, len(gated), CHUNK)):
        runs: list[tuple[Gate, list[str], list[float]]] = [
            (timed, gated[i:i + CHUNK], with_times),
            (bypass_gate, bypassed[i:i + CHUNK], without_times)]
        for replacement, keys, times in runs if n % 2 == 0 else reversed(runs):
            with gate_as(replacement):
                run_calls(factory, keys, times)
    return with_times, without_times


def worker_rate(env: BenchEnvironment, warm: list[str], keys: list[str],
                timeout: float) -> float:
    """Deliveries/s an actions worker drains with the gateway (sent while it is paused)."""
    env.start_worker()
    pending = text("SELECT count(*) FROM action_deliveries WHERE status = 'pending'")
    for key in warm:
        env.app.send_task(TaskNames.RUN_ACTION, args=[key], queue=ACTIONS)
    env.wait(lambda: env.scalar(pending) == len(keys), timeout)
    env.pause_consumer(ACTIONS)
    for key in keys:
        env.app.send_task(TaskNames.RUN_ACTION, args=[key], queue=ACTIONS)
    if env.queue_empty(ACTIONS):
        raise RuntimeError("the paused worker consumed the queue: the measurement would be void")
    started = time.perf_counter()
    env.resume_consumer(ACTIONS)
    env.wait(lambda: env.queue_empty(ACTIONS), timeout)  # a cheap LLEN while it drains
    env.wait(lambda: env.scalar(pending) == 0, timeout)  # then the rows of the last ones
    return len(keys) / (time.perf_counter() - started)


def check_outcomes(env: BenchEnvironment, gated: int, calls: int) -> None:
    """Every gated call was decided `sent` and every call delivered and succeeded."""
    decided = env.scalar(text("SELECT count(*) FILTER (WHERE outcome = 'sent') || '/' || "
                              "count(*) FROM sends WHERE key NOT LIKE 'bench-history:%'"))
    delivered = env.scalar(text("SELECT count(*) FROM message_log"))
    succeeded = env.scalar(text("SELECT count(*) FROM action_deliveries "
                                "WHERE status = 'succeeded' AND send_outcome = 'sent'"))
    if (decided, delivered, succeeded) != (f"{gated}/{gated}", calls, calls):
        raise RuntimeError(f"sends sent/decided {decided} (expected {gated}), message_log "
                           f"{delivered} and succeeded deliveries {succeeded} (expected {calls})")


def _ms(times: list[float], q: int) -> float:
    """The q-th percentile of `times` (seconds) in ms."""
    return round(1000 * statistics.quantiles(times, n=100, method="inclusive")[q - 1], 3)


def run(sends: int = 2000, worker_sends: int | None = None, worker_concurrency: int = 2,
        timeout: float = 600) -> SendsBenchResult:
    from workers.log import configure_logging
    from workers.sends.policy import POLICIES

    worker_sends = sends if worker_sends is None else worker_sends
    worker_warm = 4 * worker_concurrency if worker_sends else 0
    with BenchEnvironment(queues=ACTIONS, concurrency=worker_concurrency) as env:
        settings = env.settings()
        configure_logging(settings.log_level, settings.log_json)  # as the bench worker logs
        POLICIES.clear()
        try:
            deploy(env)
            users = seed_users(env, 2 * (WARMUP + sends) + worker_warm + worker_sends)
            seed_history(env, users)
            keys = prepare(env, users)
            factory = sessionmaker(env.engine, expire_on_commit=False)  # as db/session.py
            gate_times: list[float] = []
            warm_gated, warm_bypassed = keys[:WARMUP], keys[WARMUP:2 * WARMUP]
            gated = keys[2 * WARMUP:2 * WARMUP + sends]
            bypassed = keys[2 * WARMUP + sends:2 * (WARMUP + sends)]
            statements = warm_up(env, factory, warm_gated, warm_bypassed, gate_times)
            with_times, without_times = alternate(factory, gated, bypassed, gate_times)
            worker = None
            if worker_sends:
                rest = keys[2 * (WARMUP + sends):]
                worker = worker_rate(env, rest[:worker_warm], rest[worker_warm:], timeout)
            check_outcomes(env, WARMUP + sends + worker_warm + worker_sends, len(keys))
        finally:
            POLICIES.clear()
    with_rate = len(with_times) / sum(with_times)
    without_rate = len(without_times) / sum(without_times)
    return SendsBenchResult(
        sends_per_s_with_gateway=round(with_rate, 1),
        sends_per_s_without_gateway=round(without_rate, 1),
        operator_call_ms_p50=_ms(with_times, 50),
        operator_call_ms_p99=_ms(with_times, 99),
        operator_call_ms_p50_without_gateway=_ms(without_times, 50),
        gateway_ms_p50=_ms(gate_times, 50),
        gateway_ms_p99=_ms(gate_times, 99),
        gateway_share_of_operator_call=round(1 - with_rate / without_rate, 3),
        gateway_share_timed_inside=round(sum(gate_times) / sum(with_times), 3),
        statements_per_call_with_gateway=round(statements[0], 2),
        statements_per_call_without_gateway=round(statements[1], 2),
        worker_sends_per_s_with_gateway=None if worker is None else round(worker, 1),
        sends=sends,
        concurrency=1,
        chunk=CHUNK,
        worker_sends=worker_sends,
        worker_concurrency=worker_concurrency,
        history_sends_per_user=HISTORY_PER_USER,
        gateway_bypass=GATEWAY_BYPASS,
        policy=json.dumps({"messaging": MESSAGING, "workflow_caps": WORKFLOW_CAPS},
                          separators=(",", ":")),
    )


def as_dict(result: SendsBenchResult) -> dict[str, Any]:
    return asdict(result)
