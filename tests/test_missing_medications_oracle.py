"""[speed] The Medications to fetch by id: the one-pass look-up gives what the two-pass definition gives.

``gather._missing_medications`` reads every resource of the hook's data (every Observation too) once
(issue 17); the two passes it replaced — the Medications the data holds, then the administrations
that name one it does not — are kept here as the definition. On random data (Medications,
administrations coded or not, with and without a pump rate, references contained, by id or full URL,
missing or empty, the same bag named twice, junk) both give the same ids in the same order.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cds_service.patient_data.extract import medication_key
from cds_service.patient_data.gather import (
    MAX_MEDICATIONS,
    RawPatientData,
    _missing_medications,
    _needs_strength,
)


def missing_medications_definition(data: RawPatientData) -> list[str]:
    """The two-pass version (before issue 17's one pass)."""
    have = {
        f"Medication/{r.get('id')}"
        for values in data.resources.values()
        for r in values
        if isinstance(r, dict) and r.get("resourceType") == "Medication"
    }
    wanted: dict[str, None] = {}
    for values in data.resources.values():
        for resource in values:
            if not isinstance(resource, dict) or resource.get("resourceType") != "MedicationAdministration":
                continue
            if isinstance(resource.get("medicationCodeableConcept"), dict) and not _needs_strength(resource):
                continue
            reference = (resource.get("medicationReference") or {}).get("reference")
            if not isinstance(reference, str) or reference.startswith("#") or "Medication/" not in reference:
                continue
            key = medication_key(reference)
            if key not in have:
                wanted[key] = None
    return [key.split("/", 1)[1] for key in itertools.islice(wanted, MAX_MEDICATIONS)]


BAGS = ["b1", "b2", "b3"]

resource = st.one_of(
    st.builds(lambda id_: {"resourceType": "Medication", "id": id_}, st.sampled_from(BAGS)),
    st.builds(
        lambda concept, reference, dosage: {
            "resourceType": "MedicationAdministration",
            **({"medicationCodeableConcept": concept} if concept is not None else {}),
            **({"medicationReference": reference} if reference is not None else {}),
            **({"dosage": dosage} if dosage is not None else {}),
        },
        st.sampled_from([None, {"text": "norepinephrine"}, "junk"]),
        st.one_of(
            st.none(),
            st.sampled_from(
                [{}, "", 0, {"display": "norepinephrine"}, {"reference": "#bag"}, {"reference": 7}]
            ),
            st.builds(
                lambda id_, form: {"reference": form.format(id_)},
                st.sampled_from(BAGS),
                st.sampled_from(["Medication/{}", "https://ehr.example/fhir/Medication/{}/_history/2", "{}"]),
            ),
        ),
        st.sampled_from([None, {"rateQuantity": {"value": 15}}, {"dose": {"value": 1}}, "junk"]),
    ),
    st.sampled_from([{"resourceType": "Observation", "id": "o"}, "not a resource", None]),
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["observations", "medicationAdministrations", "medications"]),
        st.lists(resource, max_size=8),
    )
)
def test_one_pass_gives_what_the_definition_gives(resources: dict[str, list[Any]]) -> None:
    data = RawPatientData(patient=None, resources=resources)
    assert _missing_medications(data) == missing_medications_definition(data)
