"""Schema-driven fuzzing: schemathesis generates requests from hotmodel's own
``/openapi.json`` and sends them to a running hotmodel on the real router.
Whatever it sends, no answer may be a 5xx, and the server must stay healthy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotmodel.api.endpoints import ENDPOINTS, RESPONSES
from tests.conftest import HotmodelProcess, start_hotmodel, write_config

pytestmark = pytest.mark.slow  # drives the real llama-server


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path], llama_server: Path
) -> Iterator[HotmodelProcess]:
    folder = tmp_path_factory.mktemp("fuzz")
    config = write_config(
        folder,
        {"tiny": tiny_models["tiny"], "tiny2": tiny_models["tiny2"]},
        "tiny",
        tail='[system_prompts.brief]\nsystem = "Be brief."\n',
    )
    hp = start_hotmodel(config)
    yield hp
    assert hp.stop() == 0, hp.output()


GENERATING = {
    "/v1/chat/completions",
    "/v1/messages",
    *(e.path for e in ENDPOINTS if e.generates),
}


def test_openapi_describes_every_route(server: HotmodelProcess) -> None:
    doc = httpx.get(server.base_url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {
        "/v1/chat/completions",
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/sessions",
        "/v1/sessions/{session_id}",
        "/health",
        "/metrics",
        "/admin/status",
        "/admin/switches",
        "/admin/switch",
        "/admin/reload",
        "/openapi.json",
        "/admin/events",
        "/admin/logs",
        "/ui",
        *(e.path for e in ENDPOINTS),  # every inference endpoint (api/endpoints.py)
        "/v1/messages",  # Anthropic Messages (api/messages.py)
        "/v1/messages/count_tokens",
        *(e.path for e in RESPONSES),  # OpenAI Responses (api/responses.py)
        "/v1/responses/{response_id}",
        "/v1/responses/{response_id}/input_items",
    }


def test_generated_requests_never_get_a_5xx(server: HotmodelProcess) -> None:
    # /admin/events is a live feed that never ends: it has nothing to fuzz and would hang a call
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json").exclude(
        path="/admin/events"
    )
    seen: dict[int, int] = {}

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=schema.as_strategy(), tokens=st.integers(min_value=1, max_value=4))
    def check(case: Any, tokens: int) -> None:
        if isinstance(case.body, dict) and case.path in GENERATING:
            case.body["max_tokens"] = tokens  # keep generations short; types are fuzzed elsewhere
            case.body.pop("n_predict", None)  # (it would override max_tokens)
        response = case.call(base_url=server.base_url, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} {case.body!r} -> "
            f"{response.status_code} {response.text[:300]}"
        )

    check()
    assert any(code < 300 for code in seen), seen  # the fuzzing reached real answers too
    assert any(400 <= code < 500 for code in seen), seen
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert server.status()["in_flight"] == 0
