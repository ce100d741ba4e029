"""Patient data for one hook call: prefetch in every shape, and the FHIR fallback.

Prefetch templates are built from the mapping files and the screened trials: Observations only for
the LOINC codes the criteria use. Reading prefetch follows CDS Hooks 2.0:

- key present with a searchset Bundle → its entries (its ``next`` pages fetched through fhirServer);
- key present but ``null`` → the client found no data;
- key missing, or an OperationOutcome in its place → we fetch it ourselves from ``fhirServer``
  (restricted to the look-back window), with the bearer token when one was given;
- data we need and cannot obtain → ``DataUnavailable`` → HTTP 412.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from ..base.errors import HookError
from ..knowledge.mappings import Knowledge
from ..knowledge.trials import Trial
from .extract import medication_key
from .fhir_client import DataUnavailable, FhirClient
from .hook_request import HookRequest
from .lean_json import UNSET, LeanEntry, LeanResource

PATIENT_TOKEN = "{{context.patientId}}"
MEDICATION_INCLUDE = "MedicationAdministration:medication"
#: At most this many referenced Medications are fetched by id for one hook (one bounded query).
MAX_MEDICATIONS = 50


@dataclass(frozen=True)
class PrefetchQuery:
    key: str
    template: str  # CDS Hooks 2.0 prefetch template (only the context.patientId token)
    resource_type: str
    date_param: str | None  # search parameter that restricts to the look-back window when we fetch
    single_page: bool = False  # "the latest N" (_sort=-date&_count=N): never follow `next`
    #: What the key delivers: observation input names, "administrations", "conditions", "patient".
    #: When the key is null (or missing with no fhirServer), these are unavailable: unknown, not "no".
    delivers: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PrefetchPlan:
    queries: tuple[PrefetchQuery, ...]
    observation_inputs: frozenset[str]

    def templates(self) -> dict[str, str]:
        return {q.key: q.template for q in self.queries}


def _codes(tokens: list[str]) -> str:
    # "/" is percent-encoded: proxies that collapse "//" in a URL (the SMART Health IT launcher's
    # FHIR proxy does) would otherwise turn "http://loinc.org|…" into "http:/loinc.org|…".
    return ",".join(quote(token, safe="|:.-") for token in tokens)


def build_prefetch_plan(knowledge: Knowledge, trials: list[Trial], page_size: int) -> PrefetchPlan:
    """Prefetch templates restricted to what the screened trials need."""
    needed: set[str] = set()
    for trial in trials:
        needed |= trial.inputs()
    observation_inputs = {name for name in needed if name in knowledge.inputs}
    queries = [
        PrefetchQuery("patient", f"Patient/{PATIENT_TOKEN}", "Patient", None, delivers=frozenset({"patient"}))
    ]
    window_codes = knowledge.observation_query_codes(observation_inputs, "window")
    window_inputs = frozenset(
        name for name in observation_inputs if knowledge.inputs[name].query == "window"
    ) | frozenset(
        part
        for panel in knowledge.panels.values()
        if {panel.systolic, panel.diastolic, panel.mean_into} & observation_inputs
        for part in (panel.systolic, panel.diastolic, panel.mean_into)
        if part
    )
    if window_codes:
        queries.append(
            PrefetchQuery(
                "observations",
                f"Observation?patient={PATIENT_TOKEN}&code={_codes(window_codes)}&_count={page_size}",
                "Observation",
                "date",
                delivers=window_inputs,
            )
        )
    # Rarely charted inputs (weight, LVEF, pregnancy test): the latest few values whatever their age,
    # one query per input so that one input's many values cannot crowd out another's.
    for name in sorted(observation_inputs):
        codes = knowledge.observation_query_codes({name}, "latest")
        if codes:
            key = "latest" + "".join(part.capitalize() for part in name.split("_"))
            template = f"Observation?patient={PATIENT_TOKEN}&code={_codes(codes)}&_sort=-date&_count=5"
            queries.append(
                PrefetchQuery(
                    key, template, "Observation", None, single_page=True, delivers=frozenset({name})
                )
            )
    # The Medications the administrations name come along (_include): an infusion charted as a pump
    # rate in mL/h needs the bag's strength. Ones still missing are fetched by id (fetch_medications).
    queries.append(
        PrefetchQuery(
            "medicationAdministrations",
            f"MedicationAdministration?patient={PATIENT_TOKEN}&_include={MEDICATION_INCLUDE}&_count={page_size}",
            "MedicationAdministration",
            "effective-time",
            delivers=frozenset({"administrations"}),
        )
    )
    queries.append(
        PrefetchQuery(
            "conditions",
            f"Condition?patient={PATIENT_TOKEN}&_count={page_size}",
            "Condition",
            None,
            delivers=frozenset({"conditions"}),
        )
    )
    return PrefetchPlan(tuple(queries), frozenset(observation_inputs))


@dataclass
class RawPatientData:
    patient: dict[str, Any] | None
    resources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    fetched: list[str] = field(default_factory=list)  # keys we had to fetch ourselves
    #: Keys whose data could not be had: sent as null, or missing with no fhirServer to fetch from.
    unavailable: set[str] = field(default_factory=set)

    def all_resources(self) -> list[dict[str, Any]]:
        return [resource for values in self.resources.values() for resource in values]


def _fill(template: str, patient_id: str) -> str:
    return template.replace(PATIENT_TOKEN, quote(patient_id, safe=""))


def _since(at: float, lookback_hours: float) -> str:
    start = datetime.fromtimestamp(at, tz=UTC) - timedelta(hours=lookback_hours)
    return start.strftime("%Y-%m-%dT%H:%M:%SZ")


def _bundle_resources(bundle: dict[str, Any], key: str) -> list[Any]:
    """The entries' resources. A malformed entry is passed on as-is: extraction counts it as skipped."""
    entries = bundle.get("entry")
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise HookError(400, f"prefetch.{key}: Bundle.entry must be a list", [f"prefetch.{key}.entry"])
    out: list[Any] = []
    for entry in entries:
        if type(entry) is LeanEntry:  # (the lean decode of a Bundle that may hold Structs)
            search = entry.search
            if search is not UNSET and search.mode == "outcome":
                continue
            resource = entry.resource
            out.append(None if resource is UNSET else resource)
            continue
        if not isinstance(entry, dict):
            out.append(entry)
            continue
        search = entry.get("search")
        if isinstance(search, dict) and search.get("mode") == "outcome":
            continue
        out.append(entry.get("resource"))
    return out


def _has_next(bundle: dict[str, Any]) -> bool:
    links = bundle.get("link")
    return isinstance(links, list) and any(
        isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str)
        for link in links
    )


def gather(
    request: HookRequest,
    plan: PrefetchPlan,
    client: FhirClient | None,
    fhir: dict[str, Any],
    at: float,
    deadline: float | None = None,
) -> RawPatientData:
    """Collect the patient's data from prefetch, fetching what is missing. Raises DataUnavailable."""
    deadline = deadline if deadline is not None else time.monotonic() + float(fhir["deadline_seconds"])
    prefetch = request.prefetch or {}
    data = RawPatientData(patient=None)
    to_fetch: dict[str, str] = {}
    to_follow: dict[str, dict[str, Any]] = {}
    for query in plan.queries:
        if query.key in prefetch:
            value = prefetch[query.key]
            if value is None:
                # The client says it has no data for this key: every criterion that depends on it
                # is unknown, never "not met" (README, "Patient data").
                data.resources[query.key] = []
                data.unavailable.add(query.key)
                continue
            if not isinstance(value, dict):
                raise HookError(
                    400, f"prefetch.{query.key}: must be a FHIR resource or null", [f"prefetch.{query.key}"]
                )
            kind = value.get("resourceType")
            if kind == "Bundle":
                if _has_next(value) and not query.single_page:
                    to_follow[query.key] = value
                else:
                    data.resources[query.key] = _bundle_resources(value, query.key)
                continue
            if kind == query.resource_type == "Patient":
                data.patient = value
                continue
            if kind != "OperationOutcome":
                raise HookError(
                    400,
                    f"prefetch.{query.key}: expected a {query.resource_type} "
                    f"{'resource' if query.resource_type == 'Patient' else 'Bundle'}, got {kind!r}",
                    [f"prefetch.{query.key}"],
                )
            # An OperationOutcome: the client's query failed; fetch it ourselves.
        if query.resource_type == "Patient":
            # A search, not a read, so that it runs concurrently with the other queries.
            to_fetch[query.key] = f"Patient?_id={quote(request.patient_id, safe='')}"
            continue
        url = _fill(query.template, request.patient_id)
        if query.date_param:
            url += f"&{query.date_param}=ge{_since(at, float(fhir['lookback_hours']))}"
        to_fetch[query.key] = url
    if (to_fetch or to_follow) and not request.fhir_server:
        if len(to_fetch) == len(plan.queries):
            raise DataUnavailable("no prefetch data and the request has no fhirServer to fetch from")
        # Keys the client did not send, with no server to fetch them from: unknown, not "none".
        data.unavailable.update(to_fetch)
        for key, bundle in to_follow.items():  # the first page is all there is
            data.resources[key] = _bundle_resources(bundle, key)
            data.unavailable.add(key)
        return data
    if to_fetch or to_follow:
        assert client is not None and request.fhir_server is not None
        client.check_server(request.fhir_server)
        single_page = {q.key for q in plan.queries if q.single_page}
        budget = client.new_budget()  # one hook's FHIR responses together: fhir.max_response_bytes
        types = {q.key: q.resource_type for q in plan.queries}
        # The searches and the prefetch Bundles' next pages, all at once (one key's pages follow
        # one another; different keys' do not wait for each other).
        fetched = client.search_many(
            request.fhir_server,
            request.access_token,
            {key: to_fetch[key] for key in sorted(to_fetch, key=_send_order(plan))},
            deadline,
            single_page=single_page,
            budget=budget,
            follow={key: (bundle, types[key]) for key, bundle in to_follow.items()},
            lean=True,  # the bulk resources as Structs, as the lean decoder gives them in prefetch
        )
        patients = fetched.pop("patient", None)
        if patients is not None:
            data.patient = next((p for p in patients if p.get("resourceType") == "Patient"), None)
        # In the plan's order, searches then followed Bundles: extraction meets the resources in
        # the same order as ever, whatever order they were sent in.
        data.resources.update({key: fetched[key] for key in [*to_fetch, *to_follow] if key in fetched})
        data.fetched = sorted([*to_fetch, *to_follow])
    if request.fhir_server and client is not None:
        fetch_medications(request, client, data, deadline)
    return data


def _send_order(plan: PrefetchPlan) -> Callable[[str], tuple[bool, bool]]:
    """Sort key of the searches as they are handed to the client's pool: the ones over the look-back
    window (every Observation and administration of 72 h, paged) first, then the other paged ones,
    then the single-page and Patient searches. The server takes longest over the first; sending
    a search costs the client ~1 ms of CPU, so the last of seven goes out several ms after the
    first, and that delay should fall on the short searches, not on the longest chain."""
    rank = {
        query.key: (query.single_page or query.resource_type == "Patient", query.date_param is None)
        for query in plan.queries
    }
    return lambda key: rank.get(key, (True, True))


def _missing_medications(data: RawPatientData) -> list[str]:
    """Ids of Medications that administrations name but the data does not hold (not contained).

    One pass over the data (it holds every Observation too); an administration with no
    ``medicationReference`` names no Medication and is passed over first."""
    have: set[str] = set()
    named: list[str] = []  # "Medication/<id>" in the order administrations name them
    for values in data.resources.values():
        for resource in values:
            if type(resource) is LeanResource:
                # An administration the request's decoding left as a Struct (an Observation has
                # no medicationReference): the dict it stands for, only when it names a Medication.
                if resource.medicationReference is UNSET:
                    continue
                resource = resource.as_dict()
            if not isinstance(resource, dict):
                continue
            kind = resource.get("resourceType")
            if kind == "Medication":
                have.add(f"Medication/{resource.get('id')}")
                continue
            named_by = resource.get("medicationReference")
            if kind != "MedicationAdministration" or not isinstance(named_by, dict):
                continue  # (a malformed reference names nothing: extraction counts it as skipped)
            if isinstance(resource.get("medicationCodeableConcept"), dict) and not _needs_strength(resource):
                continue
            reference = named_by.get("reference")
            if not isinstance(reference, str) or reference.startswith("#") or "Medication/" not in reference:
                continue
            named.append(medication_key(reference))
    # An ordered set: first named, first fetched.
    wanted = dict.fromkeys(key for key in named if key not in have)
    return [key.split("/", 1)[1] for key in itertools.islice(wanted, MAX_MEDICATIONS)]


def _needs_strength(resource: dict[str, Any]) -> bool:
    """A pump rate with no dose in a dose unit: the Medication's strength is needed."""
    dosage = resource.get("dosage")
    return isinstance(dosage, dict) and ("rateQuantity" in dosage or "rateRatio" in dosage)


def fetch_medications(
    request: HookRequest, client: FhirClient, data: RawPatientData, deadline: float
) -> None:
    """Fetch, in one bounded query within the hook's deadline, the Medications that administrations
    reference but neither prefetch nor ``_include`` brought (a server that ignores ``_include``).

    A failure leaves them unresolved: the VIS says it lacks the bag strength (unknown), rather than
    the whole hook failing for one drug's concentration."""
    ids = _missing_medications(data)
    if not ids or request.fhir_server is None:
        return
    query = f"Medication?_id={','.join(quote(i, safe='') for i in ids)}&_count={len(ids)}"
    try:
        found = client.search_many(
            request.fhir_server,
            request.access_token,
            {"medications": query},
            deadline,
            single_page={"medications"},
        )
    except DataUnavailable:
        return
    data.resources["medications"] = found.get("medications", [])
    data.fetched = sorted({*data.fetched, "medications"})
