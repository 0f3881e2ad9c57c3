"""The AARRR funnel as inline SVG: `fleet metrics show --chart` and the demo's report draw it.

Self-contained on purpose (no scripts, no downloads): the pages open anywhere.
"""

from __future__ import annotations

import datetime as dt
import html
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.models import LIFECYCLE_STAGES

STAGE_COLORS = {"Acquisition": "#5b8def", "Activation": "#3fb68b", "Retention": "#f2a93b",
                "Revenue": "#e8604c", "Referral": "#9b6bd3"}


def funnel_counts(session: Session) -> tuple[dt.date | None, dict[str, int]]:
    """Users who reached each stage (are in it or further), at the latest metrics day."""
    day = session.execute(text("SELECT max(metric_date) FROM metrics_daily "
                               "WHERE metric_name = 'users_in_stage'")).scalar()
    in_stage: dict[str, int] = dict(session.execute(text(
        "SELECT lifecycle_stage, metric_value FROM metrics_daily WHERE metric_date = :d "
        "AND metric_name = 'users_in_stage'"), {"d": day}).tuples().all()) if day else {}
    reached, running = {}, 0
    for stage in reversed(LIFECYCLE_STAGES):
        running += int(in_stage.get(stage, 0))
        reached[stage] = running
    return day, {s: reached[s] for s in LIFECYCLE_STAGES}


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def funnel_svg(reached: dict[str, int]) -> str:
    """One centred bar per stage, its width by the users who reached it, with its share of
    all users and of the stage before."""
    top = max(reached.values(), default=0) or 1
    width, row = 640, 58
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 220}" '
             f'height="{row * len(reached) + 10}" role="img" aria-label="AARRR funnel">']
    previous = None
    for i, (stage, count) in enumerate(reached.items()):
        w = max(2.0, width * count / top)
        x, y = (width - w) / 2, 6 + i * row
        parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 12}" rx="4" '
                     f'fill="{STAGE_COLORS.get(stage, "#5b8def")}"/>')
        parts.append(f'<text x="{width / 2}" y="{y + (row - 12) / 2 + 5}" text-anchor="middle" '
                     f'font-size="14" fill="#1f2933" font-weight="600">'
                     f'{html.escape(stage)}: {count:,}</text>')
        step = f" · {percent(count, previous)} of previous" if previous is not None else ""
        parts.append(f'<text x="{width + 12}" y="{y + (row - 12) / 2 + 5}" font-size="13" '
                     f'fill="#52606d">{percent(count, top)} of all{step}</text>')
        previous = count
    parts.append("</svg>")
    return "".join(parts)


def write_funnel(path: Path, day: dt.date | None, reached: dict[str, int]) -> None:
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>AARRR funnel</title>"
        "<body style='font-family:system-ui,sans-serif;color:#1f2933'>"
        f"<h1>AARRR funnel, {day or 'no data yet'}</h1>{funnel_svg(reached)}</body>",
        encoding="utf-8")
