"""[knowledge] The mapping files: complete against the reference, validated, extendable by a site.

- every code of the tables in ../shared/reference/clinical-knowledge.md is in a mapping file with
  its source and confidence, or in the deliberately-left-out list of docs/knowledge.md (read here,
  so the document cannot drift from the files);
- a broken file is refused with an error naming the file and the key;
- a site teaches the service a local code by editing a data file only;
- unknown codes are listed by ``cds-service evaluate --explain``.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from cds_service import cli
from cds_service.base.config import PROJECT_ROOT, load_settings
from cds_service.base.datafiles import DataFileError
from cds_service.knowledge.mappings import (
    ICD10CM,
    LOINC,
    RXNORM,
    SNOMED,
    CodeRow,
    Knowledge,
    load_knowledge,
)
from cds_service.patient_data.gather import RawPatientData
from cds_service.screening import Screener
from cds_service.tools.scenario_builder import PatientBuilder
from tests.conftest import SHARED_DIR, needs_infrastructure

CLINICAL_KNOWLEDGE = SHARED_DIR / "reference" / "clinical-knowledge.md"
KNOWLEDGE_DOC = PROJECT_ROOT / "docs/knowledge.md"
AT = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def knowledge() -> Knowledge:
    return load_knowledge(PROJECT_ROOT)


# -- reading the reference and the left-out list --------------------------------------------------


def _table(text: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first Markdown table after ``heading``, header and rule dropped."""
    start = text.index(heading)
    rows: list[list[str]] = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return [row for row in rows[2:]]


@pytest.fixture(scope="module")
def reference() -> str:
    needs_infrastructure(
        "the reference file ../shared/reference/clinical-knowledge.md",
        CLINICAL_KNOWLEDGE.is_file(),
        f"put the shared folder beside the checkout ({CLINICAL_KNOWLEDGE})",
    )
    return CLINICAL_KNOWLEDGE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def left_out() -> dict[str, str]:
    """docs/knowledge.md "Deliberately left out": code or name → the reason given."""
    rows = _table(KNOWLEDGE_DOC.read_text(encoding="utf-8"), "## Deliberately left out")
    return {row[0].strip("`"): row[2] for row in rows}


def _tokens(confidence: str) -> set[str]:
    """'H / M-H' → {'H', 'M-H'}; 'H/M' → {'H', 'M'}."""
    return set(re.findall(r"M-H|H|M|U", confidence))


def _rows_matching(knowledge: Knowledge, value_sets: set[str], system: str, code: str) -> list[CodeRow]:
    """The rows of these value sets that match a code (exactly, or as an ICD-10-CM prefix)."""
    key = code.replace(".", "").upper()
    return [
        row
        for name in value_sets
        for row in knowledge.value_sets[name].codes
        if row.system == system
        and (
            row.code == code or (row.match == "prefix" and key.startswith(row.code.replace(".", "").upper()))
        )
    ]


def test_left_out_list_gives_a_reason_for_every_entry(left_out: dict[str, str]) -> None:
    assert {"angiotensin II", "levosimendan"} <= set(left_out)
    assert all(len(reason) > 20 for reason in left_out.values()), left_out


def test_every_loinc_code_of_the_reference_is_mapped_with_source_and_confidence(
    reference: str, knowledge: Knowledge, left_out: dict[str, str]
) -> None:
    rows = _table(reference, "### LOINC (Observations)")
    assert len(rows) >= 15, "the LOINC table of clinical-knowledge.md was not found whole"
    checked = 0
    for name, codes_cell, _unit, confidence in rows:
        codes = re.findall(r"\b\d{1,6}-\d\b", codes_cell)
        if not codes:
            assert name in left_out, f"{name}: no LOINC code in the reference and not listed as left out"
            continue
        for code in codes:
            key = f"{LOINC}|{code}"
            if key in knowledge.panels:
                continue
            assert key in knowledge.observation_codes, f"LOINC {code} ({name}) is in no mapping file"
            (row,) = [r for r in knowledge.observation_codes[key].codes if r.key == key]
            assert "CK" in row.source, f"{code}: source does not cite clinical-knowledge.md"
            assert row.confidence in _tokens(confidence), f"{code}: {row.confidence} vs CK {confidence}"
            checked += 1
    assert checked >= 35


def test_every_rxnorm_code_of_the_reference_is_mapped(
    reference: str, knowledge: Knowledge, left_out: dict[str, str]
) -> None:
    rows = _table(reference, "### RxNorm ingredients (MedicationAdministration)")
    assert len(rows) >= 8
    for names, rxcui, confidence in rows:
        if not rxcui.isdigit():
            for name in names.split(","):
                assert name.strip() in left_out, f"{name.strip()}: not mapped and not listed as left out"
            continue
        drug = knowledge.drug_for(RXNORM, rxcui)
        assert drug is not None and drug.name == names, f"RxNorm {rxcui} should map to {names}"
        (row,) = [r for r in drug.codes if r.code == rxcui]
        assert row.confidence in _tokens(confidence) and "CK" in row.source
    # The salt code the reference names in its text (norepinephrine bitartrate).
    assert "242969" in reference
    assert knowledge.drug_for(RXNORM, "242969").name == "norepinephrine"


def _icd_codes(cell: str) -> list[str]:
    codes: list[str] = []
    for letter, low, high in re.findall(r"\b([A-Z])(\d{2})–[A-Z]?(\d{2})\b", cell):  # "Q20–Q28"
        codes.extend(f"{letter}{n:02d}" for n in range(int(low), int(high) + 1))
    cell = re.sub(r"\b[A-Z]\d{2}–[A-Z]?\d{2}\b", "", cell)
    codes.extend(re.findall(r"\b[A-Z]\d{2}(?:\.[0-9A-Z]+)?", cell))  # "I21.x" → I21, "I31.3x" → I31.3
    codes.extend(re.findall(r"\b([A-Z]) chapter\b", cell))  # "O chapter" → O
    return codes


def test_every_condition_code_of_the_reference_is_in_one_value_set_per_row(
    reference: str, knowledge: Knowledge, left_out: dict[str, str]
) -> None:
    rows = _table(reference, "### SNOMED CT / ICD-10-CM (Conditions)")
    assert len(rows) >= 19
    for name, snomed_cell, icd_cell, confidence in rows:
        codes = [(SNOMED, c) for c in re.findall(r"\b\d{6,18}\b", snomed_cell)]
        codes += [(ICD10CM, c) for c in _icd_codes(icd_cell)]
        assert codes, name
        mapped = []
        for system, code in codes:
            if code in left_out:
                assert not knowledge.condition_value_sets(system, code), f"{code} is left out but mapped"
                continue
            assert knowledge.condition_value_sets(system, code), (
                f"{name}: {system}|{code} matches no value set"
            )
            mapped.append((system, code))
        # All codes of one reference row land in a common value set (SNOMED and ICD agree) …
        common = set(frozenset.intersection(*(knowledge.condition_value_sets(*c) for c in mapped)))
        assert common, f"{name}: its codes are spread over several value sets"
        # … through rows that cite the reference with its confidence. (Q25.1 is also in
        # congenital_heart_disease via Q25: only the value set shared by the row is checked.)
        for system, code in mapped:
            for row in _rows_matching(knowledge, common, system, code):
                assert row.confidence in _tokens(confidence), f"{code}: {row.confidence} vs CK {confidence}"
                assert "CK" in row.source


def test_unverified_rows_say_they_need_site_confirmation(knowledge: Knowledge) -> None:
    rows = [row for item in knowledge.inputs.values() for row in item.codes]
    rows += [row for drug in knowledge.drugs.values() for row in drug.codes]
    rows += [row for value_set in knowledge.value_sets.values() for row in value_set.codes]
    unverified = [row for row in rows if row.confidence == "U"]
    assert unverified, "the mottling / SOFA placeholders are U rows"
    for row in unverified:
        assert "confirm" in row.source.lower(), f"{row.key}: a U row must say it needs site confirmation"


def test_general_unit_conversions_do_not_leak_into_other_inputs(knowledge: Knowledge) -> None:
    # /uL → 10*9/L is for cell counts only: a heart rate in "/uL" is not 0.001 × anything.
    assert knowledge.conversion("absolute_neutrophil_count", "/uL").factor == 0.001
    assert knowledge.conversion("heart_rate", "/uL") is None
    # mg/dL → mmol/L is for lactate only.
    assert knowledge.conversion("lactate", "mg/dL").divisor == 9.01
    assert knowledge.conversion("body_weight", "mg/dL") is None


# -- validation errors name the file and the key --------------------------------------------------


def data_copy(tmp_path: Path) -> Path:
    """A copy of the data folder (mappings/, trials/, cards/) a test may edit."""
    for name in ("mappings", "trials", "cards"):
        shutil.copytree(PROJECT_ROOT / name, tmp_path / name)
    return tmp_path


def edit_yaml(path: Path, change: Any) -> None:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(document)
    path.write_text(yaml.safe_dump(document, allow_unicode=True, sort_keys=False), encoding="utf-8")


def problems_of(data_dir: Path) -> str:
    with pytest.raises(DataFileError) as caught:
        load_knowledge(data_dir)
    return str(caught.value)


def test_a_code_row_without_source_is_refused_naming_file_and_key(tmp_path: Path) -> None:
    data = data_copy(tmp_path)
    edit_yaml(data / "mappings/observations.yaml", lambda d: d["inputs"]["lactate"]["codes"][0].pop("source"))
    message = problems_of(data)
    assert "mappings/observations.yaml:" in message
    assert "inputs.lactate.codes[0].source: required field" in message


def test_a_unit_that_cannot_be_converted_is_refused(tmp_path: Path) -> None:
    data = data_copy(tmp_path)
    edit_yaml(
        data / "mappings/observations.yaml",
        lambda d: d["inputs"]["lactate"]["codes"][0]["units"].append("g/L"),
    )
    message = problems_of(data)
    assert "inputs.lactate.codes[0].units" in message and "'g/L'" in message


def test_local_file_errors_name_the_local_file(tmp_path: Path) -> None:
    data = data_copy(tmp_path)

    def change(document: dict[str, Any]) -> None:
        document["inputs"]["lactate"] = {
            "canonical_unit": "mg/dL",  # the input's unit is mmol/L: refused
            "codes": [
                {"system": LOINC, "code": "2524-7", "display": "dup", "source": "site", "confidence": "site"},
            ],
        }
        document["inputs"]["new_score"] = {"codes": []}  # a new input needs description and unit

    edit_yaml(data / "mappings/local.yaml", change)
    message = problems_of(data)
    assert "mappings/local.yaml" in message
    assert (
        "inputs.lactate.codes[0]: code http://loinc.org|2524-7 is already mapped to input 'lactate'"
        in message
    )
    assert "inputs.lactate.canonical_unit: 'mg/dL' differs from 'mmol/L'" in message
    assert "inputs.new_score: canonical_unit is required for a new input" in message


def test_a_drug_code_listed_twice_is_refused(tmp_path: Path) -> None:
    data = data_copy(tmp_path)
    edit_yaml(
        data / "mappings/medications.yaml",
        lambda d: d["drugs"]["epinephrine"]["codes"].append(dict(d["drugs"]["norepinephrine"]["codes"][0])),
    )
    message = problems_of(data)
    assert f"drugs.epinephrine.codes[1]: code {RXNORM}|7512 is already listed for 'norepinephrine'" in message


def test_a_misspelt_value_set_in_derived_yaml_is_refused(tmp_path: Path) -> None:
    # A typo here would silently mean "no infection diagnosis" for every patient.
    data = data_copy(tmp_path)
    edit_yaml(
        data / "mappings/derived.yaml",
        lambda d: d["septic_shock_onset"]["infection_value_sets"].append("sepsys"),
    )
    message = problems_of(data)
    assert "mappings/derived.yaml" in message and "septic_shock_onset.infection_value_sets[2]" in message


# -- a site adds a local code ---------------------------------------------------------------------

LOCAL_LACTATE = """
  lactate:
    codes:
      - {system: "urn:example:site-flowsheet", code: "LACT-POC", display: "Lactate POC (flowsheet)",
         units: [mmol/L], source: "site flowsheet build (test)", confidence: site}
"""


def _septic_patient_with_local_lactate() -> tuple[str, RawPatientData]:
    """Sepsis, norepinephrine started 4 h ago, the only lactate (4.4) charted on the local flowsheet row."""
    builder = PatientBuilder("local-lac", AT, age=50)
    builder.weight(80)
    builder.condition(ICD10CM, "A41.9", "Sepsis", onset_hours=7)
    builder.observation("LACT-POC", 4.4, "mmol/L", hours=4.5, system="urn:example:site-flowsheet")
    builder.norepinephrine(0.3, "ug/kg/min", start=4)
    return builder.patient_id, RawPatientData(patient=builder.patient, resources={"all": builder.resources})


def test_a_site_adds_a_local_lactate_code_by_editing_a_data_file_only(tmp_path: Path) -> None:
    patient_id, data = _septic_patient_with_local_lactate()
    at = AT.timestamp()

    before = Screener(load_settings(environ={})).screen(patient_id, data, at)
    assert before.facts.unknown_codes == {"Observation urn:example:site-flowsheet|LACT-POC": 1}
    assert before.facts.series("lactate") == []
    assert before.inputs.scalar("septic_shock_onset").status == "unknown"  # no lactate seen

    folder = data_copy(tmp_path / "data")
    local = folder / "mappings/local.yaml"
    local.write_text(local.read_text(encoding="utf-8") + LOCAL_LACTATE, encoding="utf-8")
    screener = Screener(load_settings(environ={}, overrides={"data": {"dir": str(folder)}}))
    after = screener.screen(patient_id, data, at)

    assert not after.facts.unknown_codes
    assert [(f.value, f.code) for f in after.facts.series("lactate")] == [
        (4.4, "urn:example:site-flowsheet|LACT-POC")
    ]
    onset = after.inputs.scalar("septic_shock_onset")
    assert (onset.status, onset.value) == ("known", at - 4 * 3600)
    # The FHIR query and the prefetch template ask the EHR for the new code too.
    assert "LACT-POC" in screener.plan.templates()["observations"]


def test_cds_service_check_accepts_the_edited_folder_and_names_a_broken_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = data_copy(tmp_path)
    local = folder / "mappings/local.yaml"
    local.write_text(local.read_text(encoding="utf-8") + LOCAL_LACTATE, encoding="utf-8")
    monkeypatch.delenv("CDS_CONFIG", raising=False)
    monkeypatch.setenv("CDS_DATA_DIR", str(folder))
    assert cli.main(["check"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")

    local.write_text(
        local.read_text(encoding="utf-8").replace("confidence: site}", "confidence: sure}"), encoding="utf-8"
    )
    assert cli.main(["check"]) == 1
    error = capsys.readouterr().err
    assert "mappings/local.yaml:" in error and "inputs.lactate.codes[0].confidence" in error


# -- unknown codes are listed by `cds-service evaluate --explain` ----------------------------------


def test_evaluate_explain_lists_unknown_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    builder = PatientBuilder("explain", AT, age=50)
    builder.observation("2345-7", 6.1, "mmol/L", hours=1)  # glucose: used by no criterion
    builder.infusion("", "Levophed 4 mg/250 mL", 0.1, "ug/kg/min", start=2, text_only=True)
    builder.infusion("1234567", "Giapreza (angiotensin II)", 20, "ng/kg/min", start=2)
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in builder.all_resources()],
    }
    path = tmp_path / "patient.json"
    path.write_text(json.dumps(bundle), encoding="utf-8")
    monkeypatch.delenv("CDS_CONFIG", raising=False)
    assert cli.main(["evaluate", str(path), "--explain", "--at", "2025-03-01T12:00:00Z"]) == 0
    unknown = json.loads(capsys.readouterr().out)["unknownCodes"]
    assert unknown == {
        "Observation http://loinc.org|2345-7": 1,
        "MedicationAdministration text:Levophed 4 mg/250 mL (matched norepinephrine by text)": 1,
        f"MedicationAdministration {RXNORM}|1234567": 1,
    }
