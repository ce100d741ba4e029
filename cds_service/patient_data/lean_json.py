"""A field-selective decoder for hook requests: the bulk of the prefetch, decoded only as far as
screening reads it.

A patient-view request is mostly prefetch Bundles: a thousand Observations, hundreds of infusion
records. Decoding all of it into dicts (``orjson.loads``) and letting it go again was, after
issue 17's other work, the largest single cost of a hook. msgspec decodes straight into the
shapes below: the fields that gathering and extraction read are kept exactly as ``orjson`` would
give them, everything else in a resource (narrative, ``meta``, ``subject``, ``category``,
reference ranges, performers …) is parsed as JSON but never built, and so never freed either.

The decoded request is plain dicts and lists, as ``orjson`` gives them, with one exception: the
Observations and MedicationAdministrations of the Bundles that search them (most of a request) are
:class:`LeanResource` Structs, which cost less to build, to read and to free. Extraction reads their
common case from their attributes and any other from ``as_dict()``, the dict they stand for;
gathering (the Medications an administration names) and the FHIR client (paging a prefetch Bundle)
take them as they are. With no prefetch, the FHIR client decodes the pages of its Observation and
administration searches the same way (:func:`decode_search_page`): extraction gets the same Structs
whichever way the data came. The rules that keep it the same screening:

- A Struct's ``as_dict()`` is exactly the dict the ``Resource`` shape gives (the same fields, the
  same accepted JSON), and extraction gives the same facts from a Struct as from its dict:
  ``tests/test_lean_json.py`` checks both on random Observations and administrations.
- Only what no stage reads is dropped. ``tests/test_lean_json.py`` reads the field names that
  ``gather``, ``extract`` and the FHIR client look up and fails on one this module would drop, and
  screens every scenario patient both ways.
- Whole values are kept verbatim (``Any``) wherever a stage might read deeper than declared: the
  Patient (validated with fhir.resources), the request's ``context`` and ``fhirAuthorization``,
  and ``contained`` resources.
- Anything not in these shapes — a field with another JSON type than FHIR gives it (a string
  where a CodeableConcept belongs), invalid JSON — is not decoded here at all: :meth:`decode`
  returns None and the caller decodes the body with ``orjson`` as before, so malformed requests
  get exactly the answers they got before.

Two differences from ``orjson`` remain, both in values no patient has: an integer beyond 64 bits
in a kept field stays an exact ``int`` where orjson gives a ``float`` (every reader takes
``float(value)`` of it), and a number beyond a double's range in a dropped field no longer
refuses the request (orjson refuses it, msgspec does not read it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import msgspec
from msgspec import UNSET, UnsetType

if TYPE_CHECKING:
    from .gather import PrefetchPlan

# The shapes, as ``TypedDict``s (msgspec builds plain dicts and skips keys not declared), all
# ``total=False``: a key absent from the JSON is absent from the dict, as with orjson.


class Coding(TypedDict, total=False):
    system: Any
    code: Any
    display: Any  # a drug or diagnosis named by display text only (extract._drug, condition)


class CodeableConcept(TypedDict, total=False):
    coding: list[Coding]
    text: Any


class Quantity(TypedDict, total=False):
    value: Any
    unit: Any
    system: Any
    code: Any
    comparator: Any


class Ratio(TypedDict, total=False):
    numerator: Quantity
    denominator: Quantity


class Period(TypedDict, total=False):
    start: Any
    end: Any


class Reference(TypedDict, total=False):
    reference: Any
    display: Any


class Dosage(TypedDict, total=False):
    dose: Quantity
    rateQuantity: Quantity
    rateRatio: Ratio


class Ingredient(TypedDict, total=False):
    itemCodeableConcept: CodeableConcept
    strength: Ratio  # the bag: 16 mg / 250 mL


class Component(TypedDict, total=False):
    code: CodeableConcept
    valueQuantity: Quantity
    valueCodeableConcept: CodeableConcept
    valueString: Any
    valueBoolean: Any
    valueInteger: Any
    dataAbsentReason: Any


class Resource(TypedDict, total=False):
    """Every resource a prefetch Bundle may hold, as one shape: the fields of Observation,
    MedicationAdministration, Medication and Condition that extraction and gathering read (other
    resource types keep their ``resourceType`` and ``id``, which is all that is read of them)."""

    resourceType: Any
    id: Any
    status: Any
    code: CodeableConcept
    # Observation
    effectiveDateTime: Any
    effectiveInstant: Any
    effectivePeriod: Period
    issued: Any
    valueQuantity: Quantity
    valueCodeableConcept: CodeableConcept
    valueString: Any
    valueBoolean: Any
    valueInteger: Any
    dataAbsentReason: Any
    component: list[Component]
    # MedicationAdministration (effectiveDateTime and effectivePeriod above)
    medicationCodeableConcept: CodeableConcept
    medicationReference: Reference
    dosage: Dosage
    contained: Any
    # Medication
    ingredient: list[Ingredient]
    # Condition
    clinicalStatus: Any
    verificationStatus: Any
    onsetDateTime: Any
    onsetPeriod: Any
    recordedDate: Any
    # OperationOutcome (a failed search's outcome in place of a Bundle or as an entry)
    issue: Any


# Observations and MedicationAdministrations, the bulk of a request, as msgspec Structs: cheaper to
# build and to free than dicts, and extraction reads their attributes faster than it looks keys up.
# The same fields as the shapes above (a test checks it), each accepting the same JSON: ``as_dict()``
# is exactly the dict ``Resource`` gives. Only the Bundles of the keys that search these two types
# hold them, and only for these two types (anything else there, such as the Medications that
# ``_include`` brings, is turned back into a dict as the request is decoded). ``UNSET`` is an absent
# field. No reference cycles can form in decoded JSON, so the collector need not track them.


class LeanCoding(msgspec.Struct, gc=False):
    system: Any = UNSET
    code: Any = UNSET
    display: Any = UNSET


class LeanCodeableConcept(msgspec.Struct, gc=False):
    coding: list[LeanCoding] | UnsetType = UNSET
    text: Any = UNSET


class LeanQuantity(msgspec.Struct, gc=False):
    value: Any = UNSET
    unit: Any = UNSET
    system: Any = UNSET
    code: Any = UNSET
    comparator: Any = UNSET


class LeanDosage(msgspec.Struct, gc=False):
    dose: LeanQuantity | UnsetType = UNSET
    rateQuantity: LeanQuantity | UnsetType = UNSET
    rateRatio: Ratio | UnsetType = UNSET


class LeanComponent(msgspec.Struct, gc=False):
    """A component of an Observation (a blood-pressure panel's systolic and diastolic readings)."""

    code: LeanCodeableConcept | UnsetType = UNSET
    valueQuantity: LeanQuantity | UnsetType = UNSET
    valueCodeableConcept: CodeableConcept | UnsetType = UNSET
    valueString: Any = UNSET
    valueBoolean: Any = UNSET
    valueInteger: Any = UNSET
    dataAbsentReason: Any = UNSET

    def as_dict(self) -> dict[str, Any]:
        """The component as ``Component`` decodes it (absent fields absent)."""
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


class LeanResource(msgspec.Struct, gc=False):
    """An Observation or a MedicationAdministration (``STRUCT_TYPES``) of a Bundle that searches
    them: extraction reads the common case from its attributes, and any other from :meth:`as_dict`."""

    resourceType: Any = UNSET
    id: Any = UNSET
    status: Any = UNSET
    code: LeanCodeableConcept | UnsetType = UNSET
    effectiveDateTime: Any = UNSET
    effectiveInstant: Any = UNSET
    effectivePeriod: Period | UnsetType = UNSET
    issued: Any = UNSET
    valueQuantity: LeanQuantity | UnsetType = UNSET
    valueCodeableConcept: CodeableConcept | UnsetType = UNSET
    valueString: Any = UNSET
    valueBoolean: Any = UNSET
    valueInteger: Any = UNSET
    dataAbsentReason: Any = UNSET
    component: list[LeanComponent] | UnsetType = UNSET
    medicationCodeableConcept: LeanCodeableConcept | UnsetType = UNSET
    medicationReference: Reference | UnsetType = UNSET
    dosage: LeanDosage | UnsetType = UNSET
    contained: Any = UNSET
    ingredient: list[Ingredient] | UnsetType = UNSET
    clinicalStatus: Any = UNSET
    verificationStatus: Any = UNSET
    onsetDateTime: Any = UNSET
    onsetPeriod: Any = UNSET
    recordedDate: Any = UNSET
    issue: Any = UNSET

    def as_dict(self) -> dict[str, Any]:
        """The resource as ``Resource`` decodes it (absent fields absent)."""
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


class EntrySearch(TypedDict, total=False):
    mode: Any  # "outcome": an OperationOutcome entry, not data


class Entry(TypedDict, total=False):
    resource: Resource
    search: EntrySearch


#: The resource types read as :class:`LeanResource`; and the searches whose Bundles may hold them.
STRUCT_TYPES = frozenset({"Observation", "MedicationAdministration"})


class LeanSearch(msgspec.Struct, gc=False):
    """``EntrySearch`` as a Struct."""

    mode: Any = UNSET


class LeanEntry(msgspec.Struct, gc=False):
    """``Entry`` as a Struct, in the Bundles that may hold :class:`LeanResource` (cheaper to build,
    read and free than a dict per entry; gathering and the FHIR client read both)."""

    resource: LeanResource | UnsetType = UNSET
    search: LeanSearch | UnsetType = UNSET


class Link(TypedDict, total=False):
    relation: Any  # "next": the pages to follow; "self": the page itself
    url: Any


class Bundle(TypedDict, total=False):
    """A prefetch value that should be a searchset Bundle (or an OperationOutcome in its place)."""

    resourceType: Any
    id: Any
    type: Any
    total: Any
    link: list[Link]
    entry: list[Entry]
    issue: Any


class StructBundle(TypedDict, total=False):
    """``Bundle``, for a key that searches one of ``STRUCT_TYPES``."""

    resourceType: Any
    id: Any
    type: Any
    total: Any
    link: list[Link]
    entry: list[LeanEntry]
    issue: Any


class LeanDecoder:
    """Decodes a patient-view request body for one prefetch plan (its keys: which are Bundles)."""

    def __init__(
        self, bundle_keys: list[str], resource_keys: list[str], struct_keys: Sequence[str] = ()
    ) -> None:
        fields: dict[str, Any] = {
            key: (StructBundle if key in struct_keys else Bundle) | None for key in bundle_keys
        }
        fields.update({key: Any for key in resource_keys})
        prefetch = TypedDict("Prefetch", fields, total=False)  # type: ignore[misc]
        # Functional syntax: the class syntax cannot name the local ``prefetch`` type.
        request = TypedDict(  # type: ignore[misc]  # noqa: UP013
            "HookRequestBody",
            {
                "hook": Any,
                "hookInstance": Any,
                "fhirServer": Any,
                "fhirAuthorization": Any,
                "context": Any,
                "prefetch": prefetch | None,
                "extension": Any,
            },
            total=False,
        )
        #: The request's shape (tests project a full decode onto it).
        self.request_type: Any = request
        self._decoder = msgspec.json.Decoder(request)
        self._struct_keys = [key for key in bundle_keys if key in struct_keys]

    @classmethod
    def for_plan(cls, plan: PrefetchPlan) -> LeanDecoder:
        """The plan's Patient key is kept whole (it is validated with fhir.resources); every other
        key is a search, answered with a Bundle."""
        resource_keys = [q.key for q in plan.queries if q.resource_type == "Patient"]
        return cls(
            [q.key for q in plan.queries if q.key not in resource_keys],
            resource_keys,
            [q.key for q in plan.queries if q.resource_type in STRUCT_TYPES],
        )

    def decode(self, body: bytes) -> dict[str, Any] | None:
        """The request with what screening reads, or None when the body is not an ordinary request
        (then decode it in full: the answer, an error included, is whatever it was before)."""
        try:
            request: dict[str, Any] = self._decoder.decode(body)
        except msgspec.DecodeError:  # ValidationError included
            return None
        prefetch = request.get("prefetch")
        if prefetch:
            for key in self._struct_keys:
                bundle = prefetch.get(key)
                if bundle:
                    _only_struct_types_as_structs(bundle.get("entry") or ())
        return request


_SEARCH_PAGE_DECODER = msgspec.json.Decoder(StructBundle)


def decode_search_page(body: bytes) -> dict[str, Any] | None:
    """A page of a search for one of ``STRUCT_TYPES`` as the FHIR client fetched it, decoded as a
    prefetch Bundle of the same search is (:class:`LeanDecoder`): its Observations and
    administrations as :class:`LeanResource`, any other resource as the dict of the ``Resource``
    shape. None when the body is not in these shapes: the client then decodes it with ``orjson``,
    and answers (an error included) as before."""
    try:
        bundle: dict[str, Any] = _SEARCH_PAGE_DECODER.decode(body)
    except msgspec.DecodeError:  # ValidationError included
        return None
    _only_struct_types_as_structs(bundle.get("entry") or ())
    return bundle


def _only_struct_types_as_structs(entries: list[LeanEntry]) -> None:
    """Another resource type in these Bundles goes on as the dict it always was: only extraction's
    Observation and MedicationAdministration paths read :class:`LeanResource`."""
    for entry in entries:
        resource = entry.resource
        if resource is UNSET:
            continue
        kind = resource.resourceType
        if type(kind) is not str or kind not in STRUCT_TYPES:
            entry.resource = resource.as_dict()  # type: ignore[assignment]
