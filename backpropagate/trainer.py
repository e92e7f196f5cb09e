"""``Trainer``: the Python API, training in this process with the same engine as the worker.

    from backpropagate import Trainer

    trainer = Trainer("demo", lora_r=8, lr=1e-3)
    result = trainer.train("examples/quickstart.jsonl", steps=20)
    print(result.final_loss, result.adapter_path)

    pairs = [{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}]
    Trainer("demo", objective="dpo", beta=0.1).train(pairs, steps=5)

Each ``train()`` is a run under ``BACKPROPAGATE_HOME/runs/<run_id>/`` with the same files a run
started from the web app has (config.json, events.jsonl, checkpoints/, adapter/).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.events import EventBase
from backpropagate.logs import get_logger
from backpropagate.settings import get_settings
from backpropagate.training.result import TrainResult
from backpropagate.training.run_ids import create_run_dir

Callback = Callable[[EventBase], None]

__all__ = ["Trainer", "TrainResult"]


class Trainer:
    """Fine-tune ``model`` with any :class:`RunConfig` fields given as keyword overrides."""

    def __init__(self, model: str = "demo", **overrides: Any) -> None:
        unknown = sorted(set(overrides) - set(RunConfig.model_fields))
        if unknown:
            raise BackpropError(
                ErrorCode.CONFIG_INVALID,
                f"Unknown Trainer option(s): {', '.join(unknown)}; options are RunConfig fields "
                "(see `backprop train --help`).",
            )
        self.model = model
        self.overrides = overrides
        self.result: TrainResult | None = None
        self.config: RunConfig | None = None
        self._log = get_logger(__name__)

    def make_config(
        self, data: str | Path, steps: int | None = None, epochs: float | None = None
    ) -> RunConfig:
        """The validated RunConfig a ``train()`` call would use (CONFIG_INVALID lists every problem)."""
        local = Path(data).expanduser()
        # Absolute, so that the run's saved config resumes from any working directory.
        data = local.resolve() if local.exists() else data
        fields: dict[str, Any] = {**self.overrides, "model": self.model, "data": str(data)}
        if steps is not None:
            fields["steps"] = steps
        if epochs is not None:
            fields["epochs"] = epochs
        return RunConfig.parse(fields)

    def train(
        self,
        data: str | Path | Sequence[Mapping[str, Any]],
        steps: int | None = None,
        epochs: float | None = None,
        callbacks: Iterable[Callback] | None = None,
    ) -> TrainResult:
        """Train on ``data``: a file, folder or hub id, or rows as dicts (kept as the run's
        ``data.jsonl``, so the run can resume); ``callbacks`` receive every event as it happens."""
        from backpropagate.runs.foreground import train_in_process

        run_dir = create_run_dir(get_settings().runs_dir)
        try:
            if not isinstance(data, (str, Path)):
                data = _write_rows(run_dir / "data.jsonl", data)
            config = self.make_config(data, steps, epochs)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing was started: leave no empty run
            raise
        run_id = run_dir.name
        config.save(run_dir / "config.json")
        log = self._log.bind(run_id=run_id)
        log.info("training %s on %s in %s", config.model, config.data, run_dir)
        hooks = list(callbacks or [])

        def on_event(event: EventBase) -> None:
            for hook in hooks:
                hook(event)

        result = train_in_process(config, run_dir, on_event)
        self.config, self.result = config, result
        log.info("run %s: %s at step %d, loss %s", run_id, result.status, result.step, result.final_loss)
        return result

    def multi_run(
        self,
        data: str | Path,
        num_runs: int,
        steps_per_run: int,
        samples_per_run: int,
        merge: str = "slao",
        callbacks: Iterable[Callback] | None = None,
        resume: str | None = None,
        **schedule: Any,
    ) -> Any:
        """Train ``num_runs`` runs on fresh chunks of ``data``, merging the adapters between runs.

        ``schedule`` takes ``validate_every_run``, ``early_stopping``, ``patience``, ``min_delta`` and
        ``wrap``, ``track_forgetting`` (see :class:`backpropagate.config.MultiRun`); ``resume`` continues an
        earlier multi-run by its id. Returns a ``MultiRunResult`` (its adapter is the merged one).
        """
        from backpropagate.training.multirun import make_schedule, start_multi_run

        plan = make_schedule(
            num_runs=num_runs,
            steps_per_run=steps_per_run,
            samples_per_run=samples_per_run,
            merge=merge,
            **schedule,
        )
        config = self.make_config(data)
        hooks = list(callbacks or [])
        result = start_multi_run(config, plan, resume=resume, on_event=lambda e: [h(e) for h in hooks])
        self.config = config
        return result

    def evaluate(self, data: str | Path | None = None) -> dict[str, float]:
        """Loss and perplexity of the trained model on ``data`` (default: the run's held-out split)."""
        if self.result is None or self.result.adapter_path is None or self.config is None:
            raise BackpropError(ErrorCode.STATE_NOT_FOUND, "Nothing to evaluate yet: call train() first.")
        from functools import partial

        from backpropagate.data import collate, prepare_datasets
        from backpropagate.training.backends import load_tokenizer
        from backpropagate.training.evaluation import evaluate

        config = self.config
        if data is not None:
            config = config.model_copy(update={"eval_data": str(data)})
        tokenizer = load_tokenizer(str(self.result.adapter_path))
        prepared = prepare_datasets(config, tokenizer)
        rows = prepared.eval or prepared.train  # no held-out split: report the training loss
        model, device = _load_trained(config, self.result.adapter_path)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batch = config.batch_size if isinstance(config.batch_size, int) else 1
        loss, ppl = evaluate(model, rows, partial(collate, pad_id=pad), batch_size=batch, device=device)
        return {"loss": loss, "perplexity": ppl}

    def save(self, path: str | Path) -> Path:
        """Copy the trained adapter (or full model) to ``path``.

        Before ``train()`` this writes the freshly initialised adapter, which has learned nothing:
        useful to check an export pipeline, surprising otherwise, so it warns.
        """
        out = Path(path).expanduser()
        if self.result is not None and self.result.adapter_path is not None:
            shutil.copytree(self.result.adapter_path, out, dirs_exist_ok=True)
            return out
        message = (
            f"Trainer.save({str(out)!r}) was called before train(): writing the untrained initial "
            "adapter, which has learned nothing yet. Call train() first to save a trained one."
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        self._log.warning(message)
        from backpropagate.training.backends import load_model

        config = RunConfig.parse({**self.overrides, "model": self.model, "data": "(none)"})
        loaded = load_model(config, emit=lambda _event: None)
        out.mkdir(parents=True, exist_ok=True)
        loaded.model.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
        return out


def _write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    if isinstance(rows, Mapping) or not all(isinstance(r, Mapping) for r in rows):
        raise BackpropError(
            ErrorCode.CONFIG_INVALID,
            "Trainer.train(data): data must be a path or a list of rows (dicts such as "
            '{"prompt": ..., "chosen": ..., "rejected": ...})',
        )
    path.write_text("".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _load_trained(config: RunConfig, adapter_path: Path) -> tuple[Any, Any]:
    """The base model with the trained adapter applied (or the fully fine-tuned model)."""
    from backpropagate.training.backends import pick_device, resolve_model_path

    device = pick_device(config)
    if config.method == "full":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(adapter_path).to(device), device
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(config.model))
    return PeftModel.from_pretrained(base, adapter_path).to(device), device
