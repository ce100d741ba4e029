"""Normalised facts: what the extraction step hands to the derivation step.

Tuples, not models: a 72-hour ICU stay is tens of thousands of observations and these are built
in the hot path. Times are epoch seconds (UTC) so comparisons and windows are plain arithmetic.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import NamedTuple

#: Times are epoch seconds (UTC floats); durations in the data files are converted with this.
HOUR = 3600.0


class ObservationFact(NamedTuple):
    input: str
    time: float
    value: float | str
    unit: str
    resource: str
    code: str
    note: str = ""
    #: FHIR ``valueQuantity.comparator`` ("<", "<=", ">=", ">"): ``value`` is a bound, not the value.
    comparator: str = ""


class AdministrationFact(NamedTuple):
    drug: str
    start: float
    end: float | None
    rate: float | None
    rate_unit: str
    resource: str
    code: str
    matched_by: str  # "code" | "text"
    status: str
    bolus: bool = False  # a dose given at one moment with no rate: not an infusion
    #: How the rate was obtained when not charted in a dose unit ("15 mL/h × 16 mg/250 mL = 0.96 mg/h"),
    #: or why no rate could be had ("pump rate 15 mL/h, but Medication/x has no strength").
    rate_note: str = ""


class ConditionFact(NamedTuple):
    value_sets: frozenset[str]
    onset: float | None
    recorded: float | None
    clinical_status: str  # "" when the Condition has no clinicalStatus
    verification_status: str  # "" when it has no verificationStatus
    resource: str
    code: str
    #: Value sets whose matching code row only *suggests* the value set's meaning (`meaning: suggests`).
    suggests: frozenset[str] = frozenset()
    display: str = ""


class UnusableValue(NamedTuple):
    """A value we recognised by code but cannot use (unknown unit, not numeric …)."""

    input: str
    resource: str
    code: str
    reason: str


@dataclass
class PatientFacts:
    patient_id: str
    birth_date: date | None = None
    gender: str | None = None
    observations: dict[str, list[ObservationFact]] = field(default_factory=dict)
    administrations: list[AdministrationFact] = field(default_factory=list)
    conditions: list[ConditionFact] = field(default_factory=list)
    #: Data that could not be had: prefetch keys sent as null, or missing with no fhirServer. Holds
    #: observation input names, "administrations", "conditions" and "patient": criteria depending on
    #: them are unknown, never "not met".
    unavailable: set[str] = field(default_factory=set)
    unknown_codes: Counter[str] = field(default_factory=Counter)
    unusable: list[UnusableValue] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    def series(self, input_name: str) -> list[ObservationFact]:
        return self.observations.get(input_name, [])


def parse_time(text: str | None) -> float | None:
    """FHIR dateTime/instant → epoch seconds (None when it cannot be placed in time).

    Any offset is honoured (``+02:00``, ``-05:00``, ``Z``). Dates and partial dates count from their
    start, read as UTC. A time of day without an offset is invalid FHIR and could be hours off in
    either direction, so it is not guessed: the caller treats the resource as malformed.
    """
    if not text or not isinstance(text, str):
        return None
    try:
        if len(text) == 4:
            moment = datetime(int(text), 1, 1, tzinfo=UTC)
        elif len(text) == 7 and text[4] == "-":
            moment = datetime(int(text[:4]), int(text[5:7]), 1, tzinfo=UTC)
        elif len(text) == 10:
            moment = datetime.fromisoformat(text).replace(tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                return None
    except ValueError:
        return None
    return moment.timestamp()


def format_time(epoch: float) -> str:
    """Epoch seconds → ISO 8601 UTC, minute precision, as shown on cards and in evidence."""
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%MZ")
