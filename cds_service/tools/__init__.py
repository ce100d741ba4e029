"""Tools around the service, never imported by it: the integration harness, the benchmark,
scenario and ICU patient generators, generated trial docs, the card-rule checker and the FHIR test
server launcher. They import the runtime; the runtime never imports them.
"""
