"""Uploads, request bodies and files at rest against a real `backprop serve-api` process."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_api_server import Server

pytestmark = pytest.mark.slow
BOUNDARY = "bp-test-boundary"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "home", BACKPROPAGATE_SERVER__MAX_UPLOAD_MB="1").start()
    yield srv
    srv.stop()


def _chunked_multipart(megabytes: int) -> Iterator[bytes]:
    yield (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    line = b'{"text": "' + b"x" * 1000 + b'"}\n'
    for _ in range(megabytes * 1024):
        yield line
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def test_chunked_upload_stops_at_the_limit_and_keeps_nothing(server: Server) -> None:
    r = httpx.post(
        server.url + "/api/datasets",
        content=_chunked_multipart(20),  # a generator: no Content-Length, chunked transfer
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        timeout=60,
    )
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["code"] == "INPUT_UPLOAD_TOO_LARGE"
    assert "BACKPROPAGATE_SERVER__MAX_UPLOAD_MB" in body["hint"]
    datasets = server.home / "datasets"
    assert not datasets.exists() or not any(datasets.iterdir())
    assert server.get("/api/datasets").json() == []


def test_upload_within_the_limit_is_stored_private(server: Server) -> None:
    r = server.post("/api/datasets", files={"file": ("ok.jsonl", b'{"text": "hi"}\n')})
    assert r.status_code == 201, r.text
    stored = next((server.home / "datasets").iterdir())
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600


def test_home_and_files_at_rest_are_private(server: Server) -> None:
    home = server.home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700  # created 0755 by the test, tightened
    for path in home.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert not mode & 0o077, f"{path} is {oct(mode)}"


def test_validation_errors_do_not_echo_a_large_body(server: Server) -> None:
    big = '{"model": "' + "A" * (5 * 2**20) + '", "data": 5, "x": ['
    r = server.post("/api/runs", content=big.encode(), headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.status_code
    assert len(r.content) < 64 * 1024
    assert "A" * 1000 not in r.text



def test_parquet_bomb_preview_is_refused_without_reading_it(server: Server, tmp_path: Path) -> None:
    """A small parquet file that unpacks to 64 MB: the API's preview refuses it with a code."""
    import io

    import psutil
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["a" * (64 << 20)]}), buf, compression="zstd")
    assert len(buf.getvalue()) < 200_000
    r = server.post("/api/datasets", files={"file": ("bomb.parquet", buf.getvalue())})
    assert r.status_code == 201, r.text
    rss_before = psutil.Process(server.proc.pid).memory_info().rss
    preview = server.get(f"/api/datasets/{r.json()['id']}/preview", params={"rows": 1})
    assert preview.status_code in (400, 413, 422), preview.text
    assert preview.json()["code"] == "DATASET_PARSE_FAILED" and len(preview.text) < 4000
    assert psutil.Process(server.proc.pid).memory_info().rss - rss_before < 200 << 20
