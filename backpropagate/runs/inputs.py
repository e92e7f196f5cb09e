"""Where a run's paths may point, checked by RunService before any run is queued.

Allowed bases: data files inside the uploads folder (``datasets_dir``), the repository's
``examples/`` folder, BACKPROPAGATE_HOME or the user's home folder; local model folders inside
``models_dir``, BACKPROPAGATE_HOME or the user's home. A relative path resolves against the first
of these folders where it exists (data also against the repository root, for ``examples/...``).
Output folders may not be system or credential folders. Names that are not paths (``demo``, hub
ids like ``org/name``) pass unchanged. An upload id that is not in the store, or a data path that
does not exist, is DATASET_NOT_FOUND at once rather than a run that fails when it loads its data.
"""

from __future__ import annotations

import re
from pathlib import Path

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.runs.store import Store
from backpropagate.server.security.paths import check_output_dir, safe_path
from backpropagate.settings import Settings

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# The shape of the ids store_upload gives (``ds-`` and 12 hex digits).
_UPLOAD_ID = re.compile(r"^ds-[0-9A-Za-z]+$")
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def data_bases(settings: Settings) -> list[Path]:
    return [settings.datasets_dir, EXAMPLES_DIR, settings.home, Path.home()]


def model_bases(settings: Settings) -> list[Path]:
    return [settings.models_dir, settings.home, Path.home()]


def _is_path(value: str, base: Path) -> bool:
    if value.startswith(("/", "~", ".")) or ".." in Path(value).parts or "\\" in value:
        return True
    if not _HUB_ID.match(value):
        return True  # not a valid hub id, so it can only be meant as a path
    return value.lower().endswith(_DATA_SUFFIXES) or (base / value).exists()


def resolve_data(value: str, settings: Settings, store: Store) -> str:
    """An uploaded data set id becomes its stored file; a path must lie inside an allowed base and exist."""
    uploaded = store.find_dataset(value)
    if uploaded is not None:
        return uploaded.stored_path
    if _UPLOAD_ID.match(value):
        raise BackpropError(
            ErrorCode.DATASET_NOT_FOUND,
            f"No uploaded data set with id {value!r}.",
            hint="Upload the file first (POST /api/datasets) and use the id it answers; "
            "GET /api/datasets lists the uploads.",
        )
    if _is_path(value, settings.datasets_dir):
        path = _resolve_in(value, data_bases(settings) + [EXAMPLES_DIR.parent])
        if not path.exists():
            raise BackpropError(ErrorCode.DATASET_NOT_FOUND, f"The data path {value!r} does not exist.")
        return str(path)
    return value  # a hub data set id


def _resolve_in(value: str, bases: list[Path]) -> Path:
    """A relative path resolves against the first base where it exists (else the first base)."""
    if not Path(value).is_absolute() and not value.startswith("~"):
        for base in bases:
            if (base / value).exists():
                return safe_path(base / value, *bases[:-1])
    return safe_path(value, *bases[:-1])


def resolve_model(value: str, settings: Settings) -> str:
    from backpropagate.models.demo import DEMO_NAMES

    if value in DEMO_NAMES:
        return value
    if _is_path(value, settings.models_dir):
        return str(_resolve_in(value, model_bases(settings) + [settings.models_dir]))
    return value


def check_run_inputs(config: RunConfig, settings: Settings, store: Store) -> RunConfig:
    """The config with every path resolved and checked (INPUT_PATH_TRAVERSAL, DATASET_NOT_FOUND, ...)."""
    update: dict[str, str] = {
        "data": resolve_data(config.data, settings, store),
        "model": resolve_model(config.model, settings),
    }
    if config.eval_data:
        update["eval_data"] = resolve_data(config.eval_data, settings, store)
    if config.output_dir:
        update["output_dir"] = str(check_output_dir(config.output_dir))
    if config.init_adapter:  # the worker reads an adapter there: a folder inside the model bases
        update["init_adapter"] = str(
            _resolve_in(config.init_adapter, model_bases(settings) + [settings.models_dir])
        )
    return config.model_copy(update=update)


def check_data_still_there(config: dict) -> None:
    """A run being resumed: its (already resolved) data must still exist where it was."""
    for key in ("data", "eval_data"):
        value = config.get(key)
        if value and Path(value).is_absolute() and not Path(value).exists():
            raise BackpropError(
                ErrorCode.DATASET_NOT_FOUND,
                f"The run's {key.replace('_', ' ')} {value} is gone, so the run cannot resume.",
                hint="Put the file back at that path, or clone the run with new data.",
            )
