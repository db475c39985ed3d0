"""schemathesis against the live server's own OpenAPI document, auth on: no 5xx, every response as documented.

A bounded, reproducible run: every operation gets :data:`EXAMPLES` positive and :data:`EXAMPLES` negative
(schema-violating) requests from a derandomized Hypothesis (no database, no deadline, no shrinking); operations with
a model name in their path get the same again with the served model's name, so the upload routes are reached too.
Checks: not a server error, status code / content type / headers / body conform to the schema. A second test sends
every operation that declares the API key / bearer schemes without credentials: each must answer 401.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server.models import ModelStore
from server.settings import load_settings
from tests.server.conftest import API_KEY
from tests.server.live import Live, live_server

pytestmark = pytest.mark.integration

EXAMPLES = 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def live(models_dir: Path, tiny_models: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    data = tmp_path_factory.mktemp("schemathesis-server")
    settings_ = load_settings(models_dir=models_dir, data_dir=data, api_keys=[API_KEY], device="cpu", auth_enabled=True)
    with live_server(settings_, tiny_models) as server:
        yield server


def _plans(schema: Any) -> list[tuple[Any, Any, str]]:
    plans = []
    for result in schema.get_all_operations():
        operation = result.ok()
        path_names = {p.name for p in operation.iter_parameters() if p.location == "path"}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            plans.append((operation, operation.as_strategy(generation_mode=mode), mode.value))
            if path_names & {"name", "model"}:
                served = {n: "tiny" for n in path_names}
                strategy = operation.as_strategy(generation_mode=mode, path_parameters=served)
                plans.append((operation, strategy, f"{mode.value} (model tiny)"))
    return plans


def _fuzz(live: Live, operation: Any, strategy: Any, examples: Counter[str], statuses: Counter[int]) -> None:
    """Send :data:`EXAMPLES` requests drawn from ``strategy`` and check each response."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        examples[operation.label] += 1
        response = case.call(base_url=live.url, headers={"X-API-Key": API_KEY}, timeout=60)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    run()


def test_openapi_schema_holds_for_fuzzed_requests(live: Live) -> None:
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    plans = _plans(schema)
    operations = {op.label for op, _, _ in plans}
    examples: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures = []
    for operation, strategy, mode in plans:
        try:
            _fuzz(live, operation, strategy, examples, statuses)
        except Unsatisfiable:  # no negative request exists for an operation without parameters
            continue
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report them together
            failures.append(f"{operation.label} [{mode}]: {exc}")
    assert len(operations) >= 17 and sum(examples.values()) >= 400, (len(operations), sum(examples.values()))
    assert not failures, "\n\n".join(failures)
    assert not [s for s in statuses if s >= 500], statuses
    assert any(400 <= s < 500 for s in statuses) and statuses[200] > 0, statuses


def test_every_operation_that_declares_auth_refuses_requests_without_it(live: Live) -> None:
    import re

    import httpx

    document = httpx.get(f"{live.url}/openapi.json", timeout=30).json()
    assert set(document["components"]["securitySchemes"]) == {"APIKeyHeader", "HTTPBearer"}
    secured, open_ = [], []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            (secured if operation.get("security") else open_).append((method.upper(), path))
    assert len(secured) >= 12, secured
    assert {p for _, p in open_} <= {"/healthz", "/readyz", "/auth/", "/auth/token"}, open_
    for method, path in secured:
        url = live.url + re.sub(r"\{[^}]+\}", "tiny", path)
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, url, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"] == "Unauthorized", (method, path, headers, r.text)
