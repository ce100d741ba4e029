"""Card text a clinician reads in five seconds: allowed characters, local times, no internal ids.

- **Characters.** Stock Debian Chromium (and many EHR side panels) has no emoji font: ✅ and ❔ render
  as empty boxes. Card text is limited to :data:`ALLOWED_RANGES` — Basic Latin and Latin-1 (× ° µ ²
  live there), general punctuation, superscripts, arrows, ≤ ≥ and ☐. The card files are checked
  against it at start-up (:func:`disallowed`); every text that reaches a card passes through
  :func:`clean`, which keeps what it can (``é`` stays, ``ő`` becomes ``o``, ``μ`` becomes ``µ``,
  ``ł`` becomes ``l``) and drops the rest.
- **Times.** Clinicians read local wall-clock times relative to now: "today 14:30",
  "tomorrow 02:00", "in 3 h 10 min". :class:`LocalClock` formats them in ``screening.timezone``.
- **No raw resource ids.** ``Observation/7b3a…`` means nothing at the bedside; :func:`clean` takes
  them out of any text that reaches a card (the machine-readable extension keeps them).
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

#: Inclusive code-point ranges allowed in card text (summary, detail, labels).
ALLOWED_RANGES: tuple[tuple[int, int], ...] = (
    (0x0A, 0x0A),  # line feed (Markdown)
    (0x20, 0x7E),  # Basic Latin, printable
    (0xA0, 0xFF),  # Latin-1 Supplement: é ü × ° µ ² ³ ¹ ± …
    (0x2000, 0x206F),  # General Punctuation: – — ‘ ’ “ ” … • ‰
    (0x2070, 0x209F),  # Superscripts and Subscripts: ⁹ ⁰ ⁻
    (0x2190, 0x21FF),  # Arrows: → ← ↑ ↓
    (0x2264, 0x2265),  # ≤ ≥
    (0x2610, 0x2610),  # ☐ (ballot box: the bedside checklist)
)
#: Look-alikes mapped to their allowed form before anything is dropped.
_REPLACEMENTS = {
    "μ": "µ",  # Greek mu (U+03BC) → micro sign
    "✅": "",
    "✔": "",
    "❔": "",
    "⏳": "",
    "≠": "other than",
    "≈": "about ",
    "\t": " ",
    "\r": "",
    # Letters outside Latin-1 with no accent to strip (NFKD leaves them whole).
    "ł": "l",
    "Ł": "L",
    "đ": "d",
    "Đ": "D",
    "ħ": "h",
    "ı": "i",
    "œ": "oe",
    "Œ": "OE",
}


#: One character outside the allow-list (a compiled class: cards are cleaned on every hook).
_OUTSIDE = re.compile("[^" + "".join(f"\\U{low:08x}-\\U{high:08x}" for low, high in ALLOWED_RANGES) + "]")


def allowed(char: str) -> bool:
    return _OUTSIDE.match(char) is None


def disallowed(text: str) -> list[str]:
    """The characters of ``text`` outside the allow-list, each once, in order of appearance."""
    return list(dict.fromkeys(_OUTSIDE.findall(text)))


#: FHIR resource types whose ``Type/id`` references may turn up in evidence text.
RESOURCE_TYPES = (
    "Observation",
    "MedicationAdministration",
    "MedicationRequest",
    "MedicationStatement",
    "Medication",
    "Condition",
    "Patient",
    "Encounter",
    "Procedure",
    "DiagnosticReport",
    "AllergyIntolerance",
    "Practitioner",
    "PractitionerRole",
    "ServiceRequest",
    "ResearchSubject",
)
#: A literal reference ``Type/id`` (FHIR ids: letters, digits, '-' and '.', up to 64).
RESOURCE_ID = re.compile(r"\b(?:" + "|".join(RESOURCE_TYPES) + r")/[A-Za-z0-9\-.]{1,64}")
_RESOURCE_LIST = re.compile(r"\s*\((?:\s*,?\s*" + RESOURCE_ID.pattern + r")+\s*\)")
#: An instant as the evaluation code writes it (``2026-11-21T04:00Z``, seconds optional).
ISO_INSTANT = re.compile(r"\b\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})")


#: Microgram as clinicians write it ("ug/kg/min" is how UCUM and pumps spell it).
_MICROGRAM = re.compile(r"\b(?:ug|mcg)(?=/)")


def clean(text: str, clock: LocalClock | None = None) -> str:
    """``text`` made fit for a card: resource ids out, ISO instants in local time, allowed characters."""
    # Each pattern needs a character most card texts lack: skip the ones that cannot match (this
    # runs for every text of every card).
    if "/" in text:
        text = _RESOURCE_LIST.sub("", text)
        text = _MICROGRAM.sub("µg", text)
        text = RESOURCE_ID.sub(lambda match: match.group(0).split("/", 1)[0], text)
    if clock is not None and "T" in text:
        text = ISO_INSTANT.sub(lambda match: clock.at_text(match.group(0)), text)
    return _OUTSIDE.sub(_replacement, text)


def _replacement(match: re.Match[str]) -> str:
    char = match.group(0)
    if char in _REPLACEMENTS:
        return _REPLACEMENTS[char]
    # Keep the letter of an accented character outside Latin-1 (ǎ → a, ő → o), drop the rest.
    return "".join(c for c in unicodedata.normalize("NFKD", char) if allowed(c) and c != " ")


# -- local times ----------------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """A time span as a clinician says it: '35 min', '1 h 30 min', '12 h'."""
    if seconds is None:
        return "unknown"
    minutes = max(0, round(seconds / 60))
    if minutes < 60:
        return f"{minutes} min"
    hours, rest = divmod(minutes, 60)
    if hours >= 10 or rest == 0:
        return f"{round(minutes / 60)} h"
    return f"{hours} h {rest} min"


#: English month abbreviations, whatever the process locale (strftime's %b follows it).
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class LocalClock:
    """Formats instants (epoch seconds) in one time zone, relative to the evaluation time ``now``."""

    def __init__(self, zone: str | ZoneInfo, now: float):
        self.zone = zone if isinstance(zone, ZoneInfo) else ZoneInfo(zone)
        self.now = now
        self._today = self._local(now).date()
        self._shown: dict[float, str] = {}  # the detail is rendered a few times while it is fitted

    def _local(self, epoch: float) -> datetime:
        return datetime.fromtimestamp(epoch, tz=UTC).astimezone(self.zone)

    @property
    def zone_label(self) -> str:
        """The zone's abbreviation at ``now`` ('UTC', 'CET', 'EST'; some zones give '+03')."""
        return self._local(self.now).tzname() or str(self.zone)

    def at(self, epoch: float | None) -> str:
        """'today 14:30', 'yesterday 23:10', 'tomorrow 02:00', else '21 Nov 14:30' (year if not this one)."""
        if epoch is None:
            return "unknown"
        shown = self._shown.get(epoch)
        if shown is None:
            shown = self._shown[epoch] = self._format(epoch)
        return shown

    def _format(self, epoch: float) -> str:
        moment = self._local(epoch)
        days = (moment.date() - self._today).days
        clock = f"{moment.hour:02d}:{moment.minute:02d}"
        if days == 0:
            return f"today {clock}"
        if days == -1:
            return f"yesterday {clock}"
        if days == 1:
            return f"tomorrow {clock}"
        day = f"{moment.day} {_MONTHS[moment.month - 1]}"
        if moment.year != self._today.year:
            day += f" {moment.year}"
        return f"{day} {clock}"

    def at_text(self, iso: str) -> str:
        """An ISO 8601 instant found in evidence text, in local time (unchanged if it does not parse)."""
        try:
            moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
        except ValueError:
            return iso
        return self.at(moment.timestamp())

    def relative(self, epoch: float | None) -> str:
        """'in 3 h 10 min', '2 h ago', 'now'."""
        if epoch is None:
            return "unknown"
        delta = epoch - self.now
        if abs(delta) < 60:
            return "now"
        return f"in {duration(delta)}" if delta > 0 else f"{duration(-delta)} ago"
