"""`fleet bench workspaces`: what row-level security costs ingest and workflow steps.

Three configurations of the same schema, each a scratch fleet of its own (database,
broker prefix, one worker: `workers.tools.bench.harness`), all up at once and measured
in one run with the same sizes:

- `rls_off`: `ALTER TABLE ... DISABLE ROW LEVEL SECURITY` on every table that has row-level
  security or the `workspace_isolation` policy (pg_class / pg_policies, partitions
  included). The workers still take the `fleet_app` role and set the tenant in every
  transaction, so against it the other two show the policies' cost alone;
- `rls_on_1_workspace`: as migrated, everything in the default workspace;
- `rls_on_10_workspaces`: as migrated, N new workspaces (default 10), each given the
  definitions the events / workflows benchmarks deploy (inside `tenancy.workspace(id)`,
  so they are its rows), the users split evenly over them (the same total), and the work
  spread round-robin: events by their envelope `workspace` field, executions created in
  their workspace and their first steps sent from inside it (the `fleet_workspace`
  header), so a buffer of single events or of steps holds several workspaces' work. A
  message of 100 events holds one workspace's, as an application per workspace sends
  them (interleaved with the other workspaces' messages); `mixed_batches` mixes all of
  them into every message instead, the worst case: the ingest then runs each message as
  one group per workspace, each with its own statements.

Figures, each a drain rate measured as its benchmark measures it: events/s one per
message and in batches of 100 (`events.drain_rate`: a queue filled while the consumer is
paused, until every audit row is committed; the events benchmark's 10 triggers per
workspace) and persisted steps/s of the 10-node linear workflow (`workflows.step_rate`).
Events and steps are two phases (an events fleet leaves the steps its triggers start
unconsumed; a steps fleet must not run them). Within a phase the configurations are
measured in rounds, in turn, the order rotated every round (ABC, BCA, CAB, ...) so
that a machine's drift does not favour one; each figure is the median of its rounds and
its cost is 1 - figure / rls_off's, in %.
"""

from __future__ import annotations

import itertools
import math
import statistics
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from db import tenancy
from db.models import DEFAULT_WORKSPACE_ID
from db.session import build_engine
from workers import workspaces
from workers.queues import EVENTS, WORKFLOWS, TaskNames
from workers.tools.bench import events as events_bench
from workers.tools.bench import workflows as workflows_bench
from workers.tools.bench.harness import BenchEnvironment

TARGET_COST_PCT = 10.0
BATCH = 100  # events per message in the batched figure, as the events benchmark sends them
RLS_OFF_MEANS = ("ALTER TABLE ... DISABLE ROW LEVEL SECURITY on every table with row-level "
                 "security or the workspace_isolation policy, partitions included; the workers "
                 "still take the fleet_app role and set the tenant: the difference is the "
                 "policies' cost alone")
_RLS_TABLES = text(f"""
SELECT c.oid::regclass::text FROM pg_class c
WHERE c.relnamespace = to_regnamespace(current_schema()) AND (c.relrowsecurity OR EXISTS (
  SELECT FROM pg_policy p WHERE p.polrelid = c.oid AND p.polname = '{tenancy.POLICY}'))
ORDER BY 1
""")
_SECURED_LEFT = text("SELECT count(*) FROM pg_class "
                     "WHERE relnamespace = to_regnamespace(current_schema()) AND relrowsecurity")
_COMMITTED = text("SELECT count(*) >= :n FROM lifecycle_events WHERE event_data->>'run' = :r")
FIGURES = ("events_per_s_single", "events_per_s_batch100", "steps_per_s")


@dataclass(frozen=True)
class Configuration:
    name: str
    row_level_security: bool
    workspaces: int


@dataclass(frozen=True)
class Tenant:
    id: uuid.UUID
    name: str | None  # for an envelope's `workspace` field; None: the default (no field)


@dataclass
class Fleet:
    """One configuration's scratch fleet, and an engine whose transactions set the
    workspace as the fleet's own do (db/session.py), for seeding inside a workspace."""

    config: Configuration
    env: BenchEnvironment
    engine: Engine
    tenants: list[Tenant]
    rls_disabled: list[str]
    rounds: dict[str, list[float]] = field(default_factory=lambda: {f: [] for f in FIGURES})


@dataclass
class ConfigurationResult:
    name: str
    row_level_security: bool
    workspaces: int
    events_per_s_single: float
    events_per_s_batch100: float
    steps_per_s: float
    ratio_events_single: float  # figure / rls_off's
    ratio_events_batch100: float
    ratio_steps: float
    cost_pct_events_single: float  # 100 * (1 - ratio): positive is slower than rls_off
    cost_pct_events_batch100: float
    cost_pct_steps: float
    rounds_events_per_s_single: list[float]
    rounds_events_per_s_batch100: list[float]
    rounds_steps_per_s: list[float]


@dataclass
class WorkspacesBenchResult:
    configurations: list[ConfigurationResult]
    rls_off_means: str
    rls_off_tables_disabled: int
    target_cost_pct: float
    max_cost_pct: float
    within_target: bool
    rounds: int
    order: str
    users: int
    single_events: int  # per configuration and round
    batch_events: int
    executions: int
    nodes_per_execution: int
    worker_concurrency: int
    mixed_batches: bool  # batches of 100 mix every workspace's events (else one each)
    figure: str


def configurations(spread: int) -> list[Configuration]:
    return [Configuration("rls_off", False, 1), Configuration("rls_on_1_workspace", True, 1),
            Configuration(f"rls_on_{spread}_workspaces", True, spread)]


def disable_rls(env: BenchEnvironment) -> list[str]:
    """Turn row-level security off on every table that has it or the policy; the tables."""
    with env.engine.begin() as conn:
        tables = list(conn.execute(_RLS_TABLES).scalars())
        for table in tables:
            conn.execute(text(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY"))
    check_rls_off(env)
    return tables


def check_rls_off(env: BenchEnvironment) -> None:
    """Raise if a table has row-level security on (e.g. a partition made since)."""
    left = env.scalar(_SECURED_LEFT)
    if left:
        raise RuntimeError(f"{left} tables have row-level security on in the rls_off fleet")


def _tenants(env: BenchEnvironment, count: int) -> list[Tenant]:
    """The default workspace alone, or `count` new ones."""
    if count == 1:
        return [Tenant(DEFAULT_WORKSPACE_ID, None)]
    with Session(env.engine) as session, session.begin():  # `workspaces` has no RLS
        names = [f"bench-{i}" for i in range(1, count + 1)]
        return [Tenant(workspaces.create(session, name)[0], name) for name in names]


@contextmanager
def fleet(config: Configuration, queues: str, concurrency: int) -> Iterator[Fleet]:
    with BenchEnvironment(queues=queues, concurrency=concurrency) as env:
        engine = build_engine(env.env["DATABASE_URL"], pooler=env.pooler,
                              statement_timeout_ms=0, application_name="fleet-bench-seed")
        try:
            disabled = [] if config.row_level_security else disable_rls(env)
            yield Fleet(config, env, engine, _tenants(env, config.workspaces), disabled)
        finally:
            engine.dispose()


def _turns(fleets: list[Fleet], rounds: int) -> Iterator[tuple[int, list[Fleet]]]:
    """(round, the fleets in that round's order): ABC, BCA, CAB, ... Rotated, so that in
    every 3 rounds each configuration is measured once first, second and last: a
    reversal (ABC, CBA) keeps B in the middle, always right after another fleet's burst
    of writes, whose checkpoint and autovacuum it would pay for."""
    for round_ in range(rounds):
        shift = round_ % len(fleets)
        yield round_, fleets[shift:] + fleets[:shift]


# Events -----------------------------------------------------------------------------------

def _committed(env: BenchEnvironment, run: str, count: int) -> bool:
    return bool(env.scalar(_COMMITTED, {"n": count, "r": run}))


def _prepare_events(f: Fleet, users: int, timeout: float) -> int:
    """Each workspace's share of the users and the events benchmark's definitions, the
    worker, and a warm-up touching every user (memberships, trigger caches, pools)."""
    share = max(1, users // len(f.tenants))
    for tenant in f.tenants:
        with tenancy.workspace(tenant.id):
            events_bench.seed_definitions(f.engine, share)
    f.env.start_worker()
    warm = _events(f, share * len(f.tenants), share, "warmup")
    for i in range(0, len(warm), BATCH):
        f.env.app.send_task(TaskNames.INGEST_BATCH, args=[warm[i:i + BATCH]], queue=EVENTS)
    f.env.wait(lambda: _committed(f.env, "warmup", len(warm)), timeout)
    return share


def _events(f: Fleet, count: int, share: int, run: str) -> list[dict[str, Any]]:
    names = [t.name for t in f.tenants] if len(f.tenants) > 1 else []
    return events_bench.make_events(count, share, run, names)


def _one_workspace_messages(events: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """`events` reordered so that each run of `size` holds one workspace's, the runs of the
    workspaces interleaved: as producers send them, an application per workspace."""
    by_workspace: dict[Any, list[dict[str, Any]]] = {}
    for event in events:
        by_workspace.setdefault(event.get("workspace"), []).append(event)
    chunks = [[group[i:i + size] for i in range(0, len(group), size)]
              for group in by_workspace.values()]
    return [e for turn in itertools.zip_longest(*chunks, fillvalue=[]) for c in turn for e in c]


def _events_rate(f: Fleet, share: int, count: int, per_message: int, run: str,
                 timeout: float, mixed: bool) -> float:
    def fill() -> int:
        batch = _events(f, count, share, run)
        if per_message > 1 and not mixed:
            batch = _one_workspace_messages(batch, per_message)
        for i in range(0, count, per_message):
            if per_message == 1:
                f.env.app.send_task(TaskNames.INGEST, args=[batch[i]], queue=EVENTS)
            else:
                f.env.app.send_task(TaskNames.INGEST_BATCH, args=[batch[i:i + per_message]],
                                    queue=EVENTS)
        return count

    return events_bench.drain_rate(f.env, fill, lambda: _committed(f.env, run, count), timeout)


def _events_phase(configs: list[Configuration], users: int, single: int, batched: int,
                  rounds: int, concurrency: int, timeout: float, mixed: bool) -> list[Fleet]:
    with ExitStack() as stack:
        fleets = [stack.enter_context(fleet(c, EVENTS, concurrency)) for c in configs]
        shares = {f.config.name: _prepare_events(f, users, timeout) for f in fleets}
        for round_, order in _turns(fleets, rounds):
            for figure, count, per_message in (("events_per_s_single", single, 1),
                                               ("events_per_s_batch100", batched, BATCH)):
                for f in order:
                    f.rounds[figure].append(_events_rate(
                        f, shares[f.config.name], count, per_message, f"{figure}-{round_}",
                        timeout, mixed))
        for f in fleets:
            if not f.config.row_level_security:
                check_rls_off(f.env)
        return fleets


# Workflow steps ---------------------------------------------------------------------------

@dataclass
class _StepFleet:
    fleet: Fleet
    users: dict[uuid.UUID, list[uuid.UUID]]  # workspace -> its users not yet given an execution
    linear: list[uuid.UUID]  # the linear workflow's id in each workspace

    def start(self, count: int) -> tuple[list[uuid.UUID], dict[uuid.UUID, uuid.UUID]]:
        """`count` executions of the linear workflow round-robin over the workspaces, each
        created in its workspace; (their ids interleaved, execution -> workspace)."""
        tenants = self.fleet.tenants
        per: dict[uuid.UUID, list[uuid.UUID]] = {}
        for k, tenant in enumerate(tenants):
            wanted = len(range(k, count, len(tenants)))
            users, self.users[tenant.id] = (self.users[tenant.id][:wanted],
                                            self.users[tenant.id][wanted:])
            with tenancy.workspace(tenant.id):
                per[tenant.id] = workflows_bench.start_executions(
                    self.fleet.env, workflows_bench.LINEAR, users, engine=self.fleet.engine)
        ids = [per[tenants[i % len(tenants)].id][i // len(tenants)] for i in range(count)]
        return ids, {e: w for w, started in per.items() for e in started}

    def rate(self, count: int, timeout: float) -> float:
        ids, owner = self.start(count)

        def send(env: BenchEnvironment, executions: list[uuid.UUID]) -> None:
            for execution_id in executions:  # in its workspace: the step carries the header
                with tenancy.workspace(owner[execution_id]):
                    workflows_bench.send_steps(env, [execution_id])

        return workflows_bench.step_rate(self.fleet.env, ids, timeout, send=send,
                                         workflows=self.linear)[0]


def _prepare_steps(f: Fleet, per_workspace: int, warm: int, timeout: float) -> _StepFleet:
    users: dict[uuid.UUID, list[uuid.UUID]] = {}
    for tenant in f.tenants:
        with tenancy.workspace(tenant.id):
            users[tenant.id] = workflows_bench.seed(f.env, per_workspace, engine=f.engine)
    linear = list(f.env.scalars(text("SELECT id FROM workflows WHERE name = :n"),
                                {"n": workflows_bench.LINEAR}))
    steps = _StepFleet(f, users, linear)
    f.env.start_worker()
    steps.rate(warm, timeout)  # imports, each workspace's parsed spec, pools
    return steps


def _steps_phase(configs: list[Configuration], executions: int, rounds: int,
                 concurrency: int, timeout: float) -> list[Fleet]:
    with ExitStack() as stack:
        fleets = [stack.enter_context(fleet(c, WORKFLOWS, concurrency)) for c in configs]
        prepared = []
        for f in fleets:
            warm = 4 * concurrency * len(f.tenants)
            per_workspace = math.ceil((warm + rounds * executions) / len(f.tenants)) + 1
            prepared.append(_prepare_steps(f, per_workspace, warm, timeout))
        by_name = {s.fleet.config.name: s for s in prepared}
        for _, order in _turns(fleets, rounds):
            for f in order:
                f.rounds["steps_per_s"].append(by_name[f.config.name].rate(executions, timeout))
        for f in fleets:
            if not f.config.row_level_security:
                check_rls_off(f.env)
        return fleets


# The run ----------------------------------------------------------------------------------

def _result(config: Configuration, figures: dict[str, list[float]],
            baseline: dict[str, float]) -> ConfigurationResult:
    median = {name: statistics.median(values) for name, values in figures.items()}
    ratio = {name: median[name] / baseline[name] for name in FIGURES}
    return ConfigurationResult(
        name=config.name, row_level_security=config.row_level_security,
        workspaces=config.workspaces,
        events_per_s_single=round(median["events_per_s_single"], 1),
        events_per_s_batch100=round(median["events_per_s_batch100"], 1),
        steps_per_s=round(median["steps_per_s"], 1),
        ratio_events_single=round(ratio["events_per_s_single"], 3),
        ratio_events_batch100=round(ratio["events_per_s_batch100"], 3),
        ratio_steps=round(ratio["steps_per_s"], 3),
        cost_pct_events_single=round(100 * (1 - ratio["events_per_s_single"]), 1),
        cost_pct_events_batch100=round(100 * (1 - ratio["events_per_s_batch100"]), 1),
        cost_pct_steps=round(100 * (1 - ratio["steps_per_s"]), 1),
        rounds_events_per_s_single=[round(v, 1) for v in figures["events_per_s_single"]],
        rounds_events_per_s_batch100=[round(v, 1) for v in figures["events_per_s_batch100"]],
        rounds_steps_per_s=[round(v, 1) for v in figures["steps_per_s"]],
    )


def run(users: int = 2000, single: int = 2000, batched: int = 20_000, executions: int = 500,
        rounds: int = 3, spread: int = 10, concurrency: int = 2,
        timeout: float = 600, mixed_batches: bool = False) -> WorkspacesBenchResult:
    if spread < 2 or rounds < 1 or min(users, single, batched, executions) < 1:
        raise ValueError("need 2 workspaces or more, and at least one round, user, event "
                         "and execution")
    configs = configurations(spread)
    event_fleets = _events_phase(configs, users, single, batched, rounds, concurrency, timeout,
                                 mixed_batches)
    step_fleets = _steps_phase(configs, executions, rounds, concurrency, timeout)
    figures = {c.name: {**e.rounds, "steps_per_s": s.rounds["steps_per_s"]}
               for c, e, s in zip(configs, event_fleets, step_fleets, strict=True)}
    baseline = {name: statistics.median(values)
                for name, values in figures[configs[0].name].items()}
    results = [_result(c, figures[c.name], baseline) for c in configs]
    costs = [cost for r in results[1:] for cost in
             (r.cost_pct_events_single, r.cost_pct_events_batch100, r.cost_pct_steps)]
    return WorkspacesBenchResult(
        configurations=results,
        rls_off_means=RLS_OFF_MEANS,
        rls_off_tables_disabled=len(event_fleets[0].rls_disabled),
        target_cost_pct=TARGET_COST_PCT,
        max_cost_pct=max(costs),
        within_target=max(costs) < TARGET_COST_PCT,
        rounds=rounds,
        order=" ".join("".join("ABC"[configs.index(f.config)] for f in order)
                       for _, order in _turns(event_fleets, rounds))
              + f" (A {configs[0].name}, B {configs[1].name}, C {configs[2].name})",
        users=users,
        single_events=single,
        batch_events=batched,
        executions=executions,
        nodes_per_execution=workflows_bench.SCRIPT_TASKS + 2,
        worker_concurrency=concurrency,
        mixed_batches=mixed_batches,
        figure="median of the rounds; cost = 1 - figure / rls_off's figure",
    )


def as_dict(result: WorkspacesBenchResult) -> dict[str, Any]:
    return asdict(result)

