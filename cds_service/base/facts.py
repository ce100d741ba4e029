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


class ConditionFact(NamedTuple):
    value_sets: frozenset[str]
    onset: float | None
    recorded: float | None
    clinical_status: str
    verification_status: str
    resource: str
    code: str


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
