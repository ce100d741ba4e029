"""No input may produce a 500: random and mutated JSON thrown at the hook and feedback routes.

Hypothesis generates arbitrary JSON and mutations of a valid request (fields removed, replaced
by other JSON values, prefetch entries swapped for junk resources). Every answer must be a
documented status; every error an OperationOutcome.
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

ALLOWED_STATUSES = {200, 400, 404, 412, 413}

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def _valid_request() -> dict[str, Any]:
    at = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    builder = PatientBuilder("cdsh-fuzz", at, age=45, gender="female")
    builder.septic_shock_story(onset_hours=4)
    builder.anc(400, hours=2, unit="/uL")
    builder.bp_panel(80, 40, hours=1)
    builder.observation("2106-3", None, "", 3, value_codeable=("http://snomed.info/sct", "260385009"))
    return hook_body(builder)


VALID = _valid_request()
PATHS: list[tuple[Any, ...]] = []


def _collect(node: Any, path: tuple[Any, ...]) -> None:
    PATHS.append(path)
    if isinstance(node, dict):
        for key, value in node.items():
            _collect(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node[:3]):
            _collect(value, (*path, index))


_collect(VALID, ())
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
    app = create_app(make_settings(tmp, fhir={"deadline_seconds": 0.5}))
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
    # fhirServer is pointed nowhere reachable so that mutations which drop prefetch keys end in 412.
    body = _mutate(VALID, path, value, delete)
    if isinstance(body, dict) and "fhirServer" in body:
        body["fhirServer"] = "https://fhir.invalid/r4"
    _check(fuzz_client.post(SERVICE_URL, json=body))


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
PATHS_BACKUP = PATHS
PATHS = FEEDBACK_PATHS
_collect(FEEDBACK_VALID, ())
PATHS = PATHS_BACKUP
FEEDBACK_PATHS.remove(())


@FUZZ
@given(body=json_values)
def test_random_json_to_feedback(fuzz_client: Any, body: Any) -> None:
    _check(fuzz_client.post(f"{SERVICE_URL}/feedback", json=body))


@FUZZ
@given(path=st.sampled_from(FEEDBACK_PATHS), value=json_values, delete=st.booleans())
def test_mutated_feedback(fuzz_client: Any, path: tuple[Any, ...], value: Any, delete: bool) -> None:
    _check(fuzz_client.post(f"{SERVICE_URL}/feedback", json=_mutate(FEEDBACK_VALID, path, value, delete)))
