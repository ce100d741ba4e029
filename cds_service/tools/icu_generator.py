"""A dense ICU patient for the benchmark: monitor vitals every few minutes, labs, a full drug chart.

Built on :class:`~cds_service.tools.scenario_builder.PatientBuilder`, deterministic for a given seed.
The clinical story (so the benchmark exercises the whole pipeline, cards included): a 58-year-old
man with acute myeloid leukaemia on chemotherapy, neutropenic, admitted to the ICU with pneumonia
and sepsis ``span_hours`` ago; septic shock ``onset_hours`` ago (norepinephrine started with a
lactate of 4.6 mmol/L, titrated every 15 min, vasopressin added later). With the shipped trials he
is a candidate for NCT01849237 (septic shock ≤ 10 h, ANC ≤ 1 × 10⁹/L).

Volume: exactly ``n_observations`` Observations — a monitor "tick" of six vitals (MAP, heart rate,
a blood-pressure panel with systolic and diastolic components, SpO2, respiratory rate,
temperature) repeated as often as needed to reach the count over the stay (every ~24 min at
1 000, ~4.5 min at 5 000, ~1 min at 20 000), labs every 4 h (lactate, ANC, leukocytes, platelets,
creatinine, bilirubin) and one admission weight. SpO2, respiratory rate, temperature, creatinine and
bilirubin are codes the mappings do not use: real charts are full of those. ``administrations``
MedicationAdministrations (300 by default): the vasoactive infusions plus antibiotics, sedation,
analgesia, insulin, heparin and fluids (codes the mappings do not know). A handful of Conditions.

``single_drug=True`` charts the ``administrations`` as one drug instead: norepinephrine titrated
from the onset until now, the records evenly spaced (30 records: every 16 min; 1 000: every 29 s),
each record a period ending at the next one or a rate charted at a single moment (every third
record, as flowsheet-driven EHRs send titrations), the last one still running. The rate follows
the time since the onset, not the record count, so 30, 300 and 1 000 records tell the same clinical
story (same onset, same VIS curve, same cards): only the number of records differs, which is what
the benchmark's "administrations" rows measure (issue 17).
"""

from __future__ import annotations

import math
import random
from datetime import datetime
from typing import Any

from .scenario_builder import ICD10CM, SNOMED, PatientBuilder

#: Vitals charted at every monitor tick: (code, display, unit, baseline, noise, category).
_VITALS: tuple[tuple[str, str, str, float, float], ...] = (
    ("8478-0", "Mean blood pressure", "mm[Hg]", 72.0, 4.0),
    ("8867-4", "Heart rate", "/min", 112.0, 6.0),
    ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%", 94.0, 1.5),
    ("9279-1", "Respiratory rate", "/min", 24.0, 2.0),
    ("8310-5", "Body temperature", "Cel", 38.4, 0.3),
)
#: Per tick: the vitals above plus one blood-pressure panel.
TICK_SIZE = len(_VITALS) + 1
#: Labs drawn every ``LAB_EVERY_HOURS``: (code, display, unit, value before shock, value after onset).
_LABS: tuple[tuple[str, str, str, float, float], ...] = (
    ("2524-7", "Lactate [Moles/volume] in Serum or Plasma", "mmol/L", 1.6, 4.6),
    ("751-8", "Neutrophils [#/volume] in Blood by Automated count", "10*3/uL", 0.6, 0.4),
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 1.4, 1.1),
    ("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", 88.0, 61.0),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 1.1, 2.3),
    ("1975-2", "Bilirubin.total [Mass/volume] in Serum or Plasma", "mg/dL", 0.9, 1.8),
)
LAB_EVERY_HOURS = 4.0

#: Non-vasoactive drugs of an ICU drug chart: (RxNorm code, display, rate or dose, unit, hours between).
_OTHER_DRUGS: tuple[tuple[str, str, float, str, float], ...] = (
    ("1659149", "piperacillin 4000 MG / tazobactam 500 MG Injection", 4.5, "g", 6.0),
    ("1807513", "vancomycin 1000 MG Injection", 1.0, "g", 12.0),
    ("8782", "propofol", 30.0, "ug/kg/min", 1.0),
    ("4337", "fentanyl", 50.0, "ug/h", 1.0),
    ("5856", "insulin regular, human", 2.0, "[IU]/h", 1.0),
    ("5224", "heparin", 800.0, "[IU]/h", 2.0),
    ("313002", "sodium chloride 9 MG/ML Injectable Solution", 500.0, "mL", 3.0),
    ("161", "acetaminophen", 1.0, "g", 6.0),
    ("40790", "pantoprazole", 40.0, "mg", 24.0),
)


def icu_patient(
    n_observations: int,
    at: datetime,
    *,
    patient_id: str | None = None,
    administrations: int = 300,
    span_hours: float = 60.0,
    onset_hours: float = 8.0,
    seed: int = 7,
    single_drug: bool = False,
) -> PatientBuilder:
    """A dense ICU patient with exactly ``n_observations`` Observations (see the module docstring)."""
    if n_observations < 100:
        raise ValueError("n_observations: at least 100 (one admission weight, labs and some vitals)")
    rng = random.Random(seed)
    builder = PatientBuilder(patient_id or f"icu-{n_observations}", at, age=58, gender="male")
    builder.weight(78.0, hours=span_hours)

    # Labs every LAB_EVERY_HOURS over the stay, one draw around the septic-shock onset.
    lab_times = [span_hours - 1 - k * LAB_EVERY_HOURS for k in range(int(span_hours // LAB_EVERY_HOURS))]
    lab_times = [t for t in lab_times if t > 0.25] + [onset_hours + 0.25]
    for hours in lab_times:
        for code, display, unit, before, after in _LABS:
            value = after if hours <= onset_hours + 0.5 else before
            value = round(value * (1 + rng.uniform(-0.05, 0.05)), 2)
            builder.observation(code, value, unit, hours, display=display)

    # Monitor ticks fill the rest, evenly over the stay.
    remaining = n_observations - len(builder.resources)
    ticks = max(1, math.ceil(remaining / TICK_SIZE))
    step = span_hours / ticks
    for tick in range(ticks):
        hours = span_hours - (tick + 0.5) * step
        shocked = onset_hours - 1.0 <= hours <= onset_hours + 1.0  # hypotension before the drug works
        for index, (code, display, unit, baseline, noise) in enumerate(_VITALS):
            if remaining <= 0:
                break
            value = baseline + rng.gauss(0, noise)
            if index == 0 and shocked:
                value -= 12
            builder.observation(code, round(value, 1), unit, hours, display=display, category="vital-signs")
            remaining -= 1
        if remaining > 0:
            systolic = 105 + rng.gauss(0, 6) - (15 if shocked else 0)
            builder.bp_panel(round(systolic), round(systolic * 0.5 + rng.gauss(0, 3)), hours)
            remaining -= 1

    if single_drug:
        _norepinephrine_titration(builder, rng, administrations, onset_hours)
    else:
        _drug_chart(builder, rng, administrations, span_hours, onset_hours)

    builder.condition(ICD10CM, "C92.00", "Acute myeloblastic leukemia, not in remission", span_hours + 900)
    builder.condition(SNOMED, "165517008", "Neutropenia", span_hours + 200)
    builder.condition(ICD10CM, "J18.9", "Pneumonia, unspecified organism", span_hours + 2)
    builder.condition(ICD10CM, "A41.9", "Sepsis, unspecified organism", span_hours + 1)
    builder.condition(ICD10CM, "I10", "Essential (primary) hypertension", span_hours + 5000)
    builder.condition(ICD10CM, "R65.21", "Severe sepsis with septic shock", onset_hours)
    return builder


def _drug_chart(
    builder: PatientBuilder, rng: random.Random, count: int, span_hours: float, onset_hours: float
) -> None:
    """Norepinephrine titrated every 15 min since the onset, vasopressin since half-way, the rest."""
    if count <= 0:
        return
    # Norepinephrine: consecutive 15-minute rate segments, the last one still running.
    segments = min(count, max(1, int(onset_hours * 4)))
    for k in range(segments):
        start = onset_hours - k * 0.25
        end = None if k == segments - 1 else start - 0.25
        rate = round(0.12 + 0.02 * min(k, 10) + rng.uniform(-0.01, 0.01), 3)
        builder.norepinephrine(rate, "ug/kg/min", start=start, end=end)
    left = count - segments
    # Vasopressin at a fixed rate from half-way through the shock, in 1-hour records.
    vasopressin = min(left, max(0, int(onset_hours / 2)))
    for k in range(vasopressin):
        start = onset_hours / 2 - k
        end = None if k == vasopressin - 1 else start - 1
        builder.infusion("11149", "vasopressin", 0.03, "[U]/min", start=start, end=end)
    left -= vasopressin
    # Everything else on the chart, round-robin over the drug list, spread over the stay.
    for k in range(left):
        code, display, dose, unit, every = _OTHER_DRUGS[k % len(_OTHER_DRUGS)]
        start = span_hours - (k * span_hours / max(left, 1))
        end = max(0.0, start - min(every, 1.0))
        builder.infusion(code, display, dose, unit, start=start, end=end, status="completed")


def _norepinephrine_titration(
    builder: PatientBuilder, rng: random.Random, count: int, onset_hours: float
) -> None:
    """``count`` norepinephrine records from the onset until now (see the module docstring)."""
    starts = [onset_hours - k * onset_hours / max(count, 1) for k in range(count)]
    for k, start in enumerate(starts):
        since_onset = onset_hours - start
        rate = round(0.12 + 0.02 * min(since_onset * 4, 10) + rng.uniform(-0.01, 0.01), 3)
        if k == count - 1:
            builder.norepinephrine(rate, "ug/kg/min", start=start)  # still running
        elif k % 3 == 2:
            # A rate charted at one moment: it holds until the next record.
            builder.norepinephrine(rate, "ug/kg/min", start=start, end=start)
            builder.resources[-1]["status"] = "in-progress"
            period = builder.resources[-1].pop("effectivePeriod")
            builder.resources[-1]["effectiveDateTime"] = period["start"]
        else:
            builder.norepinephrine(rate, "ug/kg/min", start=start, end=starts[k + 1])


def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A searchset Bundle of ``resources`` (what a FHIR server answers to a search)."""
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [
            {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
            for r in resources
        ],
    }


def prefetch_for(builder: PatientBuilder, queries: Any) -> dict[str, Any]:
    """Prefetch for the service's templates (``plan.queries``), the way a CDS client fills it.

    The first Observation key gets every Observation of the patient (a client that ignores or cannot
    apply the code filter: the worst case for the service), other Observation keys an empty
    searchset; MedicationAdministration and Condition keys get all of them.
    """
    by_type: dict[str, list[dict[str, Any]]] = {}
    for resource in builder.resources:
        by_type.setdefault(resource["resourceType"], []).append(resource)
    prefetch: dict[str, Any] = {}
    used: set[str] = set()
    for query in queries:
        if query.resource_type == "Patient":
            prefetch[query.key] = builder.patient
        elif query.resource_type in used:
            prefetch[query.key] = searchset([])
        else:
            prefetch[query.key] = searchset(by_type.get(query.resource_type, []))
            used.add(query.resource_type)
    return prefetch


def hook_request(
    builder: PatientBuilder,
    queries: Any = (),
    *,
    hook_instance: str,
    fhir_server: str | None = None,
    prefetch: bool = True,
) -> dict[str, Any]:
    """A patient-view request for the patient: with prefetch, or only ``fhirServer`` (fetch path)."""
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": hook_instance,
        "context": {"userId": "Practitioner/icu-doc-1", "patientId": builder.patient_id},
    }
    if fhir_server:
        body["fhirServer"] = fhir_server
    if prefetch:
        body["prefetch"] = prefetch_for(builder, queries)
    return body


__all__ = ["TICK_SIZE", "hook_request", "icu_patient", "prefetch_for", "searchset"]
