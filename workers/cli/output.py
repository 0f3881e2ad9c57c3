"""How commands show data: JSON for scripts, and table cells a person reads at a glance."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from typing import Any

import typer
import yaml
from rich.table import Column

# A one-line YAML form longer than this is shown in block style.
FLOW_WIDTH = 60
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def utc(value: dt.datetime | None) -> str | None:
    """A timestamp as ISO 8601 in UTC (naive ones are taken as UTC), or None."""
    if value is None:
        return None
    aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return aware.astimezone(dt.UTC).isoformat()


def _default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return utc(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def print_json(value: Any) -> None:
    """`--json`: one JSON document on stdout (ids as strings, times ISO 8601 UTC)."""
    typer.echo(json.dumps(value, default=_default, indent=2, ensure_ascii=False))


def duration(seconds: float | None) -> str:
    """Seconds in the largest unit that holds them whole, as a definition writes them: `30d`."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole != seconds or whole <= 0:
        return f"{seconds:g}s"
    return next(f"{whole // size}{unit}" for unit, size in _UNITS if whole % size == 0)


YAML_LIMIT = 4000  # characters of a value shown as YAML; longer ones are cut (see --json)


def as_yaml(value: Any, limit: int = YAML_LIMIT) -> str:
    """A definition's value as the YAML a user wrote: one line when short, else block style.

    A value longer than `limit` characters (a condition with in-lists of thousands of
    values) is shown cut, from its compact JSON: YAML-dumping and laying out all of it
    would take minutes, and `--json` prints the whole.
    """
    if value is None:
        return "-"
    compact = json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)
    if len(compact) > limit:
        return f"{compact[:limit]}… ({len(compact):,} characters; --json shows all)"
    flow: str = yaml.safe_dump(value, default_flow_style=True, sort_keys=False,
                               width=10**6, allow_unicode=True).strip()
    if flow.endswith("\n..."):  # a bare scalar
        flow = flow[:-4].strip()
    if len(flow) <= FLOW_WIDTH:
        return flow
    block: str = yaml.safe_dump(value, default_flow_style=False, sort_keys=False,
                                allow_unicode=True)
    return block.rstrip()


def id_column(header: str = "id") -> Column:
    """A table column wide enough for a whole UUID, never cut."""
    return Column(header, no_wrap=True, min_width=36, overflow="fold")
