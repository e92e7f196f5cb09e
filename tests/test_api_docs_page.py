"""/api/docs: Swagger UI with every asset from this server (the CSP and offline machines refuse CDNs)."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from backpropagate.server.app import create_app
from backpropagate.settings import Settings


def test_docs_page_and_its_assets_are_served_locally(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(home=tmp_path / "home"), gpu_indices=[])) as client:
        page = client.get("/api/docs")
        assert page.status_code == 200 and "SwaggerUIBundle" in page.text
        urls = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
        assert urls and all(u.startswith("/api/") for u in urls), urls  # nothing from another host
        for url in urls:
            assert client.get(url).status_code == 200, url
        js = client.get("/api/docs/assets/swagger-ui-bundle.js")
        assert js.headers["content-type"].startswith("text/javascript") and len(js.content) > 100_000
        assert '"openapi":"3.1' in client.get("/api/openapi.json").text.replace(
            " ", ""
        )  # Swagger UI 5 reads 3.1
        for bad in ("../__init__.py", "..%2f..%2fstatic%2fswagger-ui.css", "redoc.standalone.js"):
            assert client.get(f"/api/docs/assets/{bad}").status_code == 404
