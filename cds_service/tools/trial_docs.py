"""docs/trials.md, generated from the trial files so that it cannot drift from what is screened.

``render_trial_table(screener)`` gives one Markdown section per trial: registry facts, the
enrollment window, and every criterion — inclusion or exclusion, decided from data or by the
clinician, the rule in words, and the source sentence it encodes. ``render_document`` wraps it with
the evaluation rules, the criteria language, the scenario patients and the scenario file format.

Regenerate with ``python -m cds_service.tools.trial_docs > docs/trials.md`` (a test checks it is current).
"""

from __future__ import annotations

import sys

from ..knowledge.criteria_language import RULE_KINDS, describe_rule
from ..knowledge.trials import Criterion, Trial
from ..screening import Screener

DECIDED_BY = {
    "data": "computed from data",
    "clinician": "clinician (checklist)",
    "data, else clinician": "computed when charted, else clinician",
}


RESULTS = (
    ("`eligible`", "yes", "every computable criterion met, no exclusion met, only checklist items left"),
    (
        "`possibly_eligible`",
        "yes",
        "nothing rules the patient out but some criteria lack data: the card says what",
    ),
    (
        "`upcoming`",
        "yes (info)",
        "nothing rules the patient out, but the enrollment window has not opened yet",
    ),
    ("`window_closed`", "no", "nothing else rules the patient out, but the window has closed"),
    ("`not_eligible`", "no", "an inclusion criterion is not met, or an exclusion is met"),
)
RULES = (
    (
        "`value`",
        "the latest / lowest / highest / any / every value of an input against a threshold, optionally "
        "`within` a look-back; `if_missing: not_met` for an optional alternative measure",
    ),
    (
        "`persistent`",
        "`count` consecutive values beyond the threshold at least `min_interval` apart, optional `trend`",
    ),
    (
        "`sustained`",
        "beyond the threshold for more than `for_more_than`; a gap over `max_gap` breaks the run; "
        "`current: true` = still going on now. Going on but not yet long enough: its clock is running. "
        "A computed step series (VIS, from infusion records) holds its last value until now",
    ),
    ("`established`", "a derived input is known (septic-shock onset)"),
    ("`time_since`", "time since a derived time (`min`, `max`)"),
    (
        "`condition`",
        "a Condition of one of the value sets is charted; `if_absent` (`not_met` / `confirm` / "
        "`unknown`), `if_present` (`met` / `confirm`)",
    ),
    ("`all_of`, `any_of`, `not`", "Kleene three-valued logic; `confirm` ranks between `unknown` and `met`"),
)


def _table(head: tuple[str, ...], rows: tuple[tuple[str, ...], ...]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g} h"


def _labels(screener: Screener) -> dict[str, str]:
    labels = {name: item.label for name, item in screener.knowledge.inputs.items()}
    labels.update(
        {
            "vis": "VIS",
            "age_years": "age",
            "septic_shock_onset": "septic-shock onset",
            "sex": "sex",
            "norepinephrine_start": "norepinephrine start",
        }
    )
    return labels


def _criterion_row(criterion: Criterion, labels: dict[str, str]) -> str:
    how = describe_rule(criterion.rule, labels) if criterion.rule else ""
    if criterion.closes_window:
        how += " — *the enrollment clock: once met, the window has closed*"
    if criterion.confirm:
        how = f"{how}; checklist: “{criterion.confirm}”" if how else f"checklist: “{criterion.confirm}”"
    if criterion.note:
        how += f" ({criterion.note})"
    return (
        f"| {_cell(criterion.text)} | {criterion.kind} | {DECIDED_BY[criterion.decided_by]} | "
        f"{_cell(how)} | “{_cell(criterion.source)}” |"
    )


def render_trial(trial: Trial, labels: dict[str, str]) -> str:
    """One trial's section."""
    lines = [
        f"### {trial.short_name} — {trial.id}",
        "",
        f"**{trial.title}** — {trial.sponsor}.",
        "",
        f"- Registry: [{trial.id}]({trial.registry_url}), status **{trial.registry_status}** "
        f"(checked {trial.registry_checked}){'. ' + trial.registry_note if trial.registry_note else ''}",
    ]
    lines += [f"- [{label}]({url})" for label, url in trial.links]
    anchor = labels.get(trial.window_anchor, trial.window_anchor)
    lines += [
        f"- Enrollment window: from {_hours(trial.window_opens)} to {_hours(trial.window_closes)} after "
        f"the {anchor} — “{_cell(trial.window_source)}”",
        f"- Trial file: `trials/{trial.path.rsplit('/', 1)[-1]}`",
        "",
        "| criterion | kind | decided by | how | source |",
        "|---|---|---|---|---|",
    ]
    lines += [_criterion_row(c, labels) for c in trial.criteria]
    computed = sum(1 for c in trial.criteria if c.decided_by != "clinician")
    lines += [
        "",
        f"{computed} of {len(trial.criteria)} criteria are computed from the chart (some hand over to the "
        f"clinician when nothing is charted); {len(trial.criteria) - computed} are checklist items for the "
        "clinician.",
        "",
    ]
    return "\n".join(lines)


def render_trial_table(screener: Screener) -> str:
    """Markdown, one section per screened trial: which criteria come from data, which from the clinician."""
    labels = _labels(screener)
    return "\n".join(render_trial(trial, labels) for trial in screener.trials)


_INTRO = """# Trials screened

<!-- Generated by `python -m cds_service.tools.trial_docs > docs/trials.md` from trials/*.yaml and
cds_service/tools/scenarios.py: do not edit by hand (tests/test_trials.py checks it is current). -->

Each trial is one data file under `trials/` (registry facts, enrollment window, every inclusion
and exclusion criterion quoting the sentence it encodes). A site chooses which trials it screens
with `screening.trials` in its configuration (NCT ids; empty = every file in `trials/`). A card for
a trial that is not `recruiting` says so in its summary ("enrollment closed per registry", "registry
status unknown"), asks the clinician to check with the research team, and its referral is not
recommended; `screening.show_not_recruiting: false` hides those cards. Of the three seed trials only
ECMO-RESCUE is still recruiting.

## How a trial is evaluated

Every criterion is **met**, **not met**, **unknown** (data missing — the card says what to measure)
or **to confirm** (a clinician must look: consent, "adequate fluid resuscitation", life expectancy …,
or a code that suggests but cannot prove an exclusion). The trial's result:

{results}

**The window.** It is given relative to the septic-shock onset (the start of the first vasopressor
with an infection diagnosis and a lactate > 2 mmol/L around it — clinical-knowledge.md §2), or to
another time the registry names (I-MICRO: the norepinephrine start; the card shows both). Criteria
with a running clock refine it: an inclusion criterion that is not met *yet* (a run still going on
but not long enough, such as ECMO-RESCUE's "lasts more than 5 hours") opens the window when it will
be met, and an exclusion that is the enrollment clock (`closes_window`, ECMO-RESCUE's "inclusion
criteria met for more than 12 h") closes it when it runs out.

**Decision: an `upcoming` card before the window opens.** A silent screen would surface a patient
only once the window is already open and its clock running; the research team needs those hours to
reach the family, prepare consent and the randomisation. The upcoming card is an `info` card that says
when the window opens; the clinician can dismiss it like any other card. MSC-Neutropenia's window
opens at onset, so it is never upcoming.

"""

_LANGUAGE = """## The criteria language

A criterion has either a `rule` (computed from FHIR data) or a `confirm` text (a checklist item for
the clinician); a rule that can hand over to the clinician may carry both. The language knows
nothing about any trial; a new trial is a new file, validated at start-up and by
`cds-service check` (errors name the file, the line and the key). Rule kinds:
{kinds}.

{rules}

"""

_SCENARIO_FILES = """## Scenario files

A scenario file is one clinical story and the result each trial must give for it. The shipped ones
are in `examples/scenarios/` (`cds-service scenarios write DIR [--at TIME]` writes them); a site writes
its own cases in the same format, checks them in memory with `cds-service scenarios check DIR` (each
at its `evaluatedAt`), runs them against a deployment with the integration harness, or loads them
into a FHIR server with `cds-service scenarios load --fhir URL --files DIR`.

```json
{{
  "name": "msc-eligible",
  "story": "45-year-old man … MSC: eligible …",
  "evaluatedAt": "2026-11-21T12:00:00Z",
  "expected": {{"NCT05184296": "not_eligible", "NCT03788837": "upcoming", "NCT01849237": "eligible"}},
  "expectedCriteria": {{"NCT01849237": {{"severe_neutropenia": "met", "informed_consent": "to_confirm"}}}},
  "bundle": {{"resourceType": "Bundle", "type": "transaction", "entry": [
    {{"fullUrl": "Patient/cdsh-msc-eligible",
     "resource": {{"resourceType": "Patient", "id": "cdsh-msc-eligible", "birthDate": "1980-07-15"}},
     "request": {{"method": "PUT", "url": "Patient/cdsh-msc-eligible"}}}}
  ]}}
}}
```

- `name`, `story`: free text; the story should say why each trial gives its result.
- `evaluatedAt`: the time the story is written for, ISO 8601 with an offset. The windows are relative
  to septic-shock onset, so the file is evaluated at this time (`cds-service evaluate --at`), or
  replayed at another time with every event time shifted by the difference
  (`cds_service.tools.scenarios.shift_bundle_times`: effective*, period start/end, issued, onset*,
  recordedDate, authoredOn …, keeping each value's offset style; birthDate is never shifted).
- `expected`: NCT id → one of {statuses}. A card is expected for the first three, and its
  machine-readable `extension.screening.status` must say the same (README, "The screening
  extension"); for the last two no card is expected (in memory, the evaluation tells them apart).
- `expectedCriteria` (optional): NCT id → criterion id → `met`, `not_met`, `unknown` or `to_confirm`,
  checked against the card's `extension.screening.criteria` — for trials expected to give a card.
  For an exclusion, `met` means the exclusion applies.
- `bundle`: a FHIR R4 transaction Bundle of PUTs holding exactly one Patient and its Observations,
  MedicationAdministrations and Conditions. Use patient ids starting with `cdsh-` so that test data can
  never collide with a real patient.

Read one with `cds_service.tools.scenarios.load_scenario_file(path)`, which checks the format and names the
file and key of any problem.
"""


def render_scenarios() -> str:
    """The shipped scenario patients and their expected results (generated from scenarios.py)."""
    from .scenarios import EXAMPLES_AT, all_scenarios, expectation_table

    scenarios = all_scenarios(EXAMPLES_AT)
    stories = "\n".join(f"- **{s.name}**: {s.story}" for s in scenarios)
    return (
        "## Scenario patients\n\n"
        f"{len(scenarios)} clinical stories, each with the expected result for every trial, run by the test "
        "suite in memory, through the HTTP hook with prefetch, and against a real FHIR server without "
        "prefetch (files in `examples/scenarios/`).\n\n"
        + expectation_table([(s.name, s.expected) for s in scenarios])
        + "\n\n"
        + stories
        + "\n\n"
    )


def render_document(screener: Screener) -> str:
    """The whole of docs/trials.md."""
    from .scenarios import STATUSES

    kinds = ", ".join(f"`{k}`" for k in RULE_KINDS)
    return (
        _INTRO.format(results=_table(("result", "card", "when"), RESULTS))
        + "## The trials\n\n"
        + render_trial_table(screener)
        + "\n"
        + _LANGUAGE.format(kinds=kinds, rules=_table(("rule", "meaning"), RULES))
        + render_scenarios()
        + _SCENARIO_FILES.format(statuses=", ".join(f"`{s}`" for s in STATUSES))
    )


README_BEGIN = "<!-- trials:begin (generated by `python -m cds_service.tools.trial_docs --readme`) -->"
README_END = "<!-- trials:end -->"


def with_readme_section(readme: str, screener: Screener) -> str:
    """The README with its generated per-trial criteria section replaced by the current one."""
    head, _, rest = readme.partition(README_BEGIN)
    _, _, tail = rest.partition(README_END)
    table = render_trial_table(screener)
    return f"{head}{README_BEGIN}\n\n{table.strip()}\n\n{README_END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Print docs/trials.md, or with --readme rewrite the README's generated section in place."""
    from ..base.config import PROJECT_ROOT, load_settings

    args = sys.argv[1:] if argv is None else argv
    screener = Screener(load_settings(environ={}))
    if "--readme" in args:
        readme = PROJECT_ROOT / "README.md"
        readme.write_text(with_readme_section(readme.read_text(encoding="utf-8"), screener), encoding="utf-8")
        return 0
    sys.stdout.write(render_document(screener))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
