"""The screening worksheet: a SMART on FHIR app, served by this service, launched from the cards.

``smart.py`` (SMART App Launch client), ``sessions.py`` (sessions and launches, sealed in the store),
``page.py`` (the trial results shaped for the page) and ``views.py`` (the Flask blueprint). It runs
the same screening pipeline as the hook, with the access token of its own launch. docs/worksheet.md
describes it and how to register it with an EHR.
"""
