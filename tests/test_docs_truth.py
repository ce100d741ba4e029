"""Statements in the docs that the code decides, checked against the code (so they stay true)."""

from __future__ import annotations

import re

import pytest

from cds_service.base.config import PROJECT_ROOT, ConfigError, load_settings

DOCS = PROJECT_ROOT / "docs"


def test_security_guide_says_what_start_up_does_with_an_empty_public_url() -> None:
    text = " ".join((DOCS / "security.md").read_text(encoding="utf-8").split())
    quoted = re.search(r"the service does not start \(`([^`]+)`\)", text)
    assert quoted, "docs/security.md no longer says what happens with an empty public_url"
    with pytest.raises(ConfigError) as refused:
        load_settings(
            environ={},
            overrides={
                "security": {"trusted_clients": {"https://ehr.example.org": {"jwks_url": "https://x/j"}}}
            },
        )
    assert quoted.group(1) in str(refused.value)
    load_settings(environ={})  # open mode: an empty public_url is fine


def test_performance_guide_quotes_the_load_average_of_its_own_header() -> None:
    text = (DOCS / "performance.md").read_text(encoding="utf-8")
    header = re.search(r"load average ([\d.]+) at the start", text)
    assert header, "docs/performance.md has no load average in its header line"
    for claimed in re.findall(r"published run started at ([\d.]+)", text):
        assert claimed == header.group(1), f"the text says {claimed}, the header {header.group(1)}"


def test_readme_does_not_claim_a_container_linter() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    makefile = (PROJECT_ROOT / "Makefile").read_text(encoding="utf-8")
    if not re.search(r"hadolint|dockerfile-?lint", makefile):
        assert not re.search(r"\blinted\b", readme), (
            "the README says the containers are linted: no linter runs"
        )
