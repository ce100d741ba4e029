"""Fast extraction: FHIR resource dicts → normalised facts in canonical units.

Bulk resources (Observations, MedicationAdministrations, Conditions) are read as the plain dicts
orjson produced, touching only the fields criteria use: full pydantic validation of 20 000
Observations costs seconds (see infrastructure.md), this path costs a few ms per thousand.
The Patient — one small resource — is validated with fhir.resources (R4B models).
A malformed resource is skipped and counted, never a crash; ``entered-in-error`` records and
cancelled / not-done administrations are ignored.
"""

from __future__ import annotations

import bisect
import gc
from collections.abc import Callable, Iterable
from datetime import date
from operator import attrgetter
from typing import Any

import msgspec
from fhir.resources.R4B.patient import Patient
from pydantic import ValidationError

from ..base.facts import (
    AdministrationFact,
    ConditionFact,
    ObservationFact,
    PatientFacts,
    UnusableValue,
    parse_time,
)
from ..knowledge.mappings import UCUM, Conversion, Knowledge
from .lean_json import UNSET, LeanCodeableConcept, LeanComponent, LeanQuantity, LeanResource

_IGNORED_OBSERVATION_STATUS = frozenset({"entered-in-error", "cancelled"})
_IGNORED_ADMINISTRATION_STATUS = frozenset({"entered-in-error", "not-done", "cancelled"})
_IGNORED_VERIFICATION = frozenset({"entered-in-error", "refuted"})
#: Canonical units of scores and other unitless inputs: only these may be read from a value with no unit.
_DIMENSIONLESS = frozenset({"{score}", "1", ""})
#: A charted mean pressure this close to a panel's time is the same reading: the derived (S + 2D)/3
#: estimate is dropped in its favour (an arterial-line mean is not (S + 2D)/3).
_SAME_READING_SECONDS = 300.0


_UNSET = object()
_new_fact = tuple.__new__  # ObservationFact(...) without the NamedTuple's Python-level __new__


class _Extractor:
    """One patient's extraction; keeps per-call caches of unit conversions."""

    #: Take :meth:`_simple_quantity` before :meth:`_quantity_fact` (off: the general path only).
    fast_path = True

    def __init__(self, knowledge: Knowledge, facts: PatientFacts):
        self.k = knowledge
        self.facts = facts
        self._conversion_cache: dict[tuple[str, str], tuple[Conversion, str] | str] = {}
        # Per-call memos for the hot path (benchmark: 20 000 Observations, see docs/performance.md).
        self._times: dict[str, float | None] = {}  # dateTime text → epoch (vitals share their times)
        self._codes: dict[tuple[Any, Any], tuple[str, Any, Any]] = {}  # (system, code) → key, input, panel
        self._unknown_keys: dict[tuple[Any, Any], str] = {}  # (system, code) → unknown_codes key
        self._texts: dict[str, Any] = {}  # medication text → Drug | None
        self._drug_codes: dict[tuple[Any, Any], Any] = {}  # (system, code) → Drug | None
        # (system, code) → Drug, "system|code"; the mapping files' drug codes known from the start.
        self._coded_drugs: dict[tuple[str, str], tuple[Any, str]] = dict(knowledge.coded_drugs)
        #: rate unit → whether it converts to a dose rate (the known ones from the start).
        self._rate_units: dict[str, bool] = dict.fromkeys(knowledge.rate_units, True)
        #: ("system|code", UCUM unit) of values taken as charted (a non-coded input, a unit accepted
        #: and needing no conversion): the mapping files' pairs, and those `_simple_quantity` took.
        self._plain_units: set[tuple[str, str]] = set(knowledge.plain_units)
        self._panel_shapes: dict[int, tuple[str, str]] = {}  # id(panel) → component note, panel key
        self._notes: dict[tuple[str, float, float], str] = {}  # panel code, S, D → derived-mean note
        self.medications: dict[str, dict[str, Any]] = {}  # "Medication/<id>" → the resource

    # -- values -----------------------------------------------------------------------------------
    def _convert(self, input_name: str, code: str, unit: str) -> tuple[Conversion, str] | str:
        """(the conversion, the charted unit to name in a note or "") — or why the value is unusable."""
        key = (code, unit)
        cached = self._conversion_cache.get(key)
        if cached is not None:
            return cached
        result: tuple[Conversion, str] | str
        if not self.k.accepts_unit(code, unit):
            accepted = ", ".join(sorted(self.k.observation_units.get(code, ())))
            result = f"unit {unit!r} not accepted for {code} (accepted: {accepted})"
        else:
            conversion = self.k.conversion(input_name, unit)
            if conversion is None:
                result = f"unknown unit {unit!r}"
            else:
                same = conversion.factor == 1.0 and conversion.divisor == 1.0
                result = (conversion, "" if same else unit)
        self._conversion_cache[key] = result
        return result

    def _quantity_fact(
        self, input_name: str, holder: dict[str, Any], time: float, ref: str, code: str, note: str = ""
    ) -> ObservationFact | None:
        item = self.k.inputs[input_name]
        if item.value_type == "coded":
            return self._coded_fact(input_name, holder, time, ref, code)
        quantity = holder.get("valueQuantity")
        if not isinstance(quantity, dict):
            integer = holder.get("valueInteger")
            # valueInteger has no unit: only a score (or other unitless input) can be read from it;
            # a bare 25000 for platelets could be /uL or 10*9/L, and we do not guess.
            if isinstance(integer, int) and not isinstance(integer, bool):
                if item.canonical_unit in _DIMENSIONLESS:
                    return ObservationFact(
                        input_name, time, float(integer), item.canonical_unit, ref, code, note
                    )
                self.facts.unusable.append(
                    UnusableValue(input_name, ref, code, "integer value without a unit")
                )
            elif "dataAbsentReason" not in holder:
                self.facts.unusable.append(UnusableValue(input_name, ref, code, "no numeric value"))
            return None
        value = quantity.get("value")
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.facts.unusable.append(UnusableValue(input_name, ref, code, "no numeric value"))
            return None
        unit = _unit_of(quantity)
        if not unit and item.canonical_unit in _DIMENSIONLESS:
            unit = item.canonical_unit
        converted = self._convert(input_name, code, unit)
        if isinstance(converted, str):
            self.facts.unusable.append(UnusableValue(input_name, ref, code, converted))
            return None
        conversion, charted_unit = converted
        if charted_unit:
            conversion_note = f"converted from {value:g} {charted_unit}"
            note = f"{note}; {conversion_note}" if note else conversion_note
        comparator = quantity.get("comparator")
        if isinstance(comparator, str) and comparator:
            # A censored value ("<0.1", ">20") is a bound, not the value: the comparator travels with
            # it and the criteria compare it three-valued ("> 3" meets "> 3"; "< 5" against "> 3" is
            # unknown). The note keeps the censoring visible on the card.
            charted = f"charted as {comparator}{value:g}"
            note = f"{note}; {charted}" if note else charted
            return ObservationFact(
                input_name,
                time,
                conversion.apply(float(value)),
                item.canonical_unit,
                ref,
                code,
                note,
                comparator.strip(),
            )
        return ObservationFact(
            input_name, time, conversion.apply(float(value)), item.canonical_unit, ref, code, note
        )

    def _coded_fact(
        self, input_name: str, holder: dict[str, Any], time: float, ref: str, code: str
    ) -> ObservationFact | None:
        index = self.k.coded_value_index.get(input_name, {})
        tokens: list[str] = []
        concept = holder.get("valueCodeableConcept")
        if isinstance(concept, dict):
            for coding in concept.get("coding") or ():
                if isinstance(coding, dict):
                    tokens.append(f"{coding.get('system')}|{coding.get('code')}")
                    tokens.append(str(coding.get("code", "")))
            tokens.append(str(concept.get("text", "")))
        if isinstance(holder.get("valueString"), str):
            tokens.append(holder["valueString"])
        if isinstance(holder.get("valueBoolean"), bool):
            tokens.append("positive" if holder["valueBoolean"] else "negative")
        for token in tokens:
            label = index.get(token.strip().lower())
            if label:
                return ObservationFact(input_name, time, label, "", ref, code, "")
        row = self.k.observation_rows.get(code)
        if row is not None and row.interpret is not None and isinstance(holder.get("valueQuantity"), dict):
            return self._interpreted_fact(input_name, row.interpret, holder["valueQuantity"], time, ref, code)
        self.facts.unusable.append(UnusableValue(input_name, ref, code, "coded value not recognised"))
        return None

    def _interpreted_fact(
        self, input_name: str, interpret: Any, quantity: dict[str, Any], time: float, ref: str, code: str
    ) -> ObservationFact | None:
        """A quantitative result read as a coded label through its bands (serum hCG → positive)."""
        value = quantity.get("value")
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.facts.unusable.append(UnusableValue(input_name, ref, code, "no numeric value"))
            return None
        unit = _unit_of(quantity)
        conversion = (
            self.k.conversion_to(input_name, unit, interpret.unit)
            if self.k.accepts_unit(code, unit)
            else None
        )
        if conversion is None:
            self.facts.unusable.append(UnusableValue(input_name, ref, code, f"unit {unit!r} not usable"))
            return None
        amount = conversion.apply(float(value))
        comparator = quantity.get("comparator") if isinstance(quantity.get("comparator"), str) else ""
        label = interpret.label(amount)
        if comparator:
            # "< 2" is negative whatever the true value; "> 1000" positive; otherwise it decides nothing.
            # The bands rise with the value (negative, then positive): the ends of the censored
            # range tell whether every value it allows gets the same label.
            nudge = 1e-9 * max(1.0, abs(amount))  # a strict bound excludes its own value
            if comparator in ("<", "<="):
                ends = (
                    interpret.label(0.0),
                    interpret.label(amount - nudge if comparator == "<" else amount),
                )
            else:
                start = interpret.label(amount + nudge if comparator == ">" else amount)
                ends = (start, interpret.label(max(amount, 1.0) * 1e9))
            label = ends[0] if ends[0] == ends[1] else "inconclusive"
        shown = f"{comparator}{value:g} {unit}".strip()
        band = interpret.describe(label)
        note = f"quantitative {shown}: {label}" + (f" ({band})" if band else "")
        return ObservationFact(input_name, time, label, "", ref, code, note)

    # -- resources --------------------------------------------------------------------------------
    def _time(self, text: Any) -> float | None:
        """``parse_time``, memoised per text (a monitor writes several vitals with the same time)."""
        if type(text) is not str:
            return parse_time(text)
        time = self._times.get(text, _UNSET)
        if time is _UNSET:
            time = self._times[text] = parse_time(text)
        return time  # type: ignore[return-value]

    def _classify(self, system: Any, code: Any) -> tuple[str, Any, Any]:
        """("system|code", the input it carries or None, the panel it is or None), memoised."""
        try:
            return self._codes[system, code]
        except KeyError:
            pass
        except TypeError:  # an unhashable system or code (malformed): not memoised
            key = f"{system}|{code}"
            item = self.k.observation_codes.get(key)
            return key, item and self.k.inputs[item.name], None if item else self.k.panels.get(key)
        key = f"{system}|{code}"
        item = self.k.observation_codes.get(key)
        found = (key, item and self.k.inputs[item.name], None if item else self.k.panels.get(key))
        self._codes[system, code] = found
        return found

    def _simple_quantity(
        self, item: Any, holder: dict[str, Any], time: float, ref: str, code: str, note: str
    ) -> ObservationFact | None:
        """The common case of :meth:`_quantity_fact` — a UCUM quantity in a unit needing no conversion,
        no comparator — or None, and then the caller takes :meth:`_quantity_fact` (which gives the same
        fact for every case this accepts: ``tests/test_extract_fast_path.py`` compares the two)."""
        quantity = holder.get("valueQuantity")
        if type(quantity) is not dict or quantity.get("comparator"):
            return None
        value, unit = quantity.get("value"), quantity.get("code")
        if (
            (type(value) is not float and type(value) is not int)
            or type(unit) is not str
            or quantity.get("system") != UCUM
        ):
            return None
        if (code, unit) not in self._plain_units:
            if item.value_type == "coded" or not unit:
                return None
            converted = self._conversion_cache.get((code, unit)) or self._convert(item.name, code, unit)
            if type(converted) is not tuple or converted[1]:  # not usable, or needs converting
                return None
            self._plain_units.add((code, unit))  # `observation` takes this case without the call
        fact = (item.name, time, float(value), item.canonical_unit, ref, code, note, "")
        return _new_fact(ObservationFact, fact)  # type: ignore[no-any-return]

    def observation(self, resource: dict[str, Any]) -> None:
        # The memo look-ups (`_time`, `_classify`), the common case of `_simple_quantity` and `_add`
        # are inlined: a call costs more than the look-up, and this runs per Observation.
        get = resource.get
        if get("status") in _IGNORED_OBSERVATION_STATUS:
            return
        text = (
            get("effectiveDateTime")
            or get("effectiveInstant")
            or (get("effectivePeriod") or {}).get("start")
            or get("issued")
        )
        if type(text) is str:
            time = self._times.get(text, _UNSET)
            if time is _UNSET:
                time = self._times[text] = parse_time(text)
        else:
            time = parse_time(text)
        codings = (get("code") or {}).get("coding")
        if time is None or not isinstance(codings, list):
            self.facts.skipped["Observation"] += 1
            return
        ref = f"Observation/{get('id', '?')}"
        for coding in codings:
            system, code = coding.get("system"), coding.get("code")
            try:
                key, item, panel = self._codes[system, code]
            except (KeyError, TypeError):
                key, item, panel = self._classify(system, code)
            if item is not None:
                fact = None
                if self.fast_path:
                    # `_simple_quantity`'s plain case: a unit known to need no conversion for this code.
                    quantity = get("valueQuantity")
                    if type(quantity) is dict:
                        value, unit = quantity.get("value"), quantity.get("code")
                        if (
                            (type(value) is float or type(value) is int)
                            and type(unit) is str
                            and (key, unit) in self._plain_units
                            and not quantity.get("comparator")
                            and quantity.get("system") == UCUM
                        ):
                            fact = _new_fact(
                                ObservationFact,
                                (item.name, time, float(value), item.canonical_unit, ref, key, "", ""),
                            )
                    if fact is None:
                        fact = self._simple_quantity(item, resource, time, ref, key, "")
                if fact is None:
                    fact = self._quantity_fact(item.name, resource, time, ref, key)
                if fact is not None:
                    series = self.facts.observations.get(fact.input)
                    if series is None:
                        self.facts.observations[fact.input] = [fact]
                    else:
                        series.append(fact)
                return
            if panel is not None:
                self._panel(panel, get("component"), time, ref)
                return
        self._count_unknown([(coding.get("system"), coding.get("code")) for coding in codings])

    def lean_observation(self, resource: LeanResource) -> None:
        """:meth:`observation` of an Observation decoded as a :class:`LeanResource`: the common
        case — a dateTime, codings with a system and a code, a quantity in a unit the code takes as
        it is (``Knowledge.plain_units``), a panel, codes no input uses — read from its attributes;
        any other case from the dict it stands for, by :meth:`observation` itself.
        ``tests/test_lean_json.py`` compares the facts of both paths on random Observations."""
        text, concept, identifier = resource.effectiveDateTime, resource.code, resource.id
        if (
            type(text) is not str
            or not text
            or type(concept) is not LeanCodeableConcept
            or type(concept.coding) is not list
            or type(identifier) is not str
        ):
            self.observation(resource.as_dict())
            return
        if resource.status in _IGNORED_OBSERVATION_STATUS:
            return
        time = self._times.get(text, _UNSET)
        if time is _UNSET:
            time = self._times[text] = parse_time(text)
        if time is None:
            self.facts.skipped["Observation"] += 1
            return
        codings = concept.coding
        for coding in codings:
            system, code = coding.system, coding.code
            if system is UNSET or code is UNSET:  # the dict path reads an absent one as None
                self.observation(resource.as_dict())
                return
            try:
                key, item, panel = self._codes[system, code]
            except (KeyError, TypeError):
                key, item, panel = self._classify(system, code)
            if item is not None:
                quantity = resource.valueQuantity
                if type(quantity) is LeanQuantity and self.fast_path:
                    value, unit = quantity.value, quantity.code
                    if (
                        (type(value) is float or type(value) is int)
                        and type(unit) is str
                        and (key, unit) in self._plain_units
                        and not quantity.comparator
                        and quantity.system == UCUM
                    ):
                        ref = f"Observation/{identifier}"
                        fact = (item.name, time, float(value), item.canonical_unit, ref, key, "", "")
                        series = self.facts.observations.get(item.name)
                        if series is None:
                            self.facts.observations[item.name] = [_new_fact(ObservationFact, fact)]
                        else:
                            series.append(_new_fact(ObservationFact, fact))
                        return
                self.observation(resource.as_dict())
                return
            if panel is not None:
                components = resource.component
                self._panel(
                    panel, None if components is UNSET else components, time, f"Observation/{identifier}"
                )
                return
        self._count_unknown([(coding.system, coding.code) for coding in codings])

    def _count_unknown(self, codes: list[tuple[Any, Any]]) -> None:
        """Count an Observation's (system, code) pairs, none of which any input or panel uses."""
        unknown, names = self.facts.unknown_codes, self._unknown_keys
        for system, code in codes:
            try:
                name = names.get((system, code)) or names.setdefault(
                    (system, code), f"Observation {system}|{code}"
                )
            except TypeError:  # unhashable (malformed) system or code
                name = f"Observation {system}|{code}"
            unknown[name] += 1

    def _panel(self, panel: Any, components: Any, time: float, ref: str) -> None:
        # Facts are added only once the whole panel was read: a malformed component skips the panel.
        found: dict[str, ObservationFact] = {}
        shape = self._panel_shapes.get(id(panel))
        if shape is None:
            # What every reading of this panel shares (`panel.key` builds its text on each call).
            shape = self._panel_shapes[id(panel)] = (f"component of {panel.code}", panel.key)
        component_note, panel_key = shape
        for component in components or ():
            named = (
                self._lean_component(component, time, ref, component_note)
                if type(component) is LeanComponent
                else self._component(component, time, ref, component_note)
            )
            if named is not None:
                found[named[0]] = named[1]
        if (
            panel.mean_into
            and panel.mean_into not in found
            and panel.systolic in found
            and panel.diastolic in found
        ):
            systolic, diastolic = found[panel.systolic].value, found[panel.diastolic].value
            mean = (float(systolic) + 2 * float(diastolic)) / 3
            note_key = (panel.code, systolic, diastolic)
            note = self._notes.get(note_key) if systolic and diastolic else None  # (0.0 == -0.0)
            if note is None:
                note = f"derived (S + 2D)/3 from panel {panel.code}: S {systolic:g}, D {diastolic:g}"
                if systolic and diastolic:
                    self._notes[note_key] = note
            unit = self.k.inputs[panel.mean_into].canonical_unit
            found[panel.mean_into] = _new_fact(
                ObservationFact, (panel.mean_into, time, mean, unit, ref, panel_key, note, "")
            )
        for fact in found.values():
            self._add(fact)

    def _component(
        self, component: dict[str, Any], time: float, ref: str, note: str
    ) -> tuple[str, ObservationFact] | None:
        """The input and fact of a panel's component: its first coding that an input uses decides."""
        for coding in (component.get("code") or {}).get("coding") or ():
            system, code = coding.get("system"), coding.get("code")
            try:
                key, item, _ = self._codes[system, code]
            except (KeyError, TypeError):
                key, item, _ = self._classify(system, code)
            if item is not None:
                fact = (
                    self._simple_quantity(item, component, time, ref, key, note) if self.fast_path else None
                ) or self._quantity_fact(item.name, component, time, ref, key, note)
                return None if fact is None else (item.name, fact)
        return None

    def _lean_component(
        self, component: LeanComponent, time: float, ref: str, note: str
    ) -> tuple[str, ObservationFact] | None:
        """:meth:`_component` of a :class:`LeanComponent`: a UCUM quantity in a plain unit read from
        its attributes, any other case from its dict (``tests/test_lean_json.py`` compares them)."""
        concept = component.code
        if type(concept) is not LeanCodeableConcept or type(concept.coding) is not list:
            return self._component(component.as_dict(), time, ref, note)
        for coding in concept.coding:
            system, code = coding.system, coding.code
            if system is UNSET or code is UNSET:  # the dict path reads an absent one as None
                return self._component(component.as_dict(), time, ref, note)
            try:
                key, item, _ = self._codes[system, code]
            except (KeyError, TypeError):
                key, item, _ = self._classify(system, code)
            if item is not None:
                quantity = component.valueQuantity
                if type(quantity) is LeanQuantity and self.fast_path:
                    value, unit = quantity.value, quantity.code
                    if (
                        (type(value) is float or type(value) is int)
                        and type(unit) is str
                        and (key, unit) in self._plain_units
                        and not quantity.comparator
                        and quantity.system == UCUM
                    ):
                        fact = (item.name, time, float(value), item.canonical_unit, ref, key, note, "")
                        return item.name, _new_fact(ObservationFact, fact)
                return self._component(component.as_dict(), time, ref, note)
        return None

    def _add(self, fact: ObservationFact) -> None:
        series = self.facts.observations.get(fact.input)
        if series is None:
            self.facts.observations[fact.input] = [fact]
        else:
            series.append(fact)

    def administration(self, resource: dict[str, Any]) -> None:
        get = resource.get
        status = get("status", "")
        if status in _IGNORED_ADMINISTRATION_STATUS:
            return
        ref = f"MedicationAdministration/{get('id', '?')}"
        drug, code, matched_by, medication = self._drug(resource)
        if drug is None:
            return
        period = get("effectivePeriod")
        if isinstance(period, dict):
            start, end = self._time(period.get("start")), self._time(period.get("end"))
        else:
            start = end = self._time(get("effectiveDateTime"))
        if start is None:
            self.facts.skipped["MedicationAdministration"] += 1
            return
        dosage = get("dosage")
        rate, rate_unit, rate_note = self._rate(dosage, drug, medication)
        # A dose with no rate given at one moment is a bolus (push-dose phenylephrine, epinephrine
        # in cardiac arrest): it is no vasopressor requirement and does not enter the VIS.
        bolus = (
            rate is None and not rate_note and end == start and isinstance(dosage, dict) and "dose" in dosage
        )
        fact = (drug.name, start, end, rate, rate_unit, ref, code, matched_by, status, bolus, rate_note)
        self.facts.administrations.append(_new_fact(AdministrationFact, fact))

    def lean_administration(self, resource: LeanResource) -> None:
        """:meth:`administration` of a MedicationAdministration decoded as a :class:`LeanResource`,
        read from its attributes; the parts the general path reads as dicts (an uncommon drug
        coding, a dosage that is not a UCUM dose rate) are handed to it as the dicts they stand
        for. One that names a Medication is read from its whole dict, by :meth:`administration`."""
        status, identifier = resource.status, resource.id
        if (
            type(status) is not str
            or type(identifier) is not str
            or resource.medicationReference is not UNSET
        ):
            self.administration(resource.as_dict())
            return
        if status in _IGNORED_ADMINISTRATION_STATUS:
            return
        concept = resource.medicationCodeableConcept
        known = None
        if self.fast_path and type(concept) is LeanCodeableConcept and concept.coding:
            first = concept.coding[0]  # (`_drug`'s fast path: a drug code in the first coding)
            system, code = first.system, first.code
            if type(system) is type(code) is str:
                known = self._coded_drugs.get((system, code))
        if known is not None:
            drug, code = known
            matched_by = "code"
        else:
            named = {} if concept is UNSET else {"medicationCodeableConcept": msgspec.to_builtins(concept)}
            drug, code, matched_by, _ = self._drug(named)
            if drug is None:
                return
        period = resource.effectivePeriod
        if period is UNSET:
            text = resource.effectiveDateTime
            start = end = self._time(None if text is UNSET else text)
        else:
            start, end = self._time(period.get("start")), self._time(period.get("end"))
        if start is None:
            self.facts.skipped["MedicationAdministration"] += 1
            return
        dosage = resource.dosage
        rate, rate_unit, rate_note, bolus = None, "", "", False
        if dosage is not UNSET:
            quantity = dosage.rateQuantity
            value = unit = None
            if type(quantity) is LeanQuantity:
                value, unit = quantity.value, quantity.code
            if (
                self.fast_path
                and (type(value) is float or type(value) is int)
                and type(unit) is str
                and self._rate_units.get(unit)
                and quantity.system == UCUM  # type: ignore[union-attr]
            ):
                rate, rate_unit = float(value), unit
            else:
                rate, rate_unit, rate_note = self._rate(msgspec.to_builtins(dosage), drug, None)
                bolus = rate is None and not rate_note and end == start and dosage.dose is not UNSET
        fact = (
            drug.name, start, end, rate, rate_unit, f"MedicationAdministration/{identifier}", code,
            matched_by, status, bolus, rate_note,
        )  # fmt: skip
        self.facts.administrations.append(_new_fact(AdministrationFact, fact))

    def _converts(self, unit: str) -> bool:
        """Whether ``unit`` is a dose rate the VIS can use (``knowledge.rate_conversion``), memoised."""
        known = self._rate_units.get(unit)
        if known is None:
            known = self._rate_units[unit] = self.k.rate_conversion(unit) is not None
        return known

    def _rate(
        self, dosage: Any, drug: Any, medication: dict[str, Any] | None
    ) -> tuple[float | None, str, str]:
        """(dose rate, its unit, how it was obtained) from the shapes EHRs chart infusions in:

        - ``dosage.rateQuantity`` / ``rateRatio`` in a dose-rate unit (ug/kg/min, mg/h, U/min …);
        - ``dosage.dose`` in a dose-rate unit ("0.2 ug/kg/min"), whatever pump rate is beside it;
        - a pump rate in mL/h × the strength of the Medication it names (16 mg / 250 mL).
        With no dose to be had, rate None and the note says why (the VIS is then unknown)."""
        if not isinstance(dosage, dict):
            return None, "", ""
        if self.fast_path:
            # The common case: a UCUM dose rate already known to convert (what `_rate` and
            # `_unit_of` below would read, without building anything on the way).
            quantity = dosage.get("rateQuantity")
            if type(quantity) is dict:
                value, code = quantity.get("value"), quantity.get("code")
                if (
                    (type(value) is float or type(value) is int)
                    and type(code) is str
                    and code
                    and self._rate_units.get(code)
                    and quantity.get("system") == UCUM
                ):
                    return float(value), code, ""
        rate, unit = _rate(dosage)
        if rate is not None and self._converts(unit):
            return rate, unit, ""
        dose = dosage.get("dose")
        if isinstance(dose, dict) and isinstance(dose.get("value"), int | float):
            dose_unit = _unit_of(dose)
            if self.k.rate_conversion(dose_unit) is not None:
                pump = f", pump {rate:g} {unit}" if rate is not None else ""
                return float(dose["value"]), dose_unit, f"dose charted in dosage.dose{pump}"
        if rate is None:
            return None, "", ""
        per = self.k.volume_rate(unit)
        if per is None:
            return rate, unit, ""  # an unknown rate unit: derived.py says it is not convertible
        strength = _strength(medication, drug, self.k)
        if isinstance(strength, str):
            return None, "", f"pump {rate:g} {unit}, {strength}"
        amount, amount_unit, volume_ml, shown = strength
        dose_rate = rate * amount / volume_ml
        dose_unit = f"{amount_unit}/{per}"
        note = f"{rate:g} {unit} × {shown} = {dose_rate:.3g} {dose_unit}"
        if self.k.rate_conversion(dose_unit) is None:
            return None, "", f"{note}, a unit with no conversion"
        return dose_rate, dose_unit, note

    def _drug_for_text(self, text: str) -> Any:
        """``knowledge.drug_for_text`` memoised per text (a drug chart repeats the same few texts)."""
        if text not in self._texts:
            self._texts[text] = self.k.drug_for_text(text)
        return self._texts[text]

    def _medication(self, resource: dict[str, Any]) -> dict[str, Any] | None:
        """The Medication an administration names: contained (``#id``), or in the same data (Bundle,
        prefetch, fetched from the FHIR server) by ``Medication/<id>`` or full URL."""
        reference = (resource.get("medicationReference") or {}).get("reference", "")
        if not isinstance(reference, str) or not reference:
            return None
        if reference.startswith("#"):
            for contained in resource.get("contained") or ():
                if isinstance(contained, dict) and contained.get("id") == reference[1:]:
                    return contained
            return None
        return self.medications.get(medication_key(reference))

    def _drug(self, resource: dict[str, Any]) -> tuple[Any, str, str, dict[str, Any] | None]:
        # No (or an empty) medicationReference names no Medication: `_medication` would say None.
        medication = self._medication(resource) if resource.get("medicationReference") else None
        concept = resource.get("medicationCodeableConcept")
        if self.fast_path and type(concept) is dict:
            # The common case: the first coding is a drug code of the mapping files (or one seen
            # before in this call). The loop below would return the same, having tried it first.
            codings = concept.get("coding")
            if type(codings) is list and codings and type(first := codings[0]) is dict:
                system, code = first.get("system"), first.get("code")
                if type(system) is str and type(code) is str:
                    known = self._coded_drugs.get((system, code))
                    if known is not None:
                        return known[0], known[1], "code", medication
        if not isinstance(concept, dict):
            concept = (medication or {}).get("code")
            if not isinstance(concept, dict):
                # The Medication is not in the data (nor could it be fetched): its reference's display
                # still names the drug, so the infusion is not lost — its dose is then unknown.
                display = (resource.get("medicationReference") or {}).get("display")
                if isinstance(display, str) and (drug := self._drug_for_text(display)) is not None:
                    unresolved = f"not resolvable; matched {drug.name} by display"
                    self.facts.unknown_codes[
                        f"MedicationAdministration medicationReference ({unresolved})"
                    ] += 1
                    return drug, f"text:{display}", "text", None
                self.facts.unknown_codes["MedicationAdministration medicationReference (not resolvable)"] += 1
                return None, "", "", None
        codings = [c for c in concept.get("coding") or () if isinstance(c, dict)]
        for coding in codings:
            system, code = coding.get("system"), coding.get("code")
            try:
                drug = self._drug_codes[system, code]
            except KeyError:
                drug = self._drug_codes[system, code] = self.k.drug_for(str(system), str(code))
            except TypeError:  # an unhashable (malformed) system or code: not memoised
                drug = self.k.drug_for(str(system), str(code))
            if drug is not None:
                key = f"{system}|{code}"
                if type(system) is str and type(code) is str:
                    self._coded_drugs[system, code] = (drug, key)
                return drug, key, "code", medication
        texts = [concept.get("text")] + [c.get("display") for c in codings]
        for text in texts:
            if isinstance(text, str) and (drug := self._drug_for_text(text)) is not None:
                first = codings[0] if codings else {}
                code = f"{first.get('system')}|{first.get('code')}" if codings else f"text:{text}"
                self.facts.unknown_codes[
                    f"MedicationAdministration {code} (matched {drug.name} by text)"
                ] += 1
                return drug, code, "text", medication
        for coding in codings or [{"system": None, "code": concept.get("text")}]:
            self.facts.unknown_codes[
                f"MedicationAdministration {coding.get('system')}|{coding.get('code')}"
            ] += 1
        return None, "", "", None

    def condition(self, resource: dict[str, Any]) -> None:
        verification = _status_code(resource.get("verificationStatus"))
        if verification in _IGNORED_VERIFICATION:
            return
        codings = [c for c in (resource.get("code") or {}).get("coding") or () if isinstance(c, dict)]
        if not codings:
            self.facts.skipped["Condition"] += 1
            return
        value_sets: set[str] = set()
        suggests: set[str] = set()
        decisive: set[str] = set()
        matched_code = display = ""
        for coding in codings:
            found = self.k.condition_matches(str(coding.get("system")), str(coding.get("code")))
            if found:
                value_sets |= set(found)
                for name, row in found.items():
                    (suggests if row.meaning == "suggests" else decisive).add(name)
                if not matched_code:
                    matched_code = f"{coding.get('system')}|{coding.get('code')}"
                    shown = coding.get("display")
                    display = shown if isinstance(shown, str) else ""
        if not value_sets:
            for coding in codings:
                self.facts.unknown_codes[f"Condition {coding.get('system')}|{coding.get('code')}"] += 1
            return
        onset = parse_time(resource.get("onsetDateTime") or (resource.get("onsetPeriod") or {}).get("start"))
        self.facts.conditions.append(
            ConditionFact(
                frozenset(value_sets),
                onset,
                parse_time(resource.get("recordedDate")),
                # No clinicalStatus is kept as "" (not read as active): the criteria then ask.
                _status_code(resource.get("clinicalStatus")),
                verification or "",
                f"Condition/{resource.get('id', '?')}",
                matched_code,
                # A coding that means the value set outweighs another coding that only suggests it.
                frozenset(suggests - decisive),
                display,
            )
        )


def _status_code(concept: Any) -> str:
    if isinstance(concept, dict):
        for coding in concept.get("coding") or ():
            if isinstance(coding, dict) and coding.get("code"):
                return str(coding["code"])
    return ""


def _unit_of(quantity: dict[str, Any]) -> str:
    if quantity.get("system") == UCUM and quantity.get("code"):
        return str(quantity["code"])
    return str(quantity.get("unit") or quantity.get("code") or "")


def _rate(dosage: Any) -> tuple[float | None, str]:
    """Infusion rate from ``dosage.rateQuantity`` or ``dosage.rateRatio`` (e.g. 8 ug / 1 min)."""
    if not isinstance(dosage, dict):
        return None, ""
    quantity = dosage.get("rateQuantity")
    if isinstance(quantity, dict) and isinstance(quantity.get("value"), int | float):
        return float(quantity["value"]), _unit_of(quantity)
    ratio = dosage.get("rateRatio")
    if isinstance(ratio, dict):
        numerator, denominator = ratio.get("numerator") or {}, ratio.get("denominator") or {}
        num, den = numerator.get("value"), denominator.get("value", 1)
        if isinstance(num, int | float) and isinstance(den, int | float) and den:
            return float(num) / float(den), f"{_unit_of(numerator)}/{_unit_of(denominator)}"
    return None, ""


def medication_key(reference: str) -> str:
    """ "Medication/<id>" of a reference ("Medication/1", "https://…/fhir/Medication/1/_history/2")."""
    parts = reference.split("/")
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] == "Medication":
            return f"Medication/{parts[index + 1]}"
    return reference


def _strength(
    medication: dict[str, Any] | None, drug: Any, knowledge: Knowledge
) -> tuple[float, str, float, str] | str:
    """(amount, its unit, per millilitres, as shown) of the drug in the bag — or why not."""
    if medication is None:
        return "bag not available (Medication not in the data)"
    ingredients = [i for i in medication.get("ingredient") or () if isinstance(i, dict) and i.get("strength")]
    chosen = None
    for ingredient in ingredients:
        concept = ingredient.get("itemCodeableConcept") or {}
        codings = [c for c in concept.get("coding") or () if isinstance(c, dict)]
        texts = [concept.get("text"), *(c.get("display") for c in codings)]
        if any(knowledge.drug_for(str(c.get("system")), str(c.get("code"))) is drug for c in codings) or any(
            isinstance(t, str) and knowledge.drug_for_text(t) is drug for t in texts
        ):
            chosen = ingredient
            break
    if chosen is None and len(ingredients) == 1:
        chosen = ingredients[0]
    if chosen is None:
        return "bag strength not charted"
    ratio = chosen["strength"]
    numerator, denominator = ratio.get("numerator") or {}, ratio.get("denominator") or {}
    amount, volume = numerator.get("value"), denominator.get("value", 1)
    if not isinstance(amount, int | float) or not isinstance(volume, int | float) or not volume:
        return "bag strength not a number per volume"
    amount_unit = knowledge.canonical_unit_code(_unit_of(numerator))
    volume_unit = _unit_of(denominator)
    ml = knowledge.volume_ml(volume_unit)
    if ml is None:
        return f"bag strength per {volume_unit or 'no unit'}, not per volume"
    shown = f"{amount:g} {amount_unit}/{volume:g} {volume_unit}"
    return float(amount), amount_unit, float(volume) * ml, shown


def read_patient(resource: dict[str, Any] | None, facts: PatientFacts) -> None:
    """Validate the Patient with fhir.resources (small: full validation is cheap) and keep what we use."""
    if not isinstance(resource, dict):
        return
    try:
        patient = Patient.model_validate(resource)
    except (ValidationError, ValueError, TypeError):
        facts.skipped["Patient"] += 1
        # Keep going with what can be read safely: a broken name must not hide the birth date.
        birth = resource.get("birthDate")
        try:
            facts.birth_date = (
                date.fromisoformat(birth) if isinstance(birth, str) and len(birth) == 10 else None
            )
        except ValueError:
            facts.birth_date = None
        gender = resource.get("gender")
        facts.gender = gender if isinstance(gender, str) else None
        return
    birth_date = patient.birthDate
    facts.birth_date = birth_date if isinstance(birth_date, date) else None
    facts.gender = patient.gender


def extract(
    patient_id: str, patient: dict[str, Any] | None, resources: Iterable[Any], knowledge: Knowledge
) -> PatientFacts:
    """Turn a patient's resources into normalised facts. Unknown resource types are ignored."""
    facts = PatientFacts(patient_id=patient_id)
    read_patient(patient, facts)
    extractor = _Extractor(knowledge, facts)
    resources = list(resources)
    # Medications first: an administration may name one anywhere in the data (pump rate × strength).
    for resource in resources:
        if isinstance(resource, dict) and resource.get("resourceType") == "Medication":
            extractor.medications[f"Medication/{resource.get('id')}"] = resource
    handlers = {
        "Observation": extractor.observation,
        "MedicationAdministration": extractor.administration,
        "Condition": extractor.condition,
    }
    lean_handlers = {
        "Observation": extractor.lean_observation,
        "MedicationAdministration": extractor.lean_administration,
    }
    gc_was_enabled = gc.isenabled()
    gc.disable()  # many small tuples: the cyclic collector only costs time here
    try:
        for resource in resources:
            if type(resource) is LeanResource:
                try:
                    lean_handlers[resource.resourceType](resource)
                except (AttributeError, TypeError, ValueError, KeyError):
                    facts.skipped[resource.resourceType] += 1
                continue
            if not isinstance(resource, dict):
                facts.skipped["not a resource"] += 1
                continue
            kind = resource.get("resourceType")
            handler = handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                continue
            try:
                handler(resource)
            except (AttributeError, TypeError, ValueError, KeyError):
                facts.skipped[str(resource.get("resourceType"))] += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    for series in facts.observations.values():
        series.sort(key=_by_time)
    for panel in knowledge.panels.values():
        if panel.mean_into and panel.mean_into in facts.observations:
            facts.observations[panel.mean_into] = _prefer_charted(
                facts.observations[panel.mean_into], panel.key
            )
    facts.administrations.sort(key=_by_start)
    return facts


def _prefer_charted(series: list[ObservationFact], derived_code: str) -> list[ObservationFact]:
    """Drop a derived mean pressure when a charted one exists for the same reading (±5 min)."""
    charted = [f.time for f in series if f.code != derived_code]
    if not charted or len(charted) == len(series):
        return series
    kept = []
    for fact in series:
        if fact.code == derived_code:
            index = bisect.bisect_left(charted, fact.time - _SAME_READING_SECONDS)
            if index < len(charted) and charted[index] <= fact.time + _SAME_READING_SECONDS:
                continue
        kept.append(fact)
    return kept


#: Sort keys (C-level getters: a Python function per fact costs more than the sort).
_by_time: Callable[[ObservationFact], float] = attrgetter("time")
_by_start: Callable[[AdministrationFact], float] = attrgetter("start")
