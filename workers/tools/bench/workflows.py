"""`fleet bench workflows`: persisted workflow steps against a raw Celery task chain.

Everything runs against the same broker, the same PostgreSQL server (a scratch
database of its own) and one worker started with the same settings, consuming
the `workflows` queue:

(a) hops/s of raw Celery chains: `bench.hop` tasks that each send the next one, as
    a step sends the step after it; as many concurrent chains as (b) has
    executions, each as long as (b)'s executions have nodes;
(b) persisted steps/s of a linear 10-node workflow (start, 8 script tasks, end)
    across 1,000 concurrent executions: `execution_steps` rows / elapsed time;
(c) step latency p50/p99, from `execution_steps`: the time from the previous
    step's finish (just before its commit and the send of this step) to this
    step's finish, i.e. write + commit + send + queue wait + run; also the run
    alone (finished_at - started_at: the row lock, state load, the node and the
    state dump, not the write and commit). Under (b)'s backlog the queue wait is about
    executions / steps-per-s, so the same figures are also taken without a
    backlog, from the single loop execution of (d);
(d) the `body` node's run time at iteration 1 and at iteration N of a loop
    workflow (one execution run by the worker), and the engine state's size
    after those iterations (the same workflow stepped in this process against
    the scratch database, reading `engine_state` after each step): flat figures
    mean the state does not grow with history.

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
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import psutil
from sqlalchemy import text
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
SCRIPT_TASKS = 8  # + start and end: 10 nodes
LINEAR = "bench-linear"
LOOP = "bench-loop"
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


def seed(env: BenchEnvironment, users: int) -> list[uuid.UUID]:
    """Users for the executions, and the two workflows deployed and active."""
    from workers.definitions import deploy_workflow

    with env.engine.begin() as conn:
        ids = list(conn.execute(text(
            "INSERT INTO users (email, current_lifecycle_stage) "
            "SELECT 'wfbench' || i || '@example.com', 'Activation' "
            "FROM generate_series(1, :n) AS i RETURNING id"), {"n": users}).scalars())
    with Session(env.engine) as session, session.begin():
        deploy_workflow(session, LINEAR, linear_bpmn(), stages=[], activate=True)
        deploy_workflow(session, LOOP, LOOP_BPMN, stages=[], activate=True)
    return ids


def start_executions(env: BenchEnvironment, workflow: str, users: list[uuid.UUID],
                     variables: dict[str, Any] | None = None) -> list[uuid.UUID]:
    """One execution per user, committed; nothing is sent."""
    from workers.engine import control

    with Session(env.engine) as session, session.begin():
        return [control.start(session, workflow, user, variables) for user in users]


def send_steps(env: BenchEnvironment, executions: list[uuid.UUID]) -> None:
    for execution_id in executions:
        env.app.send_task(TaskNames.STEP, args=[str(execution_id), 0], queue=WORKFLOWS)


def wait_completed(env: BenchEnvironment, executions: list[uuid.UUID], timeout: float,
                   poll: float = 0.05) -> None:
    """Wait until every execution is completed (raises if one fails).

    Polls a count over the executions' workflow that is cheap however many there
    are: the executions not yet finished, of which any earlier ones are not part.
    """
    ids = list(executions)
    with env.engine.connect() as conn:
        workflow_id = conn.execute(text("SELECT workflow_id FROM workflow_executions WHERE id = :id"),
                                   {"id": ids[0]}).scalar_one()
    unfinished = text("SELECT count(*) FILTER "
                      f"(WHERE status IN ({sql_list(ACTIVE_EXECUTION_STATUSES)})), "
                      "count(*) FILTER (WHERE status IN ('failed', 'cancelled')) "
                      "FROM workflow_executions WHERE workflow_id = :w "
                      "AND status <> 'completed'")
    deadline = time.monotonic() + timeout
    while True:
        with env.engine.connect() as conn:
            running, failed = conn.execute(unfinished, {"w": workflow_id}).one()
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
              meter: CpuMeter | None = None) -> tuple[float, int]:
    """(steps/s, steps) of the executions run to completion (a drain rate)."""
    env.pause_consumer(WORKFLOWS)
    send_steps(env, executions)
    if env.queue_empty(WORKFLOWS):
        raise RuntimeError("the paused worker consumed the queue: the measurement would be void")
    if meter is not None:
        meter.start()
    started = time.perf_counter()
    env.resume_consumer(WORKFLOWS)
    wait_completed(env, executions, timeout)
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


def run(executions: int = 1000, loop_iterations: int = 200, concurrency: int = 2,
        timeout: float = 600) -> WorkflowsBenchResult:
    nodes = SCRIPT_TASKS + 2
    warm = 4 * concurrency
    with BenchEnvironment(queues=WORKFLOWS, concurrency=concurrency) as env:
        users = seed(env, executions + warm + 2)
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
    )


def as_dict(result: WorkflowsBenchResult) -> dict[str, Any]:
    return asdict(result)
