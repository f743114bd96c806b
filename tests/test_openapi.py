"""The OpenAPI document: served, committed, and generated from the same types."""

from __future__ import annotations

import json

import pytest

from daemon.api import openapi_bytes
from tests.conftest import REPO, Daemon

COMMITTED = REPO / "docs" / "openapi.json"


def test_served_document_matches_committed(shared_daemon: Daemon) -> None:
    reply = shared_daemon.request("GET", "/openapi.json")
    assert reply.status == 200
    assert reply.body == COMMITTED.read_bytes(), (
        "docs/openapi.json is out of date: regenerate it with"
        " `python -m daemon.api > docs/openapi.json`"
    )


def test_generated_document_matches_committed() -> None:
    assert openapi_bytes() == COMMITTED.read_bytes()


def test_document_is_openapi_31_with_contract_limits() -> None:
    document = json.loads(COMMITTED.read_text())
    schemas = document["components"]["schemas"]
    scan_event = schemas["ScanEvent"]["properties"]
    assert document["openapi"] == "3.1.0"
    assert schemas["ResolveScanRequest"]["required"] == ["requestId", "storeId", "scanEvent"]
    assert scan_event["value"]["maxLength"] == 1000
    assert sorted(scan_event["location"]["enum"]) == ["ENTRY", "EXIT", "MANUAL_IN_STORE"]
    assert sorted(scan_event["channel"]["enum"]) == ["CONTACT", "OPTICAL", "RADIO"]
    assert scan_event["timestamp"]["format"] == "date-time"
    assert schemas["ResolveScanResponse"]["properties"]["id"]["maxLength"] == 255


# Every status the scan endpoint answers with, from the admission checks to a server fault.
SCAN_STATUSES = ["200", "400", "401", "403", "408", "413", "415", "422", "429", "500", "503"]


@pytest.mark.parametrize("status", SCAN_STATUSES)
def test_scan_response_documented(status: str) -> None:
    document = json.loads(COMMITTED.read_text())
    responses = document["paths"]["/v1/identity/scan"]["post"]["responses"]
    assert status in responses


def test_rate_limit_documents_retry_after() -> None:
    document = json.loads(COMMITTED.read_text())
    too_many = document["paths"]["/v1/identity/scan"]["post"]["responses"]["429"]
    assert "Retry-After" in too_many["headers"]
