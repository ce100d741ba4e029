"""Stage 2, clinical reasoning: from facts to derived inputs to trial results.

``derived`` computes the clinical inputs (age, weight, MAP, VIS, septic-shock onset, persistence),
``criteria`` evaluates the rules of the criteria language with three-valued logic, and
``evaluation`` decides each trial (eligible, possibly eligible, upcoming) with its window.
Imports only from ``base`` and ``knowledge`` (facts come in through ``base.facts``).
"""
