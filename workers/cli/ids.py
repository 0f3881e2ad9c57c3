"""Ids as a user types them: a whole UUID or a unique prefix of one (as tables show them)."""

from __future__ import annotations

import re
import uuid
from typing import Any

import typer
from sqlalchemy import String, cast, func, select
from sqlalchemy.orm import Session

from workers.cli.context import err

MIN_PREFIX = 4
SHOWN_CANDIDATES = 5
_PREFIX = re.compile(r"[0-9a-f]+(-[0-9a-f]+)*-?")


def _refuse(message: str) -> typer.Exit:
    err.print(f"[red]{message}[/]", soft_wrap=True, highlight=False)
    return typer.Exit(2)


def resolve_id(session: Session, model: Any, prefix: str) -> Any:
    """The primary key of the one `model` row whose id starts with `prefix`.

    A UUID id may be given by its first 4 or more hex characters (dashes optional);
    an integer id is given whole. No match, several, or a malformed id exit 2 with
    one line (naming the candidates when several match).
    """
    what = model.__tablename__.replace("_", " ").removesuffix("s")
    text = prefix.strip().lower()
    column = model.id
    if column.type.python_type is int:
        if not text.isdigit():
            raise _refuse(f"{what} id must be a number, not {prefix!r}")
        found = session.execute(select(column).where(column == int(text))).scalar_one_or_none()
        if found is None:
            raise _refuse(f"no {what} {text}")
        return found
    digits = text.replace("-", "")
    if len(digits) < MIN_PREFIX or not _PREFIX.fullmatch(text):
        raise _refuse(f"{what} id must be a UUID or at least {MIN_PREFIX} of its first hex "
                      f"characters, not {prefix!r}")
    if len(digits) == 32:  # a whole UUID: the index finds it
        condition = column == uuid.UUID(digits)
    else:
        condition = func.replace(cast(column, String), "-", "").startswith(digits, autoescape=True)
    matches = session.execute(select(column).where(condition).order_by(column)
                              .limit(SHOWN_CANDIDATES + 1)).scalars().all()
    if not matches:
        raise _refuse(f"no {what} id starts with {text}")
    if len(matches) > 1:
        shown = ", ".join(str(m) for m in matches[:SHOWN_CANDIDATES])
        more = " …" if len(matches) > SHOWN_CANDIDATES else ""
        raise _refuse(f"{text} is ambiguous: {what} ids {shown}{more}")
    return matches[0]
