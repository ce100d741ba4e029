"""Clinical code mappings, loaded from ``mappings/*.yaml`` and indexed for the extraction step.

Files (all validated with cerberus at start-up and by ``cds-service check``):

- ``observations.yaml`` — LOINC (or site) codes → named clinical inputs, canonical UCUM unit,
  accepted units per code, and the panels whose components carry inputs;
- ``local.yaml`` — site-local codes, same format; merged into the inputs above (and may add inputs);
- ``medications.yaml`` — vasoactive drugs: RxNorm ingredient, salt and clinical-drug codes, a text
  fallback, and the VIS coefficient;
- ``conditions.yaml`` — condition value sets (SNOMED CT exact, ICD-10-CM by prefix);
- ``units.yaml`` — unit aliases and conversions to canonical units.

Every code row names its ``source``; codes never seen in the files are counted, never guessed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..base.datafiles import DataFileError, DataFileProblem, LoadedFile, load_and_validate, load_yaml
from .criteria_language import parse_duration

LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
UCUM = "http://unitsofmeasure.org"

_CODE_ROW = {
    "type": "dict",
    "schema": {
        "system": {"type": "string", "regex": r"^(https?|urn):.+", "required": True},
        "code": {"type": "string", "empty": False, "required": True},
        "display": {"type": "string", "required": True},
        "source": {"type": "string", "empty": False, "required": True},
        "confidence": {"type": "string", "allowed": ["H", "M-H", "M", "U", "site"], "required": True},
        "units": {"type": "list", "schema": {"type": "string"}},
        "match": {"type": "string", "allowed": ["exact", "prefix"], "default": "exact"},
        "kind": {"type": "string"},
        "note": {"type": "string"},
        # A coded input (pregnancy test) read from a quantitative result: bands of the value, in
        # `unit` (after unit conversion), give the label; between the bands the result is `otherwise`.
        "interpret": {
            "type": "dict",
            "schema": {
                "unit": {"type": "string", "required": True},
                "bands": {
                    "type": "list",
                    "required": True,
                    "schema": {
                        "type": "dict",
                        "schema": {
                            "label": {"type": "string", "required": True},
                            "below": {"type": "number"},
                            "at_least": {"type": "number"},
                        },
                    },
                },
                "otherwise": {"type": "string", "required": True},
                "source": {"type": "string", "required": True, "empty": False},
            },
        },
    },
}
#: A condition code row says what the code means for its value set: `means` (the code is the
#: condition: a criterion on it may decide) or `suggests` (it only points at it: the clinician
#: confirms), and why — every row, so the audit is in the file.
_CONDITION_ROW = {
    "type": "dict",
    "schema": {
        **_CODE_ROW["schema"],
        "meaning": {"type": "string", "allowed": ["means", "suggests"], "required": True},
        "why": {"type": "string", "required": True, "empty": False},
    },
}

_INPUT = {
    "type": "dict",
    "schema": {
        "description": {"type": "string", "required": True},
        # Short clinical label and unit as shown on cards ("ANC", "× 10⁹/L"); default: name / UCUM unit.
        "label": {"type": "string"},
        "display_unit": {"type": "string"},
        "value_type": {"type": "string", "allowed": ["quantity", "coded"], "default": "quantity"},
        "canonical_unit": {"type": "string", "required": True},
        # window: fetched within the look-back window; latest: the most recent values, whatever their age.
        "query": {"type": "string", "allowed": ["window", "latest"], "default": "window"},
        "coded_values": {
            "type": "dict",
            "keysrules": {"type": "string"},
            "valuesrules": {"type": "list", "schema": {"type": "string"}},
        },
        "codes": {"type": "list", "schema": _CODE_ROW, "required": True},
    },
}

OBSERVATIONS_SCHEMA: dict[str, Any] = {
    "inputs": {
        "type": "dict",
        "keysrules": {"type": "string", "regex": r"^[a-z][a-z0-9_]*$"},
        "valuesrules": _INPUT,
    },
    "panels": {
        "type": "list",
        "schema": {
            "type": "dict",
            "schema": {
                "system": {"type": "string", "required": True},
                "code": {"type": "string", "required": True},
                "display": {"type": "string", "required": True},
                "source": {"type": "string", "required": True},
                "confidence": {"type": "string", "allowed": ["H", "M-H", "M", "U", "site"], "required": True},
                # When the panel has these components and no charted mean, derive the mean pressure.
                "derive_mean_pressure": {
                    "type": "dict",
                    "schema": {
                        "systolic": {"type": "string", "required": True},
                        "diastolic": {"type": "string", "required": True},
                        "into": {"type": "string", "required": True},
                    },
                },
            },
        },
    },
}

# local.yaml: an input that already exists in observations.yaml only needs its extra `codes` (the
# description and canonical unit come from there); a new input needs everything (checked on load).
_LOCAL_INPUT = {
    "type": "dict",
    "schema": {
        **_INPUT["schema"],
        "description": {"type": "string"},
        "canonical_unit": {"type": "string"},
        # No defaults here: an entry for an existing input keeps that input's settings.
        "value_type": {"type": "string", "allowed": ["quantity", "coded"]},
        "query": {"type": "string", "allowed": ["window", "latest"]},
    },
}
LOCAL_SCHEMA: dict[str, Any] = {
    "inputs": {
        "type": "dict",
        "nullable": True,
        "keysrules": {"type": "string", "regex": r"^[a-z][a-z0-9_]*$"},
        "valuesrules": _LOCAL_INPUT,
    }
}

MEDICATIONS_SCHEMA: dict[str, Any] = {
    "drugs": {
        "type": "dict",
        "required": True,
        "keysrules": {"type": "string", "regex": r"^[a-z][a-z0-9_]*$"},
        "valuesrules": {
            "type": "dict",
            "schema": {
                "description": {"type": "string", "required": True},
                "vasopressor": {"type": "boolean", "required": True},
                "vis_coefficient": {"type": "number", "nullable": True, "required": True},
                "vis_source": {"type": "string"},
                "dose_unit": {"type": "string", "required": True},
                "codes": {"type": "list", "schema": _CODE_ROW, "required": True},
                "text_patterns": {"type": "list", "schema": {"type": "string", "empty": False}},
            },
        },
    }
}

CONDITIONS_SCHEMA: dict[str, Any] = {
    "system_aliases": {"type": "dict", "keysrules": {"type": "string"}, "valuesrules": {"type": "string"}},
    "value_sets": {
        "type": "dict",
        "required": True,
        "keysrules": {"type": "string", "regex": r"^[a-z][a-z0-9_]*$"},
        "valuesrules": {
            "type": "dict",
            "schema": {
                "description": {"type": "string", "required": True},
                # A charted Condition decides only when its onset (else recorded date) lies within
                # this long before the evaluation time; an older or undated one asks the clinician.
                "current_within": {"type": ["string", "number"]},
                "current_source": {"type": "string", "empty": False, "dependencies": "current_within"},
                "codes": {"type": "list", "schema": _CONDITION_ROW, "required": True},
            },
        },
    },
}

UNITS_SCHEMA: dict[str, Any] = {
    "aliases": {"type": "dict", "keysrules": {"type": "string"}, "valuesrules": {"type": "string"}},
    "conversions": {
        "type": "list",
        "schema": {
            "type": "dict",
            "schema": {
                "from": {"type": "string", "required": True},
                "to": {"type": "string", "required": True},
                # Either a factor or a divisor: "÷ 9.01" is written as divide_by so that 18.02 mg/dL
                # gives exactly 2.0 mmol/L (a rounded reciprocal would tip it over the > 2 threshold).
                "factor": {"type": "number", "required": True, "excludes": "divide_by"},
                "divide_by": {"type": "number", "required": True, "excludes": "factor", "min": 1e-12},
                "inputs": {"type": "list", "schema": {"type": "string"}},
                "source": {"type": "string", "required": True},
            },
        },
    },
    "volume_rates": {
        "type": "list",
        "schema": {
            "type": "dict",
            "schema": {
                "from": {"type": "string", "required": True},
                "volume": {"type": "string", "required": True},
                "per": {"type": "string", "allowed": ["h", "min"], "required": True},
                "source": {"type": "string", "required": True},
            },
        },
    },
    "volumes": {
        "type": "list",
        "schema": {
            "type": "dict",
            "schema": {
                "from": {"type": "string", "required": True},
                "ml": {"type": "number", "min": 0, "required": True},
                "source": {"type": "string", "required": True},
            },
        },
    },
    "rate_conversions": {
        "type": "list",
        "schema": {
            "type": "dict",
            "schema": {
                "from": {"type": "string", "required": True},
                "to": {"type": "string", "required": True},
                "factor": {"type": "number", "required": True},
                "per_kg": {"type": "boolean", "required": True},
                "source": {"type": "string", "required": True},
            },
        },
    },
}


@dataclass(frozen=True)
class CodeRow:
    system: str
    code: str
    display: str
    source: str
    confidence: str
    units: tuple[str, ...] = ()
    match: str = "exact"
    meaning: str = "means"  # condition rows: "means" or "suggests"
    why: str = ""
    interpret: Interpretation | None = None

    @property
    def key(self) -> str:
        return f"{self.system}|{self.code}"


@dataclass(frozen=True)
class Interpretation:
    """Bands that turn a quantitative result into a coded label (serum hCG → positive / negative)."""

    unit: str
    bands: tuple[tuple[str, float | None, float | None], ...]  # (label, at_least, below)
    otherwise: str
    source: str

    def label(self, value: float) -> str:
        for label, at_least, below in self.bands:
            if (at_least is None or value >= at_least) and (below is None or value < below):
                return label
        return self.otherwise

    def describe(self, label: str) -> str:
        for name, at_least, below in self.bands:
            if name == label:
                bounds = [
                    f"≥ {at_least:g}" if at_least is not None else "",
                    f"< {below:g}" if below is not None else "",
                ]
                return " and ".join(b for b in bounds if b)
        return "between the bands"


@dataclass(frozen=True)
class ObservationInput:
    name: str
    description: str
    value_type: str
    canonical_unit: str
    query: str
    codes: tuple[CodeRow, ...]
    coded_values: dict[str, tuple[str, ...]] = field(default_factory=dict)
    label: str = ""
    display_unit: str = ""


@dataclass(frozen=True)
class Panel:
    system: str
    code: str
    display: str
    systolic: str | None = None
    diastolic: str | None = None
    mean_into: str | None = None

    @property
    def key(self) -> str:
        return f"{self.system}|{self.code}"


@dataclass(frozen=True)
class Drug:
    name: str
    description: str
    vasopressor: bool
    vis_coefficient: float | None
    dose_unit: str
    codes: tuple[CodeRow, ...]
    text_patterns: tuple[str, ...]


@dataclass(frozen=True)
class ValueSet:
    name: str
    description: str
    codes: tuple[CodeRow, ...]
    current_within: float | None = None  # seconds; None: any age decides
    current_source: str = ""


@dataclass(frozen=True)
class Conversion:
    to: str
    factor: float
    source: str
    divisor: float = 1.0

    def apply(self, value: float) -> float:
        return value * self.factor / self.divisor if self.divisor != 1.0 else value * self.factor


@dataclass(frozen=True)
class RateConversion:
    to: str
    factor: float
    per_kg: bool
    source: str


def normalise_unit(unit: str) -> str:
    return unit.strip()


def _icd_key(code: str) -> str:
    return code.replace(".", "").upper()


@dataclass
class Knowledge:
    """The loaded mappings with the look-up indexes the extraction step needs."""

    inputs: dict[str, ObservationInput]
    panels: dict[str, Panel]
    drugs: dict[str, Drug]
    value_sets: dict[str, ValueSet]
    unit_aliases: dict[str, str]
    conversions: dict[tuple[str | None, str], Conversion]
    rate_conversions: dict[str, RateConversion]
    system_aliases: dict[str, str]
    files: list[str]
    #: Content hash of every file in mappings/ (recorded on each screening-log row).
    version: str = ""
    volume_rates: dict[str, str] = field(default_factory=dict)  # pump-rate unit → "h" | "min"
    volumes_ml: dict[str, float] = field(default_factory=dict)  # volume unit → millilitres
    # indexes
    observation_codes: dict[str, ObservationInput] = field(default_factory=dict)
    observation_rows: dict[str, CodeRow] = field(default_factory=dict)  # code key → its row
    # code key → the UCUM units (aliases resolved) a value of that code is accepted in; empty = any
    # unit that converts to the input's canonical unit.
    observation_units: dict[str, frozenset[str]] = field(default_factory=dict)
    drug_codes: dict[str, Drug] = field(default_factory=dict)
    drug_text: list[tuple[re.Pattern[str], Drug]] = field(default_factory=list)
    condition_exact: dict[str, dict[str, CodeRow]] = field(default_factory=dict)
    condition_prefix: dict[str, list[tuple[str, str, CodeRow]]] = field(default_factory=dict)
    coded_value_index: dict[str, dict[str, str]] = field(default_factory=dict)
    #: (code key, UCUM unit code as charted) of numeric inputs whose value is taken as it is: the unit
    #: is accepted for the code and is the input's canonical unit, or an alias of it. Extraction's
    #: fast paths read these without a conversion look-up (any other unit takes the general path).
    plain_units: frozenset[tuple[str, str]] = frozenset()
    #: (system, code) → (the drug, "system|code") of every drug code row (``drug_for`` by parts).
    coded_drugs: dict[tuple[str, str], tuple[Drug, str]] = field(default_factory=dict)
    #: Unit codes, as charted, that ``rate_conversion`` turns into a dose rate the VIS uses.
    rate_units: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for item in self.inputs.values():
            for row in item.codes:
                self.observation_codes[row.key] = item
                self.observation_rows[row.key] = row
                self.observation_units[row.key] = frozenset(
                    self.unit_aliases.get(normalise_unit(unit), normalise_unit(unit)) for unit in row.units
                )
            self.coded_value_index[item.name] = {
                token.lower(): label for label, tokens in item.coded_values.items() for token in tokens
            }
        for drug in self.drugs.values():
            for row in drug.codes:
                self.drug_codes[row.key] = drug
                self.coded_drugs[row.system, row.code] = (drug, row.key)
            for pattern in drug.text_patterns:
                self.drug_text.append((re.compile(rf"\b{re.escape(pattern)}\b", re.IGNORECASE), drug))
        for value_set in self.value_sets.values():
            for row in value_set.codes:
                if row.match == "prefix":
                    self.condition_prefix.setdefault(row.system, []).append(
                        (_icd_key(row.code), value_set.name, row)
                    )
                else:
                    self.condition_exact.setdefault(row.key, {})[value_set.name] = row
        for rows in self.condition_prefix.values():
            rows.sort(key=lambda item: -len(item[0]))  # the most specific prefix first
        self.plain_units = frozenset(self._plain_units())
        units = set(self.rate_conversions) | set(self.unit_aliases)
        self.rate_units = frozenset(unit for unit in units if unit and self.rate_conversion(unit) is not None)

    def _plain_units(self) -> Iterator[tuple[str, str]]:
        for key, item in self.observation_codes.items():
            if item.value_type == "coded":
                continue
            units = set(self.observation_units[key]) or {item.canonical_unit}
            units |= {alias for alias, unit in self.unit_aliases.items() if unit in units}
            for unit in units:
                conversion = self.conversion(item.name, unit) if self.accepts_unit(key, unit) else None
                if unit and conversion is not None and conversion.factor == conversion.divisor == 1.0:
                    yield key, unit

    # -- look-ups used in the hot path -------------------------------------------------------------
    def canonical_system(self, system: str) -> str:
        return self.system_aliases.get(system, system)

    def condition_value_sets(self, system: str, code: str) -> frozenset[str]:
        return frozenset(self.condition_matches(system, code))

    def condition_matches(self, system: str, code: str) -> dict[str, CodeRow]:
        """Value set → the code row a Condition code matches in it: an exact row, else the most
        specific (longest) prefix row — so I21.A1 (type 2 MI) meets its own row, not I21's."""
        system = self.canonical_system(system)
        found = dict(self.condition_exact.get(f"{system}|{code}", {}))
        prefixes = self.condition_prefix.get(system)
        if prefixes:
            key = _icd_key(code)
            for prefix, name, row in prefixes:
                if name not in found and key.startswith(prefix):
                    found[name] = row
        return found

    def drug_for(self, system: str, code: str) -> Drug | None:
        return self.drug_codes.get(f"{system}|{code}")

    def drug_for_text(self, text: str) -> Drug | None:
        for pattern, drug in self.drug_text:
            if pattern.search(text):
                return drug
        return None

    def canonical_unit_code(self, unit: str) -> str:
        unit = normalise_unit(unit)
        return self.unit_aliases.get(unit, unit)

    def conversion(self, input_name: str, unit: str) -> Conversion | None:
        """How to bring a value charted in ``unit`` to the input's canonical unit (None: unusable)."""
        return self.conversion_to(input_name, unit, self.inputs[input_name].canonical_unit)

    def conversion_to(self, input_name: str, unit: str, target: str) -> Conversion | None:
        """How to bring a value of ``input_name`` charted in ``unit`` to ``target`` (None: cannot)."""
        unit = self.canonical_unit_code(unit)
        if unit == target:
            return Conversion(target, 1.0, "canonical unit")
        found = self.conversions.get((input_name, unit)) or self.conversions.get((None, unit))
        # A general conversion (e.g. /uL → 10*9/L) must not apply to an input in another unit.
        return found if found is not None and found.to == target else None

    def accepts_unit(self, code_key: str, unit: str) -> bool:
        """Whether a value of this code may be charted in ``unit`` (the code row's ``units`` list)."""
        accepted = self.observation_units.get(code_key)
        return not accepted or self.canonical_unit_code(unit) in accepted

    def rate_conversion(self, unit: str) -> RateConversion | None:
        return self.rate_conversions.get(self.canonical_unit_code(unit))

    def volume_rate(self, unit: str) -> str | None:
        """ "h" / "min" when ``unit`` is a pump rate (mL/h, mL/min), else None."""
        return self.volume_rates.get(self.canonical_unit_code(unit))

    def volume_ml(self, unit: str) -> float | None:
        return self.volumes_ml.get(self.canonical_unit_code(unit))

    # -- what the criteria need ---------------------------------------------------------------------
    def observation_query_codes(self, input_names: set[str], query: str) -> list[str]:
        """``system|code`` tokens for the inputs asked for, plus panels carrying their components."""
        codes: list[str] = []
        for name in sorted(input_names):
            item = self.inputs.get(name)
            if item and item.query == query:
                codes.extend(row.key for row in item.codes)
        if query == "window":
            codes.extend(
                panel.key
                for panel in self.panels.values()
                if {panel.systolic, panel.diastolic, panel.mean_into} & input_names
            )
        return sorted(set(codes))


def content_hash(paths: list[Path]) -> str:
    """``sha256:<12 hex>`` of the files' names and bytes: which rules a decision was made with."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"sha256:{digest.hexdigest()[:12]}"


def _interpretation(raw: dict[str, Any] | None) -> Interpretation | None:
    if not raw:
        return None
    return Interpretation(
        raw["unit"],
        tuple((band["label"], band.get("at_least"), band.get("below")) for band in raw["bands"]),
        raw["otherwise"],
        raw["source"],
    )


def _rows(raw_rows: list[dict[str, Any]]) -> tuple[CodeRow, ...]:
    return tuple(
        CodeRow(
            system=row["system"],
            code=row["code"],
            display=row["display"],
            source=row["source"],
            confidence=row["confidence"],
            units=tuple(row.get("units", ())),
            match=row.get("match", "exact"),
            meaning=row.get("meaning", "means"),
            why=row.get("why", ""),
            interpret=_interpretation(row.get("interpret")),
        )
        for row in raw_rows
    )


def _input_from(name: str, raw: dict[str, Any]) -> ObservationInput:
    return ObservationInput(
        name=name,
        description=raw.get("description", ""),
        value_type=raw.get("value_type", "quantity"),
        canonical_unit=raw.get("canonical_unit", ""),
        query=raw.get("query", "window"),
        codes=_rows(raw["codes"]),
        coded_values={k: tuple(v) for k, v in raw.get("coded_values", {}).items()},
        label=raw.get("label") or name.replace("_", " "),
        display_unit=raw.get("display_unit", raw.get("canonical_unit", "")),
    )


def _check_derived_references(folder: Path, value_sets: dict[str, ValueSet]) -> list[DataFileProblem]:
    """derived.yaml names condition value sets: a typo there would silently mean "no infection"."""
    path = folder / "derived.yaml"
    if not path.exists():
        return []
    try:
        loaded = load_yaml(path)
    except DataFileError as exc:
        return list(exc.problems)
    onset = loaded.data.get("septic_shock_onset") if isinstance(loaded.data, dict) else None
    problems: list[DataFileProblem] = []
    if isinstance(onset, dict):
        for key in ("infection_value_sets", "charted_value_sets"):
            names = onset.get(key)
            for index, name in enumerate(names if isinstance(names, list) else ()):
                if name not in value_sets:
                    problems.append(
                        loaded.problem(
                            ("septic_shock_onset", key, index),
                            f"unknown value set {name!r} (not in conditions.yaml)",
                        )
                    )
    return problems


def load_knowledge(data_dir: Path) -> Knowledge:
    """Load and cross-check every mapping file. Raises DataFileError listing every problem found."""
    folder = data_dir / "mappings"
    problems: list[DataFileProblem] = []
    loaded: dict[str, tuple[LoadedFile, Any]] = {}
    schemas = {
        "observations.yaml": OBSERVATIONS_SCHEMA,
        "local.yaml": LOCAL_SCHEMA,
        "medications.yaml": MEDICATIONS_SCHEMA,
        "conditions.yaml": CONDITIONS_SCHEMA,
        "units.yaml": UNITS_SCHEMA,
    }
    for name, schema in schemas.items():
        path = folder / name
        if name == "local.yaml" and not path.exists():
            continue
        try:
            loaded[name] = load_and_validate(path, schema)
        except DataFileError as exc:
            problems.extend(exc.problems)
    if problems:
        raise DataFileError(problems)

    obs_file, obs = loaded["observations.yaml"]
    inputs = {name: _input_from(name, raw) for name, raw in (obs.get("inputs") or {}).items()}
    # Where each code row of each input was written (file, key path): problems found later name it.
    row_origin: dict[tuple[str, int], tuple[LoadedFile, tuple[Any, ...]]] = {
        (name, index): (obs_file, ("inputs", name, "codes", index))
        for name, item in inputs.items()
        for index in range(len(item.codes))
    }
    if "local.yaml" in loaded:
        local_file, local = loaded["local.yaml"]
        for name, raw in (local.get("inputs") or {}).items():
            extra = _input_from(name, raw)
            if name in inputs:
                base = inputs[name]
                for key in ("canonical_unit", "value_type"):
                    if key in raw and raw[key] != getattr(base, key):
                        problems.append(
                            local_file.problem(
                                ("inputs", name, key),
                                f"{raw[key]!r} differs from {getattr(base, key)!r} in observations.yaml: "
                                "local codes must deliver the input in its canonical unit (leave it out)",
                            )
                        )
                offset = len(base.codes)
                inputs[name] = replace(
                    base,
                    codes=base.codes + extra.codes,
                    coded_values={**base.coded_values, **extra.coded_values},
                )
            else:
                for key in ("description", "canonical_unit"):
                    if key not in raw:
                        problems.append(
                            local_file.problem(
                                ("inputs", name),
                                f"{key} is required for a new input (not in observations.yaml)",
                            )
                        )
                offset = 0
                inputs[name] = extra
            for index in range(len(extra.codes)):
                row_origin[(name, offset + index)] = (local_file, ("inputs", name, "codes", index))

    # One code, one meaning: a code listed under two inputs would be read as whichever came last.
    seen_codes: dict[str, str] = {}
    for name, item in inputs.items():
        for index, row in enumerate(item.codes):
            if row.key in seen_codes:
                where, path = row_origin[(name, index)]
                problems.append(
                    where.problem(path, f"code {row.key} is already mapped to input {seen_codes[row.key]!r}")
                )
            else:
                seen_codes[row.key] = name

    panels: dict[str, Panel] = {}
    for index, raw in enumerate(obs.get("panels") or []):
        derive = raw.get("derive_mean_pressure") or {}
        for part in ("systolic", "diastolic", "into"):
            if derive and derive[part] not in inputs:
                problems.append(
                    obs_file.problem(
                        ("panels", index, "derive_mean_pressure", part), f"unknown input {derive[part]!r}"
                    )
                )
        if f"{raw['system']}|{raw['code']}" in seen_codes:
            problems.append(
                obs_file.problem(("panels", index, "code"), "this code is also mapped to an input")
            )
        panel = Panel(
            raw["system"],
            raw["code"],
            raw["display"],
            derive.get("systolic"),
            derive.get("diastolic"),
            derive.get("into"),
        )
        panels[panel.key] = panel

    med_file, meds = loaded["medications.yaml"]
    seen_drug_codes: dict[str, str] = {}
    for name, raw in meds["drugs"].items():
        for index, row in enumerate(raw["codes"]):
            key = f"{row['system']}|{row['code']}"
            if key in seen_drug_codes:
                problems.append(
                    med_file.problem(
                        ("drugs", name, "codes", index),
                        f"code {key} is already listed for {seen_drug_codes[key]!r}",
                    )
                )
            else:
                seen_drug_codes[key] = name
    drugs = {
        name: Drug(
            name,
            raw["description"],
            raw["vasopressor"],
            raw["vis_coefficient"],
            raw["dose_unit"],
            _rows(raw["codes"]),
            tuple(raw.get("text_patterns", ())),
        )
        for name, raw in meds["drugs"].items()
    }
    cond_file, conds = loaded["conditions.yaml"]
    value_sets: dict[str, ValueSet] = {}
    for name, raw in conds["value_sets"].items():
        within = None
        if raw.get("current_within") is not None:
            try:
                within = parse_duration(raw["current_within"])
            except ValueError as exc:
                problems.append(cond_file.problem(("value_sets", name, "current_within"), str(exc)))
            if not raw.get("current_source"):
                problems.append(
                    cond_file.problem(("value_sets", name), "current_within needs current_source (why)")
                )
        value_sets[name] = ValueSet(
            name, raw["description"], _rows(raw["codes"]), within, raw.get("current_source", "")
        )
    units_file, units = loaded["units.yaml"]
    conversions: dict[tuple[str | None, str], Conversion] = {}
    for index, raw in enumerate(units.get("conversions") or []):
        for input_name in raw.get("inputs") or [None]:
            if input_name is not None and input_name not in inputs:
                problems.append(
                    units_file.problem(("conversions", index, "inputs"), f"unknown input {input_name!r}")
                )
            conversions[(input_name, raw["from"])] = Conversion(
                raw["to"], float(raw.get("factor", 1.0)), raw["source"], float(raw.get("divide_by", 1.0))
            )
    rate_conversions = {
        raw["from"]: RateConversion(raw["to"], float(raw["factor"]), raw["per_kg"], raw["source"])
        for raw in units.get("rate_conversions") or []
    }
    aliases = dict(units.get("aliases") or {})
    volume_rates = {raw["from"]: raw["per"] for raw in units.get("volume_rates") or []}
    volumes_ml = {raw["from"]: float(raw["ml"]) for raw in units.get("volumes") or []}

    knowledge = Knowledge(
        inputs=inputs,
        panels=panels,
        drugs=drugs,
        value_sets=value_sets,
        unit_aliases=aliases,
        conversions=conversions,
        rate_conversions=rate_conversions,
        system_aliases=dict(conds.get("system_aliases") or {}),
        files=[str(loaded[name][0].path) for name in loaded],
        version=content_hash(sorted(folder.glob("*.yaml"))),
        volume_rates=volume_rates,
        volumes_ml=volumes_ml,
    )
    # Cross-checks: every accepted unit must be canonical or convertible, so no value is used blindly.
    for name, item in inputs.items():
        for index, row in enumerate(item.codes):
            for unit in row.units:
                if (
                    row.interpret is not None
                    and knowledge.conversion_to(name, unit, row.interpret.unit) is None
                ):
                    where, path = row_origin[(name, index)]
                    problems.append(
                        where.problem(
                            (*path, "units"),
                            f"unit {unit!r} is not convertible to the interpretation unit "
                            f"{row.interpret.unit!r} by units.yaml",
                        )
                    )
                if item.value_type == "quantity" and knowledge.conversion(name, unit) is None:
                    where, path = row_origin[(name, index)]
                    problems.append(
                        where.problem(
                            (*path, "units"),
                            f"unit {unit!r} is neither the canonical unit {item.canonical_unit!r} "
                            "nor convertible to it by units.yaml",
                        )
                    )
    problems.extend(_check_derived_references(folder, value_sets))
    for name, drug in drugs.items():
        if drug.vis_coefficient is not None and knowledge.rate_conversion(drug.dose_unit) is None:
            problems.append(
                med_file.problem(("drugs", name, "dose_unit"), "no rate conversion in units.yaml")
            )
    if problems:
        raise DataFileError(problems)
    return knowledge
