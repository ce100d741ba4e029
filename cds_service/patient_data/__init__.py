"""Stage 1, patient data: from the validated hook request to normalised facts.

``hook_request`` validates the CDS Hooks request, ``gather`` reads the prefetch and fetches what is
missing through ``fhir_client`` (one session, one deadline), and ``extract`` turns FHIR JSON into
facts in canonical units. Imports only from ``base`` and ``knowledge``.
"""
