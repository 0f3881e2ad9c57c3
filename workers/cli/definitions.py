"""`fleet apply`, `fleet trigger …`, `fleet segment …`: definitions by name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table
from sqlalchemy import func, select, update

from db.models import Trigger, User, UserSegment, UserSegmentMembership, Workflow
from db.session import session_scope
from workers.cli.context import console, ensure_servers
from workers.events.envelope import normalise_email
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
        doc, xml = load(file)
        with session_scope() as session:
            report = apply_definitions(session, doc, xml)
    except DefinitionError as exc:
        console.print(f"[red]nothing applied:[/]\n{exc}")
        raise typer.Exit(2) from None
    print_report(report)


def print_report(report: ApplyReport) -> None:
    """One line per definition: created, updated or unchanged."""
    for verb, items in (("created", report.created), ("updated", report.updated),
                        ("unchanged", report.unchanged)):
        for item in items:
            console.print(f"{verb:9} {item}")


@trigger_app.command("list")
def trigger_list() -> None:
    """Every trigger with its event type, workflow and re-entry rules."""
    ensure_servers()
    table = Table("name", "event type", "workflow", "enabled", "reentry", "max runs", "cooldown s")
    with session_scope() as session:
        rows = session.execute(
            select(Trigger, Workflow.name).outerjoin(Workflow, Workflow.id == Trigger.workflow_id)
            .order_by(Trigger.name)).all()
        for trigger, workflow in rows:
            table.add_row(trigger.name, trigger.event_type, workflow or "-",
                          "yes" if trigger.enabled else "no", trigger.reentry,
                          str(trigger.max_runs_per_user or "-"), str(trigger.cooldown_seconds or "-"))
    console.print(table)


def _set_enabled(name: str, enabled: bool) -> None:
    ensure_servers()
    with session_scope() as session:
        changed = session.execute(
            update(Trigger).where(Trigger.name == name)
            .values(enabled=enabled, updated_at=func.now()).returning(Trigger.id)).first()
    if changed is None:
        console.print(f"[red]no trigger named {name!r}[/]")
        raise typer.Exit(1)
    console.print(f"trigger {name} {'enabled' if enabled else 'disabled'} "
                  "(workers pick it up within a few seconds)")


@trigger_app.command("disable")
def trigger_disable(name: str) -> None:
    """Stop evaluating a trigger."""
    _set_enabled(name, False)


@trigger_app.command("enable")
def trigger_enable(name: str) -> None:
    """Evaluate a trigger again."""
    _set_enabled(name, True)


@segment_app.command("list")
def segment_list() -> None:
    """Every segment with its kind, TTL and cached member count."""
    ensure_servers()
    table = Table("name", "kind", "ttl s", "cached members", "conditions")
    with session_scope() as session:
        counts = dict(session.execute(
            select(UserSegmentMembership.segment_id, func.count())
            .group_by(UserSegmentMembership.segment_id)).all())
        for seg in session.execute(select(UserSegment).order_by(UserSegment.name)).scalars():
            table.add_row(seg.name, seg.kind, str(seg.ttl_seconds), str(counts.get(seg.id, 0)),
                          str(seg.conditions)[:60])
    console.print(table)


@segment_app.command("show")
def segment_show(name: str, sample: int = typer.Option(10, help="members to list")) -> None:
    """A segment's definition, cached member count and a sample of members."""
    ensure_servers()
    with session_scope() as session:
        seg = session.execute(select(UserSegment).where(UserSegment.name == name)).scalar_one_or_none()
        if seg is None:
            console.print(f"[red]no segment named {name!r}[/]")
            raise typer.Exit(1)
        valid = (UserSegmentMembership.segment_id == seg.id) & (
            UserSegmentMembership.valid_until.is_(None)
            | (UserSegmentMembership.valid_until > func.now()))
        count = session.execute(select(func.count()).where(valid)).scalar_one()
        emails = session.execute(
            select(User.email).join(UserSegmentMembership, UserSegmentMembership.user_id == User.id)
            .where(valid).order_by(User.email).limit(sample)).scalars().all()
        console.print(f"{seg.name} ({seg.kind}, ttl {seg.ttl_seconds}s, refreshed "
                      f"{seg.refreshed_at or 'never'}): {count} members")
        console.print(f"conditions: {seg.conditions}")
        for email in emails:
            console.print(f"  {email}")


def _static_members(name: str, emails: list[str], add: bool) -> None:
    ensure_servers()
    with session_scope() as session:
        seg = session.execute(select(UserSegment).where(UserSegment.name == name)).scalar_one_or_none()
        if seg is None or seg.kind != "static":
            console.print(f"[red]no static segment named {name!r}[/]")
            raise typer.Exit(1)
        normalised = [normalise_email(e) for e in emails]  # as ingest stores them
        ids = session.execute(select(User.id).where(User.email.in_(normalised))).scalars().all()
        set_static_members(session, seg.id, list(ids), add=add)
    console.print(f"{'added' if add else 'removed'} {len(ids)} of {len(emails)} users "
                  f"({len(emails) - len(ids)} unknown)")


@segment_app.command("add")
def segment_add(name: str, emails: list[str]) -> None:
    """Add users (by email) to a static segment."""
    _static_members(name, emails, add=True)


@segment_app.command("remove")
def segment_remove(name: str, emails: list[str]) -> None:
    """Remove users (by email) from a static segment."""
    _static_members(name, emails, add=False)
