"""`fleet dlq`: inspect and replay dead letters."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy import func, select

from db.models import DeadLetter
from db.session import session_scope
from workers.cli.context import ensure_servers, err, out
from workers.cli.ids import resolve_id
from workers.cli.output import print_json, utc

app = typer.Typer(help="Dead letters: input the fleet could not process.", no_args_is_help=True)

# `dlq show` prints at most this much of the raw payload (--json gives all of it).
SHOWN_BYTES = 4096


def _text(raw: bytes) -> str | None:
    """The payload as text when it is UTF-8 without control characters (but newlines, tabs)."""
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return decoded if all(c.isprintable() or c in "\n\r\t" for c in decoded) else None


def _as_json(row: DeadLetter) -> dict[str, Any]:
    text = _text(row.raw_payload)
    return {
        "id": row.id, "received_at": utc(row.received_at), "source": row.source,
        "status": row.status, "reason": row.reason, "error_type": row.error_type,
        "event_id": row.event_id, "replay_count": row.replay_count,
        "replayed_at": utc(row.replayed_at),
        "raw_size": row.raw_size if row.raw_size is not None else len(row.raw_payload),
        "raw_stored_size": len(row.raw_payload), "raw_sha256": row.raw_sha256,
        "raw_payload_text": text, "raw_payload_hex": None if text is not None else row.raw_payload.hex(),
        "payload": row.payload,
    }


def _preview(raw: bytes, width: int) -> str:
    text = _text(raw[:width * 4])
    shown = text if text is not None else raw[:width // 2].hex()
    shown = " ".join(shown.split())
    return shown[:width] + ("…" if len(shown) > width or len(raw) > width * 4 else "")


@app.command("list")
def list_(
    status: str = typer.Option("pending", help="pending, replayed, discarded or all"),
    limit: int = typer.Option(50),
    as_json: bool = typer.Option(False, "--json", help="print JSON (whole reason and payload)"),
) -> None:
    """List dead letters, newest first, with their reason (`dlq show ID` for all of one)."""
    ensure_servers()
    with session_scope() as session:
        query = select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit)
        if status != "all":
            query = query.where(DeadLetter.status == status)
        rows = session.execute(query).scalars().all()
        counts = dict(session.execute(
            select(DeadLetter.status, func.count()).group_by(DeadLetter.status)).all())
        if as_json:
            print_json([_as_json(row) for row in rows])
            return
    table = Table("id", "received", "source", "status", "reason", "payload")
    for row in rows:
        table.add_row(str(row.id), f"{row.received_at:%Y-%m-%d %H:%M:%S}", row.source, row.status,
                      escape(row.reason[:80] + ("…" if len(row.reason) > 80 else "")),
                      escape(_preview(row.raw_payload, 60)))
    out.print(table)
    err.print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no dead letters")


@app.command()
def show(
    dead_letter_id: str = typer.Argument(..., help="the id shown by `fleet dlq list`"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (the whole raw payload)"),
) -> None:
    """One dead letter: the whole reason, its source and error type, the raw payload (text,
    or hex when it is not text) and the payload parsed as JSON."""
    ensure_servers()
    with session_scope() as session:
        row = session.get(DeadLetter, resolve_id(session, DeadLetter, dead_letter_id))
        assert row is not None
        data = _as_json(row)
    if as_json:
        print_json(data)
        return
    size, stored = data["raw_size"], data["raw_stored_size"]
    lines = [f"dead letter {row.id}", f"  status    {row.status}"
             + (f" ({row.replay_count} replays, last {utc(row.replayed_at)})" if row.replay_count else ""),
             f"  received  {utc(row.received_at)}", f"  source    {row.source}",
             f"  error     {row.error_type or '-'}", f"  event id  {row.event_id or '-'}",
             f"  reason    {row.reason}"]
    text = data["raw_payload_text"]
    kind = "text" if text is not None else "hex"
    body = text if text is not None else data["raw_payload_hex"]
    limit = SHOWN_BYTES if text is not None else SHOWN_BYTES * 2
    kept = f", {stored} kept" if stored != size else ""
    cut = f", showing the first {SHOWN_BYTES}" if len(body) > limit else ""
    lines.append(f"raw payload ({size} bytes{kept}, sha256 {row.raw_sha256 or '-'}; {kind}{cut}):")
    lines.append(body[:limit])
    lines.append("payload (parsed JSON):" if row.payload is not None else "payload: not JSON")
    if row.payload is not None:
        lines.append(json.dumps(row.payload, indent=2, ensure_ascii=False))
    out.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


@app.command()
def replay(
    dead_letter_id: str = typer.Argument(..., help="the id shown by `fleet dlq list`"),
    payload: str = typer.Option(None, "--payload", help="a corrected payload (JSON) to send"),
) -> None:
    """Re-send a dead letter (optionally corrected); a new failure makes a new dead letter."""
    try:
        corrected = json.loads(payload) if payload else None
    except ValueError as exc:
        err.print(f"[red]--payload is not JSON: {escape(str(exc))}[/]")
        raise typer.Exit(2) from None
    ensure_servers()
    # After ensure_servers(): the Celery app reads the broker's URL from the settings when
    # first imported, and an embedded broker's URL is known only now.
    from workers.events.replay import replay as do_replay

    try:
        with session_scope() as session:
            letter_id = resolve_id(session, DeadLetter, dead_letter_id)
            sent = do_replay(session, letter_id, corrected)
    except ValueError as exc:  # kept only part of its bytes: a corrected payload is needed
        err.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(2) from None
    out.print(f"replayed dead letter {letter_id} as {sent}", markup=False, highlight=False)
