"""Fuzz every REST route of a live `backprop serve-api` (basic mode) from its own OpenAPI schema.

Hypothesis picks an operation, fills its path and query parameters (real ids of a seeded run and
data set, or any text: unicode, slashes, NUL bytes, very long values) and its body (JSON built
from the schema with right and wrong types, arbitrary JSON, or random multipart files). Every
answer must be below 500, and every error a catalogued code that does not echo the input at length.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_security_realserver import PASSWORD, ApiServer, start_api

from backpropagate.errors import ErrorCode

pytestmark = pytest.mark.slow
CODES = {str(c) for c in ErrorCode}
LONG = 1000  # a value this long must never come back in an error


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiServer, dict[str, Any], list[str]]]:
    """The server, its OpenAPI schema, and real ids to mix into path parameters."""
    server = start_api(tmp_path_factory.mktemp("fuzz") / "home", "--auth", f"alice:{PASSWORD}")
    auth = ("alice", PASSWORD)
    with httpx.Client(base_url=server.url, auth=auth, trust_env=False, timeout=60) as c:
        schema = c.get("/api/openapi.json").json()
        dataset = c.post("/api/datasets", files={"file": ("seed.jsonl", b'{"text": "hello"}\n')}).json()
        run = c.post("/api/runs", json={"data": dataset["id"], "steps": 2}).json()
        deadline = time.monotonic() + 60
        while c.get(f"/api/runs/{run['id']}").json()["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, "the seeded run did not finish"
            time.sleep(0.2)
    yield server, schema, [run["id"], dataset["id"]]
    server.stop()


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = schema["components"]["schemas"][name]
    return node


TEXT = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.sampled_from("./\\%~:?#&= \x00\u2603\u0442"), max_size=20),
    st.sampled_from(["..", "../../etc/passwd", "/etc/passwd", "~/.ssh/id_rsa", "%2e%2e%2f", "demo", ""]),
    st.text(min_size=LONG, max_size=LONG + 50, alphabet="AB"),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _value_for(schema: dict[str, Any], prop: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Mostly a value of the property's type, sometimes anything."""
    prop = _resolve(schema, prop)
    kind = prop.get("type")
    typed: st.SearchStrategy[Any] = {
        "integer": st.integers(min_value=-(2**40), max_value=2**40),
        "number": st.floats(allow_nan=False, allow_infinity=False),
        "boolean": st.booleans(),
        "string": st.sampled_from(prop["enum"]) if "enum" in prop else TEXT,
        "array": st.lists(TEXT | st.integers(), max_size=3),
    }.get(kind, JSON_VALUES)
    return st.one_of(typed, typed, JSON_VALUES)


def _json_body(schema: dict[str, Any], op: dict[str, Any]) -> st.SearchStrategy[Any]:
    content = op.get("requestBody", {}).get("content", {}).get("application/json")
    if not content:
        return JSON_VALUES
    body = _resolve(schema, content["schema"])
    props = body.get("properties", {})
    shaped = st.fixed_dictionaries({}, optional={k: _value_for(schema, v) for k, v in props.items()})
    return st.one_of(shaped, shaped, shaped, JSON_VALUES)


@st.composite
def requests(draw: st.DrawFn, schema: dict[str, Any], ids: list[str]) -> dict[str, Any]:
    method, path, op = draw(st.sampled_from(_operations(schema)))
    sent: list[str] = []
    for param in op.get("parameters", []):
        if param["in"] == "path":
            value = draw(st.one_of(st.sampled_from(ids), TEXT.filter(bool)))
            sent.append(value)
            path = path.replace("{" + param["name"] + "}", quote(value, safe=""))
    query: dict[str, str] = {}
    for param in op.get("parameters", []):
        if param["in"] == "query" and (param.get("required") or draw(st.booleans())):
            value = str(draw(st.one_of(st.integers(-5, 10**6), TEXT, st.sampled_from(ids))))
            query[param["name"]] = value
            sent.append(value)
    request: dict[str, Any] = {"method": method, "url": path, "params": query, "sent": sent}
    content = op.get("requestBody", {}).get("content", {})
    if "multipart/form-data" in content:
        name = draw(st.one_of(TEXT.filter(bool), st.sampled_from(["a.jsonl", "../up.csv", "x.parquet"])))
        request["files"] = {"file": (name, draw(st.binary(max_size=2000)))}
    elif content or (method != "GET" and draw(st.booleans())):
        body = draw(_json_body(schema, op))
        request["content"] = json.dumps(body).encode()
        request["headers"] = {"content-type": "application/json"}
        sent += [v for v in body.values() if isinstance(v, str)] if isinstance(body, dict) else []
    return request


def test_security_fuzz_api_never_fails_with_5xx(api: tuple[ApiServer, dict[str, Any], list[str]]) -> None:
    server, schema, ids = api
    client = httpx.Client(base_url=server.url, auth=("alice", PASSWORD), trust_env=False, timeout=60)

    @settings(
        max_examples=250,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(request=requests(schema, ids))
    def check(request: dict[str, Any]) -> None:
        sent = request.pop("sent")
        r = client.request(**request)
        where = f"{request['method']} {request['url']} -> {r.status_code}: {r.text[:300]}"
        assert r.status_code < 500, where
        if r.status_code >= 400:
            body = r.json()
            assert body.get("code") in CODES, where
            assert len(r.content) < 64 * 1024, where
            for value in sent:
                if len(value) >= LONG:
                    assert value not in r.text, f"echoed a {len(value)}-character value: {where}"

    try:
        check()
    finally:
        client.close()
    assert "Traceback" not in server.log.read_text()
