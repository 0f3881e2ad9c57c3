"""Static checks of deploy/: the manifests parse, hang together and match the code they run.

Every queue of workers/queues.py has exactly one worker in compose and in Kubernetes,
every command they run exists in this project (Celery app, `fleet` commands, modules),
grace periods outlast the longest task of each queue, there is exactly one beat, and
KEDA scales every worker Deployment on its queue's Redis list, and every worker's
counters reach Prometheus through an exporter that shares its metrics folder. One test
starts a real worker to prove the liveness heartbeat file (workers/heartbeat.py).
"""

from __future__ import annotations

import configparser
import fnmatch
import functools
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT, WorkerProcess, wait_for
from workers import heartbeat
from workers.queues import QUEUE_NAMES

DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "k8s" / "base"
OVERLAY = DEPLOY / "k8s" / "overlays" / "example"
COMPOSE = DEPLOY / "compose.yaml"
# Programs the manifests run that are not this project's (images of their own).
EXTERNAL_PROGRAMS = {"postgres", "redis-server", "redis-cli", "pg_isready", "pgbackrest", "ls"}
# Images whose entrypoint takes the manifest's arguments (no program of ours to check).
THIRD_PARTY_IMAGES = ("danihodovic/celery-exporter", "prom/prometheus", "edoburu/pgbouncer")
METRICS_DIR = "/var/lib/fleet/metrics"


def _third_party(image: str) -> bool:
    return any(name in image for name in THIRD_PARTY_IMAGES)


# --------------------------------------------------------------------------- loading


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _kustomize_resources(directory: Path) -> Iterator[dict[str, Any]]:
    """The objects a kustomization lists (recursively), without patches or generators."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            yield from _kustomize_resources(target)
        else:
            yield from _docs(target)


@functools.cache
def _objects() -> list[dict[str, Any]]:
    return list(_kustomize_resources(BASE))


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in _objects() if obj["kind"] == kind}


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def _containers(obj: dict[str, Any], init: bool = True) -> list[dict[str, Any]]:
    spec = _pod_spec(obj)
    return list(spec.get("initContainers", []) if init else []) + list(spec["containers"])


def _argv(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


@functools.cache
def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _compose_argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def _option(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _is_celery(argv: list[str], sub: str) -> bool:
    """`celery -A <app> <sub> ...` (the form every manifest uses)."""
    return len(argv) > 3 and argv[0] == "celery" and argv[3] == sub


def _worker_queues(argv: list[str]) -> list[str]:
    queues = _option(argv, "-Q", "--queues")
    return queues.split(",") if queues else []


def _k8s_workers() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """queue -> (Deployment, its worker container)."""
    workers: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for deployment in _by_kind("Deployment").values():
        for container in _containers(deployment, init=False):
            argv = _argv(container)
            if _is_celery(argv, "worker"):
                for queue in _worker_queues(argv):
                    assert queue not in workers, f"two Deployments consume {queue}"
                    workers[queue] = (deployment, container)
    return workers


def _compose_workers() -> dict[str, tuple[str, dict[str, Any]]]:
    workers: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, service in _compose()["services"].items():
        argv = _compose_argv(service)
        if _is_celery(argv, "worker"):
            for queue in _worker_queues(argv):
                assert queue not in workers, f"two compose services consume {queue}"
                workers[queue] = (name, service)
    return workers


# --------------------------------------------------------------------------- the code's view


def _longest_time_limit_per_queue() -> dict[str, float]:
    """Longest hard time limit of any task that can land on each queue (routes + beat)."""
    from workers.celery_app import app
    from workers.queues import route_for_task

    app.loader.import_default_modules()
    default = float(app.conf.task_time_limit)
    limits: dict[str, float] = dict.fromkeys(QUEUE_NAMES, default)

    def limit(name: str) -> float:
        task = app.tasks[name]
        return float(task.time_limit or default)

    for name, task in app.tasks.items():
        if not task.__module__.startswith("tasks."):  # the fleet's tasks, not Celery's or tests'
            continue
        route = route_for_task(name)
        queue = route["queue"] if route else app.conf.task_default_queue
        limits[queue] = max(limits[queue], limit(name))
    for entry in app.conf.beat_schedule.values():
        queue = entry.get("options", {}).get("queue")
        if queue:
            limits[queue] = max(limits[queue], limit(entry["task"]))
    return limits


def _duration_seconds(value: str | int) -> float:
    """Compose durations: 90s, 7m, 1h30m, 1m30s."""
    if isinstance(value, int):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", value)
    assert parts and "".join(n + u for n, u in parts) == value, value
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


# --------------------------------------------------------------------------- commands


def _fleet_command_exists(path: list[str]) -> bool:
    import typer.main

    from workers.cli.main import app

    command: Any = typer.main.get_command(app)
    for word in path:
        if word.startswith("-"):
            break
        if word not in getattr(command, "commands", {}):
            return False
        command = command.commands[word]
    return not hasattr(command, "commands")  # a runnable command, not a bare group


def _console_scripts() -> set[str]:
    from importlib.metadata import entry_points

    scripts = {ep.name for ep in entry_points(group="console_scripts")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return scripts | set(project.get("scripts", {}))


def _check_python_module(args: list[str], where: str) -> None:
    assert args[0] == "-m", f"{where}: python {args}"
    module = args[1]
    assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
    rest = args[2:]
    if module == "workers.heartbeat":
        assert len(rest) == 3 and rest[0] == "check" and float(rest[2]) > 0, f"{where}: {args}"
    elif module == "db.roles":
        from db.roles import build_parser

        build_parser().parse_args(rest)


def _check_argv(argv: list[str], where: str) -> None:
    """One command line from a manifest: the program and what it names exist."""
    assert argv, f"{where}: empty command"
    program = argv[0]
    if program in ("sh", "/bin/sh") and argv[1:2] == ["-c"]:
        script = argv[2]
        assert "alembic current" in script, f"{where}: unexpected shell script {script!r}"
        assert "alembic" in _console_scripts()
        return
    if program == "celery":
        assert _option(argv, "-A", "--app") == "workers.celery_app", f"{where}: {argv}"
        from celery import Celery

        assert isinstance(importlib.import_module("workers.celery_app").app, Celery)
        sub = argv[3]
        assert sub in {"worker", "beat", "flower"}, f"{where}: celery {sub}"
        if sub == "worker":
            queues = _worker_queues(argv)
            assert queues and set(queues) <= set(QUEUE_NAMES), f"{where}: queues {queues}"
            assert _option(argv, "-n", "--hostname"), f"{where}: no -n hostname"
        if sub == "flower":
            from flower.options import options as flower_options

            for arg in argv[4:]:
                name = arg[2:].split("=", 1)[0]
                assert name in flower_options._options or name.replace("_", "-") in (
                    flower_options._options), f"{where}: flower {arg}"
        return
    if program == "fleet":
        assert _fleet_command_exists(argv[1:]), f"{where}: no command `{' '.join(argv)}`"
        return
    if program in ("python", "python3"):
        _check_python_module(argv[1:], where)
        return
    assert program in EXTERNAL_PROGRAMS, f"{where}: unknown program {program}"


def _all_commands() -> Iterator[tuple[str, list[str]]]:
    """(where, argv) of every command deploy/ runs: containers, probes, compose, Dockerfile."""
    for path in _yaml_files():
        if path == COMPOSE:
            continue
        for doc in _docs(path):
            if doc.get("kind") not in ("Deployment", "Job", "CronJob", "StatefulSet"):
                continue
            for container in _containers(doc):
                if _third_party(container.get("image", "")):
                    continue
                where = f"{path.relative_to(ROOT)}:{doc['metadata']['name']}/{container['name']}"
                if "patches" in path.parts and not _argv(container):
                    continue  # a patch of other fields keeps the base's command
                yield where, _argv(container)
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    exec_ = container.get(probe, {}).get("exec")
                    if exec_:
                        yield f"{where} {probe}", list(exec_["command"])
    for name, service in _compose()["services"].items():
        where = f"compose:{name}"
        if _third_party(service.get("image", "")):
            continue
        if service.get("command"):
            yield where, _compose_argv(service)
        test = service.get("healthcheck", {}).get("test")
        if test and test[0] == "CMD":
            argv = list(test[1:])
            if argv[:2] == ["python", "-c"]:
                compile(argv[2], where, "exec")  # a Python one-liner: it must at least compile
            else:
                yield f"{where} healthcheck", argv
        elif test and test[0] == "CMD-SHELL":
            yield f"{where} healthcheck", shlex.split(test[1])[:1]
    cmd = re.search(r"^CMD (\[.*\])$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert cmd, "Dockerfile has no exec-form CMD"
    yield "Dockerfile CMD", yaml.safe_load(cmd.group(1))


# --------------------------------------------------------------------------- tests: files


def test_every_yaml_file_parses() -> None:
    files = _yaml_files()
    assert COMPOSE in files and (BASE / "kustomization.yaml") in files
    for path in files:
        docs = _docs(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), path
            if "apiVersion" in doc and doc.get("kind") != "Kustomization":
                assert doc.get("kind") and doc.get("metadata", {}).get("name"), path


def test_kustomizations_are_consistent() -> None:
    kustomizations = sorted(DEPLOY.rglob("kustomization.yaml"))
    assert BASE / "kustomization.yaml" in kustomizations
    assert OVERLAY / "kustomization.yaml" in kustomizations
    for path in kustomizations:
        directory = path.parent
        k = yaml.safe_load(path.read_text())
        listed = set()
        for entry in k.get("resources", []):
            target = (directory / entry).resolve()
            assert target.exists(), f"{path}: resource {entry} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists(), f"{path}: {entry} is no kustomization"
            listed.add(target)
        for patch in k.get("patches", []):
            if "path" in patch:
                assert (directory / patch["path"]).exists(), f"{path}: patch {patch['path']}"
        for generator in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
            for entry in generator.get("files", []):
                source = entry.split("=", 1)[-1]
                assert (directory / source).exists(), f"{path}: generator file {source}"
        # No manifest lying next to a kustomization without being part of it.
        for manifest in directory.glob("*.yaml"):
            if manifest.name in ("kustomization.yaml", "secret.example.yaml"):
                continue
            assert manifest.resolve() in listed, f"{manifest} is not listed in {path}"
    overlay = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    assert "../../base" in overlay["resources"] and overlay.get("namespace")


def test_the_overlay_builds_with_kustomize() -> None:
    """The real kustomize build, when kubectl or kustomize is installed."""
    if shutil.which("kustomize"):
        argv = ["kustomize", "build", str(OVERLAY)]
    elif shutil.which("kubectl"):
        argv = ["kubectl", "kustomize", str(OVERLAY)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    docs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    namespace = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())["namespace"]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, doc["metadata"]["name"]
    images = {c["image"] for doc in docs if doc["kind"] in ("Deployment", "Job", "CronJob")
              for c in _containers(doc)}
    assert all(":" in image for image in images), images
    config = [d for d in docs if d["kind"] == "ConfigMap"
              and d["metadata"]["name"].startswith("fleet-config-")]
    assert len(config) == 1  # generated once, merged by the overlay, hashed


def test_secret_example_documents_every_key_the_manifests_use() -> None:
    documented: dict[str, set[str]] = {}
    for doc in _docs(BASE / "secret.example.yaml"):
        documented[doc["metadata"]["name"]] = set(doc["stringData"])
    used: set[tuple[str, str]] = set()
    for obj in _objects():
        if obj["kind"] == "TriggerAuthentication":
            used |= {(ref["name"], ref["key"]) for ref in obj["spec"]["secretTargetRef"]}
        if obj["kind"] not in ("Deployment", "Job", "CronJob"):
            continue
        for container in _containers(obj):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used.add((ref["name"], ref["key"]))
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in documented
    for name, key in used:
        assert key in documented.get(name, set()), f"secret {name} key {key} is not documented"


# --------------------------------------------------------------------------- tests: commands


def test_every_command_the_manifests_run_exists() -> None:
    commands = list(_all_commands())
    assert len(commands) > 20
    for where, argv in commands:
        _check_argv(argv, where)
    # The migration runs the real `fleet migrate`, in compose and in Kubernetes.
    assert ["fleet", "migrate"] in [argv for _, argv in commands]
    assert sum(argv == ["fleet", "migrate"] for _, argv in commands) == 2
    text = "\n".join(p.read_text() for p in DEPLOY.rglob("*") if p.is_file())
    assert "inspect ping" not in text.replace("`celery inspect ping`", "")


def test_the_image_installs_what_the_containers_run() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER \d+(:\d+)?$", dockerfile, re.M), "run as a numeric non-root user"
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), f"COPY {source}: missing"
            assert not any(fnmatch.fnmatch(source, pattern.rstrip("/")) for pattern in ignored), (
                f"COPY {source} is excluded by .dockerignore")
    # The wheel carries every package, beat_schedule and the migrations (package data).
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "beat_schedule" in config["py-modules"]
    include = config["packages"]["find"]["include"]
    for package in ("workers", "tasks", "db"):
        assert any(fnmatch.fnmatch(package, pattern) for pattern in include), package
    patterns = config["package-data"]["db"]
    for path in (ROOT / "db" / "migrations").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            relative = path.relative_to(ROOT / "db").as_posix()
            assert any(fnmatch.fnmatch(relative, p) for p in patterns), f"{relative} not packaged"


def test_the_image_alembic_config_finds_the_packaged_migrations() -> None:
    """The Dockerfile rewrites alembic.ini to `script_location = db:migrations`."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from db.migrate import MIGRATIONS

    sed = re.search(r"sed -e 's\|\^script_location \*=\.\*\|(.+?)\|'", (DEPLOY / "Dockerfile")
                    .read_text())
    assert sed, "the Dockerfile's alembic.ini rewrite changed"
    ini = configparser.ConfigParser()
    ini.read(ROOT / "alembic.ini")
    assert ini.has_option("alembic", "script_location")
    packaged = Config()
    packaged.set_main_option("script_location", sed.group(1).split("=", 1)[1].strip())
    source = Config()
    source.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(packaged).get_heads() == (
        ScriptDirectory.from_config(source).get_heads())


def test_roles_sql_file_is_what_db_roles_generates() -> None:
    from db.roles import render_sql

    assert (DEPLOY / "sql" / "roles.sql").read_text() == render_sql(), (
        "regenerate: python -m db.roles sql > deploy/sql/roles.sql")


# --------------------------------------------------------------------------- tests: topology


def test_every_queue_has_one_worker_in_compose_and_in_kubernetes() -> None:
    assert sorted(_compose_workers()) == sorted(QUEUE_NAMES)
    assert sorted(_k8s_workers()) == sorted(QUEUE_NAMES)
    for queue, (deployment, container) in _k8s_workers().items():
        assert _worker_queues(_argv(container)) == [queue], "one queue per Deployment"
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert deployment["spec"]["template"]["metadata"]["labels"]["fleet.example.com/queue"] == queue
    for queue, (_name, service) in _compose_workers().items():
        assert _worker_queues(_compose_argv(service)) == [queue]
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_exactly_one_beat() -> None:
    compose_beats = [name for name, s in _compose()["services"].items()
                     if _is_celery(_compose_argv(s), "beat")]
    assert len(compose_beats) == 1
    beat_service = _compose()["services"][compose_beats[0]]
    assert beat_service.get("deploy", {}).get("replicas", 1) == 1 and "scale" not in beat_service
    beats = [d for d in _by_kind("Deployment").values()
             if any(_is_celery(_argv(c), "beat") for c in _containers(d, init=False))]
    assert len(beats) == 1
    beat = beats[0]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"
    scaled = {so["spec"]["scaleTargetRef"]["name"] for so in _by_kind("ScaledObject").values()}
    assert beat["metadata"]["name"] not in scaled
    assert not _by_kind("HorizontalPodAutoscaler")


def test_grace_periods_outlast_the_longest_task_of_each_queue() -> None:
    limits = _longest_time_limit_per_queue()
    assert limits["maintenance"] >= 3300  # maintenance.retention
    for queue, (deployment, _) in _k8s_workers().items():
        grace = _pod_spec(deployment)["terminationGracePeriodSeconds"]
        assert grace > limits[queue], f"{queue}: grace {grace}s <= longest task {limits[queue]}s"
    for queue, (name, service) in _compose_workers().items():
        grace = _duration_seconds(service["stop_grace_period"])
        assert grace > limits[queue], f"compose {name}: {grace}s <= {limits[queue]}s"
    # Redis must not redeliver a message while its task may still run.
    generated = yaml.safe_load((BASE / "kustomization.yaml").read_text())["configMapGenerator"]
    literals = dict(item.split("=", 1) for g in generated if g["name"] == "fleet-config"
                    for item in g["literals"])
    assert int(literals["FLEET_VISIBILITY_TIMEOUT"]) > max(limits.values())


def test_workers_are_probed_by_their_heartbeat_file() -> None:
    for queue, (_, container) in _k8s_workers().items():
        env = {e["name"]: e.get("value") for e in container["env"]}
        path = env["FLEET_HEARTBEAT_FILE"]
        for probe in ("startupProbe", "livenessProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:4] == ["python", "-m", "workers.heartbeat", "check"], queue
            assert command[4] == path
            assert float(command[5]) > heartbeat.INTERVAL * 3
            # Killing a wedged worker must not wait for the pod's long drain period.
            assert container[probe]["terminationGracePeriodSeconds"] <= 60
    for _, (_, service) in _compose_workers().items():
        test = service["healthcheck"]["test"]
        assert test[1:5] == ["python", "-m", "workers.heartbeat", "check"]
        assert test[5] == service["environment"]["FLEET_HEARTBEAT_FILE"]


def test_keda_scales_every_worker_on_its_queue() -> None:
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in _by_kind("ScaledObject").values()}
    workers = _k8s_workers()
    assert set(scaled) == {d["metadata"]["name"] for d, _ in workers.values()}
    prefix = ""  # FLEET_BROKER_KEY_PREFIX in the base ConfigMap
    for queue, (deployment, _) in workers.items():
        so = scaled[deployment["metadata"]["name"]]
        assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
        assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == prefix + queue
        assert int(trigger["metadata"]["listLength"]) > 0
        assert trigger["authenticationRef"]["name"] in _by_kind("TriggerAuthentication")


def test_every_worker_has_a_disruption_budget() -> None:
    budgets = list(_by_kind("PodDisruptionBudget").values())
    for queue, (deployment, _) in _k8s_workers().items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets
                    if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(matching) == 1, queue
        assert matching[0]["spec"].get("maxUnavailable") == 1


def test_the_fleet_gets_its_urls_and_least_privilege() -> None:
    for obj in _objects():
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        for container in _containers(obj, init=False):
            argv = _argv(container)
            env = {e["name"]: e for e in container.get("env", [])}
            if _third_party(container["image"]):
                if "celery-exporter" in container["image"]:
                    assert "CE_BROKER_URL" in env, obj["metadata"]["name"]
                continue
            assert "CELERY_BROKER_URL" in env, obj["metadata"]["name"]
            if _is_celery(argv, "flower"):
                assert "FLOWER_BASIC_AUTH" in env
                continue
            key = env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"]
            owner = argv == ["fleet", "migrate"] or "maintenance" in _worker_queues(argv)
            assert key == ("migrator-database-url" if owner else "database-url"), argv
        spec = _pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in _containers(obj):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_backups_follow_the_seed_strategy() -> None:
    jobs = _by_kind("CronJob")
    schedules = {" ".join(_argv(c)): job["spec"] for job in jobs.values()
                 for c in _containers(job)}
    full = [s for argv, s in schedules.items() if "--type=full" in argv and "backup" in argv]
    incr = [s for argv, s in schedules.items() if "--type=incr" in argv and "backup" in argv]
    assert len(full) == 1 and len(incr) == 1
    assert full[0]["schedule"] == "0 2 * * *" and full[0]["timeZone"] == "Etc/UTC"
    hours = incr[0]["schedule"].split()[1].split(",")
    assert sorted({2, *map(int, hours)}) == [2, 8, 14, 20], "incremental every 6 hours"
    assert incr[0]["timeZone"] == "Etc/UTC"
    for spec in (full[0], incr[0]):
        assert spec["concurrencyPolicy"] == "Forbid"
    conf = configparser.ConfigParser()
    conf.read(DEPLOY / "backup" / "pgbackrest.conf")
    glob = conf["global"]
    assert glob["repo1-retention-full-type"] == "time" and glob["repo1-retention-full"] == "90"
    assert glob["repo1-retention-archive-type"] == "full"
    assert glob["repo1-retention-archive"] == "30"  # 30 daily fulls of WAL: 30 days of PITR
    assert conf.has_section("fleet")
    assert "repo1-s3-key" not in glob and "repo1-cipher-pass" not in glob  # secrets: env only
    assert (DEPLOY / "backup" / "RESTORE.md").exists()


# --------------------------------------------------------------------------- heartbeat


def test_heartbeat_check(tmp_path: Path) -> None:
    path = tmp_path / "hb"
    assert heartbeat.check(path, 60)[0] is False  # missing
    heartbeat.beat(path)
    assert heartbeat.check(path, 60)[0] is True
    os.utime(path, (time.time() - 120, time.time() - 120))
    assert heartbeat.check(path, 60) == (False, "heartbeat is 120s old (max 60s)")
    assert heartbeat.main(["check", str(tmp_path / "none"), "60"]) == 1
    assert heartbeat.main(["check"]) == 2
    heartbeat.beat(path)
    done = subprocess.run([sys.executable, "-m", "workers.heartbeat", "check", str(path), "60"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.servers
def test_a_worker_touches_its_heartbeat_file_from_its_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "heartbeat"
    path.write_text("left by a previous process\n")  # must not vouch for the new worker
    worker = WorkerProcess("segments", concurrency=1, FLEET_HEARTBEAT_FILE=str(path))
    try:
        worker.wait_ready()
        assert path.read_text().startswith("alive")
        # Made stale on purpose: the running worker brings it back within an interval.
        os.utime(path, (time.time() - 600, time.time() - 600))
        wait_for(lambda: heartbeat.check(path, 30)[0], timeout=heartbeat.INTERVAL * 3,
                 message="the heartbeat to be touched again")
        # A stuck main process (its event loop stopped) stops the heartbeat.
        os.kill(worker.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(heartbeat.INTERVAL * 1.6)
            assert heartbeat.check(path, heartbeat.INTERVAL * 1.5)[0] is False
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
        wait_for(lambda: heartbeat.check(path, heartbeat.INTERVAL * 1.5)[0],
                 timeout=heartbeat.INTERVAL * 3, message="the heartbeat to resume")
    finally:
        worker.stop()
    assert worker.proc.returncode == 0, worker.log()[-3000:]  # a clean warm shutdown


def test_workers_get_the_prefetch_their_queue_needs() -> None:
    """The events and workflows workers micro-batch their messages: each must hold a batch."""
    from workers.queues import worker_options

    for path in (COMPOSE, DEPLOY / "k8s" / "base" / "workers.yaml"):
        text = path.read_text()
        for queue in ("events", "workflows"):
            options = " ".join(f'"{o}"' for o in worker_options(queue))
            assert options and options.replace('" "', '", "') in text, (path, queue)


# --------------------------------------------------------------------------- tests: monitoring


def test_the_compose_file_says_it_needs_compose_v2() -> None:
    assert "Needs Docker Compose v2" in COMPOSE.read_text()


def _mounts(volumes: list[str]) -> dict[str, str]:
    """Compose short volume syntax: mount path -> volume name (with :ro kept on the name)."""
    mounts = {}
    for volume in volumes:
        source, target, *mode = volume.split(":")
        mounts[target] = source + (":ro" if mode == ["ro"] else "")
    return mounts


def test_every_compose_worker_shares_its_own_metrics_volume_with_one_exporter() -> None:
    """Multiprocess files are named by PID: one writer container per folder, one reader."""
    services = _compose()["services"]
    exporters = {name: s for name, s in services.items()
                 if _compose_argv(s)[:2] == ["fleet", "exporter"]}
    volumes: list[str] = []
    for queue, (name, service) in _compose_workers().items():
        assert service["environment"]["FLEET_METRICS_DIR"] == METRICS_DIR, name
        volume = _mounts(service["volumes"])[METRICS_DIR]
        volumes.append(volume)
        readers = [e for e, s in exporters.items()
                   if _mounts(s.get("volumes", [])).get(METRICS_DIR) == volume + ":ro"]
        assert readers == [f"exporter-{queue}"], (queue, readers)
        assert exporters[readers[0]]["environment"]["FLEET_METRICS_DIR"] == METRICS_DIR
    assert len(set(volumes)) == len(QUEUE_NAMES) == len(exporters)
    assert set(volumes) <= set(_compose()["volumes"])


def test_prometheus_scrapes_every_exporter_and_celery_exporter_in_compose() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for group in job["static_configs"]
               for t in group["targets"]}
    services = _compose()["services"]
    expected = {f"{name}:9808" for name, s in services.items()
                if _compose_argv(s)[:2] == ["fleet", "exporter"]
                or "celery-exporter" in s.get("image", "")}
    assert targets == expected and len(expected) == len(QUEUE_NAMES) + 1
    exporter = services["celery-exporter"]
    assert "global_keyprefix=${FLEET_BROKER_KEY_PREFIX:-}" in " ".join(exporter["command"])
    assert exporter["environment"]["CE_BROKER_URL"] == services["beat"]["environment"][
        "CELERY_BROKER_URL"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]


def test_every_worker_pod_has_an_exporter_sidecar_on_its_metrics_folder() -> None:
    config = _by_kind("ConfigMap") or {}
    literals = (BASE / "kustomization.yaml").read_text()
    assert f"FLEET_METRICS_DIR={METRICS_DIR}" in literals, config
    for queue, (deployment, worker) in _k8s_workers().items():
        containers = {c["name"]: c for c in _containers(deployment, init=False)}
        exporter = containers["exporter"]
        assert _argv(exporter)[:2] == ["fleet", "exporter"], queue
        volumes = {v["name"]: v for v in _pod_spec(deployment)["volumes"]}
        for container, read_only in ((worker, False), (exporter, True)):
            mount = {m["mountPath"]: m for m in container["volumeMounts"]}[METRICS_DIR]
            assert "emptyDir" in volumes[mount["name"]], queue  # of this pod only
            assert mount.get("readOnly", False) is read_only, (queue, container["name"])
        assert {p["name"]: p["containerPort"] for p in exporter["ports"]} == {"metrics": 9808}


def test_service_monitors_reach_the_worker_exporters_and_celery_exporter() -> None:
    services = _by_kind("Service")
    (monitor,) = _by_kind("ServiceMonitor").values()
    selector = monitor["spec"]["selector"]
    components = set(selector["matchExpressions"][0]["values"])
    selected = {name for name, svc in services.items()
                if svc["metadata"]["labels"].get("app.kubernetes.io/component") in components}
    assert selected == {"fleet-worker-metrics", "fleet-celery-exporter"}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    workers = services["fleet-worker-metrics"]
    assert workers["spec"]["clusterIP"] == "None"  # every pod a target
    assert workers["spec"]["selector"]["app.kubernetes.io/component"] == "worker"
    (exporter,) = _containers(_by_kind("Deployment")["fleet-celery-exporter"])
    assert "danihodovic/celery-exporter" in exporter["image"]
    assert any(a.startswith("--broker-transport-option=global_keyprefix=") for a in exporter["args"])


def test_flower_gets_the_rabbitmq_management_api_from_the_settings() -> None:
    flower = _compose()["services"]["flower"]
    assert flower["environment"]["FLOWER_BROKER_API"] == "${FLEET_FLOWER_BROKER_API:-}"
    (container,) = _containers(_by_kind("Deployment")["fleet-flower"])
    env = {e["name"]: e for e in container["env"]}
    ref = env["FLOWER_BROKER_API"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] == "flower-broker-api" and ref["optional"] is True
