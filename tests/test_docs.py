"""The generated reference pages must match the code they document."""

from pathlib import Path

import pytest

from backpropagate.docs import PAGES
from backpropagate.errors import ErrorCode

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(PAGES))
def test_generated_page_is_current(name):
    committed = (REPO / "docs" / name).read_text()
    assert committed == PAGES[name](), f"docs/{name} is stale: run `python -m backpropagate.docs`"


def test_every_error_code_is_documented():
    text = (REPO / "docs" / "error-codes.md").read_text()
    missing = [code for code in ErrorCode if f"`{code}`" not in text]
    assert not missing


def test_every_setting_and_run_field_is_documented():
    from backpropagate.config import RunConfig

    text = (REPO / "docs" / "configuration.md").read_text()
    for name in RunConfig.model_fields:
        assert f"| `{name}` |" in text
    for var in ("BACKPROPAGATE_HOME", "BACKPROPAGATE_DB_URL", "BACKPROPAGATE_SERVER__PORT"):
        assert f"`{var}`" in text
