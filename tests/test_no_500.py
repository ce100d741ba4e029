"""No input may produce a 500: random and mutated JSON thrown at the hook and feedback routes.

Hypothesis generates arbitrary JSON and mutations of a valid request (fields removed, replaced
by other JSON values, prefetch entries swapped for junk resources). Every answer must be a
documented status; every error an OperationOutcome.

The valid request names a ``fhirServer`` (allowed, with a token) on a refused loopback port: a
mutation that drops or breaks a prefetch key sends the service to fetch it, and that path must end
in a 412, never a 500 (``test_every_dropped_prefetch_key_is_fetched_and_ends_in_412`` shows that
the path is taken).
"""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.app import create_app
from cds_service.tools.scenario_builder import PatientBuilder
from tests.conftest import SERVICE_URL, CardCheckingClient, hook_body, make_settings
from tests.fault_server import refused_url

ALLOWED_STATUSES = {200, 400, 404, 412, 413}
#: Where the valid request's fhirServer points: allowed, plain http, nothing listening (instant refusal).
REFUSED_FHIR = refused_url()

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def _valid_request() -> dict[str, Any]:
    at = datetime.now(UTC).replace(microsecond=0)  # a request that gets cards now
    builder = PatientBuilder("cdsh-fuzz", at, age=45, gender="female")
    builder.septic_shock_story(onset_hours=4)
    builder.anc(400, hours=2, unit="/uL")
    builder.bp_panel(80, 40, hours=1)
    builder.observation("2106-3", None, "", 3, value_codeable=("http://snomed.info/sct", "260385009"))
    return hook_body(builder, fhir_server=REFUSED_FHIR, token="fuzz-token")


VALID = _valid_request()
PATHS: list[tuple[Any, ...]] = []


def _collect(node: Any, path: tuple[Any, ...], into: list[tuple[Any, ...]]) -> None:
    into.append(path)
    if isinstance(node, dict):
        for key, value in node.items():
            _collect(value, (*path, key), into)
    elif isinstance(node, list):
        for index, value in enumerate(node[:3]):
            _collect(value, (*path, index), into)


_collect(VALID, (), PATHS)
PATHS.remove(())


def _mutate(document: dict[str, Any], path: tuple[Any, ...], value: Any, delete: bool) -> dict[str, Any]:
    mutated = copy.deepcopy(document)
    node = mutated
    for key in path[:-1]:
        node = node[key]
    if delete and isinstance(node, dict):
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return mutated


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    app = create_app(
        make_settings(
            tmp, fhir={"deadline_seconds": 0.5, "allow_http": True, "allowed_servers": [REFUSED_FHIR]}
        )
    )
    app.test_client_class = CardCheckingClient
    return app.test_client()


def _check(response: Any) -> None:
    assert response.status_code in ALLOWED_STATUSES, (response.status_code, response.data[:500])
    if response.status_code != 200:
        assert response.get_json()["resourceType"] == "OperationOutcome"


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(body=json_values)
def test_random_json_to_the_hook(fuzz_client: Any, body: Any) -> None:
    _check(fuzz_client.post(SERVICE_URL, json=body))


@FUZZ
@given(path=st.sampled_from(PATHS), value=json_values, delete=st.booleans())
def test_mutated_hook_requests(fuzz_client: Any, path: tuple[Any, ...], value: Any, delete: bool) -> None:
    _check(fuzz_client.post(SERVICE_URL, json=_mutate(VALID, path, value, delete)))


def test_the_valid_request_is_valid_and_its_fhir_server_is_mutated_too(fuzz_client: Any) -> None:
    """The mutations start from a request the service answers with cards, and reach fhirServer."""
    response = fuzz_client.post(SERVICE_URL, json=VALID)
    assert response.status_code == 200 and response.get_json()["cards"]
    assert {("fhirServer",), ("fhirAuthorization",), ("fhirAuthorization", "access_token")} <= set(PATHS)


@pytest.mark.parametrize("bad_id", [[], 12, "not an id!", None, "x" * 65])
def test_resources_whose_id_is_not_a_fhir_id_still_give_valid_cards(fuzz_client: Any, bad_id: Any) -> None:
    """Found by the mutations: ``"id": []`` in a prefetched Observation made the card's
    extension.screening name ``Observation/[]`` as its evidence (the client checks the contract)."""
    body = copy.deepcopy(VALID)
    for bundle in body["prefetch"].values():
        for entry in bundle.get("entry") or [] if isinstance(bundle, dict) else []:
            if entry["resource"].get("resourceType") != "Patient":
                entry["resource"]["id"] = bad_id
    response = fuzz_client.post(SERVICE_URL, json=body)
    assert response.status_code == 200 and response.get_json()["cards"]


@pytest.mark.parametrize("reference", ["Medication/bag-1", 7, ["Medication/bag-1"], True])
def test_an_administration_whose_medication_reference_is_not_an_object_is_no_500(
    fuzz_client: Any, reference: Any
) -> None:
    """Found on reading the change: with a fhirServer in the request, looking for the Medications to
    fetch by id read ``medicationReference.reference`` of a string and the hook answered 500. Such
    a record is malformed (extraction skips and counts it, as any malformed resource): the hook
    answers, without the cards those records would have given."""
    body = copy.deepcopy(VALID)
    entries = body["prefetch"]["medicationAdministrations"]["entry"]
    assert entries, "the valid request charts administrations"
    for entry in entries:
        entry["resource"]["medicationReference"] = reference
    response = fuzz_client.post(SERVICE_URL, json=body)
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize("key", sorted(VALID["prefetch"]))
def test_every_dropped_prefetch_key_is_fetched_and_ends_in_412(
    fuzz_client: Any, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A prefetch key left out is fetched from fhirServer: refused there, the answer is a 412 that
    says the data could not be had (the path the mutations above take). The service runs open, so
    the answer names only the category; the log says the connection was refused."""
    with caplog.at_level("WARNING"):
        response = fuzz_client.post(SERVICE_URL, json=_mutate(VALID, ("prefetch", key), None, delete=True))
    assert response.status_code == 412, response.get_json()
    diagnostics = response.get_json()["issue"][0]["diagnostics"]
    assert diagnostics.endswith("the FHIR server could not be read in time"), diagnostics
    assert "connection failed" in caplog.text


@FUZZ
@given(raw=st.binary(max_size=200))
def test_random_bytes_to_the_hook(fuzz_client: Any, raw: bytes) -> None:
    _check(fuzz_client.post(SERVICE_URL, data=raw, content_type="application/json"))


FEEDBACK_VALID = {
    "feedback": [
        {
            "card": str(uuid.uuid4()),
            "outcome": "overridden",
            "outcomeTimestamp": "2026-11-21T12:00:00Z",
            "overrideReason": {"reason": {"code": "declined", "display": "Declined"}, "userComment": "no"},
            "acceptedSuggestions": [{"id": str(uuid.uuid4())}],
        }
    ]
}
FEEDBACK_PATHS: list[tuple[Any, ...]] = []
_collect(FEEDBACK_VALID, (), FEEDBACK_PATHS)
FEEDBACK_PATHS.remove(())


@FUZZ
@given(body=json_values)
def test_random_json_to_feedback(fuzz_client: Any, body: Any) -> None:
    _check(fuzz_client.post(f"{SERVICE_URL}/feedback", json=body))


@FUZZ
@given(path=st.sampled_from(FEEDBACK_PATHS), value=json_values, delete=st.booleans())
def test_mutated_feedback(fuzz_client: Any, path: tuple[Any, ...], value: Any, delete: bool) -> None:
    _check(fuzz_client.post(f"{SERVICE_URL}/feedback", json=_mutate(FEEDBACK_VALID, path, value, delete)))
