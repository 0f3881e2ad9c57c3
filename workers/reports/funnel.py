"""The AARRR funnel as a self-contained HTML page (inline SVG, no scripts, no downloads)."""

from __future__ import annotations

import datetime as dt
import html
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.models import LIFECYCLE_STAGES


def funnel_counts(session: Session) -> tuple[dt.date | None, dict[str, int]]:
    """Users who reached each stage (are in it or further), at the latest metrics day."""
    day = session.execute(text("SELECT max(metric_date) FROM metrics_daily "
                               "WHERE metric_name = 'users_in_stage'")).scalar()
    in_stage = dict(session.execute(text(
        "SELECT lifecycle_stage, metric_value FROM metrics_daily WHERE metric_date = :d "
        "AND metric_name = 'users_in_stage'"), {"d": day}).all()) if day else {}
    reached, running = {}, 0
    for stage in reversed(LIFECYCLE_STAGES):
        running += int(in_stage.get(stage, 0))
        reached[stage] = running
    return day, {s: reached[s] for s in LIFECYCLE_STAGES}


def write_funnel(path: Path, day: dt.date | None, reached: dict[str, int]) -> None:
    top = max(reached.values(), default=0) or 1
    bars = []
    for i, (stage, count) in enumerate(reached.items()):
        width = 560 * count / top
        x = (600 - width) / 2
        share = f"{100 * count / top:.1f}%"
        bars.append(
            f'<rect x="{x:.1f}" y="{20 + i * 60}" width="{width:.1f}" height="44" fill="#3b6ea5"/>'
            f'<text x="300" y="{48 + i * 60}" text-anchor="middle" fill="#000" '
            f'font-family="sans-serif" font-size="15">{html.escape(stage)}: {count} ({share})</text>'
        )
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>AARRR funnel</title>"
        f"<h1 style='font-family:sans-serif'>AARRR funnel, {day or 'no data yet'}</h1>"
        f"<svg width='600' height='{40 + 60 * len(reached)}' xmlns='http://www.w3.org/2000/svg'>"
        + "".join(bars) + "</svg>")
