"""Evaluate a run: held-out loss and perplexity, and greedy generations scored against a file.

``evaluate_run(run, data=..., vs=...)`` loads the run's model (base + adapter, or the fully
fine-tuned model), optionally a second model to compare with (another run, or ``"base"``: the
same base with the adapter switched off), and returns the result object that ``backprop eval
--json`` prints and that is stored as ``RUN_DIR/evals/<eval_id>/result.json``.

The loss of a model is measured on the eval file's ``prompt`` -> ``expected`` pairs when a file
is given (the answer tokens only, as training counts them), else on the run's held-out split.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.evaluation import metrics

Progress = Callable[[str, int, int], None]
RESULT_FILE = "result.json"
MAX_NEW_TOKENS = 64


@dataclass
class EvalRow:
    prompt: str
    expected: str
    regex: str | None = None
    line: int = 0


def read_eval_file(path: str | Path) -> list[EvalRow]:
    """``{prompt, expected[, regex]}`` rows of a JSONL file (or a JSON list); every bad row is named."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise BackpropError(ErrorCode.DATASET_NOT_FOUND, f"Eval file {str(path)!r} does not exist.")
    text = file.read_text(errors="replace")
    records: list[tuple[int, Any]] = []
    if file.suffix == ".json":
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise BackpropError(ErrorCode.DATASET_PARSE_FAILED, f"{file}: not valid JSON: {exc}") from None
        records = list(enumerate(loaded if isinstance(loaded, list) else [loaded], start=1))
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except ValueError as exc:
                raise BackpropError(
                    ErrorCode.DATASET_PARSE_FAILED, f"{file}:{number}: not valid JSON: {exc}"
                ) from None
    rows, problems = [], []
    for number, record in records:
        missing = [k for k in ("prompt", "expected") if not isinstance(_get(record, k), str)]
        if missing:
            problems.append(f"{file}:{number}: needs a text {' and '.join(missing)}")
            continue
        pattern = _get(record, "regex")
        if pattern is not None:
            try:
                import re

                re.compile(pattern)
            except (re.error, TypeError) as exc:
                problems.append(f"{file}:{number}: regex {pattern!r} does not compile: {exc}")
                continue
        rows.append(EvalRow(record["prompt"], record["expected"], pattern, number))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BackpropError(
            ErrorCode.DATASET_PARSE_FAILED,
            "; ".join(problems[:3]) + more,
            hint='Each row is {"prompt": "...", "expected": "..."} with an optional "regex".',
            problems=problems,
        )
    if not rows:
        raise BackpropError(ErrorCode.DATASET_EMPTY, f"Eval file {file} has no rows.")
    return rows


def _get(record: Any, key: str) -> Any:
    return record.get(key) if isinstance(record, dict) else None


@dataclass
class Model:
    """A model to evaluate, its tokenizer, and how to switch it to the base (LoRA runs)."""

    label: str
    model: Any
    tokenizer: Any
    device: Any
    base_context: Callable[[], Any] | None = None


def load_run_model(run: str | Path) -> tuple[Model, Any]:
    """The run's trained model, and its ExportSource (run folder, config, base model)."""
    from backpropagate.export.source import resolve_source

    src = resolve_source(str(run))  # an unknown run fails before torch is imported
    from transformers import AutoModelForCausalLM

    from backpropagate.models.tokenizer import load_tokenizer

    device, dtype = _device()
    if src.adapter_dir is not None:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(src.base_model, dtype=dtype)
        model = PeftModel.from_pretrained(base, str(src.adapter_dir))
        tokenizer = load_tokenizer(str(src.adapter_dir))
        base_context = model.disable_adapter
    else:
        model = AutoModelForCausalLM.from_pretrained(src.base_model, dtype=dtype)
        tokenizer = load_tokenizer(src.base_model)
        base_context = None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Model(src.name, model.to(device).eval(), tokenizer, device, base_context), src


def load_base_model(src: Any) -> Model:
    """A fully fine-tuned run's starting model, loaded on its own (LoRA runs switch the adapter off)."""
    from transformers import AutoModelForCausalLM

    from backpropagate.export.source import base_model_source
    from backpropagate.models.tokenizer import load_tokenizer

    base = base_model_source(src).base_model
    tokenizer = load_tokenizer(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device, dtype = _device()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval()
    return Model("base", model, tokenizer, device)


def _device() -> tuple[Any, Any]:
    """The first GPU in bf16 when there is one (fp16 on older cards), else the CPU in fp32."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32
    return torch.device("cuda", 0), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# Loss ---------------------------------------------------------------------------------------------
def _pair_rows(rows: list[EvalRow], tokenizer: Any, max_seq_len: int) -> list[dict[str, list[int]]]:
    from backpropagate.data.formats import Example
    from backpropagate.data.tokenize import tokenize_example

    out = []
    for row in rows:
        messages = [{"role": "user", "content": row.prompt}, {"role": "assistant", "content": row.expected}]
        example = Example(kind="chat", source="eval", line=row.line, messages=messages)
        out.append(tokenize_example(example, tokenizer, max_seq_len=max_seq_len).as_dict())
    return out


def example_losses(
    model: Model, rows: list[dict[str, list[int]]], progress: Progress | None = None
) -> tuple[list[float], list[int]]:
    """Mean loss over each row's loss-carrying tokens, and their count (rows without any are left out)."""
    import torch

    from backpropagate.training.data_order import label_tokens

    losses, tokens = [], []
    with torch.no_grad():
        for i, row in enumerate(rows):
            n = label_tokens(row)
            if n:
                ids = torch.tensor([row["input_ids"]], device=model.device)
                labels = torch.tensor([row["labels"]], device=model.device)
                losses.append(float(model.model(input_ids=ids, labels=labels, use_cache=False).loss))
                tokens.append(n)
            if progress:
                progress("loss", i + 1, len(rows))
    return losses, tokens


def held_out_rows(config: dict[str, Any], tokenizer: Any) -> list[dict[str, list[int]]]:
    """The run's held-out split (its eval_data, or the seeded eval_fraction), unpacked."""
    from backpropagate.config import RunConfig
    from backpropagate.data import prepare_datasets

    cfg = RunConfig.model_validate({**config, "packing": False})
    data = prepare_datasets(cfg, tokenizer)
    return list(data.eval)


# Generation ---------------------------------------------------------------------------------------
def generate(model: Model, prompt: str, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The model's greedy answer to ``prompt`` as a one-turn chat."""
    import torch

    tok = model.tokenizer
    enc = tok.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    ids = enc["input_ids"].to(model.device)
    with torch.no_grad():
        out = model.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return tok.decode(out[0][ids.shape[1] :], skip_special_tokens=True).strip()


def _measure(
    model: Model, rows: list[EvalRow] | None, loss_rows: list[dict[str, list[int]]], max_new_tokens: int,
    progress: Progress | None, stage: str,
) -> tuple[list[str], list[dict[str, float | None]], list[float], list[int]]:  # fmt: skip
    outputs, scores = [], []
    for i, row in enumerate(rows or []):
        text = generate(model, row.prompt, max_new_tokens)
        outputs.append(text)
        scores.append(metrics.score(text, row.expected, row.regex))
        if progress:
            progress(f"generate:{stage}", i + 1, len(rows or []))
    losses, tokens = example_losses(
        model, loss_rows, progress and (lambda s, d, t: progress(f"loss:{stage}", d, t))
    )
    return outputs, scores, losses, tokens


def evaluate_run(
    run: str | Path,
    *,
    data: str | Path | None = None,
    vs: str | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    seed: int = metrics.SEED,
    progress: Progress | None = None,
    save: bool = True,
    eval_id: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``run`` (an id or folder), optionally against ``vs`` (a run id or ``"base"``).

    Returns ``{"run": metrics, "vs": metrics | None, "diff": {...} | None, "examples": [...]}`` and,
    with ``save``, writes it atomically to ``RUN_DIR/evals/<eval_id>/result.json``.
    """
    started = time.time()
    rows = read_eval_file(data) if data is not None else None  # bad input fails before any load
    model, src = load_run_model(run)
    import torch

    from backpropagate.training.checkpoints import write_json_atomic

    torch.manual_seed(seed)
    config = src.run_config or {}
    holdout = src.run_dir / "data" / "holdout.jsonl" if src.run_dir is not None else None
    if config and holdout is not None and (src.run_dir / "multirun.json").is_file() and holdout.is_file():
        config = {**config, "eval_data": str(holdout)}  # a multi-run's held-out rows, never trained on
    max_len = int(config.get("max_seq_len", 1024))

    def loss_rows(m: Model) -> list[dict[str, list[int]]]:
        if rows is not None:
            return _pair_rows(rows, m.tokenizer, max_len)
        if not config:
            raise BackpropError(ErrorCode.CONFIG_INVALID, f"{src.name} has no run config: pass --data FILE.")
        return held_out_rows(config, m.tokenizer)

    run_rows = loss_rows(model)
    if rows is None and not run_rows:
        raise BackpropError(
            ErrorCode.DATASET_EMPTY,
            f"Run {src.name} has no held-out split (eval_fraction=0 and no eval_data).",
            hint="Pass --data FILE with {prompt, expected} rows to evaluate on.",
        )
    out_run = _measure(model, rows, run_rows, max_new_tokens, progress, "run")

    out_vs = None
    vs_label = None
    if vs is not None:
        if vs == "base" and model.base_context is not None:
            vs_label = "base"
            with model.base_context():
                out_vs = _measure(model, rows, run_rows, max_new_tokens, progress, "vs")
        else:
            other = load_base_model(src) if vs == "base" else load_run_model(vs)[0]
            vs_label = "base" if vs == "base" else other.label
            out_vs = _measure(other, rows, loss_rows(other), max_new_tokens, progress, "vs")

    result: dict[str, Any] = {
        "id": eval_id or _new_id(),
        "run_id": src.name,
        "vs_id": vs_label,
        "data": str(Path(data).expanduser().resolve()) if data is not None else None,
        "seed": seed,
        "created_at": started,
        "seconds": None,
        "run": _metrics(src.name, out_run, seed),
        "vs": _metrics(vs_label, out_vs, seed) if out_vs is not None else None,
        "diff": None,
        "examples": [],
        "path": None,
    }
    if out_vs is not None:
        result["diff"] = metrics.compare(out_run[1], out_vs[1], out_run[2:], out_vs[2:], seed=seed)
    for i, row in enumerate(rows or []):
        example: dict[str, Any] = {
            "prompt": row.prompt,
            "expected": row.expected,
            "output": out_run[0][i],
            "scores": out_run[1][i],
        }
        if row.regex is not None:
            example["regex"] = row.regex
        if out_vs is not None:
            example["vs_output"], example["vs_scores"] = out_vs[0][i], out_vs[1][i]
        result["examples"].append(example)
    result["seconds"] = round(time.time() - started, 3)
    if save and src.run_dir is not None:
        folder = src.run_dir / "evals" / result["id"]
        folder.mkdir(parents=True, exist_ok=True)
        result["path"] = str(folder / RESULT_FILE)
        write_json_atomic(folder / RESULT_FILE, result)
    return result


def _metrics(label: str | None, measured: Any, seed: int) -> dict[str, Any]:
    _, scores, losses, tokens = measured
    return {"id": label, **metrics.summarise(scores, losses, tokens, seed=seed)}


def _new_id() -> str:
    return f"eval-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
