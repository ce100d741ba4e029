"""CDS Hooks 2.0 service that screens ICU patients for septic-shock clinical trials.

The package is laid out as the pipeline a hook runs through; each layer imports only from the
layers above it in this list (``tests/test_layers.py`` checks it):

- ``base/``          settings, errors, logs, metrics, data-file loading, the facts contract
- ``knowledge/``     mappings/ and trials/ loaded and validated; the criteria language's grammar
- ``patient_data/``  stage 1: hook request → prefetch / FHIR fetch → facts
- ``clinical/``      stage 2: facts → derived inputs → criteria → trial results
- ``cards/``         stage 3: trial results → CDS Hooks cards and referral resources
- ``protocol/``, ``screening``, ``service``, ``store``, ``app``
                     the top: routes, client auth, and the orchestrators that run the stages
- ``tools/``         harness, benchmark, scenario and patient generators (never imported by the runtime)
- ``cli``            the ``cds-service`` command: runtime commands and the tools
"""
