"""Base layer: what every other layer may import.

Settings (``config``), the HookError and OperationOutcome answers (``errors``), JSON logging with
redaction (``logs``), Prometheus metrics (``metrics``), YAML + cerberus loading of data files
(``datafiles``) and the normalised facts that flow between the stages (``facts``).
Nothing here imports from another layer.
"""
