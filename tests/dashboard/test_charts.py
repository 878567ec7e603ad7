"""The presentation module: money and count axes, pooled rates, gauges, labels that fit."""

import json

import pytest

from dashboard import charts
from dashboard.charts import Ratio, Series


def ticks(max_usd: float, step: float) -> list[str]:
    decimals = int(charts.money_axis(max_usd)["tickformat"].removeprefix(",.").removesuffix("f"))
    n = int(max_usd / step) + 2
    return [f"${i * step:,.{decimals}f}" for i in range(n)]


@pytest.mark.parametrize("max_usd", [0.000022, 0.0004, 0.0031, 0.022, 0.13, 1.76, 2.1, 15, 4200])
@pytest.mark.parametrize("intervals", [3, 4, 5, 6, 8])
def test_money_ticks_never_print_alike_whatever_step_plotly_picks(max_usd, intervals):
    labels = ticks(max_usd, charts.nice_step(max_usd, intervals))

    assert len(set(labels)) == len(labels), labels


@pytest.mark.parametrize("max_usd", [0, 0.000022, 0.5, 2.1, 150])
def test_money_axes_are_dollars_with_decimals_never_si_prefixes(max_usd):
    axis = charts.money_axis(max_usd)

    assert axis["tickprefix"] == "$" and axis["tickformat"].endswith("f")
    assert axis["rangemode"] == "tozero"


def test_count_axes_are_whole_numbers_from_zero():
    axis = charts.count_axis()

    assert axis["tickformat"] == ",d" and axis["autorangeoptions"]["include"] == [0, 4]


def test_a_rate_is_pooled_over_the_trailing_window_and_blank_when_too_few():
    ratio = Ratio("Escalated", [str(h) for h in range(8)], [1, 0, 3, 0, 0, 0, 0, 5],
                  [1, 2, 10, 2, 0, 0, 0, 5])  # fmt: skip

    rates = charts.pooled(ratio, window=3, minimum=10)

    # hour 0: 1 of 1 is not a rate; hour 2: 4 of 13 pooled; hour 6: nothing in 3 hours.
    assert rates[0] is None and rates[1] is None
    assert rates[2] == pytest.approx(100 * 4 / 13)
    assert rates[3] == pytest.approx(100 * 3 / 14) and rates[4] == pytest.approx(100 * 3 / 12)
    assert rates[5] is None and rates[6] is None and rates[7] is None


def test_the_escalation_chart_keeps_its_request_axis_readable():
    hours = [f"2026-11-30 {h:02d}:00" for h in range(4)]
    chart = charts.rate(
        title="Escalation",
        rate=Ratio("Escalated", hours, [0, 1, 0, 0], [1, 1, 0, 1]),
        volume=Series("Requests", hours, [1, 1, 0, 1]),
    )
    layout = chart.to_dict()["layout"]

    assert layout["yaxis2"]["tickformat"] == ",d"
    assert layout["yaxis2"]["tickmode"] == "auto"  # not synced to the percent axis
    assert layout["yaxis2"]["autorangeoptions"]["include"] == [0, 4]
    assert layout["yaxis"]["dtick"] == 25


@pytest.mark.parametrize(
    ("spent", "level", "colour"),
    [(10, "allow", "#12805c"), (85, "warn", "#dc6803"), (95, "degrade", "#c4320a"),
     (120, "block", "#b42318")],
)  # fmt: skip
def test_the_gauge_colours_its_value_by_budget_state(spent, level, colour):
    chart = charts.gauge(
        name="Month budget",
        spent_nanos=spent * 10**7,
        limit_nanos=10**9,
        thresholds=(80, 90, 100),
        level=level,
    ).to_dict()

    indicator = chart["data"][0]
    assert indicator["gauge"]["bar"]["color"] == colour
    assert chart["state"] == ("ok" if level == "allow" else level)
    assert [(s["state"], s["from"]) for s in chart["states"]] == [
        ("ok", 0.0),
        ("warn", 0.8),
        ("degrade", 0.9),
        ("block", 1.0),
    ]
    bands = [step["range"] for step in indicator["gauge"]["steps"]]
    assert bands[:3] == [[0.0, 0.8], [0.8, 0.9], [0.9, 1.0]]
    assert indicator["gauge"]["axis"]["ticktext"] == ["$0", "$1.00"]


def test_long_category_labels_are_shortened_with_the_full_name_on_hover():
    names = ["cascade/a-very-long-profile-name-one", "cascade/a-very-long-profile-name-two"]
    chart = charts.bars_by(title="Spend", labels=names, values=[1.0, 2.0], money=True).to_dict()

    yaxis = chart["layout"]["yaxis"]
    assert yaxis["tickvals"] == names and yaxis["automargin"] is True
    assert all(len(text) <= charts.LABEL_CHARS for text in yaxis["ticktext"])
    assert chart["data"][0]["customdata"] == names


def test_date_axes_never_rotate_and_thin_out_when_narrow():
    hours = [f"2026-11-30 {h:02d}:00" for h in range(24)]
    chart = charts.spend_bars(title="Spend per hour", spend=Series("Paid", hours, [0.01] * 24))
    doc = chart.to_dict()

    assert doc["layout"]["xaxis"]["tickangle"] == 0
    assert doc["layout"]["xaxis"]["automargin"] is True
    assert doc["narrow"] == {"below": charts.NARROW_PX, "layout": {"xaxis": {"nticks": 3}}}


def test_figures_embed_safely_in_a_script_element():
    chart = charts.counts(title="</script><b>", series=Series("Requests", ["x"], [1]))

    doc = charts.to_json({"rpm": chart})

    assert "<" not in doc and ">" not in doc
    assert json.loads(doc)["rpm"]["layout"]["title"]["text"] == "</script><b>"
