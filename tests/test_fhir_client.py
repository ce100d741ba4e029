"""FhirClient against the real FHIR server (sekmet) and against a misbehaving local server.

Fixtures ``fhir_server`` and ``fault_server`` come from tests/fhir_server.py via conftest.py.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cds_service.base.config import DEFAULTS
from cds_service.patient_data.fhir_client import DataUnavailable, FhirClient, ServerNotAllowed, _inside
from cds_service.tools.fhir_server import FhirTestServer
from tests.conftest import at_once
from tests.fault_server import Behaviour, FaultServer, refused_url

LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LACTATE, MAP, HEART_RATE = "2524-7", "8478-0", "8867-4"
T0 = datetime(2026, 11, 18, 0, 0, tzinfo=UTC)
PLUS_2 = timezone(timedelta(hours=2))
TOKEN = "tok-SECRET-4f1c9a"
#: Budget over the deadline within which every failing call must have raised.
LATE = 0.5

ClientFactory = Callable[..., FhirClient]


@pytest.fixture
def make_client() -> Iterator[ClientFactory]:
    """Build clients from the default fhir settings plus overrides (http allowed: servers are local)."""
    clients: list[FhirClient] = []

    def factory(**overrides: Any) -> FhirClient:
        settings = copy.deepcopy(DEFAULTS["fhir"])
        settings["allow_http"] = True
        settings.update(overrides)
        client = FhirClient(settings)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


def deadline_in(seconds: float) -> float:
    return time.monotonic() + seconds


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def ids(resources: list[dict[str, Any]]) -> set[str]:
    return {f"{resource['resourceType']}/{resource['id']}" for resource in resources}


# -- the real server ----------------------------------------------------------------------------


class Loaded:
    """A patient loaded into the real server, with the expected answers computed alongside."""

    def __init__(self, server: FhirTestServer) -> None:
        self.server = server
        self.patient_id = f"pt-{uuid.uuid4().hex[:12]}"
        self.other_id = f"pt-{uuid.uuid4().hex[:12]}"
        self.observations: list[tuple[str, str, datetime]] = []  # (id, code, time)
        resources: list[dict[str, Any]] = [
            {"resourceType": "Patient", "id": self.patient_id, "gender": "female", "birthDate": "1958-03-02"},
            {"resourceType": "Patient", "id": self.other_id, "gender": "male", "birthDate": "1970-01-01"},
        ]
        codes = [LACTATE, MAP, HEART_RATE]
        for i in range(30):  # one every 2.4 h over 3 days: 10 of each code
            code = codes[i % 3]
            moment = T0 + timedelta(hours=2.4 * i)
            obs_id = f"{self.patient_id}-obs-{i}"
            # Every fourth time is written with a +02:00 offset: the server must compare instants.
            written = moment.astimezone(PLUS_2).isoformat() if i % 4 == 0 else iso(moment)
            resources.append(observation(obs_id, self.patient_id, code, written, float(i)))
            self.observations.append((obs_id, code, moment))
        for i in range(5):  # another patient's data must never come back
            resources.append(
                observation(
                    f"{self.other_id}-obs-{i}", self.other_id, LACTATE, iso(T0 + timedelta(hours=i)), 9.0
                )
            )
        self.old_med = f"{self.patient_id}-ma-old"
        self.running_med = f"{self.patient_id}-ma-running"
        resources.append(
            administration(self.old_med, self.patient_id, {"effectiveDateTime": iso(T0 + timedelta(hours=3))})
        )
        resources.append(
            administration(
                self.running_med,
                self.patient_id,
                {"effectivePeriod": {"start": iso(T0 + timedelta(hours=60))}},
            )
        )
        server.put_all(resources)

    def expected(self, codes: set[str] | None = None, since: datetime | None = None) -> set[str]:
        return {
            f"Observation/{obs_id}"
            for obs_id, code, moment in self.observations
            if (codes is None or code in codes) and (since is None or moment >= since)
        }


def observation(obs_id: str, patient_id: str, code: str, when: str, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": obs_id,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "u"},
    }


def administration(ma_id: str, patient_id: str, effective: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "MedicationAdministration",
        "id": ma_id,
        "status": "in-progress" if "effectivePeriod" in effective else "completed",
        "medicationCodeableConcept": {
            "coding": [{"system": RXNORM, "code": "7512"}],
            "text": "norepinephrine",
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        **effective,
    }


@pytest.fixture(scope="module")
def loaded(fhir_server: FhirTestServer) -> Iterator[Loaded]:
    data = Loaded(fhir_server)
    yield data
    fhir_server.delete_patient_everything(data.patient_id)
    fhir_server.delete_patient_everything(data.other_id)


@pytest.mark.fhir
def test_search_many_code_and_date_restricted(
    fhir_server: FhirTestServer, loaded: Loaded, make_client: ClientFactory
) -> None:
    client = make_client()
    pid = loaded.patient_id
    since = T0 + timedelta(hours=48)
    codes = f"{LOINC}|{LACTATE},{LOINC}|{MAP}"
    queries = {
        "lactate_map": f"Observation?patient={pid}&code={codes}&_count=1000",
        "recent": f"Observation?patient={pid}&date=ge{iso(since)}&_count=1000",
        "recent_lactate": f"Observation?patient={pid}&code={LOINC}|{LACTATE}&date=ge{iso(since)}&_count=1000",
        "window_offset": f"Observation?patient={pid}&date=ge{since.astimezone(PLUS_2).isoformat()}".replace(
            "+", "%2B"
        ),
        "meds": f"MedicationAdministration?patient={pid}&effective-time=ge{iso(since)}",
        "nothing": f"Observation?patient={pid}&code={LOINC}|0000-0",
    }
    result = client.search_many(fhir_server.base_url, None, queries, deadline_in(10))

    assert list(result) == list(queries)
    assert ids(result["lactate_map"]) == loaded.expected({LACTATE, MAP})
    assert len(result["lactate_map"]) == 20
    assert ids(result["recent"]) == loaded.expected(since=since)
    assert ids(result["recent_lactate"]) == loaded.expected({LACTATE}, since)
    assert ids(result["window_offset"]) == loaded.expected(since=since)
    # The running infusion (open period started before `since`) overlaps the window; the old bolus does not.
    assert ids(result["meds"]) == {f"MedicationAdministration/{loaded.running_med}"}
    assert result["nothing"] == []


@pytest.mark.fhir
def test_paging_follows_next_links(
    fhir_server: FhirTestServer, loaded: Loaded, make_client: ClientFactory
) -> None:
    client = make_client(page_size=4)
    query = f"Observation?patient={loaded.patient_id}&_count={client.page_size}"
    result = client.search_many(fhir_server.base_url, None, {"all": query}, deadline_in(10))
    assert len(result["all"]) == 30  # 8 pages of 4
    assert ids(result["all"]) == loaded.expected()


@pytest.mark.fhir
def test_single_page_queries_take_the_first_page_only(
    fhir_server: FhirTestServer, loaded: Loaded, make_client: ClientFactory
) -> None:
    client = make_client(max_pages=2)
    queries = {
        "latest": f"Observation?patient={loaded.patient_id}&_sort=-date&_count=5",
        "all": f"Observation?patient={loaded.patient_id}&_count=15",
    }
    result = client.search_many(fhir_server.base_url, None, queries, deadline_in(10), single_page={"latest"})
    newest = sorted(loaded.observations, key=lambda item: item[2])[-5:]
    assert ids(result["latest"]) == {f"Observation/{obs_id}" for obs_id, _, _ in newest}
    assert len(result["all"]) == 30


@pytest.mark.fhir
def test_paging_beyond_max_pages_is_unavailable(
    fhir_server: FhirTestServer, loaded: Loaded, make_client: ClientFactory
) -> None:
    client = make_client(max_pages=3)
    query = f"Observation?patient={loaded.patient_id}&_count=4"
    with pytest.raises(DataUnavailable, match="more than 3 pages"):
        client.search_many(fhir_server.base_url, None, {"all": query}, deadline_in(10))


@pytest.mark.fhir
def test_outcome_entries_are_skipped(
    fhir_server: FhirTestServer, loaded: Loaded, make_client: ClientFactory
) -> None:
    # sekmet adds an OperationOutcome entry (search.mode = outcome) for an unknown parameter.
    query = f"Observation?patient={loaded.patient_id}&no-such-param=1&_count=1000"
    result = make_client().search_many(fhir_server.base_url, None, {"q": query}, deadline_in(10))
    assert {resource["resourceType"] for resource in result["q"]} == {"Observation"}
    assert len(result["q"]) == 30


@pytest.mark.fhir
def test_follow_next_of_a_prefetch_page(
    fhir_server: FhirTestServer, loaded: Loaded, make_client: ClientFactory
) -> None:
    first_page = fhir_server.get(f"Observation?patient={loaded.patient_id}&_count=7")
    assert len(first_page["entry"]) == 7
    resources = make_client().follow_next(fhir_server.base_url, None, first_page, deadline_in(10))
    assert len(resources) == 30
    assert ids(resources) == loaded.expected()


@pytest.mark.fhir
def test_follow_next_without_next_returns_the_bundle(
    make_client: ClientFactory, fhir_server: FhirTestServer
) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": {"resourceType": "X", "id": "1"}}],
    }
    assert make_client().follow_next(fhir_server.base_url, None, bundle, deadline_in(1)) == [
        {"resourceType": "X", "id": "1"}
    ]


@pytest.mark.fhir
def test_read(fhir_server: FhirTestServer, loaded: Loaded, make_client: ClientFactory) -> None:
    client = make_client()
    patient = client.read(fhir_server.base_url, None, f"Patient/{loaded.patient_id}", deadline_in(5))
    assert patient["id"] == loaded.patient_id
    with pytest.raises(DataUnavailable) as caught:
        client.read(fhir_server.base_url, None, "Patient/does-not-exist", deadline_in(5))
    assert caught.value.reason == "Patient read: HTTP 404"


@pytest.mark.fhir
def test_concurrent_hooks_share_one_client(
    fhir_server: FhirTestServer, loaded: Loaded, make_client: ClientFactory
) -> None:
    client = make_client(max_workers=4)
    pid = loaded.patient_id
    queries = {
        "lactate": f"Observation?patient={pid}&code={LOINC}|{LACTATE}",
        "map": f"Observation?patient={pid}&code={LOINC}|{MAP}&_count=3",
        "hr": f"Observation?patient={pid}&code={LOINC}|{HEART_RATE}",
    }
    results, errors = at_once(
        lambda: client.search_many(fhir_server.base_url, None, queries, deadline_in(20)), 8
    )
    assert errors == []
    assert len(results) == 8
    for result in results:
        assert ids(result["lactate"]) == loaded.expected({LACTATE})
        assert ids(result["map"]) == loaded.expected({MAP})
        assert ids(result["hr"]) == loaded.expected({HEART_RATE})


# -- concurrency and deadlines (fault server) --------------------------------------------------


def test_queries_run_in_parallel(fault_server: FaultServer, make_client: ClientFactory) -> None:
    for path in ("Observation", "Condition", "MedicationAdministration"):
        fault_server.slow(path, 0.3, [{"resourceType": path, "id": "1"}])
    client = make_client()
    queries = {name: f"{name}?patient=p" for name in ("Observation", "Condition", "MedicationAdministration")}
    started = time.monotonic()
    result = client.search_many(fault_server.base_url, None, queries, deadline_in(5))
    elapsed = time.monotonic() - started
    assert {key: len(value) for key, value in result.items()} == dict.fromkeys(queries, 1)
    assert elapsed < 0.6, f"3 searches of 0.3 s each took {elapsed:.2f} s: not run concurrently"


def _call(kind: str, client: FhirClient, base_url: str, deadline: float) -> Any:
    if kind == "search":
        return client.search_many(base_url, TOKEN, {"obs": "Observation?patient=secret-pid-77"}, deadline)
    if kind == "read":
        return client.read(base_url, TOKEN, "Observation/secret-pid-77", deadline)
    page = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [{"relation": "next", "url": f"{base_url}/Observation?patient=secret-pid-77&page=2"}],
    }
    return client.follow_next(base_url, TOKEN, page, deadline, "Observation")


FAULTS: dict[str, tuple[Callable[[FaultServer], None], str]] = {
    "slower than the deadline": (lambda s: s.slow(None, 3.0), "timed out|deadline"),
    "HTTP 500": (lambda s: s.status(None, 500), "Observation (query|read|prefetch).*HTTP 500"),
    "HTTP 401": (lambda s: s.status(None, 401), "HTTP 401"),
    "HTTP 403": (lambda s: s.status(None, 403), "HTTP 403"),
    "malformed JSON": (lambda s: s.malformed(None), "malformed JSON"),
    "JSON that is not an object": (lambda s: s.json(None, [1, 2]), "not a JSON object"),
    "next loop": (lambda s: s.loop(None), "loop"),
    "OperationOutcome instead of Bundle": (lambda s: s.operation_outcome(None), "OperationOutcome"),
    "redirect": (lambda s: s.status(None, 302), "HTTP 302 .redirects are not followed"),
}


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        (fault, kind)
        for fault in FAULTS
        for kind in ("search", "read", "follow_next")
        if not (kind == "read" and fault == "next loop")  # a read has no next link
    ],
)
def test_faults_raise_data_unavailable_in_time(
    fault: str,
    kind: str,
    fault_server: FaultServer,
    make_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    program, pattern = FAULTS[fault]
    if kind == "read" and fault == "OperationOutcome instead of Bundle":
        pattern = "expected a Observation, got OperationOutcome"
    program(fault_server)
    client = make_client(allowed_servers=[fault_server.base_url])
    deadline_seconds = 0.6
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="cds_service.patient_data.fhir_client"),
        pytest.raises(DataUnavailable) as caught,
    ):
        _call(kind, client, fault_server.base_url, deadline_in(deadline_seconds))
    elapsed = time.monotonic() - started
    assert elapsed < deadline_seconds + LATE
    assert re.search(pattern, caught.value.reason), caught.value.reason
    assert_no_secrets(caught.value, caplog)


def assert_no_secrets(error: DataUnavailable, caplog: pytest.LogCaptureFixture) -> None:
    """Neither the reason, the exception text nor any log line holds the token or the patient id."""
    texts = [error.reason, str(error), *(record.getMessage() for record in caplog.records)]
    for text in texts:
        assert TOKEN not in text
        assert "secret-pid" not in text
        assert "?" not in text  # no query string at all
    assert any(record.levelno == logging.WARNING for record in caplog.records)


@pytest.mark.parametrize("kind", ["search", "read", "follow_next"])
def test_connection_refused(kind: str, make_client: ClientFactory, caplog: pytest.LogCaptureFixture) -> None:
    base_url = refused_url()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(DataUnavailable, match="connection failed"):
        _call(kind, make_client(), base_url, deadline_in(2))
    assert time.monotonic() - started < 2 + LATE
    assert "Bearer" not in caplog.text and TOKEN not in caplog.text


def test_next_link_beyond_max_pages(fault_server: FaultServer, make_client: ClientFactory) -> None:
    # Each page links to a page with a new number: no loop, but the pages never end.
    fault_server.bundle(None, [], next_url="{self}x")
    with pytest.raises(DataUnavailable, match="more than 5 pages; results would be incomplete"):
        make_client(max_pages=5).search_many(
            fault_server.base_url, None, {"o": "Observation?a=1"}, deadline_in(5)
        )
    assert len(fault_server.requests) == 5


def test_slow_body_is_cut_at_the_deadline(fault_server: FaultServer, make_client: ClientFactory) -> None:
    """Only the queries that are slow fail; the call returns at the deadline, not after the slowest."""
    fault_server.bundle("Observation", [{"resourceType": "Observation", "id": "1"}])
    fault_server.slow("Condition", 5.0)
    started = time.monotonic()
    with pytest.raises(DataUnavailable, match=r"Condition query \(conditions\)"):
        make_client().search_many(
            fault_server.base_url,
            None,
            {"observations": "Observation?patient=p", "conditions": "Condition?patient=p"},
            deadline_in(0.4),
        )
    assert time.monotonic() - started < 0.4 + LATE


def test_trickling_body_frees_the_worker_at_the_deadline(
    fault_server: FaultServer, make_client: ClientFactory
) -> None:
    """A body that never stops coming must not keep the (only) pool thread busy past the deadline."""
    fault_server.trickle("Observation", 0.02)
    fault_server.bundle("Condition", [{"resourceType": "Condition", "id": "1"}])
    client = make_client(max_workers=1)
    started = time.monotonic()
    with pytest.raises(DataUnavailable, match="deadline"):
        client.search_many(fault_server.base_url, None, {"o": "Observation?patient=p"}, deadline_in(0.5))
    assert time.monotonic() - started < 0.5 + LATE
    # The single worker thread is free again soon: the next hook's query is served in time.
    result = client.search_many(fault_server.base_url, None, {"c": "Condition?patient=p"}, deadline_in(1.0))
    assert len(result["c"]) == 1


def test_expired_deadline_sends_nothing(fault_server: FaultServer, make_client: ClientFactory) -> None:
    with pytest.raises(DataUnavailable, match="deadline"):
        make_client().search_many(
            fault_server.base_url, TOKEN, {"o": "Observation?x=1"}, time.monotonic() - 1
        )
    assert fault_server.requests == []


def test_empty_queries(fault_server: FaultServer, make_client: ClientFactory) -> None:
    assert make_client().search_many(fault_server.base_url, None, {}, deadline_in(1)) == {}


# -- token safety -------------------------------------------------------------------------------


def test_server_not_in_allow_list_is_never_contacted(
    fault_server: FaultServer, make_client: ClientFactory
) -> None:
    client = make_client(allowed_servers=["https://ehr.example.org/fhir"])
    for call in (
        lambda: client.search_many(fault_server.base_url, TOKEN, {"o": "Observation?x=1"}, deadline_in(2)),
        lambda: client.read(fault_server.base_url, TOKEN, "Patient/1", deadline_in(2)),
        lambda: client.follow_next(fault_server.base_url, TOKEN, {"resourceType": "Bundle"}, deadline_in(2)),
    ):
        with pytest.raises(ServerNotAllowed, match="not an allowed server"):
            call()
    assert fault_server.requests == []


def test_token_sent_only_to_allowed_server(fault_server: FaultServer, make_client: ClientFactory) -> None:
    client = make_client(allowed_servers=[fault_server.base_url + "/"])  # trailing slash is fine
    client.search_many(fault_server.base_url, TOKEN, {"o": "Observation?x=1"}, deadline_in(2))
    client.search_many(fault_server.base_url, None, {"o": "Observation?x=1"}, deadline_in(2))
    with_token, without_token = fault_server.requests
    assert with_token.header("Authorization") == f"Bearer {TOKEN}"
    assert with_token.header("Accept") == "application/fhir+json"
    assert without_token.header("Authorization") is None
    assert with_token.path == "/fhir/Observation" and with_token.query == "x=1"


def test_token_sent_to_any_server_when_allow_list_empty_and_http_allowed(
    fault_server: FaultServer, make_client: ClientFactory
) -> None:
    fault_server.json("Patient/1", {"resourceType": "Patient", "id": "1"})
    patient = make_client(allowed_servers=[]).read(fault_server.base_url, TOKEN, "Patient/1", deadline_in(2))
    assert patient["id"] == "1"
    assert fault_server.requests[0].header("Authorization") == f"Bearer {TOKEN}"


def test_next_link_to_another_server_is_not_followed(
    fault_server: FaultServer, make_client: ClientFactory
) -> None:
    with FaultServer() as other:
        fault_server.next_to(
            None, other.url("Observation?page=2"), [{"resourceType": "Observation", "id": "1"}]
        )
        client = make_client(allowed_servers=[fault_server.base_url, other.base_url])
        with pytest.raises(DataUnavailable, match="not followed; results would be incomplete"):
            client.search_many(fault_server.base_url, TOKEN, {"o": "Observation?x=1"}, deadline_in(2))
        with pytest.raises(DataUnavailable, match="not followed"):
            page = {
                "resourceType": "Bundle",
                "link": [{"relation": "next", "url": other.url("Observation?p=2")}],
            }
            client.follow_next(fault_server.base_url, TOKEN, page, deadline_in(2))
        assert other.requests == []
    assert len(fault_server.requests) == 1


@pytest.mark.parametrize(
    "next_url",
    [
        "{origin}/other/Observation?page=2",  # same host and port, outside the base path
        "{origin}/fhirx/Observation?page=2",  # a path that merely starts with the base path
        "https://127.0.0.1:{port}/fhir/Observation?page=2",  # another scheme
        "http://localhost:{port}/fhir/Observation?page=2",  # another host name
    ],
)
def test_next_link_outside_base_url_is_not_followed(
    next_url: str, fault_server: FaultServer, make_client: ClientFactory
) -> None:
    fault_server.next_to(
        "Observation", next_url.format(origin=fault_server.origin, port=fault_server.port), []
    )
    with pytest.raises(DataUnavailable, match="leaves the FHIR server base URL"):
        make_client().search_many(fault_server.base_url, TOKEN, {"o": "Observation?x=1"}, deadline_in(2))
    assert len(fault_server.requests) == 1


def test_dot_segments_cannot_leave_the_base_url(
    fault_server: FaultServer, make_client: ClientFactory
) -> None:
    client = make_client()
    for path in ("Patient/../../admin", "Patient/%2e%2e/%2E%2E/admin", "./Patient/1"):
        with pytest.raises(DataUnavailable, match="outside the FHIR server base URL"):
            client.read(fault_server.base_url, TOKEN, path, deadline_in(2))
    assert fault_server.requests == []


def test_redirect_to_another_server_is_not_followed(
    fault_server: FaultServer, make_client: ClientFactory
) -> None:
    with FaultServer() as other:
        fault_server.set(
            None, Behaviour(status=302, body=b"", headers={"Location": other.url("Observation")})
        )
        with pytest.raises(DataUnavailable, match="HTTP 302"):
            make_client().search_many(fault_server.base_url, TOKEN, {"o": "Observation?x=1"}, deadline_in(2))
        assert other.requests == []


def test_plain_http_refused_unless_allowed(fault_server: FaultServer, make_client: ClientFactory) -> None:
    client = make_client(allow_http=False)
    with pytest.raises(ServerNotAllowed, match="plain http"):
        client.search_many(fault_server.base_url, TOKEN, {"o": "Observation?x=1"}, deadline_in(2))
    # Even when listed: allow_http is the switch for plain http.
    listed = make_client(allow_http=False, allowed_servers=[fault_server.base_url])
    with pytest.raises(ServerNotAllowed):
        listed.read(fault_server.base_url, TOKEN, "Patient/1", deadline_in(2))
    assert fault_server.requests == []


@pytest.mark.parametrize(
    "base_url",
    [
        "ftp://ehr.example.org/fhir",
        "ehr.example.org/fhir",
        "https://user:pw@ehr.example.org/fhir",
        "https://ehr.example.org/fhir?x=1",
        "https://ehr.example.org:notaport/fhir",
        "https://ehr.example.org/fhir2",  # not inside the allowed https://ehr.example.org/fhir
        "https://evil.example.org/fhir",
    ],
)
def test_bad_or_unlisted_base_urls(base_url: str, make_client: ClientFactory) -> None:
    client = make_client(allowed_servers=["https://ehr.example.org/fhir"])
    with pytest.raises(ServerNotAllowed):
        client.check_server(base_url)
    client.check_server("https://ehr.example.org/fhir")
    client.check_server("https://EHR.example.org:443/fhir/")


@given(
    path=st.lists(
        st.text(alphabet="abcXYZ019-_.", min_size=1, max_size=8).filter(lambda s: s not in (".", "..")),
        max_size=4,
    ),
    port=st.integers(min_value=1, max_value=65535),
)
def test_inside_is_segment_wise(path: list[str], port: int) -> None:
    base = f"https://h.example:{port}/fhir"
    url = base + "".join(f"/{part}" for part in path) + "?q=1"
    assert _inside(url, base)
    assert not _inside(url.replace("/fhir", "/fhir2", 1), base)
    assert not _inside(url.replace(f":{port}", f":{port % 65535 + 1}", 1), base)
    assert not _inside(url.replace("https://", "http://", 1), base)


# -- response size -------------------------------------------------------------------------------------


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "streamed"])
def test_a_response_over_the_limit_is_cut_and_unavailable(
    announced: bool, fault_server: FaultServer, make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    limit = 1024 * 1024
    if announced:  # Content-Length tells: nothing is read
        padding = [
            {"resourceType": "Observation", "id": f"o{i}", "note": [{"text": "x" * 900}]} for i in range(2000)
        ]
        fault_server.bundle("Observation", padding)
    else:  # no length: read until the limit, then cut
        fault_server.huge("Observation", 50 * limit)
    client = make_client(max_response_bytes=limit)
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(DataUnavailable, match="over the limit of 1048576 bytes"),
    ):
        client.search_many(fault_server.base_url, None, {"o": "Observation?patient=p"}, deadline_in(5))
    assert time.monotonic() - started < 2  # cut early, not read whole (50 MB) nor waited for the deadline
    # Under the limit, the same client reads it.
    fault_server.huge("Condition", limit // 4)
    result = client.search_many(fault_server.base_url, None, {"c": "Condition?patient=p"}, deadline_in(5))
    assert len(result["c"]) > 1000


def test_the_limit_is_shared_by_one_hooks_queries(
    fault_server: FaultServer, make_client: ClientFactory
) -> None:
    limit = 1024 * 1024
    fault_server.huge("Observation", int(limit * 0.6))
    fault_server.huge("Condition", int(limit * 0.6))
    client = make_client(max_response_bytes=limit)
    queries = {"o": "Observation?patient=p", "c": "Condition?patient=p"}
    with pytest.raises(DataUnavailable, match="over the limit"):
        client.search_many(fault_server.base_url, None, queries, deadline_in(5))
    # Each alone fits; a new call (a new hook) has a budget of its own.
    assert client.search_many(fault_server.base_url, None, {"o": queries["o"]}, deadline_in(5))["o"]


def test_metrics_labels_come_from_the_services_own_queries(fault_server: FaultServer) -> None:
    """Not from what the server (or a prefetch Bundle) says: a made-up type cannot become a label."""
    seen: list[str] = []
    fault_server.bundle("Observation", [{"resourceType": "Made-Up-Type", "id": "1"}])
    fault_server.json("Patient/1", {"resourceType": "Patient", "id": "1"})
    settings = {**DEFAULTS["fhir"], "allow_http": True}
    with FhirClient(
        settings, on_query=lambda kind, *_: seen.append(kind), resource_types={"Observation"}
    ) as client:
        client.search_many(fault_server.base_url, None, {"o": "Observation?patient=1"}, deadline_in(5))
        client.read(fault_server.base_url, None, "Patient/1", deadline_in(5))  # not a type it was told of
        prefetch = {
            "resourceType": "Bundle",
            "entry": [{"resource": {"resourceType": "Invented"}}],
            "link": [{"relation": "next", "url": fault_server.url("Invented?page=2")}],
        }
        client.follow_next(fault_server.base_url, None, prefetch, deadline_in(5), "Observation")
        client.follow_next(fault_server.base_url, None, prefetch, deadline_in(5))  # type not given
    assert seen == ["Observation", "other", "Observation", "other"]


def test_hooks_waiting_on_a_hanging_server_leave_threads_for_other_hooks(fault_server: FaultServer) -> None:
    """The client is shared by the worker's threads: two hooks stuck on a server that never answers
    must not leave the third hook's queries (to a good server) waiting in the pool's queue."""
    hanging = FaultServer()
    hanging.slow(None, 3.0)
    fault_server.bundle(None, [{"resourceType": "Observation", "id": "1"}])
    settings = {**DEFAULTS["fhir"], "allow_http": True, "max_workers": 2}
    queries = {"a": "Observation?patient=p", "b": "Condition?patient=p"}
    failures: list[str] = []

    def stuck_hook(client: FhirClient) -> None:
        try:
            client.search_many(hanging.base_url, None, queries, deadline_in(2.5))
        except DataUnavailable as exc:
            failures.append(exc.reason)

    try:
        with FhirClient(settings, concurrent_hooks=3) as client:
            stuck = [threading.Thread(target=stuck_hook, args=(client,)) for _ in range(2)]
            for thread in stuck:
                thread.start()
            time.sleep(0.2)
            started = time.monotonic()
            result = client.search_many(fault_server.base_url, None, queries, deadline_in(1.0))
            assert time.monotonic() - started < 1.0 and len(result["a"]) == 1
            for thread in stuck:
                thread.join(timeout=10)
    finally:
        hanging.close()
    assert len(failures) == 2 and all("deadline" in reason for reason in failures)
