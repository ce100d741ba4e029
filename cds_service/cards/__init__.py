"""Stage 3, cards: from trial results to CDS Hooks cards.

``render`` renders each card from the cards/ templates; ``referral`` builds the suggested FHIR
resources (ServiceRequest, ResearchSubject), validated with fhir.resources. Imports only from the
layers below.
"""
