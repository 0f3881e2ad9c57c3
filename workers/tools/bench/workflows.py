"""`fleet bench workflows`: persisted workflow steps against a raw Celery task chain.

Everything runs against the same broker, the same PostgreSQL server (a scratch
database of its own) and one worker started with the same settings, consuming
the `workflows` queue:

(a) hops/s of raw Celery chains: `bench.hop` tasks that each send the next one, as
    a step sends the step after it; as many concurrent chains as (b) has
    executions, each as long as (b)'s executions have nodes;
(b) persisted steps/s of a linear 10-node workflow (start, 8 script tasks, end)
    across 1,000 concurrent executions: `execution_steps` rows / elapsed time;
    with the batch sizes seen in that run: the rows one batch writes share one
    `started_at` (the batch's start), so a batch is the (b) rows of one
    `started_at` (one step per batch: size 1);
(c) step latency p50/p99, from `execution_steps`: the time from the previous
    step's finish (just before its commit and the send of this step) to this
    step's finish, i.e. write + commit + send + queue wait + run; also the run
    alone (finished_at - started_at: the row lock, state load, the node and the
    state dump, not the write and commit). Under (b)'s backlog the queue wait is about
    executions / steps-per-s, so the same figures are also taken without a
    backlog, from the single loop execution of (d);
(e) enqueue -> first node at half the maximum rate: executions of (b)'s workflow
    are started (committed, nothing sent), then their first steps are sent from
    this process at half (b)'s execution rate (steps/s / nodes per execution / 2),
    for 10 s or 500 executions, whichever is fewer; latency = the `finished_at` of
    the execution's first step row (seq 1) - the wall time just before its send
    (one machine, one clock);
(d) the `body` node's run time at iteration 1 and at iteration N of a loop
    workflow (one execution run by the worker), and the engine state's size
    after those iterations (the same workflow stepped in this process against
    the scratch database, reading `engine_state` after each step): flat figures
    mean the state does not grow with history;
(f) timer lateness p50/p99: 1,000 executions of start -> a `PT1S` timer catch
    event (`wait`) -> a script task -> end, whose first steps are sent at half of
    the execution rate (b) sustained (steps/s / 4 nodes / 2), or faster if that
    would take over 45 s: the timers come due while the worker is busy with other
    executions' steps (under load, not behind a backlog). Lateness = `wait`'s step `finished_at` - (`start`'s step
    `finished_at` + 1 s): the timer begins when the start step reaches the catch
    event, a little before that step stamps `finished_at` (the rest of the node's
    run and the state dump, ~1 ms, which this figure leaves out, so it reads that
    much low; the write and commit come after the stamp), and ends when the woken
    node has run. The timers are woken as
    a fleet wakes them: the real `celery beat` with the fleet's schedule (its
    `workflows.wake_due_timers` sweep, every few seconds) and a second worker
    consuming `maintenance`, both started for this part only, plus whatever the
    step path itself schedules;
(g) the engine's own upper bound, in this process and without a database: the
    same linear workflow parsed once by the fleet's parser (`parse_bpmn`), then
    1,000 workflows run to completion by plain SpiffWorkflow `do_engine_steps()`
    (drawn nodes/s), and the same 1,000 run node by node the fleet's way
    (`runner.next_node`, `run_node`, `next_node` again for what follows), first
    engine only, then with `state.load` before and `state.dump` after every node
    (ms per node). All three use the fleet's sandbox script engine
    (`workers.engine.state._SCRIPT_ENGINE`), so script evaluation costs the same
    as in a step; `ratio_steps_to_spiff_plain` = (b)'s steps/s / plain nodes/s.

(a) and (b) are drain rates: the first message of every chain / execution is sent
while the worker's consumer is paused; the clock starts when it is resumed and
stops when every chain has ended / every execution is `completed`. During each,
the CPU time of the worker's main process (consumer), its pool processes, its
PostgreSQL backends and Redis is taken per hop / per step (servers only when they
run on this machine): on a small machine that says where a step's extra time goes.
`unloaded_hop_ms` is one chain's time per hop, to compare with the unloaded step
latency.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import psutil
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from db.models import ACTIVE_EXECUTION_STATUSES, sql_list
from workers.queues import MAINTENANCE, WORKFLOWS, TaskNames
from workers.tools.bench.harness import BenchEnvironment

# A copy of tests/bpmn/loop.bpmn: `body` runs while i < iterations (a gateway loops back).
LOOP_BPMN = """<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
                  id="loop-definitions" targetNamespace="http://lifecycle-fleet/bench">
  <bpmn:process id="loop" isExecutable="true">
    <bpmn:startEvent id="start"><bpmn:outgoing>f1</bpmn:outgoing></bpmn:startEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="start" targetRef="init"/>
    <bpmn:scriptTask id="init"><bpmn:incoming>f1</bpmn:incoming><bpmn:outgoing>f2</bpmn:outgoing>
      <bpmn:script>i = 0
total = 0</bpmn:script></bpmn:scriptTask>
    <bpmn:sequenceFlow id="f2" sourceRef="init" targetRef="body"/>
    <bpmn:scriptTask id="body"><bpmn:incoming>f2</bpmn:incoming><bpmn:incoming>again</bpmn:incoming>
      <bpmn:outgoing>f3</bpmn:outgoing>
      <bpmn:script>i += 1
total += i</bpmn:script></bpmn:scriptTask>
    <bpmn:sequenceFlow id="f3" sourceRef="body" targetRef="more"/>
    <bpmn:exclusiveGateway id="more" default="done"><bpmn:incoming>f3</bpmn:incoming>
      <bpmn:outgoing>again</bpmn:outgoing><bpmn:outgoing>done</bpmn:outgoing></bpmn:exclusiveGateway>
    <bpmn:sequenceFlow id="again" sourceRef="more" targetRef="body">
      <bpmn:conditionExpression>i &lt; iterations</bpmn:conditionExpression></bpmn:sequenceFlow>
    <bpmn:sequenceFlow id="done" sourceRef="more" targetRef="end"/>
    <bpmn:endEvent id="end"><bpmn:incoming>done</bpmn:incoming></bpmn:endEvent>
  </bpmn:process>
</bpmn:definitions>
"""
TIMER_BPMN = """<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
                  id="bench-timer-definitions" targetNamespace="http://lifecycle-fleet/bench">
  <bpmn:process id="bench_timer" isExecutable="true">
    <bpmn:startEvent id="start"><bpmn:outgoing>f1</bpmn:outgoing></bpmn:startEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="start" targetRef="wait"/>
    <bpmn:intermediateCatchEvent id="wait"><bpmn:incoming>f1</bpmn:incoming>
      <bpmn:outgoing>f2</bpmn:outgoing>
      <bpmn:timerEventDefinition><bpmn:timeDuration>"PT1S"</bpmn:timeDuration></bpmn:timerEventDefinition>
    </bpmn:intermediateCatchEvent>
    <bpmn:sequenceFlow id="f2" sourceRef="wait" targetRef="after"/>
    <bpmn:scriptTask id="after"><bpmn:incoming>f2</bpmn:incoming><bpmn:outgoing>f3</bpmn:outgoing>
      <bpmn:script>woke = True</bpmn:script></bpmn:scriptTask>
    <bpmn:sequenceFlow id="f3" sourceRef="after" targetRef="end"/>
    <bpmn:endEvent id="end"><bpmn:incoming>f3</bpmn:incoming></bpmn:endEvent>
  </bpmn:process>
</bpmn:definitions>
"""
TIMER_SECONDS = 1.0  # the catch event's PT1S
SCRIPT_TASKS = 8  # + start and end: 10 nodes
LINEAR = "bench-linear"
LOOP = "bench-loop"
TIMER = "bench-timer"
TIMER_NODES = 4  # start, wait, the script task, end
TIMER_SPREAD_MAX = 45.0  # seconds over which the timer executions start, at most
PACED_SECONDS = 10.0  # (e) sends first steps for this long, or
PACED_MAX = 500  # this many executions, whichever is fewer
SWEEPS = "celery beat (the fleet's schedule) + a maintenance worker"
DONE_QUEUE = MAINTENANCE  # the bench worker does not consume it: finished chains pile up there


@dataclass
class WorkflowsBenchResult:
    hops_per_s: float
    steps_per_s: float
    ratio_steps_to_hops: float
    cpu_ms_per_hop_worker_main: float | None
    cpu_ms_per_hop_worker_pool: float | None
    cpu_ms_per_hop_redis: float | None
    cpu_ms_per_step_worker_main: float | None
    cpu_ms_per_step_worker_pool: float | None
    cpu_ms_per_step_postgres: float | None
    cpu_ms_per_step_redis: float | None
    latency_measure: str
    loaded_step_latency_p50_ms: float
    loaded_step_latency_p99_ms: float
    loaded_step_run_p50_ms: float
    loaded_step_run_p99_ms: float
    unloaded_step_latency_p50_ms: float
    unloaded_step_latency_p99_ms: float
    unloaded_step_run_p50_ms: float
    unloaded_step_run_p99_ms: float
    unloaded_hop_ms: float
    loop_body_run_ms_iteration_1: float
    loop_body_run_ms_iteration_last: float
    loop_body_run_ms_first10_median: float
    loop_body_run_ms_last10_median: float
    loop_engine_state_bytes_iteration_1: int
    loop_engine_state_bytes_iteration_last: int
    loop_iterations: int
    loop_steps: int
    executions: int
    nodes_per_execution: int
    steps: int
    hops: int
    hops_elapsed_s: float
    steps_elapsed_s: float
    worker_concurrency: int
    batch_size_mean: float
    batch_size_p50: float
    batch_size_max: int
    batches: int
    first_node_latency_p50_ms: float
    first_node_latency_p99_ms: float
    paced_starts_per_s: float
    paced_executions: int
    timer_lateness_p50_ms: float
    timer_lateness_p99_ms: float
    timer_executions: int
    timer_sweeps: str
    spiff_plain_nodes_per_s: float
    inprocess_engine_ms_per_node: float
    inprocess_engine_and_state_ms_per_node: float
    ratio_steps_to_spiff_plain: float
    inprocess_workflows: int
    inprocess_script_engine: str


def linear_bpmn(script_tasks: int = SCRIPT_TASKS) -> str:
    """start -> s1 -> ... -> sN -> end, each script task adding one to `count`."""
    ids = ["start", *(f"s{i}" for i in range(1, script_tasks + 1)), "end"]
    flows = [(f"f{i}", a, b) for i, (a, b) in enumerate(zip(ids, ids[1:], strict=False), 1)]
    incoming = {b: f for f, _, b in flows}
    outgoing = {a: f for f, a, _ in flows}
    parts = [f'<bpmn:startEvent id="start"><bpmn:outgoing>{outgoing["start"]}</bpmn:outgoing>'
             "</bpmn:startEvent>"]
    for node in ids[1:-1]:
        script = "count = 1" if node == "s1" else "count += 1"
        parts.append(f'<bpmn:scriptTask id="{node}"><bpmn:incoming>{incoming[node]}</bpmn:incoming>'
                     f"<bpmn:outgoing>{outgoing[node]}</bpmn:outgoing>"
                     f"<bpmn:script>{script}</bpmn:script></bpmn:scriptTask>")
    parts.append(f'<bpmn:endEvent id="end"><bpmn:incoming>{incoming["end"]}</bpmn:incoming>'
                 "</bpmn:endEvent>")
    parts += [f'<bpmn:sequenceFlow id="{f}" sourceRef="{a}" targetRef="{b}"/>' for f, a, b in flows]
    body = "\n    ".join(parts)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
                  id="bench-linear-definitions" targetNamespace="http://lifecycle-fleet/bench">
  <bpmn:process id="bench_linear" isExecutable="true">
    {body}
  </bpmn:process>
</bpmn:definitions>
"""


def seed(env: BenchEnvironment, users: int, engine: Engine | None = None) -> list[uuid.UUID]:
    """Users for the executions, and the workflows deployed and active (through `engine`,
    e.g. one that sets the workspace; default: the scratch database's)."""
    from workers.definitions import deploy_workflow

    engine = engine or env.engine
    with engine.begin() as conn:
        ids = list(conn.execute(text(
            "INSERT INTO users (email, current_lifecycle_stage) "
            "SELECT 'wfbench' || i || '@example.com', 'Activation' "
            "FROM generate_series(1, :n) AS i RETURNING id"), {"n": users}).scalars())
    with Session(engine) as session, session.begin():
        deploy_workflow(session, LINEAR, linear_bpmn(), stages=[], activate=True)
        deploy_workflow(session, LOOP, LOOP_BPMN, stages=[], activate=True)
        deploy_workflow(session, TIMER, TIMER_BPMN, stages=[], activate=True)
    return ids


def start_executions(env: BenchEnvironment, workflow: str, users: list[uuid.UUID],
                     variables: dict[str, Any] | None = None,
                     engine: Engine | None = None) -> list[uuid.UUID]:
    """One execution per user, committed (through `engine`, default the scratch
    database's); nothing is sent."""
    from workers.engine import control

    with Session(engine or env.engine) as session, session.begin():
        return [control.start(session, workflow, user, variables) for user in users]


def send_steps(env: BenchEnvironment, executions: list[uuid.UUID]) -> None:
    for execution_id in executions:
        env.app.send_task(TaskNames.STEP, args=[str(execution_id), 0], queue=WORKFLOWS)


def wait_completed(env: BenchEnvironment, executions: list[uuid.UUID], timeout: float,
                   poll: float = 0.05, workflows: Sequence[uuid.UUID] | None = None) -> None:
    """Wait until every execution is completed (raises if one fails).

    Polls a count over the executions' workflow that is cheap however many there
    are: the executions not yet finished, of which any earlier ones are not part.
    `workflows` names the workflows when they are several (one per workspace); by
    default it is the first execution's.
    """
    ids = list(executions)
    if workflows is None:
        with env.engine.connect() as conn:
            workflows = [conn.execute(text(
                "SELECT workflow_id FROM workflow_executions WHERE id = :id"),
                {"id": ids[0]}).scalar_one()]
    unfinished = text("SELECT count(*) FILTER "
                      f"(WHERE status IN ({sql_list(ACTIVE_EXECUTION_STATUSES)})), "
                      "count(*) FILTER (WHERE status IN ('failed', 'cancelled')) "
                      "FROM workflow_executions WHERE workflow_id = ANY(:w) "
                      "AND status <> 'completed'")
    deadline = time.monotonic() + timeout
    while True:
        with env.engine.connect() as conn:
            running, failed = conn.execute(unfinished, {"w": list(workflows)}).one()
        if failed:
            raise RuntimeError(f"{failed} bench executions failed; see {env.log_dir}")
        if not running:
            break
        if env.worker is not None and env.worker.poll() is not None:
            raise RuntimeError(f"bench worker exited; see {env.log_dir}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{running} executions not completed in {timeout}s")
        time.sleep(poll)
    done = env.scalar(text("SELECT count(*) FROM workflow_executions "
                           "WHERE id = ANY(:ids) AND status = 'completed'"), {"ids": ids})
    if done != len(ids):
        raise RuntimeError(f"only {done} of {len(ids)} bench executions completed")


class CpuMeter:
    """CPU seconds used by the worker's main process (consumer: receive, ack, events)
    and its pool processes (the task bodies), the pool's PostgreSQL backends and the
    Redis server, between `start` and `stop` (servers only when local)."""

    def __init__(self, env: BenchEnvironment) -> None:
        self.env = env
        url = make_url(env.admin_url)
        self.local_db = url.host in (None, "", "localhost", "127.0.0.1", "::1")
        self.redis_pid = _local_redis_pid(env.env["CELERY_BROKER_URL"])
        self._start: dict[str, dict[int, float]] = {}
        self.used: dict[str, float | None] = {}

    def _sample(self) -> dict[str, dict[int, float]]:
        groups: dict[str, list[int]] = {"worker_main": [], "worker_pool": [], "postgres": [],
                                        "redis": []}
        if self.env.worker is not None:
            root = psutil.Process(self.env.worker.pid)
            groups["worker_main"] = [root.pid]
            groups["worker_pool"] = [c.pid for c in root.children(recursive=True)]
        if self.local_db:
            groups["postgres"] = [int(pid) for pid in self.env.scalars(text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'lifecycle-fleet'"))]
        if self.redis_pid is not None:
            groups["redis"] = [self.redis_pid]
        return {name: {pid: _cpu(pid) for pid in pids} for name, pids in groups.items()}

    def start(self) -> None:
        self._start = self._sample()

    def stop_and_keep(self) -> None:
        self.used = self.stop()

    def stop(self) -> dict[str, float | None]:
        """CPU seconds per group since `start` (None: not measurable here)."""
        end = self._sample()
        used: dict[str, float | None] = {}
        for name, pids in end.items():
            if not pids and (name == "postgres" and not self.local_db
                             or name == "redis" and self.redis_pid is None):
                used[name] = None
                continue
            used[name] = sum(cpu - self._start[name].get(pid, 0.0) for pid, cpu in pids.items())
        return used


def _cpu(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0
    return float(times.user + times.system)


def _local_redis_pid(broker_url: str) -> int | None:
    """The pid of a Redis broker on this machine (None if remote, not Redis or not visible)."""
    url = urlsplit(broker_url)
    if not url.scheme.startswith("redis") or url.hostname not in ("localhost", "127.0.0.1", "::1"):
        return None
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if (conn.status == psutil.CONN_LISTEN and conn.laddr
                    and conn.laddr.port == (url.port or 6379) and conn.pid):
                return int(conn.pid)
    except psutil.AccessDenied:
        return None
    return None


def _per_unit_ms(used: dict[str, float | None], units: int) -> dict[str, float | None]:
    return {name: None if seconds is None else round(1000 * seconds / units, 2)
            for name, seconds in used.items()}


def _queue_size(channel: Any, queue: str) -> int:
    """Messages waiting in `queue`, on an open channel (as `BenchEnvironment.queue_length`)."""
    if hasattr(channel, "_size"):  # Redis: kombu's virtual channel sums the priority lists
        return int(channel._size(queue))
    return int(channel.queue_declare(queue=queue, passive=True).message_count)


def hop_rate(env: BenchEnvironment, chains: int, hops: int, timeout: float,
             poll: float = 0.05, meter: CpuMeter | None = None) -> float:
    """Hops/s of `chains` concurrent chains of `hops` tasks each (a drain rate)."""
    done_before = env.queue_length(DONE_QUEUE)
    env.pause_consumer(WORKFLOWS)
    for _ in range(chains):
        env.app.send_task(TaskNames.BENCH_HOP, args=[hops - 1, WORKFLOWS, DONE_QUEUE],
                          queue=WORKFLOWS)
    # A lone message can still meet a fetch issued before the pause: one early hop of a
    # long chain does not change the rate; many would.
    if chains > 1 and env.queue_empty(WORKFLOWS):
        raise RuntimeError("the paused worker consumed the queue: the measurement would be void")
    # One broker connection for the polls: `env.queue_length` connects anew each call
    # (~8 ms of CPU), which at this rate would take a quarter of a core from the worker.
    with env.app.connection_for_write() as conn:
        channel = conn.default_channel
        if meter is not None:
            meter.start()
        started = time.perf_counter()
        env.resume_consumer(WORKFLOWS)
        deadline = time.monotonic() + timeout
        while _queue_size(channel, DONE_QUEUE) - done_before < chains:
            if env.worker is not None and env.worker.poll() is not None:
                raise RuntimeError(f"bench worker exited; see {env.log_dir}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"hop chains did not finish within {timeout}s")
            time.sleep(poll)
        elapsed = time.perf_counter() - started
        if meter is not None:
            meter.stop_and_keep()
        return chains * hops / elapsed


def step_rate(env: BenchEnvironment, executions: list[uuid.UUID], timeout: float,
              meter: CpuMeter | None = None,
              send: Callable[[BenchEnvironment, list[uuid.UUID]], None] = send_steps,
              workflows: Sequence[uuid.UUID] | None = None) -> tuple[float, int]:
    """(steps/s, steps) of the executions run to completion (a drain rate); `send` sends
    their first steps (e.g. each in its workspace), `workflows` as `wait_completed`'s."""
    env.pause_consumer(WORKFLOWS)
    send(env, executions)
    if env.queue_empty(WORKFLOWS):
        raise RuntimeError("the paused worker consumed the queue: the measurement would be void")
    if meter is not None:
        meter.start()
    started = time.perf_counter()
    env.resume_consumer(WORKFLOWS)
    wait_completed(env, executions, timeout, workflows=workflows)
    elapsed = time.perf_counter() - started
    if meter is not None:
        meter.stop_and_keep()
    steps = int(env.scalar(text("SELECT count(*) FROM execution_steps WHERE execution_id = ANY(:ids)"),
                           {"ids": list(executions)}))
    return steps / elapsed, steps


_LATENCY_SQL = text("""
WITH s AS (
  SELECT finished_at - started_at AS run,
         finished_at - lag(finished_at) OVER (PARTITION BY execution_id ORDER BY seq) AS latency
  FROM execution_steps WHERE execution_id = ANY(:ids)
)
SELECT 1000 * extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY latency)),
       1000 * extract(epoch FROM percentile_cont(0.99) WITHIN GROUP (ORDER BY latency)),
       1000 * extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY run)),
       1000 * extract(epoch FROM percentile_cont(0.99) WITHIN GROUP (ORDER BY run))
FROM s
""")


def latencies(env: BenchEnvironment, executions: list[uuid.UUID]) -> tuple[float, ...]:
    """(latency p50, p99, run p50, p99) in ms; latency is previous step's finish -> finish."""
    with env.engine.connect() as conn:
        row = conn.execute(_LATENCY_SQL, {"ids": list(executions)}).one()
    return tuple(round(float(v), 2) for v in row)


def body_runs(env: BenchEnvironment, execution_id: uuid.UUID) -> list[float]:
    """The loop body's run times in ms, iteration 1 first."""
    return [float(v) for v in env.scalars(text(
        "SELECT 1000 * extract(epoch FROM finished_at - started_at) FROM execution_steps "
        "WHERE execution_id = :id AND node_id = 'body' ORDER BY seq"), {"id": execution_id})]


def loop_state_sizes(env: BenchEnvironment, user: uuid.UUID, iterations: int) -> list[int]:
    """Step the loop workflow in this process; engine state bytes after each body iteration."""
    from workers.engine import stepper

    execution_id = start_executions(env, LOOP, [user], {"iterations": iterations})[0]
    sizes: list[int] = []
    version: int | None = 0
    size_sql = text("SELECT octet_length(engine_state::text) FROM workflow_executions "
                    "WHERE id = :id")
    while version is not None:
        with Session(env.engine) as session, session.begin():
            result = stepper.step(session, execution_id, version)
        if result.outcome != "completed":
            raise RuntimeError(f"loop step {version}: {result.outcome} {result.reason or ''}")
        if result.node_id == "body":
            sizes.append(int(env.scalar(size_sql, {"id": execution_id})))
        version = result.next_version
    return sizes


_BATCH_SQL = text("""
WITH b AS (SELECT count(*) AS n FROM execution_steps WHERE execution_id = ANY(:ids)
           GROUP BY started_at)
SELECT count(*), avg(n), percentile_cont(0.5) WITHIN GROUP (ORDER BY n), max(n) FROM b
""")


def batch_sizes(env: BenchEnvironment, executions: list[uuid.UUID]) -> tuple[int, float, float, int]:
    """(batches, mean, p50, max size): the executions' step rows grouped by `started_at`."""
    with env.engine.connect() as conn:
        batches, mean, p50, largest = conn.execute(_BATCH_SQL, {"ids": list(executions)}).one()
    return int(batches), round(float(mean), 2), float(p50), int(largest)


def _percentile(values: list[float], q: float) -> float:
    """As PostgreSQL's percentile_cont: linear between the closest ranks."""
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def send_paced(env: BenchEnvironment, executions: list[uuid.UUID],
               rate: float) -> dict[uuid.UUID, float]:
    """Send the executions' first steps at `rate` per second; {execution: wall time sent}."""
    sent: dict[uuid.UUID, float] = {}
    begin = time.perf_counter()
    for i, execution_id in enumerate(executions):
        pause = begin + i / rate - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        sent[execution_id] = time.time()  # the workers stamp finished_at from this clock too
        env.app.send_task(TaskNames.STEP, args=[str(execution_id), 0], queue=WORKFLOWS)
    return sent


def paced_first_nodes(env: BenchEnvironment, executions: list[uuid.UUID], rate: float,
                      timeout: float) -> tuple[float, float, float]:
    """(p50, p99 ms, achieved starts/s): first steps sent at `rate`, send -> seq 1 finished."""
    sent = send_paced(env, executions, rate)
    span = max(sent.values()) - min(sent.values())
    wait_completed(env, executions, timeout)
    with env.engine.connect() as conn:
        rows = conn.execute(text("SELECT execution_id, finished_at FROM execution_steps "
                                 "WHERE execution_id = ANY(:ids) AND seq = 1"),
                            {"ids": list(executions)}).all()
    if len(rows) != len(executions):
        raise RuntimeError(f"{len(rows)} first steps for {len(executions)} paced executions")
    ms = [1000 * (row.finished_at.timestamp() - sent[row.execution_id]) for row in rows]
    achieved = (len(executions) - 1) / span if span > 0 else 0.0
    return round(_percentile(ms, 0.5), 2), round(_percentile(ms, 0.99), 2), round(achieved, 1)


_TIMER_SQL = text("""
WITH t AS (
  SELECT w.finished_at - s.finished_at - make_interval(secs => :timer) AS late
  FROM execution_steps w
  JOIN execution_steps s ON s.execution_id = w.execution_id AND s.node_id = 'start'
  WHERE w.execution_id = ANY(:ids) AND w.node_id = 'wait'
)
SELECT count(*),
       1000 * extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY late)),
       1000 * extract(epoch FROM percentile_cont(0.99) WITHIN GROUP (ORDER BY late))
FROM t
""")


def _purge(env: BenchEnvironment, queue: str) -> None:
    with env.app.connection_for_write() as conn:
        conn.default_channel.queue_purge(queue)


def timer_lateness(env: BenchEnvironment, users: list[uuid.UUID], rate: float,
                   timeout: float) -> tuple[float, float]:
    """(p50, p99 ms) lateness of a PT1S timer in executions started at `rate`/s (see (f)).

    The beat and the maintenance worker run only here: the finished hop chains are
    counted on `maintenance` (dropped first, so the sweeper does not run them).
    """
    _purge(env, DONE_QUEUE)
    env.start_queue_worker(MAINTENANCE)
    env.start_beat()
    try:
        ids = start_executions(env, TIMER, users)
        send_paced(env, ids, rate)
        wait_completed(env, ids, timeout)
    finally:
        env.stop_extras()
    with env.engine.connect() as conn:
        woken, p50, p99 = conn.execute(_TIMER_SQL, {"ids": ids, "timer": TIMER_SECONDS}).one()
    if woken != len(ids):
        raise RuntimeError(f"{woken} timer nodes ran for {len(ids)} executions")
    return round(float(p50), 2), round(float(p99), 2)


def inprocess_rates(workflows: int) -> tuple[float, float, float]:
    """(plain SpiffWorkflow nodes/s, engine ms/node, engine + state load/dump ms/node), see (g)."""
    from SpiffWorkflow.bpmn.workflow import BpmnWorkflow
    from SpiffWorkflow.util.task import TaskState

    from workers.engine import runner, state
    from workers.engine.bpmn import parse_bpmn
    from workers.engine.specs import LoadedSpec

    parsed = parse_bpmn(linear_bpmn())
    loaded = LoadedSpec(uuid.uuid4(), "bench", parsed.process_id, parsed.spec,
                        parsed.subprocess_specs)
    started = time.perf_counter()
    done = []
    for _ in range(workflows):
        workflow = BpmnWorkflow(loaded.spec, loaded.subprocess_specs,
                                script_engine=state._SCRIPT_ENGINE)
        workflow.do_engine_steps()
        done.append(workflow)
    plain_elapsed = time.perf_counter() - started
    if not all(w.is_completed() for w in done):
        raise RuntimeError("plain SpiffWorkflow did not complete the linear workflow")
    plain_nodes = sum(1 for w in done for t in w.get_tasks(state=TaskState.COMPLETED)
                      if runner.is_node(t))

    def node_by_node(persist: bool) -> float:
        """ms per node, run as the steps run them (with the state saved and restored or not)."""
        nodes = 0
        began = time.perf_counter()
        for _ in range(workflows):
            workflow = state.new_workflow(loaded, {})
            task = runner.next_node(workflow)
            while task is not None:
                runner.run_node(workflow, task)
                nodes += 1
                has_next = runner.next_node(workflow) is not None
                if persist:
                    saved = state.dump(workflow)
                    if has_next:
                        workflow = state.load(saved, loaded)
                task = runner.next_node(workflow) if has_next else None
            if not workflow.is_completed():
                raise RuntimeError("the linear workflow did not complete node by node")
        return 1000 * (time.perf_counter() - began) / nodes

    engine_ms = node_by_node(persist=False)
    with_state_ms = node_by_node(persist=True)
    return plain_nodes / plain_elapsed, engine_ms, with_state_ms


def run(executions: int = 1000, loop_iterations: int = 200, concurrency: int = 2,
        timeout: float = 600, timer_executions: int = 1000,
        inprocess_workflows: int = 1000) -> WorkflowsBenchResult:
    nodes = SCRIPT_TASKS + 2
    warm = 4 * concurrency
    with BenchEnvironment(queues=WORKFLOWS, concurrency=concurrency) as env:
        users = seed(env, executions + warm + 2 + PACED_MAX + timer_executions)
        paced_users = users[warm + executions:warm + executions + PACED_MAX]
        timer_users = users[warm + executions + PACED_MAX:-2]
        env.start_worker()

        # Warm up: imports, parsed specs and connection pools in every pool process.
        warm_ids = start_executions(env, LINEAR, users[:warm])
        send_steps(env, warm_ids)
        hop_rate(env, warm, nodes, timeout)
        wait_completed(env, warm_ids, timeout)

        meter = CpuMeter(env)
        hops = hop_rate(env, executions, nodes, timeout, meter=meter)
        hop_cpu = _per_unit_ms(meter.used, executions * nodes)
        hops_elapsed = executions * nodes / hops
        ids = start_executions(env, LINEAR, users[warm:warm + executions])
        steps, step_count = step_rate(env, ids, timeout, meter=meter)
        step_cpu = _per_unit_ms(meter.used, step_count)
        steps_elapsed = step_count / steps
        loaded = latencies(env, ids)
        batches = batch_sizes(env, ids)

        paced_rate = steps / nodes / 2
        paced_count = max(2, min(PACED_MAX, int(paced_rate * PACED_SECONDS)))
        paced_ids = start_executions(env, LINEAR, paced_users[:paced_count])
        first_node = paced_first_nodes(env, paced_ids, paced_rate, timeout)

        loop_id = start_executions(env, LOOP, [users[-2]], {"iterations": loop_iterations})[0]
        send_steps(env, [loop_id])
        wait_completed(env, [loop_id], timeout)
        unloaded = latencies(env, [loop_id])
        # The same without a backlog for raw Celery: one chain as long as the loop run.
        single_hop_rate = hop_rate(env, 1, loop_iterations * 2 + 3, timeout, poll=0.005)
        runs = body_runs(env, loop_id)
        loop_steps = int(env.scalar(text(
            "SELECT count(*) FROM execution_steps WHERE execution_id = :id"), {"id": loop_id}))

        sizes = loop_state_sizes(env, users[-1], loop_iterations)
        # Last on the broker: it starts the maintenance worker, which drains DONE_QUEUE.
        timer_rate = max(steps / TIMER_NODES / 2, len(timer_users) / TIMER_SPREAD_MAX)
        timers = timer_lateness(env, timer_users, timer_rate, timeout)
    plain_rate, engine_ms, with_state_ms = inprocess_rates(inprocess_workflows)
    return WorkflowsBenchResult(
        hops_per_s=round(hops, 1),
        steps_per_s=round(steps, 1),
        ratio_steps_to_hops=round(steps / hops, 3),
        cpu_ms_per_hop_worker_main=hop_cpu["worker_main"],
        cpu_ms_per_hop_worker_pool=hop_cpu["worker_pool"],
        cpu_ms_per_hop_redis=hop_cpu["redis"],
        cpu_ms_per_step_worker_main=step_cpu["worker_main"],
        cpu_ms_per_step_worker_pool=step_cpu["worker_pool"],
        cpu_ms_per_step_postgres=step_cpu["postgres"],
        cpu_ms_per_step_redis=step_cpu["redis"],
        latency_measure="latency: previous step's finished_at -> this step's finished_at "
                        "(write + commit + send + queue wait + run); run: finished_at - "
                        "started_at (row lock, state load, the node, state dump)",
        loaded_step_latency_p50_ms=loaded[0],
        loaded_step_latency_p99_ms=loaded[1],
        loaded_step_run_p50_ms=loaded[2],
        loaded_step_run_p99_ms=loaded[3],
        unloaded_step_latency_p50_ms=unloaded[0],
        unloaded_step_latency_p99_ms=unloaded[1],
        unloaded_step_run_p50_ms=unloaded[2],
        unloaded_step_run_p99_ms=unloaded[3],
        unloaded_hop_ms=round(1000 / single_hop_rate, 2),
        loop_body_run_ms_iteration_1=round(runs[0], 2),
        loop_body_run_ms_iteration_last=round(runs[-1], 2),
        loop_body_run_ms_first10_median=round(statistics.median(runs[:10]), 2),
        loop_body_run_ms_last10_median=round(statistics.median(runs[-10:]), 2),
        loop_engine_state_bytes_iteration_1=sizes[0],
        loop_engine_state_bytes_iteration_last=sizes[-1],
        loop_iterations=loop_iterations,
        loop_steps=loop_steps,
        executions=executions,
        nodes_per_execution=nodes,
        steps=step_count,
        hops=executions * nodes,
        hops_elapsed_s=round(hops_elapsed, 1),
        steps_elapsed_s=round(steps_elapsed, 1),
        worker_concurrency=concurrency,
        batch_size_mean=batches[1],
        batch_size_p50=batches[2],
        batch_size_max=batches[3],
        batches=batches[0],
        first_node_latency_p50_ms=first_node[0],
        first_node_latency_p99_ms=first_node[1],
        paced_starts_per_s=first_node[2],
        paced_executions=paced_count,
        timer_lateness_p50_ms=timers[0],
        timer_lateness_p99_ms=timers[1],
        timer_executions=timer_executions,
        timer_sweeps=SWEEPS,
        spiff_plain_nodes_per_s=round(plain_rate, 1),
        inprocess_engine_ms_per_node=round(engine_ms, 3),
        inprocess_engine_and_state_ms_per_node=round(with_state_ms, 3),
        ratio_steps_to_spiff_plain=round(steps / plain_rate, 4),
        inprocess_workflows=inprocess_workflows,
        inprocess_script_engine="workers.engine.state._SCRIPT_ENGINE (the fleet's sandbox)",
    )


def as_dict(result: WorkflowsBenchResult) -> dict[str, Any]:
    return asdict(result)
