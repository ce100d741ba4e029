"""Top layer, the CDS Hooks wire: the Flask blueprint (``api``) and client JWT checks (``auth``)."""
