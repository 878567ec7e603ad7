"""The dashboard's one presentation module: typed series in, Plotly figures out.

Views hand over plain series (labels in the tenant's local time, money in
nano-dollars); this module owns every visual decision (units, colours, axes,
layout) and returns figures as JSON for plotly.js, which is served from our own
static files. Live updates in the browser extend the same traces by name.
"""

import json
from dataclasses import dataclass
from datetime import datetime

import plotly.graph_objects as go

NANOS_PER_USD = 1_000_000_000
ACCENT, MUTED, GOOD, WARN, BAD = "#2f6fed", "#98a2b3", "#12805c", "#b54708", "#b42318"


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


def figure(*traces) -> go.Figure:
    return go.Figure(data=list(traces), layout={"template": _TEMPLATE})


def usd(nanos: int | float) -> float:
    return nanos / NANOS_PER_USD


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


def _layout(fig: go.Figure, *, title: str, money: bool = False, pct: bool = False) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0, "font": {"size": 14}},
        margin={"l": 48, "r": 12, "t": 40, "b": 36},
        height=300,
        hovermode="x unified",
        legend={"orientation": "h", "y": -0.18},
        font={"family": "system-ui, sans-serif", "size": 12},
        uirevision="keep",  # live updates keep the user's zoom
    )
    if money:
        fig.update_yaxes(tickprefix="$", rangemode="tozero")
    if pct:
        fig.update_yaxes(ticksuffix="%", range=[0, 100])
    return fig


def gauge(*, name: str, spent_nanos: int, limit_nanos: int, thresholds: dict) -> go.Figure:
    """Spend against one budget, with the warn/degrade/block thresholds as bands."""
    limit = usd(limit_nanos)
    colours = {"warn": "#fffaeb", "degrade": "#fef0c7", "block": "#fee4e2"}
    levels = sorted((pct, colours[k]) for k, pct in thresholds.items() if pct and k in colours)
    steps = [
        {"range": [limit * pct / 100, limit * (nxt[0] if nxt else 100) / 100], "color": colour}
        for (pct, colour), nxt in zip(levels, [*levels[1:], None], strict=False)
    ]
    fig = figure(
        go.Indicator(
            mode="gauge+number",
            value=usd(spent_nanos),
            number={"prefix": "$", "valueformat": ",.2f"},
            gauge={
                "axis": {"range": [0, max(limit, usd(spent_nanos))], "tickprefix": "$"},
                "bar": {"color": BAD if spent_nanos >= limit_nanos else ACCENT},
                "steps": steps,
                "threshold": {"line": {"color": BAD, "width": 3}, "value": limit},
            },
        )
    )
    fig.update_layout(
        title={"text": name, "x": 0, "font": {"size": 14}},
        margin={"l": 24, "r": 24, "t": 40, "b": 8},
        height=200,
    )
    return fig


def spend_bars(*, title: str, spend: Series, baseline: Series | None = None) -> go.Figure:
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
    return _layout(fig, title=title, money=True)


def forecast(
    *, actual: Series, expected: Series, band: Band | None, limit_nanos: int | None
) -> go.Figure:
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
                   line={"color": ACCENT})
    )  # fmt: skip
    fig.add_trace(
        go.Scatter(x=expected.x, y=expected.y, name=expected.name, mode="lines",
                   line={"color": ACCENT, "dash": "dash"})
    )  # fmt: skip
    if limit_nanos:
        fig.add_hline(
            y=usd(limit_nanos),
            line={"color": BAD, "dash": "dot"},
            annotation_text="budget",
            annotation_position="top left",
        )
    return _layout(fig, title="Spend this period and forecast (cumulative)", money=True)


def rate(
    *, title: str, series: Series, volume: Series | None = None, quality: Series | None = None
) -> go.Figure:
    """A percentage over time (escalation, acceptance), with request volume behind it."""
    fig = figure()
    if volume is not None:
        fig.add_trace(
            go.Bar(x=volume.x, y=volume.y, name=volume.name, marker_color="#e4e7ec", yaxis="y2")
        )
    fig.add_trace(
        go.Scatter(x=series.x, y=series.y, name=series.name, mode="lines+markers",
                   line={"color": WARN}, connectgaps=False)
    )  # fmt: skip
    if quality is not None:
        fig.add_trace(
            go.Scatter(
                x=quality.x,
                y=quality.y,
                name=quality.name,
                mode="lines",
                line={"color": GOOD, "width": 2},
                connectgaps=False,
            )
        )
    _layout(fig, title=title, pct=True)
    fig.update_layout(
        margin={"l": 48, "r": 44, "t": 40, "b": 36},
        yaxis2={
            "overlaying": "y",
            "side": "right",
            "showgrid": False,
            "rangemode": "tozero",
            "tickformat": ",.0f",
        },
    )
    return fig


def counts(*, title: str, series: Series) -> go.Figure:
    fig = figure(go.Bar(x=series.x, y=series.y, name=series.name, marker_color=GOOD))
    _layout(fig, title=title)
    fig.update_yaxes(rangemode="tozero")
    return fig


def bars_by(*, title: str, labels: list[str], values: list[float], money: bool) -> go.Figure:
    fig = figure(go.Bar(x=values, y=labels, orientation="h", marker_color=ACCENT))
    _layout(fig, title=title, money=False)
    if money:
        fig.update_xaxes(tickprefix="$")
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=max(200, 40 + 28 * len(labels)), hovermode="closest")
    return fig


def to_json(figures: dict[str, go.Figure]) -> str:
    """Figures as one JSON document, safe to embed in a <script type="application/json">."""
    doc = "{" + ",".join(f"{json.dumps(k)}:{f.to_json()}" for k, f in figures.items()) + "}"
    return doc.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
