"""`fleet apply`, `fleet trigger …`, `fleet segment …`: definitions by name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy import func, select, update

from db.models import Trigger, User, UserSegment, UserSegmentMembership, Workflow
from db.session import session_scope
from workers.cli.context import ensure_servers, err, out
from workers.cli.output import as_yaml, duration, print_json, utc
from workers.events.envelope import normalise_email
from workers.events.outbox import add_segment_transitions
from workers.rules.segments import set_static_members

if TYPE_CHECKING:
    from workers.definitions import ApplyReport

trigger_app = typer.Typer(help="Event triggers.", no_args_is_help=True)
segment_app = typer.Typer(help="User segments.", no_args_is_help=True)


def apply(file: Path = typer.Argument(..., exists=True, dir_okay=False,
                                      help="YAML with workflows, segments and triggers")) -> None:
    """Create or update workflows, segments and triggers by name (all or nothing)."""
    ensure_servers()
    # Here, not at the top: parsing BPMN loads SpiffWorkflow and lxml (~0.2 s), which
    # the other commands do without.
    from workers.definitions import DefinitionError, load
    from workers.definitions import apply as apply_definitions

    try:
        doc, xml = load(file)  # every problem of the file itself, each line naming it
        try:
            with session_scope() as session:
                report = apply_definitions(session, doc, xml)
        except DefinitionError as exc:  # references to nothing, in the file or the database
            raise DefinitionError("\n".join(f"{file}: {line}" for line in str(exc).splitlines())
                                  ) from None
    except DefinitionError as exc:
        problems = str(exc).splitlines()
        err.print(f"[red]nothing applied[/] ({len(problems)} "
                  f"problem{'s' if len(problems) > 1 else ''}):")
        err.print("\n".join(problems), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    print_report(report)


def print_report(report: ApplyReport) -> None:
    """One line per definition: created, updated or unchanged."""
    for verb, items in (("created", report.created), ("updated", report.updated),
                        ("unchanged", report.unchanged)):
        for item in items:
            out.print(f"{verb:9} {item}", markup=False, highlight=False)


@trigger_app.command("list")
def trigger_list(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Every trigger with its event type (and watched segment), workflow, conditions and
    re-entry rules."""
    ensure_servers()
    with session_scope() as session:
        rows: list[dict[str, Any]] = [
            {"name": trigger.name, "event_type": trigger.event_type, "segment": segment,
             "workflow": workflow,
             "enabled": trigger.enabled, "reentry": trigger.reentry,
             "max_runs_per_user": trigger.max_runs_per_user,
             "cooldown_seconds": trigger.cooldown_seconds,
             "cooldown": duration(trigger.cooldown_seconds) if trigger.cooldown_seconds else None,
             "conditions": trigger.conditions}
            for trigger, workflow, segment in session.execute(
                select(Trigger, Workflow.name, UserSegment.name)
                .outerjoin(Workflow, Workflow.id == Trigger.workflow_id)
                .outerjoin(UserSegment, UserSegment.id == Trigger.segment_id)
                .order_by(Trigger.name))]
    if as_json:
        print_json(rows)
        return
    table = Table("name", "event type", "workflow", "enabled", "reentry", "max runs", "cooldown",
                  "conditions")
    for row in rows:
        on = row["event_type"] + (f" of {row['segment']}" if row["segment"] else "")
        table.add_row(row["name"], on, row["workflow"] or "-",
                      "yes" if row["enabled"] else "no", row["reentry"],
                      str(row["max_runs_per_user"] or "-"), row["cooldown"] or "-",
                      escape(as_yaml(row["conditions"], limit=200)))
    out.print(table)


def _set_enabled(name: str, enabled: bool) -> None:
    ensure_servers()
    with session_scope() as session:
        changed = session.execute(
            update(Trigger).where(Trigger.name == name)
            .values(enabled=enabled, updated_at=func.now()).returning(Trigger.id)).first()
    if changed is None:
        err.print(f"[red]no trigger named {escape(repr(name))}[/]")
        raise typer.Exit(1)
    out.print(f"trigger {name} {'enabled' if enabled else 'disabled'} "
              "(workers pick it up within a few seconds)")


@trigger_app.command("disable")
def trigger_disable(name: str) -> None:
    """Stop evaluating a trigger."""
    _set_enabled(name, False)


@trigger_app.command("enable")
def trigger_enable(name: str) -> None:
    """Evaluate a trigger again."""
    _set_enabled(name, True)


def _segment_json(seg: UserSegment, members: int) -> dict[str, Any]:
    return {"name": seg.name, "kind": seg.kind, "ttl_seconds": seg.ttl_seconds,
            "ttl": duration(seg.ttl_seconds), "refreshed_at": utc(seg.refreshed_at),
            "members": members, "conditions": seg.conditions}


@segment_app.command("list")
def segment_list(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Every segment with its kind, TTL, cached member count and conditions."""
    ensure_servers()
    with session_scope() as session:
        counts = dict(session.execute(
            select(UserSegmentMembership.segment_id, func.count())
            .group_by(UserSegmentMembership.segment_id)).all())
        rows = [_segment_json(seg, counts.get(seg.id, 0))
                for seg in session.execute(select(UserSegment).order_by(UserSegment.name)).scalars()]
    if as_json:
        print_json(rows)
        return
    table = Table("name", "kind", "ttl", "cached members", "conditions")
    for row in rows:
        table.add_row(row["name"], row["kind"], row["ttl"], str(row["members"]),
                      escape(as_yaml(row["conditions"], limit=200)))
    out.print(table)


@segment_app.command("show")
def segment_show(name: str, sample: int = typer.Option(10, help="members to list"),
                 as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """A segment's definition, valid member count and a sample of members."""
    ensure_servers()
    with session_scope() as session:
        seg = session.execute(select(UserSegment).where(UserSegment.name == name)).scalar_one_or_none()
        if seg is None:
            err.print(f"[red]no segment named {escape(repr(name))}[/]")
            raise typer.Exit(1)
        valid = (UserSegmentMembership.segment_id == seg.id) & (
            UserSegmentMembership.valid_until.is_(None)
            | (UserSegmentMembership.valid_until > func.now()))
        count = session.execute(select(func.count()).where(valid)).scalar_one()
        emails = session.execute(
            select(User.email).join(UserSegmentMembership, UserSegmentMembership.user_id == User.id)
            .where(valid).order_by(User.email).limit(sample)).scalars().all()
        data = {**_segment_json(seg, count), "sample": list(emails)}
    if as_json:
        print_json(data)
        return
    lines = [f"{data['name']} ({data['kind']}, ttl {data['ttl']}, refreshed "
             f"{data['refreshed_at'] or 'never'}): {count} members",
             "conditions:" + ("\n  " if "\n" in (text := as_yaml(data["conditions"])) else " ")
             + text.replace("\n", "\n  ")]
    lines += [f"  {email}" for email in emails]
    out.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


def _static_members(name: str, emails: list[str], add: bool) -> None:
    ensure_servers()
    with session_scope() as session:
        seg = session.execute(select(UserSegment).where(UserSegment.name == name)).scalar_one_or_none()
        if seg is None or seg.kind != "static":
            err.print(f"[red]no static segment named {escape(repr(name))}[/]")
            raise typer.Exit(1)
        normalised = [normalise_email(e) for e in emails]  # as ingest stores them
        ids = session.execute(select(User.id).where(User.email.in_(normalised))).scalars().all()
        change = set_static_members(session, seg.id, list(ids), add=add)
        add_segment_transitions(session, change.transitions)
    out.print(f"{'added' if add else 'removed'} {len(ids)} of {len(emails)} users "
              f"({len(emails) - len(ids)} unknown)")


@segment_app.command("add")
def segment_add(name: str, emails: list[str]) -> None:
    """Add users (by email) to a static segment."""
    _static_members(name, emails, add=True)


@segment_app.command("remove")
def segment_remove(name: str, emails: list[str]) -> None:
    """Remove users (by email) from a static segment."""
    _static_members(name, emails, add=False)
