"""A workflow drawn with its per-node counts, as inline SVG: `fleet workflow report --svg`
and the demo's HTML report (`workflow_section_html`).

With a BPMNDI section the shapes are drawn where the modeler put them; without one
the nodes are laid out left to right in layers (longest path from the start over the
sequence flows, loops cut where a depth-first walk meets them again). Each node shows
its name and its counts (reached, completed, waiting, failed, stalled, exited, median time);
each sequence flow the executions that took it and their share of its source's.
Self-contained, as funnel.py: no scripts, no downloads, so the page opens anywhere.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from workers.reports.funnel import percent
from workers.reports.nodes import Bounds, Graph, Node, NodeStats, WorkflowReport, workflow_report

MARGIN = 24
COUNTS_HEIGHT = 34  # room under a shape for its two lines of counts
EVENT, GATEWAY, TASK = (36.0, 36.0), (50.0, 50.0), (110.0, 70.0)
LAYER_GAP, ROW_GAP = 80.0, 60.0
CONTAINERS = ("subProcess", "transaction")
ACCENT, INK, MUTED, FAILED, WAITING = "#5b8def", "#1f2933", "#52606d", "#e8604c", "#f2a93b"


@dataclass(frozen=True)
class Layout:
    """Where each node is drawn and the polyline of each sequence flow."""

    bounds: Mapping[str, Bounds]
    paths: Mapping[str, tuple[tuple[float, float], ...]]  # by flow id
    from_di: bool


def layout(graph: Graph) -> Layout:
    """The BPMNDI coordinates when the file has them, else a layered left-to-right layout."""
    if graph.has_di:
        bounds = {k: n.bounds for k, n in graph.nodes.items() if n.bounds is not None}
        paths = {f.id: f.waypoints or _straight(bounds[f.source], bounds[f.target])
                 for f in graph.flows if f.source in bounds and f.target in bounds}
        return Layout(bounds, paths, True)
    return _layered(graph)


def _size(node: Node) -> tuple[float, float]:
    if node.kind.endswith("Event"):
        return EVENT
    if node.kind.endswith("Gateway"):
        return GATEWAY
    return TASK


def _layered(graph: Graph) -> Layout:
    """Longest-path layers over the flows of the main process (and its subprocesses).

    An embedded subprocess's inner start goes one layer after the subprocess and a
    boundary event one after its activity (implied edges, for placing only).
    """
    main = [n for n in graph.nodes.values() if n.process == graph.process_id] or list(
        graph.nodes.values())
    ids = [n.id for n in main]
    order = {node_id: i for i, node_id in enumerate(ids)}
    edges = [(f.source, f.target) for f in graph.flows if f.source in order and f.target in order]
    targets = {t for _, t in edges}
    edges += [(n.parent, n.id) for n in main if n.parent in order and n.id not in targets]
    edges += [(n.attached_to, n.id) for n in main if n.attached_to in order]
    out: dict[str, list[str]] = {node_id: [] for node_id in ids}
    for source, target in edges:
        out[source].append(target)
    forward = _without_back_edges(ids, out, targets)
    layer = dict.fromkeys(ids, 0)
    for node_id in _topological(ids, forward):
        for target in forward[node_id]:
            layer[target] = max(layer[target], layer[node_id] + 1)
    columns: dict[int, list[str]] = {}
    for node_id in ids:
        columns.setdefault(layer[node_id], []).append(node_id)
    rows = _rows(columns, forward)
    bounds: dict[str, Bounds] = {}
    for column, members in columns.items():
        for node_id in members:
            row = rows[node_id]
            width, height = _size(graph.nodes[node_id])
            cx = column * (TASK[0] + LAYER_GAP) + TASK[0] / 2
            cy = row * (TASK[1] + ROW_GAP) + TASK[1] / 2
            bounds[node_id] = Bounds(cx - width / 2, cy - height / 2, width, height)
    paths = {f.id: _straight(bounds[f.source], bounds[f.target])
             for f in graph.flows if f.source in bounds and f.target in bounds}
    return Layout(bounds, paths, False)


def _rows(columns: Mapping[int, list[str]], forward: Mapping[str, list[str]]) -> dict[str, int]:
    """A row per node: each layer in the order of its predecessors' rows (their mean), each
    node at that mean where it is free, so a chain of nodes stays on one line."""
    before: dict[str, list[str]] = {}
    for source, targets in forward.items():
        for target in targets:
            before.setdefault(target, []).append(source)
    rows: dict[str, int] = {}
    for column in sorted(columns):
        def mean(node_id: str) -> float:
            placed = [rows[p] for p in before.get(node_id, ()) if p in rows]
            return sum(placed) / len(placed) if placed else 0.0
        members = sorted(columns[column], key=mean)  # stable: document order breaks ties
        columns[column][:] = members
        free = 0
        for node_id in members:
            rows[node_id] = max(free, round(mean(node_id)))
            free = rows[node_id] + 1
    return rows


def _without_back_edges(ids: Sequence[str], out: Mapping[str, list[str]],
                        targets: set[str]) -> dict[str, list[str]]:
    """The edges a depth-first walk from the sources does not meet again (loops cut)."""
    state: dict[str, int] = {}  # 1 on the walk's path, 2 done
    forward: dict[str, list[str]] = {node_id: [] for node_id in ids}
    roots = [n for n in ids if n not in targets] + list(ids)
    for root in roots:
        if root in state:
            continue
        stack = [(root, iter(out[root]))]
        state[root] = 1
        while stack:
            node_id, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node_id] = 2
                stack.pop()
            elif state.get(child) != 1:
                forward[node_id].append(child)
                if child not in state:
                    state[child] = 1
                    stack.append((child, iter(out[child])))
    return forward


def _topological(ids: Sequence[str], forward: Mapping[str, list[str]]) -> list[str]:
    incoming = dict.fromkeys(ids, 0)
    for targets in forward.values():
        for target in targets:
            incoming[target] += 1
    ready = [n for n in ids if incoming[n] == 0]
    done: list[str] = []
    while ready:
        node_id = ready.pop(0)
        done.append(node_id)
        for target in forward[node_id]:
            incoming[target] -= 1
            if incoming[target] == 0:
                ready.append(target)
    return done


def _straight(a: Bounds, b: Bounds) -> tuple[tuple[float, float], ...]:
    """From the right middle of `a` to the left middle of `b`, with an elbow halfway when
    they are on different rows; a flow back (a loop) goes below both, under their counts."""
    start = (a.x + a.width, a.y + a.height / 2)
    end = (b.x, b.y + b.height / 2)
    if end[0] <= start[0]:
        start = (a.x + a.width / 2, a.y + a.height)
        end = (b.x + b.width / 2, b.y + b.height)
        middle = ((start[0] + end[0]) / 2, max(start[1], end[1]) + COUNTS_HEIGHT + 12)
        return start, middle, end
    if abs(start[1] - end[1]) < 1:
        return start, end
    bend = start[0] + min(LAYER_GAP / 2, (end[0] - start[0]) / 2)
    return start, (bend, start[1]), (bend, end[1]), end


# --------------------------------------------------------------------------- drawing


def _seconds(value: float | None) -> str:
    """A median time a person reads: 0.4s, 12s, 5m, 3.2h, 2.5d."""
    if value is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size:
            return f"{value / size:.1f}{unit}".replace(".0", "")
    return f"{value:.1f}s" if value < 10 else f"{value:.0f}s"


def _wrap(label: str, width: int = 16, lines: int = 3) -> list[str]:
    words, out = label.split(), [""]
    for word in words:
        if out[-1] and len(out[-1]) + 1 + len(word) > width:
            out.append(word)
        else:
            out[-1] = f"{out[-1]} {word}".strip()
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: width - 1] + "…"
    return out


def _text(x: float, y: float, value: str, size: float = 11, fill: str = INK,
          weight: str = "normal", anchor: str = "middle") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" fill="{fill}" '
            f'font-weight="{weight}" text-anchor="{anchor}">{html.escape(value)}</text>')


def _shape(node: Node, b: Bounds, stats: NodeStats | None, top: int) -> list[str]:
    share = (stats.reached / top) if stats and top else 0.0
    fill = f"rgba(91,141,239,{0.08 + 0.42 * share:.2f})"
    stroke = FAILED if stats and stats.failed else ACCENT
    cx, cy = b.x + b.width / 2, b.y + b.height / 2
    parts: list[str] = []
    if node.kind in CONTAINERS and b.width > TASK[0] * 1.5:  # expanded: a frame around children
        parts.append(f'<rect x="{b.x:.1f}" y="{b.y:.1f}" width="{b.width:.1f}" '
                     f'height="{b.height:.1f}" rx="10" fill="none" stroke="{stroke}" '
                     'stroke-dasharray="6 3"/>')
        parts.append(_text(b.x + 8, b.y + 16, node.label, 12, INK, "600", "start"))
    elif node.kind.endswith("Event"):
        width = 3 if node.kind == "endEvent" else 1.5
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{min(b.width, b.height) / 2:.1f}" '
                     f'fill="{fill}" stroke="{stroke}" stroke-width="{width}"/>')
        for i, line in enumerate(_wrap(node.label, 18, 2)):
            parts.append(_text(cx, b.y - 6 - 13 * (len(_wrap(node.label, 18, 2)) - 1 - i), line))
    elif node.kind.endswith("Gateway"):
        points = f"{cx},{b.y} {b.x + b.width},{cy} {cx},{b.y + b.height} {b.x},{cy}"
        parts.append(f'<polygon points="{points}" fill="{fill}" stroke="{stroke}" '
                     'stroke-width="1.5"/>')
        marks = {"parallelGateway": "+", "exclusiveGateway": "×", "inclusiveGateway": "○",
                 "eventBasedGateway": "◇"}
        parts.append(_text(cx, cy + 6, marks.get(node.kind, ""), 18, MUTED))
        for i, line in enumerate(_wrap(node.label, 18, 2)):
            parts.append(_text(cx, b.y - 6 - 13 * (len(_wrap(node.label, 18, 2)) - 1 - i), line))
    else:
        parts.append(f'<rect x="{b.x:.1f}" y="{b.y:.1f}" width="{b.width:.1f}" '
                     f'height="{b.height:.1f}" rx="8" fill="{fill}" stroke="{stroke}" '
                     'stroke-width="1.5"/>')
        lines = _wrap(node.label, max(8, int(b.width / 7)))
        first = cy - 7 * (len(lines) - 1) + 4
        for i, line in enumerate(lines):
            parts.append(_text(cx, first + 14 * i, line, 12, INK, "600"))
    parts += _counts(cx, b.y + b.height, stats)
    return parts


def _counts(cx: float, bottom: float, stats: NodeStats | None) -> list[str]:
    if stats is None:
        return []
    line1 = f"{stats.reached:,} reached · {stats.completed:,} done"
    extra = [(f"{stats.waiting:,} waiting", WAITING) if stats.waiting else None,
             (f"{stats.failed:,} failed", FAILED) if stats.failed else None,
             (f"{stats.stalled:,} stalled", FAILED) if stats.stalled else None,
             (f"{stats.exited:,} exited", MUTED) if stats.exited else None,
             (f"median {_seconds(stats.median_seconds)}", MUTED)  # not the queue's latency
             if stats.median_seconds is not None and stats.median_seconds >= 1 else None]
    shown = [e for e in extra if e is not None]
    parts = [_text(cx, bottom + 14, line1, 11, INK, "600")]
    if shown:
        spans = " · ".join(f'<tspan fill="{color}">{html.escape(label)}</tspan>'
                           for label, color in shown)
        parts.append(f'<text x="{cx:.1f}" y="{bottom + 28:.1f}" font-size="10.5" '
                     f'text-anchor="middle">{spans}</text>')
    return parts


def _edge_label_at(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The middle of the polyline's last segment (into the target: flows leaving one
    gateway share their first ones), or of its longest when the last is short."""
    pairs = list(zip(points, points[1:], strict=False))

    def length(pair: tuple[tuple[float, float], tuple[float, float]]) -> float:
        return abs(pair[1][0] - pair[0][0]) + abs(pair[1][1] - pair[0][1])

    (x1, y1), (x2, y2) = pairs[-1] if length(pairs[-1]) >= 60 else max(pairs, key=length)
    return (x1 + x2) / 2, (y1 + y2) / 2


def workflow_svg(report: WorkflowReport) -> str:
    """The workflow with its counts, as one `<svg>` element (XML: parses standalone)."""
    graph, placed = report.graph, layout(report.graph)
    stats = {n.node_id: n for n in report.nodes}
    shown = [n for n in graph.nodes.values() if n.id in placed.bounds]
    xs = [v for b in placed.bounds.values() for v in (b.x, b.x + b.width)] + [
        x for path in placed.paths.values() for x, _ in path]
    ys = [v for b in placed.bounds.values() for v in (b.y - 30, b.y + b.height + COUNTS_HEIGHT)] \
        + [y for path in placed.paths.values() for _, y in path]
    left, top = (min(xs) - 70, min(ys)) if xs else (0.0, 0.0)
    width = (max(xs) - left + 70 if xs else 200) + 2 * MARGIN
    height = (max(ys) - top if ys else 40) + 2 * MARGIN
    dx, dy = MARGIN - left, MARGIN - top
    most = max((n.reached for n in report.nodes), default=0)
    busiest = max((e.executions for e in report.edges), default=0) or 1
    title = f"{report.workflow} v{report.version}: executions at each node"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
             f'aria-label="{html.escape(title)}" font-family="system-ui,sans-serif">',
             f"<title>{html.escape(title)}</title>",
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" '
             'markerUnits="userSpaceOnUse" markerWidth="9" markerHeight="9" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
             f'fill="{MUTED}"/></marker></defs>',
             f'<g transform="translate({dx:.1f},{dy:.1f})">']
    # Flows first, then nodes over them (containers before their children).
    for flow in graph.flows:
        path = placed.paths.get(flow.id)
        if not path:
            continue
        edge = report.edge(flow.source, flow.target)
        count = edge.executions if edge else 0
        stroke = 1 + 5 * count / busiest
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in path)
        parts.append(f'<g class="edge" data-flow-id="{html.escape(flow.id)}" '
                     f'data-source="{html.escape(flow.source)}" '
                     f'data-target="{html.escape(flow.target)}">'
                     f'<polyline points="{points}" fill="none" stroke="{MUTED}" '
                     f'stroke-opacity="0.7" stroke-width="{stroke:.1f}" marker-end="url(#arrow)"/>')
        x, y = _edge_label_at(path)
        label = f"{count:,}"
        if edge is not None and edge.share is not None:
            label += f" ({percent(edge.executions, stats[flow.source].reached)})"
        parts.append(f'<rect x="{x - 4 - 3.2 * len(label):.1f}" y="{y - 9:.1f}" '
                     f'width="{8 + 6.4 * len(label):.1f}" height="15" rx="3" fill="#ffffff" '
                     'fill-opacity="0.9"/>')
        parts.append(_text(x, y + 3, label, 10.5, INK))
        parts.append("</g>")
    for node in sorted(shown, key=lambda n: n.kind not in CONTAINERS):
        parts.append(f'<g class="node" data-node-id="{html.escape(node.id)}">'
                     f"<title>{html.escape(node.id)}"
                     f"{': ' + html.escape(node.name) if node.name else ''}</title>")
        parts += _shape(node, placed.bounds[node.id], stats.get(node.id), most)
        parts.append("</g>")
    parts.append("</g></svg>")
    return "".join(parts)


def _row(cells: Sequence[str], tag: str = "td") -> str:
    return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"


def report_html(report: WorkflowReport) -> str:
    """The report as an HTML fragment: a heading, outcomes and conversion, the picture, a table."""
    period = f"started in the last {report.days} days" if report.days is not None else "all"
    outcomes = ", ".join(f"{k} {v:,}" for k, v in report.outcomes.items() if v)
    lines = [f"<section class='workflow-report' id='workflow-{html.escape(report.workflow)}'>",
             f"<h2>{html.escape(report.workflow)} v{html.escape(report.version)}</h2>",
             f"<p>{report.executions:,} executions ({html.escape(period)}): "
             f"{html.escape(outcomes or 'none')}</p>"]
    if report.conversion is not None:
        c, lifted = report.conversion, report.conversion.lift
        lines.append(f"<p>Goal <code>{html.escape(report.goal or '')}</code>: treated "
                     f"{percent(c.treated_converted, c.treated)} of {c.treated:,}, held out "
                     f"{percent(c.held_out_converted, c.held_out)} of {c.held_out:,}; "
                     f"lift {html.escape(lifted.in_points())} pp (95% CI)</p>")
    lines.append(f"<div style='overflow-x:auto'>{workflow_svg(report)}</div>")
    lines.append("<table><thead>" + _row(["node", "kind", "reached", "completed", "waiting",
                                          "failed", "stalled", "median"], "th") + "</thead><tbody>")
    for n in report.nodes:
        lines.append(_row([n.name or n.node_id, n.kind, f"{n.reached:,}", f"{n.completed:,}",
                           f"{n.waiting:,}", f"{n.failed:,}", f"{n.stalled:,}",
                           _seconds(n.median_seconds)]))
    lines.append("</tbody></table>")
    hidden = [e for e in report.edges if not e.drawn]
    if hidden:
        moves = "; ".join(f"{e.source} → {e.target}: {e.executions:,}" for e in hidden)
        lines.append(f"<p><small>Moves with no drawn flow (parallel branches, subprocess "
                     f"entries and exits): {html.escape(moves)}</small></p>")
    lines.append("</section>")
    return "".join(lines)


def workflow_section_html(session: Session, workflow_name: str, days: int | None) -> str:
    """A ready HTML fragment for one workflow's current version (the demo's report embeds it)."""
    return report_html(workflow_report(session, workflow_name, days=days))
