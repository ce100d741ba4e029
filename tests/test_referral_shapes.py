"""[speed] Referral resources are validated once per shape, and that refuses what full validation refuses.

``cards/referral.py`` validates a referral ServiceRequest or ResearchSubject with fhir.resources
only when its *shape* (everything but the card uuid, the patient, the requester, the note and the
window's times) has not validated before, and those per-card values are plainly valid text and
instants (issue 17). Random per-card values — empty, whitespace at an end, control characters,
impossible dates, wrong types — and random changes to the rest must be accepted or refused exactly
as a full fhir.resources validation of every resource would.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.base.config import load_settings
from cds_service.cards import referral
from cds_service.cards.referral import InvalidResource, ReferralRequest, research_subject, service_request
from cds_service.clinical.evaluation import ELIGIBLE
from tests.test_cards import AT, synthetic_trial

_SCREENING = load_settings(environ={}).section("screening")
_TRIAL = synthetic_trial("NCT09999995", "SHAPES", ("shock",))


def _request(**changes: Any) -> ReferralRequest:
    base = ReferralRequest(
        "3fa85f64-5717-4562-b3fc-2c963f66afa6",
        "p1",
        _TRIAL,
        ELIGIBLE,
        AT,
        window_opens_at=AT + 3600,
        window_closes_at=AT + 7200,
        user_id="Practitioner/7",
    )
    return ReferralRequest(**{**base.__dict__, **changes})


TEMPLATES = [service_request(_request(), _SCREENING), research_subject(_request())]

texts = st.one_of(
    st.sampled_from(["urn:uuid:3fa85f64", "Patient/p2", "Practitioner/8", "Needs data: lactate.", "a\nb\tc"]),
    st.sampled_from(["", " ", " lead", "trail ", "\n", "x\x00y", "x\x0bx", "\u00a0nbsp", "ok\u2028"]),
    st.text(max_size=12),
    st.integers(),
    st.none(),
)
instants = st.one_of(
    st.sampled_from(["2026-03-01T10:00:00Z", "2024-02-29T23:59:59Z", "1999-12-31T00:00:00Z"]),
    st.sampled_from(["2026-02-30T10:00:00Z", "2026-13-01T00:00:00Z", "2026-03-01T25:00:00Z", "tomorrow", ""]),
    st.sampled_from(["2026-03-01T10:00:00+02:00", "2026-03-01", "2026-03-01T10:00:00.5Z"]),
    st.text(max_size=8),
    st.none(),
)
#: Changes to what is not per-card: a code outside its binding, a missing required element, a wrong type.
others = st.sampled_from(
    [
        {},
        {},
        {"status": "bogus"},
        {"intent": "suggestion"},
        {"priority": "urgent"},
        {"priority": 3},
        {"subject": None},
        {"identifier": [{"system": "urn:ietf:rfc:3986", "value": "a"}, {"value": "b"}]},
        {"note": "not a list"},
        {"extra": True},
    ]
)


def _set(resource: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    if referral._at(resource, path) is referral._ABSENT:
        return resource
    return referral._with_value(resource, path, value)


@st.composite
def referral_resources(draw: st.DrawFn) -> dict[str, Any]:
    resource = draw(st.sampled_from(TEMPLATES))
    for path in referral._PER_CARD_TEXT:
        if draw(st.integers(0, 2)) == 0:
            resource = _set(resource, path, draw(texts))
    for path in referral._PER_CARD_TIME:
        if draw(st.integers(0, 2)) == 0:
            resource = _set(resource, path, draw(instants))
    change = draw(others)
    changed = {**resource, **change}
    return {key: value for key, value in changed.items() if value is not None or key != "subject"}


def _accepts(check: Any, resource: dict[str, Any]) -> bool:
    try:
        check(resource)
    except InvalidResource:
        return False
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(resource=referral_resources())
def test_a_known_shape_is_accepted_and_refused_as_full_validation_says(resource: dict[str, Any]) -> None:
    for template in TEMPLATES:
        referral.validated(template)  # the shapes of the templates are known
    assert _accepts(referral.validated, resource) == _accepts(referral._validate_fully, resource), resource


def test_the_shape_cache_is_used_and_returns_the_resource_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    full = referral._validate_fully
    monkeypatch.setattr(referral, "_validate_fully", lambda r: (calls.append(r), full(r)))
    monkeypatch.setattr(referral, "_VALID_SHAPES", set())
    first = service_request(_request(), _SCREENING)
    other_card = _request(card_uuid="0b5e8d1c-1111-4222-8333-944455556666", patient_id="p9")
    second = service_request(other_card, _SCREENING)
    assert len(calls) == 1  # the second card's ServiceRequest has the first one's shape
    assert second["subject"] == {"reference": "Patient/p9"} and first != second
    service_request(_request(status="possibly_eligible"), _SCREENING)  # another note, same shape
    assert len(calls) == 1
    service_request(_request(user_id=None), _SCREENING)  # no requester: another shape
    assert len(calls) == 2
    with pytest.raises(InvalidResource, match="occurrencePeriod"):  # not plainly valid: validated
        referral.validated({**second, "occurrencePeriod": {"end": "2026-02-30T10:00:00Z"}})
    assert len(calls) == 3
