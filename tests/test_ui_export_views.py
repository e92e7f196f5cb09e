"""The Export page builds, and turns export job states into what it shows: progress, results, links, errors."""

from __future__ import annotations

import json

from ui_app.pages.export import export_page
from ui_app.state.export import any_running, download_href, job_view


def _state(**over: object) -> dict:
    state = {
        "id": "gguf-q8_0-1a2b3c4d",
        "run_id": "r1",
        "format": "gguf",
        "quantization": "q8_0",
        "verify": True,
        "ollama_name": None,
        "base_model": False,
        "status": "running",
        "stage": "convert",
        "progress": 0.4231,
        "files": [],
        "path": None,
        "seconds": None,
        "verification": None,
        "warnings": [],
        "error": None,
    }
    return {**state, **over}


def test_page_builds_with_the_form_progress_result_and_earlier_exports() -> None:
    text = json.dumps(export_page().render(), default=str)
    for needed in (
        "export-run",
        "start-export",
        "export-ollama-name",
        "export-verify",
        "export-progress",
        "export-progress-bar",
        "export-result",
        "export-error",
        "export-list",
        "export-no-runs",
        "export-download",
    ):
        assert needed in text, needed


def test_a_running_export_shows_its_stage_and_percent() -> None:
    view = job_view(_state())
    assert view["status"] == "running" and view["percent"] == 42
    assert view["stage"] == "Converting to GGUF" and view["what"] == "gguf · q8_0"
    assert view["error"] == "" and view["files"] == []
    assert any_running([view]) and not any_running([{**view, "status": "completed"}])


def test_a_finished_export_lists_its_result_and_same_origin_download_links() -> None:
    view = job_view(
        _state(
            status="completed",
            stage=None,
            progress=1.0,
            path="/home/u/runs/r1/exports/gguf-q8_0-1a2b3c4d/r1-q8_0.gguf",
            seconds=12.4,
            verification={"mean_kl": 0.000172, "kl_limit": 0.02, "top1_agreement": 0.984},
            warnings=["quantization fallback: x"],
            files=[{"name": "r1-q8_0.gguf", "bytes": 3 * 2**20}, {"name": "Modelfile", "bytes": 200}],
        )
    )
    details = {d["label"]: d["value"] for d in view["details"]}
    assert list(details)[0] == "path"  # first, so the result's text names the file before the links
    assert details["mean KL"] == "1.72e-04 (limit 0.02)" and details["top-1 agreement"] == "98.4 %"
    assert details["took"] == "12 s" and view["warnings"] == ["quantization fallback: x"]
    gguf = view["files"][0]
    assert gguf == {
        "name": "r1-q8_0.gguf",
        "size": "3.0 MB",
        "href": "/api/exports/gguf-q8_0-1a2b3c4d/download?file=r1-q8_0.gguf",
    }
    assert view["files"][1]["size"] == "200 B"


def test_download_links_are_relative_and_quote_odd_names() -> None:
    href = download_href("gguf-f16-00", "my model&v=2.gguf")
    assert href == "/api/exports/gguf-f16-00/download?file=my%20model%26v%3D2.gguf"
    assert "://" not in href  # the page's own origin, whichever served it


def test_a_failed_export_shows_code_message_and_hint_and_keeps_its_files() -> None:
    error = {
        "code": "DEP_OLLAMA_REGISTRATION_FAILED",
        "message": "Ollama at http://127.0.0.1:11434 did not answer",
        "hint": "Start the daemon with `ollama serve` (or set OLLAMA_HOST) and try again.",
    }
    view = job_view(
        _state(
            status="failed",
            stage="ollama",
            ollama_name="tiny",
            error=error,
            files=[{"name": "r1-q8_0.gguf", "bytes": 10}],
        )
    )
    assert view["error"] == "[DEP_OLLAMA_REGISTRATION_FAILED] Ollama at http://127.0.0.1:11434 did not answer"
    assert view["hint"].startswith("Start the daemon")
    assert view["files"][0]["name"] == "r1-q8_0.gguf"  # what was made can still be downloaded
    assert {"label": "Ollama model", "value": "tiny"} in view["details"]


def test_a_base_model_export_is_named_as_such() -> None:
    view = job_view(_state(id="gguf-f16-base-00", quantization="f16", base_model=True))
    assert view["what"] == "base model · gguf · f16"
