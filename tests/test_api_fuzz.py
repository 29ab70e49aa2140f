"""schemathesis against the running service's OpenAPI document (``/docs.json``): whatever it sends,
the service answers only with statuses, content types and bodies the document declares, and
never with a 5xx. A short run is part of ``make test``; ``make fuzz`` runs it long
(``BACKBONES_FUZZ_EXAMPLES`` examples per operation)."""

from __future__ import annotations

import functools

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

from .conftest import fuzz_budget
from .serving import Server

pytestmark = [pytest.mark.slow, pytest.mark.fuzz]

SHORT_RUN_EXAMPLES = 15  # per operation: the whole short run stays within ~30 s on 2 cores
# "only the declared errors": no 5xx, and every status, content type and body as documented
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# the Open Inference Protocol's routes (service/oip_routes.py), all in the document
OIP_OPERATIONS = (
    "GET /v2",
    "GET /v2/health/live",
    "GET /v2/health/ready",
    "GET /v2/models/{model_name}",
    "GET /v2/models/{model_name}/versions/{model_version}",
    "GET /v2/models/{model_name}/ready",
    "GET /v2/models/{model_name}/versions/{model_version}/ready",
    "POST /v2/models/{model_name}/infer",
    "POST /v2/models/{model_name}/versions/{model_version}/infer",
)


def naming_served(case: schemathesis.Case, version: str) -> schemathesis.Case:
    """``case`` for the model the server serves (and its version, where the path has one)."""
    case.path_parameters = {**(case.path_parameters or {}), "model_name": "tiny_cnn"}
    if "{model_version}" in case.path:
        case.path_parameters["model_version"] = version
    return case


def test_only_declared_responses(tiny_server: Server) -> None:
    # Each operation gets its own Hypothesis run. (schemathesis.pytest.from_fixture, the lazy
    # loader, does not work with pytest 9: it reads a private attribute pytest no longer has.)
    schema = schemathesis.openapi.from_url(tiny_server.url + "/docs.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the document has an operation schemathesis cannot read: {result.err()}"
        operations.append(result.ok())
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /classify", "POST /embed", "GET /readyz"}
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= set(OIP_OPERATIONS)
    seen: dict[str, set[int]] = {}
    served_version = tiny_server.registry.get("tiny_cnn").spec.version
    for operation in operations:
        # valid requests and invalid ones (wrong types, missing fields, values out of range)
        cases = st.one_of([operation.as_strategy(mode) for mode in GenerationMode])
        if "{model_name}" in operation.path:  # half of them name the served model, whose checks they then reach
            cases = st.one_of(cases, cases.map(functools.partial(naming_served, version=served_version)))

        @given(case=cases)
        @settings(
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            **fuzz_budget(SHORT_RUN_EXAMPLES),
        )
        def only_declared(case: schemathesis.Case) -> None:
            response = case.call_and_validate(timeout=30, checks=CHECKS)
            seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

        only_declared()
    print({op: sorted(codes) for op, codes in seen.items()})
    # the fuzzer got past the front door: bad images and bad fields both reached the handlers
    assert {400, 422} <= seen.get("POST /classify", set()) | seen.get("POST /embed", set()), seen
    # and the Open Inference Protocol's: a served model's checks, and an unknown model's 404
    infer = seen.get("POST /v2/models/{model_name}/infer", set())
    assert 404 in infer and infer & {400, 422}, seen
