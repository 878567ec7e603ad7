"""The dashboard's one presentation module: typed series in, Plotly figures out.

Views hand over plain series (labels in the tenant's local time, money in
nano-dollars); this module owns every visual decision (units, colours, axes,
tick formats, margins, legends, what a narrow chart drops) and returns figures
as JSON for plotly.js, which is served from our own static files. Live updates
in the browser extend the same traces by name.

Layout rules that keep every label readable at any width:

- margins grow to fit the tick labels and the title (``automargin``), so a long
  model name or a wide money label is never cut;
- tick labels are never rotated: date axes use short formats and few ticks,
  and a chart narrower than ``NARROW_PX`` gets its ``narrow`` layout (fewer
  ticks, a wrapped title), which the browser merges in;
- legends sit below the plot in their own band of the margin, never on labels;
- money ticks show as many decimals as their step needs ($0.005, not "$5m"),
  counts are whole numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime

import plotly.graph_objects as go

from core.money import nanos_to_float_usd
from dashboard.templatetags.money import usd as money_text
from tenants.enums import BudgetDecision

ACCENT, MUTED, GOOD, WARN, BAD = "#2f6fed", "#98a2b3", "#12805c", "#b54708", "#b42318"
VOLUME = "#e4e7ec"
NARROW_PX = 480  # a chart narrower than this (in CSS pixels) uses its narrow layout
LABEL_CHARS = 18  # category labels longer than this are shortened (full name on hover)

# Budget states, in order, with the colour of the value and of the band on the gauge.
BUDGET_STATES = (
    ("ok", GOOD, "#ecfdf3"),
    (BudgetDecision.WARN, "#dc6803", "#fef0c7"),
    (BudgetDecision.DEGRADE, "#c4320a", "#fddcab"),
    (BudgetDecision.BLOCK, BAD, "#fee4e2"),
)

# Escalation and quality per hour are pooled over a trailing window, and drawn only
# where the window holds enough answered requests to be read as a rate.
RATE_WINDOW_HOURS = 6
RATE_MIN_REQUESTS = 10

# A small template of our own: plotly's built-in ones are ~10 kB of JSON each and
# their validation dominated the page's time (deep copies on every figure).
_TEMPLATE = {
    "layout": {
        "paper_bgcolor": "#ffffff",
        "plot_bgcolor": "#ffffff",
        "font": {"color": "#1d2330"},
        "xaxis": {"gridcolor": "#eef0f3", "linecolor": "#e4e7ec", "zeroline": False},
        "yaxis": {"gridcolor": "#eef0f3", "linecolor": "#e4e7ec", "zeroline": False},
        "colorway": [ACCENT, WARN, GOOD, BAD, MUTED],
    }
}

# Date tick formats (d3): one short line per tick, the day under the hour.
HOUR_TICKS = "%H:%M\n%b %-d"
DAY_TICKS = "%b %-d"
MINUTE_TICKS = "%H:%M"


usd = nanos_to_float_usd


def label(moment: datetime, tz, minutes: bool = True) -> str:
    """A local-time label plotly.js reads as a date: 'YYYY-MM-DD HH:MM'."""
    return moment.astimezone(tz).strftime("%Y-%m-%d %H:%M" if minutes else "%Y-%m-%d")


@dataclass(frozen=True)
class Series:
    name: str
    x: list[str]
    y: list[float]


@dataclass(frozen=True)
class Band:
    """A prediction interval around a series."""

    x: list[str]
    low: list[float]
    high: list[float]
    name: str


@dataclass(frozen=True)
class Ratio:
    """Per-point counts of a rate: ``hits`` out of ``totals`` (escalated of answered)."""

    name: str
    x: list[str]
    hits: list[float]
    totals: list[float]


@dataclass
class Chart:
    """A figure, with what a narrow chart changes and any data the live view needs."""

    figure: go.Figure
    narrow: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        doc = json.loads(self.figure.to_json())
        return {**doc, "narrow": {"below": NARROW_PX, "layout": self.narrow}, **self.extra}


def figure(*traces) -> go.Figure:
    return go.Figure(data=list(traces), layout={"template": _TEMPLATE})


# --- numbers on axes -------------------------------------------------------------------


def nice_step(span: float, intervals: int = 4) -> float:
    """The smallest 1-2-5 step that covers ``span`` in ``intervals`` steps."""
    if span <= 0:
        return 1.0
    raw = span / intervals
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * magnitude >= raw * (1 - 1e-9):
            return float(f"{factor * magnitude:.12g}")
    return float(f"{10 * magnitude:.12g}")


def money_decimals(step: float) -> int:
    """Decimals a money tick step needs (at least cents): $0.005 needs 3, $0.0025 needs 4."""
    decimals = 2
    while decimals < 9 and abs(round(step, decimals) - step) > step * 1e-6:
        decimals += 1
    return decimals


def money_axis(max_usd: float) -> dict:
    """Dollar ticks with the decimals their step needs: "$0.005", never "$5m" (plotly's SI
    prefixes, read as millions). The decimals cover the finest step plotly may pick for
    the range, so two ticks never print alike; an empty chart shows $0.00 to $0.04."""
    if max_usd <= 0:
        decimals = 2
    elif max_usd >= 10:
        decimals = 0
    else:
        decimals = money_decimals(nice_step(max_usd, 8))
    return {
        "tickprefix": "$",
        "tickformat": f",.{decimals}f",
        "hoverformat": f",.{min(9, max(2, decimals + 2))}f",
        "nticks": 6,
        "rangemode": "tozero",
        "autorangeoptions": {"include": [0, 0.04] if max_usd <= 0 else [0]},
    }


def count_axis() -> dict:
    """Whole numbers only: a range that includes 0..4 keeps plotly's steps integral."""
    return {
        "tickformat": ",d",
        "rangemode": "tozero",
        "autorangeoptions": {"include": [0, 4]},
        "tickmode": "auto",
        "nticks": 5,
    }


def _max(*lists) -> float:
    return max((v for values in lists for v in values if v is not None), default=0.0)


# --- layout ------------------------------------------------------------------------------


def _layout(
    fig: go.Figure,
    *,
    title: str,
    short_title: str = "",
    dates: str | None = None,
    height: int = 300,
    legend: bool = True,
    hovermode: str = "x unified",
) -> dict:
    """The layout every chart shares; returns the narrow layout's changes.

    ``dates``: the tick format of a date x axis (None: not a date axis).
    ``short_title``: the title of a narrow chart (plotly titles do not wrap).
    """
    fig.update_layout(
        title={
            "text": title,
            "x": 0,
            "xanchor": "left",
            "xref": "container",
            "yref": "container",
            "pad": {"t": 10, "l": 2, "b": 6},
            "font": {"size": 14},
            "automargin": True,
        },
        margin={"l": 4, "r": 4, "t": 8, "b": 4, "pad": 2, "autoexpand": True},
        height=height,
        hovermode=hovermode,
        showlegend=legend,
        legend={
            "orientation": "h",
            "x": 0,
            "xanchor": "left",
            "xref": "container",
            "y": 0,
            "yanchor": "bottom",
            "yref": "container",
            "font": {"size": 11},
        },
        font={"family": "system-ui, sans-serif", "size": 12},
        uirevision="keep",  # live updates keep the user's zoom
    )
    fig.update_xaxes(automargin=True, tickangle=0, ticklabelstandoff=6)
    fig.update_yaxes(automargin=True)
    narrow: dict = {}
    if dates is not None:
        fig.update_xaxes(type="date", tickformat=dates, nticks=6)
        narrow["xaxis"] = {"nticks": 3}
    if short_title:
        narrow["title"] = {"text": short_title}
    return narrow


# --- figures -------------------------------------------------------------------------------


def gauge(
    *, name: str, spent_nanos: int, limit_nanos: int, thresholds: tuple[int, int, int], level: str
) -> Chart:
    """Spend against one budget: the thresholds as bands, the value in its level's colour.

    ``level`` is allow / warn / degrade / block (allow shows as "ok"). The live
    view moves the value and recolours it from ``states`` (the lower edge of
    each state's band, in dollars).
    """
    limit = usd(limit_nanos)
    spent = usd(spent_nanos)
    edges = [("ok", 0.0)] + [
        (state, limit * pct / 100)
        for state, pct in zip(
            (BudgetDecision.WARN, BudgetDecision.DEGRADE, BudgetDecision.BLOCK),
            thresholds,
            strict=True,
        )
    ]
    top = max(limit, spent, edges[-1][1]) or 1.0
    colours = {state: (value, band) for state, value, band in BUDGET_STATES}
    steps = [
        {"range": [low, high], "color": colours[state][1]}
        for (state, low), (_, high) in zip(edges, [*edges[1:], ("", top)], strict=True)
        if high > low
    ]
    current = "ok" if level == BudgetDecision.ALLOW else level
    ends = [("$0", 0.0), (money_text(limit_nanos), limit)]
    side = max(28, 10 + 7 * max(len(text) for text, _ in ends))  # room for the end labels
    fig = figure(
        go.Indicator(
            mode="gauge+number",
            value=spent,
            number={
                "prefix": "$",
                "valueformat": ",.6f" if 0 < spent < 0.01 else ",.2f",
                "font": {"size": 32},
            },
            gauge={
                "shape": "angular",
                "axis": {
                    "range": [0, top],
                    "tickmode": "array",
                    "tickvals": [value for _, value in ends],
                    "ticktext": [text for text, _ in ends],
                },
                "bar": {"color": colours[current][0], "thickness": 0.6},
                "bgcolor": "#ffffff",
                "borderwidth": 0,
                "steps": steps,
                "threshold": {"line": {"color": BAD, "width": 3}, "value": limit},
            },
            domain={"x": [0, 1], "y": [0, 1]},
        )
    )
    fig.update_layout(
        title={"text": name, "x": 0, "xref": "container", "pad": {"l": 2}, "font": {"size": 14}},
        margin={"l": side, "r": side, "t": 44, "b": 8},
        height=210,
        font={"family": "system-ui, sans-serif", "size": 12},
    )
    states = [{"state": state, "from": low, "colour": colours[state][0]} for state, low in edges]
    return Chart(fig, extra={"states": states, "state": current})


def spend_bars(
    *, title: str, spend: Series, baseline: Series | None = None, dates: str = HOUR_TICKS
) -> Chart:
    fig = figure(go.Bar(x=spend.x, y=spend.y, name=spend.name, marker_color=ACCENT))
    if baseline is not None:
        fig.add_trace(
            go.Scatter(
                x=baseline.x,
                y=baseline.y,
                name=baseline.name,
                mode="lines",
                line={"color": MUTED, "dash": "dot", "shape": "hv"},
            )
        )
    narrow = _layout(fig, title=title, dates=dates)
    fig.update_yaxes(**money_axis(_max(spend.y, baseline.y if baseline else [])))
    return Chart(fig, narrow)


def forecast(
    *, actual: Series, expected: Series, band: Band | None, limit_nanos: int | None
) -> Chart:
    """Cumulative spend this period, the forecast to its end and the budget line."""
    fig = figure()
    if band is not None and band.x:
        fig.add_trace(
            go.Scatter(
                x=band.x + band.x[::-1],
                y=band.high + band.low[::-1],
                fill="toself",
                fillcolor="rgba(47,111,237,0.15)",
                line={"width": 0},
                hoverinfo="skip",
                name=band.name,
            )
        )
    fig.add_trace(
        go.Scatter(x=actual.x, y=actual.y, name=actual.name, mode="lines+markers",
                   line={"color": ACCENT}, marker={"size": 5})
    )  # fmt: skip
    fig.add_trace(
        go.Scatter(x=expected.x, y=expected.y, name=expected.name, mode="lines",
                   line={"color": ACCENT, "dash": "dash"})
    )  # fmt: skip
    top = _max(actual.y, expected.y, band.high if band else [])
    if limit_nanos:
        top = max(top, usd(limit_nanos))
        fig.add_hline(
            y=usd(limit_nanos),
            line={"color": BAD, "dash": "dot"},
            annotation_text="budget",
            annotation_position="bottom right",
            annotation_font={"color": BAD, "size": 11},
        )
    narrow = _layout(
        fig,
        title="Spend this period and forecast (cumulative)",
        short_title="Spend and forecast (cumulative)",
        dates=DAY_TICKS,
    )
    fig.update_yaxes(**money_axis(top))
    return Chart(fig, narrow)


def pooled(ratio: Ratio, *, window: int = RATE_WINDOW_HOURS, minimum: int = RATE_MIN_REQUESTS):
    """Percent of ``hits`` over ``totals`` pooled over each point's trailing ``window``
    points; None where the window holds fewer than ``minimum`` (too few to be a rate)."""
    out: list[float | None] = []
    for i in range(len(ratio.x)):
        lo = max(0, i - window + 1)
        total = sum(ratio.totals[lo : i + 1])
        hits = sum(ratio.hits[lo : i + 1])
        out.append(100.0 * hits / total if total >= minimum and total > 0 else None)
    return out


def rate(
    *, title: str, short_title: str = "", rate: Ratio, volume: Series, quality: Ratio | None = None
) -> Chart:
    """A percentage over time (escalation; the check's estimated quality), pooled over a
    trailing window so low-volume hours are not read as swings, with request volume
    behind it on its own axis."""
    fig = figure()
    fig.add_trace(
        go.Bar(x=volume.x, y=volume.y, name=volume.name, marker_color=VOLUME, yaxis="y2",
               hovertemplate="%{y:,d}")
    )  # fmt: skip
    fig.add_trace(
        go.Scatter(x=rate.x, y=pooled(rate), name=rate.name, mode="lines",
                   line={"color": WARN, "width": 2}, connectgaps=False,
                   hovertemplate="%{y:.1f}%")
    )  # fmt: skip
    if quality is not None:
        fig.add_trace(
            go.Scatter(x=quality.x, y=pooled(quality), name=quality.name, mode="lines",
                       line={"color": GOOD, "width": 2}, connectgaps=False,
                       hovertemplate="%{y:.1f}%")
        )  # fmt: skip
    narrow = _layout(fig, title=title, short_title=short_title, dates=HOUR_TICKS)
    # Three entries: two to a row (plotly otherwise stacks them one per row).
    narrow["legend"] = {"entrywidth": 0.5, "entrywidthmode": "fraction"}
    fig.update_layout(
        yaxis={"ticksuffix": "%", "range": [0, 100], "dtick": 25, "fixedrange": True},
        yaxis2={
            "overlaying": "y",
            "side": "right",
            "showgrid": False,
            "automargin": True,
            **count_axis(),
        },
    )
    return Chart(fig, narrow)


def counts(*, title: str, series: Series, dates: str = MINUTE_TICKS) -> Chart:
    fig = figure(
        go.Bar(x=series.x, y=series.y, name=series.name, marker_color=GOOD,
               hovertemplate="%{y:,d}")
    )  # fmt: skip
    narrow = _layout(fig, title=title, dates=dates, legend=False)
    fig.update_yaxes(**count_axis())
    return Chart(fig, narrow)


def short(text: str, limit: int = LABEL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bars_by(*, title: str, labels: list[str], values: list[float], money: bool) -> Chart:
    """Horizontal bars per category: labels shortened to fit, the full name on hover."""
    fig = figure(
        go.Bar(
            x=values,
            y=labels,
            orientation="h",
            marker_color=ACCENT,
            customdata=labels,
            hovertemplate="%{customdata}: %{x:" + ("$,.6f" if money else ",d") + "}<extra></extra>",
        )
    )
    narrow = _layout(fig, title=title, legend=False, hovermode="closest")
    fig.update_yaxes(
        autorange="reversed",
        type="category",
        tickmode="array",
        tickvals=labels,
        ticktext=[short(name) for name in labels],
    )
    fig.update_xaxes(**(money_axis(_max(values)) if money else count_axis()))
    fig.update_layout(height=max(200, 90 + 30 * len(labels)))
    narrow["xaxis"] = {"nticks": 3}
    return Chart(fig, narrow)


def to_json(figures: dict[str, Chart]) -> str:
    """Figures as one JSON document, safe to embed in a <script type="application/json">."""
    doc = json.dumps({name: chart.to_dict() for name, chart in figures.items()})
    return doc.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
