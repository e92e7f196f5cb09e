"""Find what to export: a run id, a run folder, a checkpoint folder, an adapter folder or a full model folder.

The one resolver of both doors: ``backprop export`` and the API's export jobs call it. A stopped
run (no ``adapter/`` yet) exports its newest complete checkpoint (``export/checkpoint.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.export.checkpoint import checkpoint_weights, is_checkpoint, last_checkpoint, not_exportable
from backpropagate.settings import get_settings


@dataclass
class ExportSource:
    """The pieces an export needs, resolved from whatever the user named."""

    base_model: str  # local folder or hub id of the base (or of the full model itself)
    adapter_dir: Path | None  # PEFT adapter folder, None for a full model
    run_dir: Path | None  # the run folder when the source is a run
    run_config: dict[str, Any] | None
    label: str | None = None  # overrides the name derived from the folders (the base model's export)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.run_dir is not None:
            return self.run_dir.name
        if self.adapter_dir is not None:
            return self.adapter_dir.name
        return Path(self.base_model).name

    @property
    def default_output_root(self) -> Path:
        if self.run_dir is not None:
            return self.run_dir / "exports"
        return get_settings().exports_dir / self.name


def _is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _is_model(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_source(source: str | Path) -> ExportSource:
    """Resolve RUN_ID (under BACKPROPAGATE_HOME/runs) or a path; STATE_RUN_NOT_FOUND if neither."""
    text = str(source)
    candidates = [Path(text).expanduser()]
    if "/" not in text and "\\" not in text:
        candidates.insert(0, get_settings().runs_dir / text)
    for path in candidates:
        if not path.is_dir():
            continue
        path = path.resolve()
        if is_checkpoint(path) and (path.parent.parent / "config.json").is_file():  # RUN/checkpoints/step-N
            return _from_run_dir(path.parent.parent, checkpoint=path)
        config_path = path / "config.json"
        if (path / "adapter").is_dir() or (config_path.is_file() and "data" in _read_json(config_path)):
            return _from_run_dir(path)
        if _is_adapter(path):
            cfg = _read_json(path / "adapter_config.json")
            base = cfg.get("base_model_name_or_path")
            if not base:
                raise BackpropError(
                    ErrorCode.STATE_NOT_FOUND,
                    f"{path / 'adapter_config.json'} does not name base_model_name_or_path",
                )
            return ExportSource(base_model=base, adapter_dir=path, run_dir=None, run_config=None)
        if _is_model(path):
            return ExportSource(base_model=str(path), adapter_dir=None, run_dir=None, run_config=None)
    raise BackpropError(
        ErrorCode.STATE_RUN_NOT_FOUND,
        f"{text!r} is neither a run id under {get_settings().runs_dir} nor a run, adapter or model folder",
    )


def base_model_source(src: ExportSource) -> ExportSource:
    """The model a run started from, without its adapter: the baseline to compare its export with.

    Output goes next to the run's own exports, named ``<run>-base`` so the two are never confused.
    """
    base = src.base_model
    if src.adapter_dir is None:
        # Full fine-tuning: base_model is the trained model itself; the run's config names the start.
        model = (src.run_config or {}).get("model")
        if not model:
            raise BackpropError(
                ErrorCode.CONFIG_INVALID_SETTING,
                f"{src.name} is a full model with no separate base model to export",
                hint="Export the base model's own folder instead, or pick a run trained with LoRA.",
            )
        base = _resolve_base(str(model))
    return ExportSource(
        base_model=base,
        adapter_dir=None,
        run_dir=src.run_dir,
        run_config=src.run_config,
        label=f"{src.name}-base",
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BackpropError(ErrorCode.STATE_NOT_FOUND, f"cannot read {path}: {exc}") from exc


def _from_run_dir(run_dir: Path, checkpoint: Path | None = None) -> ExportSource:
    """A run's weights: its adapter (or full model, in the run folder or its output_dir) once it has
    finished; else, or when ``checkpoint`` names one, a checkpoint written out as an adapter folder."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise BackpropError(ErrorCode.STATE_RUN_NOT_FOUND, f"{config_path} is missing: not a run folder")
    config = _read_json(config_path)
    base = _resolve_base(str(config.get("model", "")))
    if checkpoint is None:
        adapter = run_dir / "adapter"
        output_dir = Path(config["output_dir"]).expanduser() if config.get("output_dir") else None
        for folder in (adapter, output_dir):
            if folder is not None and _is_adapter(folder):
                return ExportSource(base_model=base, adapter_dir=folder, run_dir=run_dir, run_config=config)
        # Full fine-tuning leaves a whole model instead of an adapter.
        for folder in (run_dir / "model", adapter, output_dir):
            if folder is not None and _is_model(folder):
                return ExportSource(
                    base_model=str(folder), adapter_dir=None, run_dir=run_dir, run_config=config
                )
        checkpoint = last_checkpoint(run_dir)  # a stopped or interrupted run
        if checkpoint is None:
            raise not_exportable(run_dir)
    weights = checkpoint_weights(checkpoint, config)
    if _is_adapter(weights):
        return ExportSource(base_model=base, adapter_dir=weights, run_dir=run_dir, run_config=config)
    return ExportSource(base_model=str(weights), adapter_dir=None, run_dir=run_dir, run_config=config)


def _resolve_base(model: str) -> str:
    """Turn the run's `model` (demo names, folders, hub ids) into something from_pretrained takes."""
    try:
        from backpropagate.models.demo import resolve_model
    except ImportError:
        return model
    return str(resolve_model(model))
