"""[speed] The series rules of the criteria language agree with their brute-force definitions.

Persistence runs (``persistent``), trends (``trend_holds``) and the "for more than N h" windows
(``sustained_run``, ``current_run``) are single passes over a time-ordered series (issue 17).
``tests/sweep_oracles.py`` keeps versions that rescan from the start for every value (every pair,
for the trend); random series — same-time values, gaps longer and shorter than the allowed gap,
values closer than the minimum interval, censored values that cannot be decided, an evaluation
time before the last value — must give the same runs.
"""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.base.facts import ObservationFact
from cds_service.clinical.criteria import _fact_test, current_run
from cds_service.clinical.derived import persistent, sustained_run, trend_holds

from . import sweep_oracles

T = datetime(2025, 3, 1, 12, 0, tzinfo=UTC).timestamp()
STEP = 900.0  # a 15-minute grid: values often share a time or sit exactly one interval apart
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def lactate_series(draw: st.DrawFn) -> list[ObservationFact]:
    count = draw(st.integers(0, 25))
    offsets = sorted(draw(st.lists(st.integers(0, 60), min_size=count, max_size=count)))
    facts = []
    for index, offset in enumerate(offsets):
        comparator = draw(st.sampled_from(["", "", "", "", ">", "<"]))
        value: float | str = draw(st.sampled_from([1.0, 1.8, 2.0, 2.1, 3.5, 4.0, 6.2]))
        if draw(st.integers(0, 15)) == 0:
            value = "not a number"
        facts.append(
            ObservationFact(
                "lactate", T + offset * STEP, value, "mmol/L", f"Observation/{index}", "c", "", comparator
            )
        )
    return facts


RULES = st.fixed_dictionaries(
    {"op": st.sampled_from([">", ">=", "<", "<="]), "threshold": st.sampled_from([2, 2.0, 3.5])}
)


@PROPERTY
@given(
    series=lactate_series(),
    rule=RULES,
    min_interval=st.sampled_from([0.0, STEP, 2 * STEP, 3.3 * STEP]),
    count=st.integers(1, 4),
    current=st.booleans(),
)
def test_persistence_runs_agree_with_the_brute_force_definition(
    series: list[ObservationFact], rule: dict, min_interval: float, count: int, current: bool
) -> None:
    test = _fact_test(rule)
    assert persistent(series, test, min_interval, count, current) == sweep_oracles.persistent(
        series, test, min_interval, count, current
    )


@PROPERTY
@given(series=lactate_series(), direction=st.sampled_from(["non_decreasing", "non_increasing"]))
def test_trends_agree_with_the_brute_force_definition(series: list[ObservationFact], direction: str) -> None:
    numeric = [f for f in series if isinstance(f.value, float)]
    assert trend_holds(numeric, direction) == sweep_oracles.trend_holds(numeric, direction)


@PROPERTY
@given(
    series=lactate_series(),
    rule=RULES,
    max_gap=st.sampled_from([0.0, STEP, 2 * STEP, 4.5 * STEP]),
    at_offset=st.sampled_from([60 * STEP, 30 * STEP, 30.5 * STEP, 0.0, 70 * STEP]),
)
def test_for_more_than_windows_agree_with_the_brute_force_definition(
    series: list[ObservationFact], rule: dict, max_gap: float, at_offset: float
) -> None:
    test = _fact_test(rule)
    at = T + at_offset
    assert sustained_run(series, test, at, max_gap) == sweep_oracles.sustained_run(series, test, at, max_gap)
    upto = [f for f in series if f.time <= at]
    assert current_run(upto, test, at, max_gap) == sweep_oracles.current_run(upto, test, at, max_gap)


def test_the_series_oracles_on_a_worked_example() -> None:
    """Hand-worked: lactate 3, 4, (1.8), 5, 6 with a 2 h gap before the last; threshold > 2."""
    values = [3.0, 4.0, 1.8, 5.0, 6.0]
    hours = [0, 1, 2, 3, 5]
    series = [
        ObservationFact("lactate", T + h * 3600, v, "mmol/L", f"Observation/{i}", "c")
        for i, (h, v) in enumerate(zip(hours, values, strict=True))
    ]
    test = _fact_test({"op": ">", "threshold": 2})
    for rule in (persistent, sweep_oracles.persistent):
        assert rule(series, test, 3600, 2, True) == (series[3], series[4])
        assert rule(series, test, 3 * 3600, 2, True) is None  # 5 and 6 are 2 h apart, not 3
    for run in (sustained_run, sweep_oracles.sustained_run):
        assert run(series, test, T + 5 * 3600, 3600) == (3600.0, (series[0], series[1]))
        assert run(series, test, T + 5 * 3600, 2 * 3600) == (7200.0, (series[3], series[4]))
    for now in (current_run, sweep_oracles.current_run):
        assert now(series, test, T + 5 * 3600, 2 * 3600) == (series[3], series[4])
        assert now(series, test, T + 8 * 3600, 2 * 3600) is None  # the last value is 3 h old
    for trend in (trend_holds, sweep_oracles.trend_holds):
        assert trend(series[3:], "non_decreasing") and not trend(series, "non_decreasing")
