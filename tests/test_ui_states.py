"""Every state text the pages show comes from the run's status and never names another status."""

from __future__ import annotations

import pytest

from backpropagate.events import RunStatus
from ui_app.components.status import STATUS_COLORS
from ui_app.state.runview import STATUS_LABELS, human_label, status_text, timeline_entry

PHASES = ["", "saving", "resuming", "loading_model"]


def _others(status: RunStatus) -> list[str]:
    return [str(o) for o in RunStatus if o != status]


@pytest.mark.parametrize("status", list(RunStatus))
@pytest.mark.parametrize("phase", PHASES)
def test_the_state_text_agrees_with_the_status(status: RunStatus, phase: str) -> None:
    text = status_text(str(status), phase).lower()
    assert text.startswith(str(status))
    if status != RunStatus.RUNNING:  # a finished or waiting run shows no leftover phase
        assert "saving" not in text and "resuming" not in text
    assert not any(other in text for other in _others(status))
    assert "_" not in text


@pytest.mark.parametrize("status", list(RunStatus))
def test_every_status_has_a_label_and_a_colour(status: RunStatus) -> None:
    assert STATUS_LABELS[str(status)] == str(status).capitalize()
    assert str(status) in STATUS_COLORS
    assert STATUS_COLORS["failed"] == "red"


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_the_timeline_names_an_ending_by_its_status(status: str) -> None:
    text = timeline_entry({"type": status, "step": 3, "message": "boom"})["text"].lower()
    assert text.startswith(status)
    assert not any(other in text for other in _others(RunStatus(status)))
    assert "stopped" not in text


def test_a_queued_run_says_what_it_waits_for() -> None:
    assert status_text("queued") == "Queued: waiting for a free slot"


def test_field_names_read_as_words() -> None:
    assert human_label("final_loss") == "Final loss"
    assert human_label("runtime_s") == "Runtime (s)"
