"""The demo's HTML report: one self-contained file (inline CSS and SVG, no scripts, no downloads)."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from db.models import LIFECYCLE_STAGES
from workers.reports.funnel import STAGE_COLORS, funnel_svg, percent
from workers.tools.demo.summary import SEND_OUTCOMES, Summary

PALETTE = ("#3fb68b", "#5b8def", "#f2a93b", "#9b6bd3", "#2bb5c9", "#e58fb8", "#8c9a3b")
OUTCOME_COLORS = {"sent": "#3fb68b", "deferred": "#5b8def", "suppressed": "#d64545",
                  "capped": "#f2a93b", "held_out": "#9aa0a6", "dropped": "#7b61a8"}
STATUS_COLORS = {"failed": "#d64545", "cancelled": "#9aa0a6", "running": "#c7d2e0",
                 "pending": "#e3e8ef"}

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2rem auto;
max-width:1000px;color:#1f2933;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2.2rem;
border-bottom:1px solid #e4e7eb;padding-bottom:.3rem}
.meta{color:#616e7c;font-size:.9rem}
.cards{display:flex;flex-wrap:wrap;gap:.8rem;margin-top:1.2rem}
.card{flex:1 1 150px;border:1px solid #e4e7eb;border-radius:8px;padding:.7rem .9rem}
.card b{display:block;font-size:1.5rem}.card span{color:#616e7c;font-size:.85rem}
table{border-collapse:collapse;width:100%;font-size:.9rem;margin-top:.6rem}
th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid #eef0f2}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.legend span{display:inline-block;margin-right:1rem;font-size:.85rem}
.legend i{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;
vertical-align:-1px;border-radius:2px}
code{background:#f5f7fa;padding:0 .25rem;border-radius:3px}
.warn{color:#b44d12}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _n(value: int | float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"


def stacked_bar(segments: Sequence[tuple[str, int, str]], width: int = 420) -> str:
    """One horizontal bar split into (label, count, colour) parts."""
    total = sum(count for _, count, _ in segments) or 1
    x = 0.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="18">']
    for label, count, color in segments:
        w = width * count / total
        if w <= 0:
            continue
        parts.append(f'<rect x="{x:.1f}" y="1" width="{w:.1f}" height="16" fill="{color}">'
                     f'<title>{_e(label)}: {_n(count)}</title></rect>')
        x += w
    parts.append("</svg>")
    return "".join(parts)


def _bar(count: int, top: int, color: str = "#5b8def", width: int = 260) -> str:
    w = width * count / top if top else 0
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="12">'
            f'<rect x="0" y="1" width="{w:.1f}" height="10" rx="2" fill="{color}"/></svg>')


def _table(head: Iterable[str], rows: Iterable[Iterable[str]], numeric: set[int]) -> str:
    cells = "".join(f'<th{" class=n" if i in numeric else ""}>{_e(h)}</th>'
                    for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{c}</td>'
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def workflow_section(summary: Summary) -> str:
    out = []
    for wf in summary.workflows:
        segments: list[tuple[str, int, str]] = []
        for i, (outcome, count) in enumerate(sorted(wf.outcomes.items(), key=lambda kv: -kv[1])):
            segments.append((f"completed at {outcome}", count, PALETTE[i % len(PALETTE)]))
        for status in ("failed", "cancelled", "running", "pending"):
            if wf.statuses.get(status):
                segments.append((status, wf.statuses[status], STATUS_COLORS[status]))
        legend = "".join(f'<span><i style="background:{c}"></i>{_e(label)} {_n(n)}</span>'
                         for label, n, c in segments)
        failures = "".join(f'<div class="warn">failed ({_n(n)}): {_e(reason)}</div>'
                           for reason, n in wf.failures.items())
        out.append(f"<tr><td><b>{_e(wf.name)}</b></td><td class=n>{_n(wf.total)}</td>"
                   f"<td>{stacked_bar(segments)}<div class=legend>{legend}</div>{failures}</td></tr>")
    return ("<table><thead><tr><th>workflow</th><th class=n>executions</th>"
            "<th>outcomes (end event reached, or status)</th></tr></thead><tbody>"
            + "".join(out) + "</tbody></table>")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _splits(summary: Summary) -> str:
    """The A/B splits: each branch's exposures and goal conversion, its lift over the first."""
    if not summary.splits:
        return ""
    rows = [(f"<b>{_e(split.workflow)}</b>" if i == 0 else "", _e(split.node_id) if i == 0 else "",
             _e(branch.variant), _n(branch.exposures),
             "-" if branch.converted is None else _n(branch.converted), _rate(branch.rate),
             "baseline" if i == 0 else ("-" if branch.lift is None
                                         else _e(branch.lift.in_points())))
            for split in summary.splits for i, branch in enumerate(split.branches)]
    return f"""<h2>A/B splits</h2>
<p class="meta">The <code>split</code> operator sends each user down one branch, from a hash of
the user, workflow and node: sticky on every worker and on re-entry. Conversion = the workflow's
goal; lift against the first branch, 95% CI by Newcombe's hybrid score method.</p>
{_table(("workflow", "split", "variant", "exposed", "converted", "rate", "lift, pp [95% CI]"),
        rows, {3, 4, 5})}"""


def sends_section(summary: Summary) -> str:
    """Sends by outcome per workflow, the deferred sends released, conversion by group."""
    sends = summary.sends
    totals = sends.by_outcome
    legend = "".join(f'<span><i style="background:{OUTCOME_COLORS[o]}"></i>{_e(o)} '
                     f'{_n(totals[o])}</span>' for o in SEND_OUTCOMES)
    rows = [(f"<b>{_e(workflow)}</b>", *(_n(counts[o]) for o in SEND_OUTCOMES),
             stacked_bar([(o, counts[o], OUTCOME_COLORS[o]) for o in SEND_OUTCOMES], 260))
            for workflow, counts in sends.by_workflow.items()]
    first = f", the first at {_e(sends.first_release)} UTC" if sends.first_release else ""
    conversion_rows = []
    for c in summary.conversions:
        lifted = c.lift
        difference = lifted.in_points()
        conversion_rows.append((
            f"<b>{_e(c.workflow)}</b>", _n(c.treated), _n(c.treated_converted),
            _rate(lifted.treated_rate), _n(c.held_out), _n(c.held_out_converted),
            _rate(lifted.control_rate), _e(difference)))
    return f"""<p class="meta">Every message passes one gateway before its channel: consent and the
suppression list, the control group (held out: recorded, never sent), the send window in the
user's time zone (deferred: waits on a durable timer, every rule re-checked when it opens), the
frequency caps. One decision per send, table <code>sends</code> (a deferred send shows its
latest decision).</p>
<div class="legend">{legend}</div>
{_table(("workflow", *SEND_OUTCOMES, ""), rows, {1, 2, 3, 4, 5, 6})}
<p><b>{_n(sends.deferred)}</b> sends waited for the send window; <b>{_n(sends.deferred_sent)}</b>
went out when it opened, <b>{_n(sends.deferred_sent_in_window)}</b> of them at an instant the
user's window was open{first}. The others were capped or suppressed when re-checked.</p>
{_splits(summary)}
<p><b>{_n(summary.early_projects)}</b> users created their first project before the activation
nudge began waiting for it; its wait looks back an hour in the audit log, so
<b>{_n(summary.needless_nudges)}</b> nudges went to a user whose project came before the nudge's
timeout. <b>{_n(summary.late_nudges)}</b> nudges were decided at the timeout, waited for the send
window, and went out although the user created a project meanwhile: the nudge ends on its goal
(<code>exit_on_goal</code>), so such a send is dropped instead.</p>
{_early_exits(summary)}
<h2>Goal conversion, treated vs held out</h2>
<p class="meta">Executions of each workflow with a goal, split by the holdout rule; conversion =
the goal event recorded within the goal's window after the start. Lift: treated minus held-out
rate in percentage points, with the 95% confidence interval of Newcombe's hybrid score method.
The demo's synthetic users do not read their mail, so the lift of this stream is noise around 0:
the interval tells how much a real program would need to show.</p>
{_table(("workflow", "treated", "converted", "rate", "held out", "converted", "rate",
         "lift, pp [95% CI]"), conversion_rows, {1, 2, 3, 4, 5, 6})}"""


def _early_exits(summary: Summary) -> str:
    """Executions ended before their end event: a goal exit, or `exit_when`."""
    if not summary.early_exits:
        return ""
    rows = [(f"<b>{_e(workflow)}</b>", "goal reached" if outcome == "goal" else _e(outcome),
             _n(n)) for (workflow, outcome), n in summary.early_exits.items()]
    dropped = summary.sends.by_outcome.get("dropped", 0)
    return (f"<p>Journeys ended early, wherever they were (a wait, a send deferred to the "
            f"window): <b>{_n(dropped)}</b> deferred sends were dropped by those exits.</p>"
            + _table(("workflow", "why", "executions"), rows, {2}))


def _segment_moves(summary: Summary) -> str:
    """Entries and exits of watched segments, and the schedules' starts: the audience journeys."""
    html = ""
    if summary.segment_moves:
        rows = [(f"<b>{_e(segment)}</b>", _e(kind), _n(n))
                for (segment, kind), n in summary.segment_moves.items()]
        html += ("<p class=\"meta\">Segment entries and exits, as <code>segment.entered</code> "
                 "/ <code>segment.exited</code> events: each membership change of a watched "
                 "segment, written to the outbox by the transaction that made it.</p>"
                 + _table(("segment", "transition", "users"), rows, {2}))
    if summary.scheduled:
        rows = [(f"<b>{_e(schedule)}</b>", _e(workflow), _n(n))
                for (schedule, workflow), n in summary.scheduled.items()]
        html += ("<p class=\"meta\">Scheduled journeys: a run starts the workflow for every "
                 "member of the schedule's segment, in batches, once per user per run.</p>"
                 + _table(("schedule", "workflow", "executions started"), rows, {2}))
    return html


def render(summary: Summary, meta: dict[str, Any], pictures: Sequence[str] = ()) -> str:
    """The whole page. `meta`: title facts of the run (seed, days, durations, ...);
    `pictures`: each workflow drawn with its per-node counts (workers/reports/diagram.py)."""
    reached = summary.reached
    executions = summary.executions
    cards = [
        (_n(summary.users), "users"),
        (_n(summary.events), "events recorded"),
        (f"{_n(summary.matched)} / {_n(summary.evaluated)}", "triggers matched / evaluated"),
        (_n(sum(executions.values())), "workflow executions"),
        (_n(summary.messages), "messages sent"),
        (_n(summary.sends.deferred), "sends deferred to the window"),
        (_n(summary.dead_letters), "inputs dead-lettered"),
    ]
    card_html = "".join(f'<div class="card"><b>{v}</b><span>{_e(label)}</span></div>'
                        for v, label in cards)
    top_stage = max(summary.stages.values(), default=0)
    stage_rows = [(_e(s), _n(summary.stages.get(s, 0)),
                   percent(summary.stages.get(s, 0), summary.users),
                   _bar(summary.stages.get(s, 0), top_stage, STAGE_COLORS[s]))
                  for s in LIFECYCLE_STAGES]
    top_trigger = max((t.evaluated for t in summary.triggers), default=0)
    trigger_rows = [(f"<b>{_e(t.name)}</b><br><code>{_e(t.event_type)}</code> → "
                     f"{_e(t.workflow or '-')}", _n(t.evaluated), _n(t.matched), _n(t.started),
                     _bar(t.matched, top_trigger, "#3fb68b") + "<br>"
                     + _bar(t.evaluated, top_trigger, "#c7d2e0"))
                    for t in summary.triggers]
    top_msg = max(summary.messages_by_template.values(), default=0)
    message_rows = [(_e(channel), f"<code>{_e(template)}</code>", _n(n), _bar(n, top_msg))
                    for (channel, template), n in summary.messages_by_template.items()]
    top_event = max(summary.events_by_type.values(), default=0)
    event_rows = [(f"<code>{_e(t)}</code>", _n(n), _bar(n, top_event, "#9aa0a6"))
                  for t, n in summary.events_by_type.items()]
    dead = "".join(f"<li>{_e(reason)}</li>" for reason in summary.dead_letter_reasons) or \
        "<li>none</li>"
    facts = " · ".join(f"{_e(k)} {_e(v)}" for k, v in meta.items())
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Lifecycle fleet demo</title><style>{CSS}</style></head><body>
<h1>Lifecycle fleet demo</h1>
<div class="meta">{facts}<br>users <code>*@{_e(summary.domain)}</code> · written {generated}</div>
<div class="cards">{card_html}</div>

<h2>AARRR funnel</h2>
<p class="meta">Users who reached each stage (are in it or in a later one); stages are moved by
the workflows' <code>set_lifecycle_stage</code>.</p>
{funnel_svg(reached)}

<h2>Users per stage now</h2>
{_table(("stage", "users", "share", ""), stage_rows, {1, 2})}

<h2>Workflows</h2>
{workflow_section(summary)}
{"".join(pictures)}

<h2>Triggers</h2>
{_table(("trigger", "evaluated", "matched", "started", "matched / evaluated"), trigger_rows,
        {1, 2, 3})}
<p class="meta">Matched but not started: the re-entry rules (one active execution per user, at
most one run, cooldown) held the start back.</p>
{_segment_moves(summary)}

<h2>Send gateway</h2>
{sends_section(summary)}

<h2>Messages (default channel: <code>message_log</code>)</h2>
{_table(("channel", "template", "messages", ""), message_rows, {2})}

<h2>Events recorded</h2>
{_table(("event type", "audit rows", ""), event_rows, {1})}

<h2>Dead letters</h2>
<p class="meta">Deliberately bad inputs in the stream: the workers kept every good event of their
batch and wrote each bad one to <code>dead_letters</code> (<code>fleet dlq list</code>).</p>
<ul>{dead}</ul>
</body></html>
"""


def write_report(path: Path, summary: Summary, meta: dict[str, Any],
                 pictures: Sequence[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(summary, meta, pictures), encoding="utf-8")
    return path
