"""[performance] Smoke run of ``make bench`` at the smallest size: it runs and reports every figure.

No timing is asserted here (a loaded CI machine says nothing about the service): the real figures
come from ``make bench`` (docs/performance.md). This checks that the benchmark still works end to
end — generator, in-process hook, the production server over HTTP, the fetch path against the real
FHIR server (the session's sekmet), the load generator in its own process, the memory probe — and
that it stops what it started.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from cds_service.tools import bench
from cds_service.tools.fhir_server import FhirTestServer
from tests.fault_server import FaultServer

pytestmark = pytest.mark.fhir


def _numbers(results: dict[str, Any]) -> list[Any]:
    size = results["sizes"]["1000"]
    return [
        size["body_mb"],
        size["body_loads_ms"],
        size["in_process"]["ms"],
        size["in_process"]["ratio"],
        size["in_process"]["ms_per_1000_observations"],
        size["http"]["ms"],
        size["http"]["ratio"],
        size["extraction"]["extract_ms"],
        size["extraction"]["loads_ms"],
        size["extraction"]["ratio"],
        size["fetch"]["gather_ms"],
        size["fetch"]["slowest_query_ms"],
        size["fetch"]["ratio"],
        size["fetch"]["longest_chain_ms"],
        size["fetch"]["chain_ratio"],
        *(size[name][key] for name in ("fetch", "fetch_concurrent") for key in _FETCH_FIGURES),
        results["throughput"]["hooks_per_second"],
        results["throughput"]["p50_ms"],
        results["throughput"]["p99_ms"],
        results["memory"]["peak_worker_mb"],
        results["fresh_process_loads"]["ms"],
        results["fresh_process_loads"]["http_ratio"],
        *(results["floor"]["ratios"].values()),
        *(row[key] for row in _floor_rows(results) for key in ("p50_ms", "p90_ms", "cpu_ms_per_request")),
    ]


_FETCH_FIGURES = (
    "gather_ms",
    "longest_chain_ms",
    "chain_ratio",
    "sum_of_queries_ms",
    "sum_ratio",
    "machine_floor_ms",
    "machine_floor_ratio",
    "bare_client_ms",
    "bare_client_chain_ratio",
    "client_ratio",
    "client_cpu_ms",
    "bare_client_cpu_ms",
)


def _floor_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [results["floor"]["stub"], *results["floor"]["service"].values()]


def test_bench_runs_at_the_smallest_size_and_reports_every_figure(
    tmp_path: Path, fhir_server: FhirTestServer
) -> None:
    lines: list[str] = []
    results = bench.run(
        tmp_path,
        sizes=(1000,),
        repeat=2,
        load_seconds=1.5,
        concurrency=4,
        fhir=fhir_server,
        log=lines.append,
        fhir_workers=2,  # the fewest that answer in parallel: each process takes ~1 s to start
    )
    for value in _numbers(results):
        assert isinstance(value, int | float) and value > 0, value
    throughput = results["throughput"]
    assert throughput["ok"] > 0 and throughput["errors"] == 0, throughput
    assert results["sizes"]["1000"]["in_process"]["cards"] >= 1  # the dense patient gets a card
    fetched = results["sizes"]["1000"]["fetch"]["fetched"]
    assert fetched["patient"] == 1
    assert sum(n for key, n in fetched.items() if "edication" in key) == 300  # the drug chart
    # The multi-process FHIR server serves the same store: the same data comes back from it.
    concurrent = results["sizes"]["1000"]["fetch_concurrent"]
    assert concurrent["fetched"] == fetched and concurrent["server_processes"] == 2
    for fetch in (results["sizes"]["1000"]["fetch"], concurrent):
        assert set(fetch["client_ms"]) == {"first_sent", "last_sent", "after_last_answer"}, fetch
        assert all(isinstance(ms, int | float) and ms >= 0 for ms in fetch["client_ms"].values()), fetch
        # The floor: the longest chain, or the searches' total work spread over every core.
        assert fetch["machine_floor_ms"] >= fetch["longest_chain_ms"]
        assert fetch["machine_floor_ms"] >= fetch["sum_of_queries_ms"] / fetch["cores"] - 0.01
        # The bare client ran the same searches in the same rounds.
        assert len(fetch["samples_ms"]["bare_client"]) == len(fetch["samples_ms"]["gather"]), fetch
    assert set(results["verdict"]) == {
        "prefetch_in_process_ratio",
        "prefetch_http_ratio",
        "prefetch_http_p50_ms",
        "extraction_ratio",
        "fetch_ratio",
        "fetch_ratio_machine_floor",
        "fetch_ratio_bare_client",
        "throughput",
        "peak_worker_memory_mb",
        "cost_growth",
        "floor_p50_ratio",
        "floor_cpu_ratio",
        "administrations_ratio",
        "fresh_loads_ratio",
    }
    # The floor comparison: the stub and the service at 30, 300 and 1 000 single-drug records, each
    # with every request it was sent (batches × rounds), the bodies growing with the record count.
    floor = results["floor"]
    assert sorted(floor["service"], key=int) == ["30", "300", "1000"]
    for row in _floor_rows(results):
        assert row["requests"] == floor["rounds"] * floor["batch"] == len(row["samples_ms"]), row
    sizes = [floor["service"][c]["body_mb"] for c in ("30", "300", "1000")]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert floor["stub"]["body_mb"] == floor["service"]["300"]["body_mb"]
    assert results["machine"]["cores"] and results["machine"]["python"]

    # Both reports are written; the Markdown table has a row for every figure.
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["verdict"] == results["verdict"]
    table = (tmp_path / "results.md").read_text()
    for label in (
        "bare `orjson.loads`",
        "prefetch hook, in process",
        "over HTTP",
        "extraction only",
        "FHIR server of 1 process",
        "FHIR server of 2 processes",
        "… gathering (ms)",
        "longest chain of dependent queries",
        "the machine's floor",
        "from a bare client",
        "what our client adds",
        "last answer decoded",
        "ms per 1 000 Obs",
        "throughput",
        "peak resident memory",
        "decode-only stub",
        "server CPU per request",
        "hook p50 ÷ stub p50",
        "fresh-process `orjson.loads`",
    ):
        assert label in table, label

    # The bench patient was removed from the shared FHIR server; the service it started is stopped.
    assert not [p for p in fhir_server.search_all("Patient?_count=1000") if p["id"].startswith("bench-")]
    assert not [cmd for cmd in _children() if "serve" in cmd and "cds" in cmd], _children()
    assert not [cmd for cmd in _children() if "decode_stub" in cmd], _children()
    assert not [cmd for cmd in _children() if "uvicorn" in cmd], _children()


def test_single_drug_patients_tell_the_same_story_whatever_the_record_count() -> None:
    """The "administrations" rows compare 30, 300 and 1 000 norepinephrine records: only the count
    may differ, not the clinical answer (same statuses, same card summaries, same onset)."""
    from datetime import UTC, datetime

    from cds_service.base.config import load_settings
    from cds_service.patient_data.gather import RawPatientData
    from cds_service.screening import Screener
    from cds_service.tools.icu_generator import icu_patient

    screener = Screener(load_settings(environ={}))
    at = datetime(2026, 1, 1, tzinfo=UTC)
    answers = []
    for count in (30, 300):
        builder = icu_patient(1000, at, administrations=count, single_drug=True)
        drugs = {
            r["medicationCodeableConcept"]["text"]
            for r in builder.resources
            if r["resourceType"] == "MedicationAdministration"
        }
        assert (
            drugs == {"norepinephrine"}
            and sum(r["resourceType"] == "MedicationAdministration" for r in builder.resources) == count
        )
        data = RawPatientData(patient=builder.patient, resources={"all": builder.resources})
        outcome = screener.screen(builder.patient_id, data, at.timestamp())
        answers.append(
            (
                [r.status for r in outcome.results],
                [card["summary"] for _, card in screener.cards(outcome)],
                outcome.inputs.scalars["septic_shock_onset"].value,
            )
        )
    assert answers[0] == answers[1]
    assert "eligible" in answers[0][0]


def _children() -> list[str]:
    """Command lines of this process's living children (Linux /proc)."""
    pid = os.getpid()
    commands = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                stat = Path(f"/proc/{child}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                commands.append(Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
    return commands


def test_the_decode_only_stub_runs_the_worker_model_of_the_service() -> None:
    """The floor is only a floor with the same gunicorn worker model as ``cds-service serve``."""
    from cds_service.base.config import load_settings
    from cds_service.serving import gunicorn_options
    from cds_service.tools.decode_stub import WORKER_MODEL_KEYS, worker_model

    for environ in ({}, {"CDS_SERVER_WORKERS": "3", "CDS_SERVER_THREADS": "4"}):
        settings = load_settings(environ=environ)
        served = gunicorn_options(settings)
        assert worker_model(settings) == {key: served[key] for key in WORKER_MODEL_KEYS}


def test_a_follow_up_search_is_timed_as_a_chain_with_the_search_it_follows() -> None:
    """Issue 17's fetch reference: the Medication reads follow the administrations search."""
    queries = {
        "observations": "Observation?patient=p&code=…",
        "administrations": "MedicationAdministration?patient=p&_include=MedicationAdministration:medication",
        "medications": "Medication?_id=a,b&_count=2",
    }
    alone = {"observations": 0.030, "administrations": 0.020, "medications": 0.015}
    assert bench.dependent_chains(alone, queries) == {
        "observations": 0.030,
        "administrations + medications": 0.035,
    }
    without = {key: value for key, value in alone.items() if key != "medications"}
    assert bench.dependent_chains(without, queries) == without


def test_the_bare_client_reads_every_page_of_every_chain(fault_server: FaultServer) -> None:
    """The floor our fetch client is read against sends the same searches: every page of each (the
    next link found before or after the entries), the Medication reads after the administrations."""
    server = fault_server
    server.bundle(
        "Observation", [{"resourceType": "Observation", "id": "o1"}], next_url=server.url("page2?p=2")
    )
    # A server that writes its links after the entries.
    server.json(
        "page2",
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": {"resourceType": "Observation", "id": "o2", "note": [{"text": "{}"}]}}],
            "link": [{"url": server.url("page3"), "relation": "next"}],
        },
    )
    server.bundle("page3", [{"resourceType": "Observation", "id": "o3"}])
    server.bundle("MedicationAdministration", [{"resourceType": "MedicationAdministration", "id": "a1"}])
    server.bundle("Medication", [{"resourceType": "Medication", "id": "m1"}])
    issued = {
        "observations": "Observation?patient=p&code=x",
        "administrations": "MedicationAdministration?patient=p",
        "medications": "Medication?_id=m1",
    }
    chains = bench.chains_of(issued)
    assert chains == {
        "observations": [issued["observations"]],
        "administrations + medications": [issued["administrations"], issued["medications"]],
    }
    client = bench.BareClient(server.base_url)
    try:
        assert client.gather(chains) > 0
        assert {name: pages for name, (_, pages) in client.read.items()} == {
            "observations": 3,
            "administrations + medications": 2,
        }
        seen = [(r.path, r.query) for r in server.requests]
        assert ("/fhir/page2", "p=2") in seen and ("/fhir/page3", "") in seen
        assert seen.index(("/fhir/MedicationAdministration", "patient=p")) < seen.index(
            ("/fhir/Medication", "_id=m1")
        )
        server.status("Observation", 500)
        with pytest.raises(RuntimeError, match="HTTP 500 for observations"):
            client.gather(chains)
    finally:
        client.close()
