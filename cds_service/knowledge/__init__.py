"""Knowledge layer: the data files of mappings/ and trials/, loaded and validated at start-up.

``mappings`` reads the code mappings and unit conversions (mappings/*.yaml), ``trials`` the trial
definitions (trials/*.yaml), and ``criteria_language`` defines the grammar their rules are written
in. Imports only from ``base``.
"""
