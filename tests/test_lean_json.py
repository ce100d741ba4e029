"""[speed] The field-selective decoder gives the same screening as a full decode.

``patient_data/lean_json.py`` decodes a hook request keeping only the fields gathering and
extraction read (issue 17). What a user relies on: the same cards, whatever the chart holds. So:

- every field name ``gather``, ``extract`` and the FHIR client look up is one the decoder keeps (a
  stage that starts reading a new field fails here until the decoder keeps it too);
- on random requests built from the decoder's own shapes plus random extra fields, and on random
  JSON in their place, the lean decode is exactly the full decode with the undeclared fields
  removed — or None (the caller then decodes in full) when the body is not in those shapes;
- every scenario patient, and every resource of the corpus (synthea, clinosim and the official
  HL7 R4 examples, with their odd-but-valid shapes), screens to the same facts, derived inputs and
  trial results both ways.
"""

from __future__ import annotations

import ast
import time
import types
import typing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.base.config import PROJECT_ROOT
from cds_service.base.errors import HookError
from cds_service.patient_data import lean_json
from cds_service.patient_data.extract import extract
from cds_service.patient_data.gather import gather
from cds_service.patient_data.hook_request import parse_hook_request
from cds_service.patient_data.lean_json import LeanDecoder
from cds_service.screening import Screener, ScreeningOutcome
from cds_service.tools import bench
from cds_service.tools.scenarios import all_scenarios, hook_request
from tests.fault_server import FaultServer
from tests.test_corpus import CLINOSIM, HL7, SYNTHEA, _require

#: Keys the scanned modules look up that are not FHIR fields of a request: settings, HTTP headers,
#: counters of skipped resources, prefix tests. Anything else they read must be kept by the decoder.
NOT_REQUEST_FIELDS = {
    # fhir_client / gather settings
    "allow_http", "allowed_servers", "deadline_seconds", "lookback_hours", "max_pages",
    "max_response_bytes", "max_workers", "page_size",
    # HTTP headers (fhir_client)
    "Authorization", "Content-Length", "User-Agent",
    # Counter keys of PatientFacts.skipped / unknown_codes, and a prefix test (gather)
    "Observation", "MedicationAdministration", "Condition", "Patient", "not a resource",
    "MedicationAdministration medicationReference (not resolvable)", "Medication/",
    # gather's own key for the Medications it fetched by id
    "medications",
    # read from the Patient, which the decoder keeps whole (fhir.resources validates it)
    "birthDate", "gender",
    # the environment, read once by fhir_client's session: CA bundles, getproxies()'s NO_PROXY entry
    "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "no",
}  # fmt: skip
SCANNED = ["patient_data/gather.py", "patient_data/extract.py", "patient_data/fhir_client.py"]


def _looked_up(path: Path) -> set[str]:
    """String keys a module looks up: ``x.get("k")``, ``get("k")``, ``x["k"]``, ``"k" in x``."""
    keys: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        key: Any = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("get", "pop", "setdefault"):
                key = node.args[0].value
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            key = node.slice.value
        elif (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Constant)
            and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops)
        ):
            key = node.left.value
        if isinstance(key, str):
            keys.add(key)
    return keys


def _declared(tp: Any, seen: set[Any] | None = None) -> set[str]:
    """Every field name of a decoder shape and the shapes inside it."""
    seen = set() if seen is None else seen
    if tp in seen:
        return set()
    seen.add(tp)
    if _is_object_shape(tp):
        names: set[str] = set()
        for name, hint in get_type_hints(tp).items():
            names.add(name)
            names |= _declared(hint, seen)
        return names
    return set().union(*(_declared(arg, seen) for arg in get_args(tp))) if get_args(tp) else set()


def _is_object_shape(tp: Any) -> bool:
    """A TypedDict or a msgspec Struct: a JSON object with declared fields."""
    return typing.is_typeddict(tp) or (isinstance(tp, type) and issubclass(tp, msgspec.Struct))


def _members(tp: Any) -> list[Any]:
    """A union's members, less ``UnsetType`` (a Struct's absent field: nothing in the JSON)."""
    return [arg for arg in get_args(tp) if arg is not msgspec.UnsetType]


@pytest.fixture(scope="module")
def decoder(screener: Screener) -> LeanDecoder:
    return screener.request_decoder


def test_every_field_a_stage_reads_is_kept(decoder: LeanDecoder) -> None:
    declared = _declared(decoder.request_type)
    for module in SCANNED:
        read = _looked_up(PROJECT_ROOT / "cds_service" / module)
        dropped = sorted(read - declared - NOT_REQUEST_FIELDS)
        assert not dropped, (
            f"{module} reads {dropped}, which patient_data/lean_json.py drops: declare them there "
            "(or, if they are not request fields, in this test's NOT_REQUEST_FIELDS)"
        )
    # The scan finds what it should: the hot fields of both bulk resource types.
    assert {"valueQuantity", "effectiveDateTime", "rateQuantity", "medicationReference"} <= _looked_up(
        PROJECT_ROOT / "cds_service/patient_data/extract.py"
    )


# -- the decode itself against orjson --------------------------------------------------------------


class _NotInShape(Exception):
    pass


def _project(value: Any, tp: Any) -> Any:
    """The full decode reduced to a shape: what the lean decode must give (or _NotInShape)."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        (inner,) = [arg for arg in _members(tp) if arg is not type(None)]
        return _project(value, inner)
    if origin is list:
        if type(value) is not list:
            raise _NotInShape
        return [_project(item, get_args(tp)[0]) for item in value]
    if _is_object_shape(tp):
        if type(value) is not dict:
            raise _NotInShape
        hints = get_type_hints(tp)
        return {key: _project(item, hints[key]) for key, item in value.items() if key in hints}
    raise AssertionError(f"a shape the projection does not know: {tp!r}")


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)  # orjson's range (see lean_json's docstring)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
FIELD_NAMES = [
    *sorted(_declared(lean_json.Resource) | _declared(lean_json.Bundle)),
    *["subject", "meta", "category", "text", "performer", "referenceRange", "fullUrl"],
]
ANY_JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _in_shape(tp: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values a shape accepts, with random extra (dropped) fields in every object."""
    if tp is Any:
        return ANY_JSON
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return st.one_of(*(st.none() if a is type(None) else _in_shape(a, depth) for a in _members(tp)))
    if origin is list:
        return st.lists(_in_shape(get_args(tp)[0], depth + 1), max_size=3) if depth < 5 else st.just([])
    if depth >= 5:
        return st.just({})
    hints = get_type_hints(tp)
    declared = st.fixed_dictionaries({}, optional={k: _in_shape(h, depth + 1) for k, h in hints.items()})
    dropped = st.sampled_from(["subject", "meta", "text", "x", "display"])
    extra = st.dictionaries(dropped, ANY_JSON, max_size=2)
    return st.tuples(extra, declared).map(lambda pair: {**pair[0], **pair[1]})


def _check_against_orjson(decoder: LeanDecoder, raw: bytes) -> Any:
    lean = decoder.decode(raw)
    try:
        full = orjson.loads(raw)
    except orjson.JSONDecodeError:
        assert lean is None, "a body orjson refuses is decoded in full (and refused) as before"
        return None
    try:
        expected = _project(full, decoder.request_type)
    except _NotInShape:
        assert lean is None
        return None
    assert lean is not None
    _check_structs_are_bulk_resources(lean)
    assert msgspec.to_builtins(lean) == expected
    return lean


def _check_structs_are_bulk_resources(value: Any, key: str = "") -> None:
    """Structs stand only for Observations and administrations (in the Bundles that search them);
    everything else is plain JSON."""
    if type(value) is lean_json.LeanEntry:  # (the entries of those Bundles)
        assert type(value.search) in (lean_json.LeanSearch, msgspec.UnsetType), key
        _check_structs_are_bulk_resources(value.resource, f"{key}.resource")
        return
    if isinstance(value, msgspec.Struct):
        assert type(value) is lean_json.LeanResource, key
        assert value.resourceType in ("Observation", "MedicationAdministration"), key
        return
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for inner_key, item in items:
        _check_structs_are_bulk_resources(item, f"{key}.{inner_key}")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_lean_decode_is_the_full_decode_without_the_fields_no_stage_reads(
    decoder: LeanDecoder, data: st.DataObject
) -> None:
    request = data.draw(_in_shape(decoder.request_type))
    assert _check_against_orjson(decoder, orjson.dumps(request)) is not None or request is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefetch=st.dictionaries(
        st.sampled_from(["patient", "observations", "medicationAdministrations", "conditions", "other"]),
        st.none()
        | ANY_JSON
        | st.builds(lambda entry: {"resourceType": "Bundle", "entry": entry}, st.lists(ANY_JSON)),
        max_size=4,
    )
)
def test_random_json_in_place_of_a_resource_is_decoded_as_before(
    decoder: LeanDecoder, prefetch: dict[str, Any]
) -> None:
    _check_against_orjson(decoder, orjson.dumps({"hook": "patient-view", "prefetch": prefetch}))


def test_what_no_stage_reads_is_not_built(decoder: LeanDecoder, screener: Screener) -> None:
    scenario = all_scenarios(datetime(2026, 11, 30, 12, tzinfo=UTC))[0]
    body = orjson.dumps(hook_request(scenario, screener.plan.templates()))
    lean = decoder.decode(body)
    assert lean is not None
    observation = lean["prefetch"]["observations"]["entry"][0].resource.as_dict()
    full = orjson.loads(body)["prefetch"]["observations"]["entry"][0]["resource"]
    assert "subject" in full and "subject" not in observation
    assert observation["valueQuantity"] == full["valueQuantity"]
    # The Patient is kept whole: it is validated with fhir.resources.
    assert lean["prefetch"]["patient"] == orjson.loads(body)["prefetch"]["patient"]


def test_a_body_out_of_the_ordinary_is_left_to_the_full_decode(decoder: LeanDecoder) -> None:
    observation = {"resourceType": "Observation", "valueQuantity": "7 mmol/L"}  # not a Quantity
    body = {"hook": "patient-view", "prefetch": {"observations": {"resourceType": "Bundle", "entry": [
        {"resource": observation}]}}}  # fmt: skip
    assert decoder.decode(orjson.dumps(body)) is None
    assert decoder.decode(b"[1, 2]") is None
    assert decoder.decode(b'{"hook": "patient-view",}') is None


# -- the same screening ---------------------------------------------------------------------------


def _screen(screener: Screener, body: Any, at: float) -> ScreeningOutcome | str:
    request = parse_hook_request(body, "patient-view")
    fhir = {**screener.settings.section("fhir")}
    try:
        data = gather(request, screener.plan, None, fhir, at)
    except HookError as exc:
        return f"{exc.status}: {exc.diagnostics}"
    return screener.screen(request.patient_id, data, at)


def _same_screening(screener: Screener, raw: bytes, at: float) -> bool:
    """Screens the body decoded in full and decoded lean; True when the lean decode was taken."""
    lean = screener.request_decoder.decode(raw)
    if lean is None:
        return False
    full, thin = _screen(screener, orjson.loads(raw), at), _screen(screener, lean, at)
    if isinstance(full, str) or isinstance(thin, str):
        assert full == thin
        return True
    assert thin.facts == full.facts
    assert thin.inputs == full.inputs
    assert thin.results == full.results
    return True


def test_every_scenario_patient_screens_the_same_both_ways(screener: Screener) -> None:
    at = datetime(2026, 11, 30, 12, tzinfo=UTC)
    scenarios = all_scenarios(at)
    for scenario in scenarios:
        raw = orjson.dumps(hook_request(scenario, screener.plan.templates()))
        assert _same_screening(screener, raw, at.timestamp()), scenario.name


def _as_prefetch(resources: list[Any], patient_id: str) -> bytes:
    """Resources as the prefetch of a request: each in the Bundle of the key that asks for its type."""
    keys = {
        "MedicationAdministration": "medicationAdministrations",
        "Medication": "medicationAdministrations",
        "Condition": "conditions",
    }
    bundles: dict[str, list[Any]] = {"observations": [], "medicationAdministrations": [], "conditions": []}
    patient = None
    for resource in resources:
        kind = resource.get("resourceType") if isinstance(resource, dict) else None
        if kind == "Patient" and patient is None:
            patient = resource
            continue
        bundles[keys.get(str(kind), "observations")].append({"resource": resource})
    prefetch: dict[str, Any] = {
        key: {"resourceType": "Bundle", "type": "searchset", "entry": entries}
        for key, entries in bundles.items()
    }
    prefetch["patient"] = patient
    return orjson.dumps(
        {
            "hook": "patient-view",
            "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": {"userId": "Practitioner/doc-1", "patientId": patient_id},
            "prefetch": prefetch,
        }
    )


#: The resource types a prefetch Bundle of this service's plan holds.
PREFETCH_TYPES = {
    *("Observation", "MedicationAdministration", "Medication", "Condition"),
    *("OperationOutcome", "Patient"),
}


def _documents(folder: Path, pattern: str) -> list[Any]:
    documents = []
    for path in sorted(folder.glob(pattern)):
        if path.suffix == ".ndjson":
            documents.extend(orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip())
            continue
        try:
            documents.append(orjson.loads(path.read_bytes()))
        except orjson.JSONDecodeError:
            continue
    return documents


def _resources(document: Any) -> list[Any]:
    if isinstance(document, dict) and document.get("resourceType") == "Bundle":
        return [e.get("resource") for e in document.get("entry") or () if isinstance(e, dict)]
    return [document] if isinstance(document, dict) and "resourceType" in document else []


def test_the_corpus_screens_the_same_both_ways(screener: Screener) -> None:
    """synthea and clinosim patients, and every HL7 R4 example (odd-but-valid shapes), as prefetch."""
    _require(SYNTHEA, "synthea output")
    _require(CLINOSIM, "clinosim output")
    _require(HL7, "npm hl7.fhir.r4.examples")
    at = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    patients = [("synthea", _resources(d)) for d in _documents(SYNTHEA, "*.json")]
    patients.append(("clinosim", _documents(CLINOSIM, "*.ndjson")))
    patients += [("hl7", _resources(d)) for d in _documents(HL7, "*.json") if _resources(d)]
    assert len(patients) > 2000
    in_shape = 0
    for source, resources in patients:
        taken = _same_screening(screener, _as_prefetch(resources, source), at)
        # What an EHR's prefetch holds is always in the shapes, however odd (the lean decode is
        # taken); other resource types (SearchParameter's string `code` …) may be decoded in full.
        if all(isinstance(r, dict) and r.get("resourceType") in PREFETCH_TYPES for r in resources):
            assert taken, (source, [r.get("id") for r in resources][:5])
            in_shape += 1
    assert in_shape > 100


# -- Observations as Structs -----------------------------------------------------------------------


def test_a_resource_struct_has_the_fields_of_a_resource() -> None:
    """``LeanResource.as_dict()`` can only be the ``Resource`` dict if both declare the same
    fields, and the Structs inside it the same fields as the shapes they stand for."""
    pairs = [
        (lean_json.LeanResource, lean_json.Resource),
        (lean_json.LeanCodeableConcept, lean_json.CodeableConcept),
        (lean_json.LeanCoding, lean_json.Coding),
        (lean_json.LeanQuantity, lean_json.Quantity),
        (lean_json.LeanDosage, lean_json.Dosage),
        (lean_json.LeanComponent, lean_json.Component),
        (lean_json.LeanEntry, lean_json.Entry),
        (lean_json.LeanSearch, lean_json.EntrySearch),
    ]
    for struct, shape in pairs:
        assert set(get_type_hints(struct)) == set(get_type_hints(shape)), struct.__name__


def _observation_strategy(knowledge: Any) -> st.SearchStrategy[dict[str, Any]]:
    """Observations as charts write them, from a small pool of codes, units and times (so that
    several share a code and a unit, which is what the Struct path's memos are for), with the odd
    cases mixed in: censored values, units needing conversion, panels, missing systems, bad times."""
    codes = sorted(knowledge.observation_codes)[:12] + sorted(knowledge.panels)[:2]
    codes += ["http://loinc.org|0000-0", "urn:local|HR"]
    units = sorted({unit for accepted in knowledge.observation_units.values() for unit in accepted})[:10]
    units += ["", "mg", "%", "mm[Hg]", "/min"]

    def coding(token: str) -> st.SearchStrategy[dict[str, Any]]:
        system, _, code = token.partition("|")
        return st.fixed_dictionaries(
            {}, optional={"system": st.just(system), "code": st.just(code), "display": st.text(max_size=3)}
        )

    def concept(pool: list[str]) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries(
            {"coding": st.lists(st.sampled_from(pool).flatmap(coding), min_size=1, max_size=2)},
            optional={"text": st.text(max_size=3)},
        )

    quantity = st.fixed_dictionaries(
        {},
        optional={
            "value": st.integers(-5, 300) | st.floats(-5, 300) | st.sampled_from(["7", None, True]),
            "unit": st.sampled_from(units),
            "system": st.sampled_from(["http://unitsofmeasure.org", "http://unitsofmeasure.org", "urn:x"]),
            "code": st.sampled_from(units),
            "comparator": st.sampled_from(["<", ">=", "", None]),
        },
    )
    # A panel's components: its parts (systolic, diastolic: the mean is derived from them), the mean
    # itself, another input's code and an unknown one; mostly a UCUM pressure as monitors chart it,
    # sometimes censored, in another unit, odd, or with no code, no quantity, another value type.
    parts = [
        token
        for panel in knowledge.panels.values()
        for name in (panel.systolic, panel.diastolic, panel.mean_into)
        for token, item in knowledge.observation_codes.items()
        if item.name == name
    ][:6]
    pressure = st.fixed_dictionaries(
        {
            "value": st.integers(20, 250) | st.floats(20, 250) | st.sampled_from(["7", None]),
            "system": st.sampled_from(["http://unitsofmeasure.org"] * 4 + ["urn:x"]),
            "code": st.sampled_from(["mm[Hg]"] * 4 + ["kPa", "", "mg"]),
        },
        optional={"unit": st.just("mmHg"), "comparator": st.sampled_from(["<", ">=", "", None])},
    )
    component = st.fixed_dictionaries(
        {},
        optional={
            "code": concept([*parts, codes[0], "http://loinc.org|0000-0"]),
            "valueQuantity": pressure | quantity,
            "valueInteger": st.integers(0, 20),
            "dataAbsentReason": st.just({"text": "not measured"}),
        },
    )
    times = ["2026-11-29T10:00:00Z", "2026-11-29T11:00:00+01:00", "2026-11-29", "2026-11-29T10:00:00", ""]
    panel_reading = st.fixed_dictionaries(
        {
            "resourceType": st.just("Observation"),
            "id": st.sampled_from(["o1", "o2"]),
            "status": st.just("final"),
            "code": st.fixed_dictionaries(
                {
                    "coding": st.lists(
                        st.sampled_from(sorted(knowledge.panels)).flatmap(coding), min_size=1, max_size=1
                    )
                }
            ),
            "effectiveDateTime": st.sampled_from(times[:2]),
            "component": st.lists(component, min_size=1, max_size=3),
        }
    )
    return panel_reading | st.fixed_dictionaries(
        {"resourceType": st.just("Observation")},
        optional={
            "id": st.sampled_from(["o1", "o2"]) | st.none() | st.just(7),
            "status": st.sampled_from(["final", "final", "amended", "entered-in-error", "cancelled", None]),
            "code": concept(codes),
            "effectiveDateTime": st.sampled_from(times) | st.none(),
            "effectiveInstant": st.sampled_from(times[:1]),
            "issued": st.sampled_from(times[:2]),
            "valueQuantity": quantity,
            "valueInteger": st.integers(0, 20),
            "valueString": st.sampled_from(["positive", "7"]),
            "dataAbsentReason": st.just({"text": "not measured"}),
            "component": st.lists(component, max_size=3),
        },
    )


def _administration_strategy(knowledge: Any) -> st.SearchStrategy[dict[str, Any]]:
    """Infusion records as EHRs chart them, from a small pool of drugs, units and times, with the
    odd cases mixed in: Medications by reference (contained or not), periods, pump rates in mL/h,
    doses in dosage.dose, rate ratios, uncoded drugs named by text, bad times."""
    drugs = [*sorted(knowledge.drug_codes)[:6], "http://www.nlm.nih.gov/research/umls/rxnorm|0000"]
    units = [*sorted(knowledge.rate_units)[:6], "mL/h", "", "mg"]
    times = ["2026-11-29T10:00:00Z", "2026-11-29T11:00:00+01:00", "2026-11-29", "bad"]

    def coding(token: str) -> st.SearchStrategy[dict[str, Any]]:
        system, _, code = token.partition("|")
        return st.fixed_dictionaries({}, optional={"system": st.just(system), "code": st.just(code)})

    concept = st.fixed_dictionaries(
        {},
        optional={
            "coding": st.lists(st.sampled_from(drugs).flatmap(coding), max_size=2),
            "text": st.sampled_from(["norepinephrine", "saline", ""]),
        },
    )
    quantity = st.fixed_dictionaries(
        {},
        optional={
            "value": st.integers(0, 50) | st.floats(0, 50) | st.sampled_from([None, "1"]),
            "unit": st.sampled_from(units),
            "system": st.sampled_from(["http://unitsofmeasure.org", "http://unitsofmeasure.org", "urn:x"]),
            "code": st.sampled_from(units),
        },
    )
    dosage = st.fixed_dictionaries(
        {},
        optional={
            "rateQuantity": quantity,
            "dose": quantity,
            "rateRatio": st.fixed_dictionaries({"numerator": quantity, "denominator": quantity}),
        },
    )
    reference = st.fixed_dictionaries(
        {},
        optional={
            "reference": st.sampled_from(["#bag", "Medication/m1", "Medication/none"]),
            "display": st.sampled_from(["norepinephrine 16 mg in 250 mL", "x"]),
        },
    )
    ucum = "http://unitsofmeasure.org"
    strength = {"numerator": {"value": 16, "system": ucum, "code": "mg"},
                "denominator": {"value": 250, "system": ucum, "code": "mL"}}  # fmt: skip
    bag = {"resourceType": "Medication", "id": "bag", "ingredient": [{"strength": strength}]}
    return st.fixed_dictionaries(
        {"resourceType": st.just("MedicationAdministration")},
        optional={
            "id": st.sampled_from(["a1", "a2"]) | st.none(),
            "status": st.sampled_from(["in-progress", "completed", "not-done", "entered-in-error"]),
            "medicationCodeableConcept": concept,
            "medicationReference": reference,
            "contained": st.just([bag]),
            "effectiveDateTime": st.sampled_from(times),
            "effectivePeriod": st.fixed_dictionaries({}, optional={"start": st.sampled_from(times),
                                                                     "end": st.sampled_from(times)}),
            "dosage": dosage,
        },
    )  # fmt: skip


def _facts_both_ways(
    decoder: LeanDecoder, screener: Screener, key: str, resources: list[dict[str, Any]]
) -> None:
    """Extraction of the resources as the lean decode gives them (Structs) and as dicts: the same facts."""
    entries = [{"resource": resource} for resource in resources]
    raw = orjson.dumps({"prefetch": {key: {"resourceType": "Bundle", "entry": entries}}})
    lean = decoder.decode(raw)
    assert lean is not None
    structs = [entry.resource for entry in lean["prefetch"][key]["entry"]]
    assert all(
        type(r) is lean_json.LeanResource
        for r, resource in zip(structs, resources, strict=True)
        if resource["resourceType"] in lean_json.STRUCT_TYPES
    )
    dicts = [entry["resource"] for entry in orjson.loads(raw)["prefetch"][key]["entry"]]
    from_structs = extract("p", None, structs, screener.knowledge)
    from_dicts = extract("p", None, dicts, screener.knowledge)
    assert from_structs == from_dicts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_administration_structs_give_the_facts_their_dicts_give(
    decoder: LeanDecoder, screener: Screener, data: st.DataObject
) -> None:
    """Extraction's Struct path for infusion records against its dict path (the oracle), with the
    Medication an administration names in the same Bundle (as ``_include`` brings it) or not."""
    administrations = data.draw(
        st.lists(_administration_strategy(screener.knowledge), min_size=1, max_size=12)
    )
    medication = {"resourceType": "Medication", "id": "m1", "code": {"text": "norepinephrine"}}
    if data.draw(st.booleans()):
        administrations = [*administrations, medication]
    _facts_both_ways(decoder, screener, "medicationAdministrations", administrations)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_observation_structs_give_the_facts_their_dicts_give(
    decoder: LeanDecoder, screener: Screener, data: st.DataObject
) -> None:
    """Extraction's Struct path against its dict path (the oracle), Observation by Observation in a
    chart's order: the same facts, unusable values, skipped and unknown codes."""
    observations = data.draw(st.lists(_observation_strategy(screener.knowledge), min_size=1, max_size=12))
    _facts_both_ways(decoder, screener, "observations", observations)


def _count_as_dict(monkeypatch: pytest.MonkeyPatch, struct: type[Any]) -> list[int]:
    """``struct.as_dict`` made to count its calls: the count is the returned list's one item."""
    calls = [0]
    as_dict = struct.as_dict

    def counting(self: Any) -> dict[str, Any]:
        calls[0] += 1
        return as_dict(self)  # type: ignore[no-any-return]

    monkeypatch.setattr(struct, "as_dict", counting)
    return calls


def test_the_struct_path_reads_an_ordinary_chart_without_its_dicts(
    decoder: LeanDecoder, screener: Screener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The oracles above would pass if every Struct were read through its dict: on ordinary charts
    (the scenario patients, the benchmark's ICU patient) the dict is built only for the unusual
    resources."""
    at = datetime(2026, 11, 30, 12, tzinfo=UTC)
    built = _count_as_dict(monkeypatch, lean_json.LeanResource)
    read = 0
    for scenario in all_scenarios(at):
        lean = decoder.decode(orjson.dumps(hook_request(scenario, screener.plan.templates())))
        assert lean is not None
        observations = (lean["prefetch"].get("observations") or {}).get("entry", [])
        resources = [entry.resource for entry in observations]
        before = built[0]
        facts = extract("p", None, resources, screener.knowledge)
        # (a value converted from another unit, or censored, carries a note)
        noted = sum(1 for series in facts.observations.values() for fact in series if fact.note)
        unusual = noted + len(facts.unusable) + sum(facts.skipped.values())
        assert built[0] - before <= unusual, scenario.name
        read += len(resources)
    assert read > 500 and built[0] < read / 50, (built[0], read)
    # An ICU chart's administrations (the benchmark's): vasopressor infusions among other drugs;
    # only the records that name a Medication by reference are read through their dicts.
    patient = bench.make_patient(200, screener.plan.queries, "t", administrations=300)
    lean = decoder.decode(patient.body)
    assert lean is not None
    records = [entry.resource for entry in lean["prefetch"]["medicationAdministrations"]["entry"]]
    built[0] = 0
    facts = extract("p", None, records, screener.knowledge)
    assert facts.administrations and built[0] < len(records) / 4, (built[0], len(records))
    # Its blood-pressure panels: each component read from its attributes.
    components = _count_as_dict(monkeypatch, lean_json.LeanComponent)
    observations = [entry.resource for entry in lean["prefetch"]["observations"]["entry"]]
    panels = [r for r in observations if r.component]
    built[0] = 0
    facts = extract("p", None, observations, screener.knowledge)
    for part in ("systolic_blood_pressure", "diastolic_blood_pressure"):
        from_components = [f for f in facts.observations[part] if f.note.startswith("component of")]
        assert panels and len(from_components) == len(panels), (part, len(from_components), len(panels))
    assert built[0] == 0 and components[0] == 0, (built[0], components[0])


@pytest.mark.parametrize("kind", [[], {}, 7, None, "Medication", "OperationOutcome"])
@pytest.mark.parametrize("key", ["observations", "medicationAdministrations"])
def test_any_other_resource_type_in_a_struct_bundle_stays_a_dict(
    decoder: LeanDecoder, key: str, kind: Any
) -> None:
    """A Medication that ``_include`` brings, an outcome entry, a malformed ``resourceType`` (the
    fuzzer's list): decoded as the dicts they always were, never a Struct (nor a 500)."""
    resource = {"resourceType": kind, "id": "x", "status": "final", "subject": {"reference": "Patient/p"}}
    body = {
        "hook": "patient-view",
        "prefetch": {key: {"resourceType": "Bundle", "entry": [{"resource": resource}]}},
    }
    lean = _check_against_orjson(decoder, orjson.dumps(body))
    assert lean["prefetch"][key]["entry"][0].resource == {
        "resourceType": kind,
        "id": "x",
        "status": "final",
    }


@pytest.mark.parametrize("key", ["observations", "medicationAdministrations"])
def test_struct_entries_are_read_as_dict_entries_are(decoder: LeanDecoder, key: str) -> None:
    """The entries of those Bundles are Structs in the lean decode and dicts in the full one (a body
    the lean decode does not take): gathering and the FHIR client's paging read both alike. An
    outcome entry (a server's warning) is dropped; an entry without a resource is passed on as None
    by gathering (extraction counts it as skipped) and left out by the client."""
    from cds_service.patient_data import fhir_client
    from cds_service.patient_data import gather as gathering

    kind = "Observation" if key == "observations" else "MedicationAdministration"
    entries = [
        {"resource": {"resourceType": kind, "id": "a", "status": "final"}, "search": {"mode": "match"}},
        {"resource": {"resourceType": "OperationOutcome", "id": "w"}, "search": {"mode": "outcome"}},
        {"search": {"mode": "match"}},
        {"resource": {"resourceType": "Medication", "id": "m"}, "search": {"mode": "include"}},
        {"resource": {"resourceType": kind, "id": "b"}, "search": {}},
    ]
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": entries}
    raw = orjson.dumps({"hook": "patient-view", "prefetch": {key: bundle}})
    lean = decoder.decode(raw)
    assert lean is not None and all(type(e) is lean_json.LeanEntry for e in lean["prefetch"][key]["entry"])
    full = orjson.loads(raw)

    def named(resources: list[Any]) -> list[Any]:
        return [
            None
            if r is None
            else (r.resourceType, r.id)
            if type(r) is lean_json.LeanResource
            else (r["resourceType"], r["id"])
            for r in resources
        ]

    for decoded in (lean, full):
        prefetch_bundle = decoded["prefetch"][key]
        assert named(gathering._bundle_resources(prefetch_bundle, key)) == [
            (kind, "a"), None, ("Medication", "m"), (kind, "b")
        ]  # fmt: skip
        assert named(fhir_client._bundle_resources(prefetch_bundle, "prefetch Bundle")) == [
            (kind, "a"), ("Medication", "m"), (kind, "b")
        ]  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_fetched_search_page_is_decoded_as_the_same_bundle_in_prefetch(
    decoder: LeanDecoder, screener: Screener, data: st.DataObject
) -> None:
    """With no prefetch, the FHIR client decodes each page of the Observation and administration
    searches as the lean decoder decodes the same Bundle sent in prefetch: the same Structs, and so
    the facts the page decoded in full (the oracle) gives."""
    from cds_service.patient_data import fhir_client

    observations = data.draw(st.lists(_observation_strategy(screener.knowledge), max_size=8))
    administrations = data.draw(st.lists(_administration_strategy(screener.knowledge), max_size=8))
    medication = {"resourceType": "Medication", "id": "m1", "code": {"text": "norepinephrine"}}
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "warning", "code": "informational"}],
    }
    for key, resources in (
        ("observations", observations),
        ("medicationAdministrations", [*administrations, medication]),
    ):
        entries: list[dict[str, Any]] = [{"resource": r, "search": {"mode": "match"}} for r in resources]
        entries.append({"resource": outcome, "search": {"mode": "outcome"}})
        bundle = {"resourceType": "Bundle", "type": "searchset", "link": [{"relation": "self", "url": "u"}]}
        raw = orjson.dumps({**bundle, "entry": entries})
        page = lean_json.decode_search_page(raw)
        in_prefetch = decoder.decode(orjson.dumps({"prefetch": {key: orjson.loads(raw)}}))
        assert page is not None and in_prefetch is not None
        assert page == in_prefetch["prefetch"][key]
        lean = fhir_client._bundle_resources(page, "page")
        full = fhir_client._bundle_resources(orjson.loads(raw), "page")
        assert [type(r) is lean_json.LeanResource for r in lean] == [
            r["resourceType"] in lean_json.STRUCT_TYPES for r in full
        ]
        assert extract("p", None, lean, screener.knowledge) == extract("p", None, full, screener.knowledge)


def test_a_fetched_page_out_of_the_ordinary_is_decoded_in_full(fault_server: FaultServer) -> None:
    """A page the lean shapes do not take (here a code sent as a bare string) comes back exactly as
    without the lean decode; an ordinary one gives Structs for the Observations only, and never to
    a caller that did not ask (the client's other users get dicts)."""
    from cds_service.base.config import DEFAULTS
    from cds_service.patient_data.fhir_client import FhirClient

    odd = {"resourceType": "Observation", "id": "odd", "status": "final", "code": "8478-0"}
    usual = {"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "MAP"}}
    fault_server.bundle("Observation", [odd])
    fault_server.bundle("Condition", [{"resourceType": "Condition", "id": "c"}])
    with FhirClient({**DEFAULTS["fhir"], "allow_http": True}) as client:
        queries = {"o": "Observation?patient=p", "c": "Condition?patient=p"}

        def search(lean: bool) -> dict[str, list[Any]]:
            return client.search_many(fault_server.base_url, None, queries, time.monotonic() + 5, lean=lean)

        assert (
            search(lean=True)
            == search(lean=False)
            == {"o": [odd], "c": [{"resourceType": "Condition", "id": "c"}]}
        )
        fault_server.bundle("Observation", [usual])
        found = search(lean=True)
        assert type(found["o"][0]) is lean_json.LeanResource and found["o"][0].as_dict() == usual
        assert type(found["c"][0]) is dict
        assert search(lean=False)["o"] == [usual]
