"""Charts drawn on the server as SVG: the versions a group runs over time (stacked bars) and its status counts.
Pure: values in, markup out.

Rules: every text is escaped; each bar carries a ``<title>`` (the browser's tooltip, also read by screen
readers) and a ``data-tip`` the page's script shows on hover and focus; colours are fixed per position (the
oldest version first) and have at least 3:1 contrast on white (WCAG 1.4.11); each chart has an ``aria-label``
summary, and the page puts the same figures in a table beside it.  At most ``MAX_VERSIONS`` versions get their
own colour; older ones are summed as "older".  Heights are scaled to the largest stack, with a round axis top.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from markupsafe import Markup, escape

from coreupdate.model import InstanceStatus
from update_engine.omaha import version_less

# Blue, orange, green, purple, red, teal, brown, slate: each ≥ 3:1 against white.
PALETTE = ("#1f5f9e", "#b4490b", "#1d7538", "#7a2fb8", "#b42323", "#0b6e82", "#8a5a00", "#4b5563")
MAX_VERSIONS = len(PALETTE) - 1
OLDER = "older"
STATUS_COLOURS = {
    InstanceStatus.UNDEFINED: "#4b5563",
    InstanceStatus.ON_HOLD: "#8a5a00",
    InstanceStatus.UPDATE_GRANTED: "#1f5f9e",
    InstanceStatus.DOWNLOADING: "#1f5f9e",
    InstanceStatus.DOWNLOADED: "#1f5f9e",
    InstanceStatus.INSTALLED: "#0b6e82",
    InstanceStatus.COMPLETE: "#1d7538",
    InstanceStatus.ERROR: "#b42323",
    InstanceStatus.ROLLED_BACK: "#7a1a1a",
}


@dataclass(frozen=True)
class TimePoint:
    at: float  # epoch seconds: the start of the sampled period, or now for the live point
    versions: Mapping[str, int]


def _compare(a: str, b: str) -> int:
    try:
        if version_less(a, b):
            return -1
        if version_less(b, a):
            return 1
    except ValueError:
        pass
    return (a > b) - (a < b)


def ordered_versions(versions: set[str] | Sequence[str]) -> list[str]:
    """Oldest first (Omaha's version order; text order for anything that is not a version)."""
    return sorted(set(versions), key=functools.cmp_to_key(_compare))


def _nice_top(value: int) -> int:
    """The axis' top: the peak rounded up to an even number (so the middle line is whole) or a round one."""
    if value <= 4:
        return 2 if value <= 2 else 4
    magnitude = 10 ** (len(str(value)) - 1)
    for step in (1, 2, 2.5, 5, 10):
        top = int(step * magnitude)
        if top >= value:
            return top
    return value


def _time_label(epoch: float, span: float) -> str:
    """Month, day and minute; with seconds instead of the date when the chart spans less than two hours."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%S" if span < 7200 else "%m-%d %H:%M")


def _time_text(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class VersionSeries:
    """The chart's data after folding: versions (oldest first), their colours, and the points."""

    versions: list[str]
    colours: dict[str, str]
    points: list[TimePoint]


def fold_versions(points: Sequence[TimePoint]) -> VersionSeries:
    """Keep the newest ``MAX_VERSIONS`` versions, sum the rest as ``older``, assign colours."""
    every = ordered_versions({v for p in points for v in p.versions})
    kept = every[-MAX_VERSIONS:]
    folded = every[:-MAX_VERSIONS] if len(every) > MAX_VERSIONS else []
    versions = ([OLDER] if folded else []) + kept
    result = []
    for p in points:
        counts = {v: n for v, n in p.versions.items() if v in kept}
        if folded:
            counts[OLDER] = sum(n for v, n in p.versions.items() if v in folded)
        result.append(TimePoint(p.at, counts))
    colours = {v: PALETTE[i] for i, v in enumerate(versions)}
    return VersionSeries(versions, colours, result)


def versions_chart(series: VersionSeries, *, width: int = 720, height: int = 240) -> Markup:
    """Stacked bars, one per point, one colour per version."""
    left, right, top, bottom = 44, 8, 10, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    points = series.points
    peak = max((sum(p.versions.values()) for p in points), default=0)
    axis_top = _nice_top(peak)
    label = f"Instances per version over time, {len(points)} point(s), at most {peak} instance(s)"
    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}" '
           f'xmlns="http://www.w3.org/2000/svg">']
    for fraction in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - fraction)
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text class="axis" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f'{int(axis_top * fraction)}</text>')
    if not points:
        out.append(f'<text class="empty" x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" '
                   'text-anchor="middle">No check-ins recorded yet</text></svg>')
        return Markup("".join(out))
    slot = plot_w / len(points)
    bar = max(1.0, slot * 0.8)
    for i, p in enumerate(points):
        x = left + i * slot + (slot - bar) / 2
        y = top + plot_h
        parts = [f"{v} {p.versions[v]}" for v in reversed(series.versions) if p.versions.get(v)]
        tip = f"{_time_text(p.at)}: " + (", ".join(parts) if parts else "no instances")
        out.append(f'<g class="bar" data-tip="{escape(tip)}"><title>{escape(tip)}</title>')
        for v in series.versions:
            n = p.versions.get(v, 0)
            if not n:
                continue
            h = plot_h * n / axis_top
            y -= h
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                       f'fill="{series.colours[v]}"/>')
        out.append("</g>")
    ticks = sorted({0, len(points) // 2, len(points) - 1})
    span = points[-1].at - points[0].at
    for i in ticks:
        x = left + i * slot + slot / 2
        anchor = "start" if i == 0 and len(points) > 1 else ("end" if i == len(points) - 1 and i else "middle")
        out.append(f'<text class="axis" x="{x:.1f}" y="{height - 10}" text-anchor="{anchor}">'
                   f'{escape(_time_label(points[i].at, span))}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def status_chart(counts: Mapping[InstanceStatus, int], order: Sequence[InstanceStatus], *, width: int = 420
                 ) -> Markup:
    """Horizontal bars, one per status that has instances, with the label and the count written beside."""
    rows = [(s, counts[s]) for s in order if counts.get(s)]
    row_h, label_w, count_w = 24, 110, 70
    height = max(1, len(rows)) * row_h + 4
    peak = max((n for _, n in rows), default=0)
    summary = ", ".join(f"{s.label} {n}" for s, n in rows) or "no instances"
    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="Instances by status: {escape(summary)}" xmlns="http://www.w3.org/2000/svg">']
    if not rows:
        out.append('<text class="empty" x="0" y="16">No instances yet</text></svg>')
        return Markup("".join(out))
    span = width - label_w - count_w
    for i, (status, n) in enumerate(rows):
        y = i * row_h + 2
        w = max(2.0, span * n / peak)
        tip = f"{status.label}: {n}"
        out.append(f'<g class="bar" data-tip="{escape(tip)}"><title>{escape(tip)}</title>'
                   f'<text class="label" x="0" y="{y + 16}">{escape(status.label)}</text>'
                   f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" '
                   f'fill="{STATUS_COLOURS[status]}"/>'
                   f'<text class="label" x="{label_w + w + 6:.1f}" y="{y + 16}">{n}</text></g>')
    out.append("</svg>")
    return Markup("".join(out))
