"""`export_run`: one call from a run (or folder) to an adapter, merged weights or a verified GGUF.

The CLI's `backprop export` and the API's background export job both call this. Stages report
through ``progress(stage, done, total)``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.export.gguf_convert import (
    DIRECT_TYPES,
    check_convertible,
    convert_to_gguf,
    read_chat_template,
    read_model_config,
)
from backpropagate.export.merge import export_adapter, export_merged, load_merged_model
from backpropagate.export.quantize import (
    LLAMA_QUANTS,
    QUANTIZATIONS,
    quantize_gguf,
    require_llama_cpp,
    width_fallbacks,
)
from backpropagate.export.source import ExportSource, base_model_source, resolve_source
from backpropagate.logs import get_logger

log = get_logger(__name__)

ExportFormat = Literal["adapter", "merged", "gguf"]
StageProgress = Callable[[str, int, int], None]  # (stage, done, total)


def export_label(fmt: str, quantization: str | None, base_model: bool = False) -> str:
    """An export's name, as its folder, its job id and the run store show it: ``gguf-q8_0-base``."""
    return (fmt if quantization is None else f"{fmt}-{quantization}") + ("-base" if base_model else "")


def check_base_model_format(fmt: str) -> None:
    """A run's base model is exported as GGUF only: it is there to chat with next to the run."""
    if fmt != "gguf":
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING,
            f"the base model is exported as gguf, to chat with next to the run; got format {fmt!r}",
        )


@dataclass
class ExportResult:
    """Where an export went and what was measured on the way."""

    format: str
    quantization: str | None
    path: str  # the GGUF file, or the folder for adapter/merged
    output_dir: str
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    verification: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    ollama_model: str | None = None
    base_model: bool = False  # the run's base model alone, without the adapter

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


PARTIAL_SUFFIX = ".partial"


def partial_path(final: Path) -> Path:
    """Where a file is written before it is complete: ``model.gguf`` -> ``model.gguf.partial``."""
    return final.with_name(final.name + PARTIAL_SUFFIX)


def publish(partial: Path, final: Path) -> Path:
    """Flush ``partial`` to disk and rename it to ``final`` in one step: no reader sees half a file."""
    with partial.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a ``.partial`` name, so a kill leaves the old file or the new one."""
    tmp = partial_path(path)
    tmp.write_text(text)
    publish(tmp, path)


def clear_leftovers(out_dir: Path) -> None:
    """Remove what a killed export left: the ``.work`` scratch folder and ``*.partial`` files."""
    shutil.rmtree(out_dir / ".work", ignore_errors=True)
    for leftover in out_dir.glob(f"*{PARTIAL_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def _validate(fmt: str, quantization: str | None) -> str | None:
    if fmt not in ("adapter", "merged", "gguf"):
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING, f"format must be adapter, merged or gguf; got {fmt!r}"
        )
    if fmt == "merged":
        q = quantization or "f16"
        if q not in ("f32", "f16", "bf16"):
            raise BackpropError(
                ErrorCode.CONFIG_INVALID_SETTING, f"merged weights are f32, f16 or bf16; got {q!r}"
            )
        return q
    if fmt == "gguf":
        q = (quantization or "f16").lower()
        if q not in QUANTIZATIONS:
            raise BackpropError(
                ErrorCode.CONFIG_INVALID_SETTING,
                f"unknown GGUF quantization {q!r}; choose one of {', '.join(QUANTIZATIONS)}",
            )
        if q in LLAMA_QUANTS:
            require_llama_cpp(f"{q} quantization")  # fail before any heavy work
        return q
    return None


def _intermediate_dtype(model_dir_config: dict[str, Any], quantization: str) -> str:
    # Keep the base's precision for the merged copy the converter reads; f32 stays f32.
    if quantization == "f32":
        return "f32"
    dtype = str(model_dir_config.get("dtype") or model_dir_config.get("torch_dtype") or "float32")
    return {"bfloat16": "bf16", "float16": "f16"}.get(dtype, "f32")


def export_run(
    source: str | Path,
    format: ExportFormat = "gguf",  # noqa: A002 - the CLI option's name
    quantization: str | None = None,
    output: str | Path | None = None,
    verify: bool = True,
    progress: StageProgress | None = None,
    ollama_name: str | None = None,
    base_model: bool = False,
) -> ExportResult:
    """Export a run id, run folder, adapter folder or model folder; returns an ExportResult.

    ``base_model=True`` exports the model the run started from, without the adapter (GGUF only):
    the same quantization and verification, to chat with next to the trained model.
    """
    started = time.monotonic()
    q = _validate(format, quantization)
    if base_model:
        check_base_model_format(format)
    src = resolve_source(source)
    if base_model:
        src = base_model_source(src)
    out_dir = Path(output) if output else src.default_output_root / export_label(format, q, base_model)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_leftovers(out_dir)
    report = progress or (lambda *_: None)

    if format == "adapter":
        report("adapter", 0, 1)
        export_adapter(src, out_dir)
        report("adapter", 1, 1)
        result = ExportResult(format, None, str(out_dir), str(out_dir))
    elif format == "merged":
        report("merge", 0, 1)
        export_merged(src, out_dir, q)  # type: ignore[arg-type]
        report("merge", 1, 1)
        result = ExportResult(format, q, str(out_dir), str(out_dir))
    else:
        result = _export_gguf(src, out_dir, q or "f16", verify, report)
        if ollama_name:
            from backpropagate.export.ollama import OllamaClient

            report("ollama", 0, 1)
            config = (
                json.loads((out_dir / "export.json").read_text())
                if (out_dir / "export.json").is_file()
                else {}
            )
            OllamaClient().create(
                ollama_name,
                Path(result.path),
                config.get("chat_template"),
                config.get("context_length"),
                config.get("eos_token"),
            )
            result.ollama_model = ollama_name
            report("ollama", 1, 1)
    result.base_model = base_model
    result.seconds = round(time.monotonic() - started, 2)
    result.files = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))
    write_text_atomic(out_dir / "result.json", json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _export_gguf(
    src: ExportSource, out_dir: Path, q: str, verify: bool, report: StageProgress
) -> ExportResult:
    from backpropagate.export.ollama import render_modelfile

    warnings: list[str] = []
    base_cfg = _base_config(src)
    if base_cfg:  # a family llama.cpp cannot run as transformers does is refused before any merge
        check_convertible(base_cfg)
    scratch = out_dir / ".work"
    scratch.mkdir()  # clear_leftovers removed any earlier one
    try:
        # 1. A safetensors folder with the adapter folded in (a full model is read as it is).
        if src.adapter_dir is None and Path(src.base_model).is_dir():
            model_dir = Path(src.base_model)
        else:
            report("merge", 0, 1)
            model_dir = scratch / "merged"
            export_merged(src, model_dir, _intermediate_dtype(base_cfg, q))  # type: ignore[arg-type]
            report("merge", 1, 1)
        config = read_model_config(model_dir)
        name = f"{src.name}-{q}"
        gguf_path = out_dir / f"{name}.gguf"
        partial = partial_path(gguf_path)  # renamed to gguf_path once complete

        # 2. Convert (f32/f16/bf16/q8_0 directly; K-quants from an f16 file through llama.cpp).
        direct = q if q in DIRECT_TYPES else "f16"
        target = partial if q in DIRECT_TYPES else scratch / f"{name}.f16.gguf"
        conv = convert_to_gguf(
            model_dir, target, direct, name=src.name, progress=lambda d, t, _n: report("convert", d, t)
        )
        warnings += conv.warnings + [f"quantization fallback: {f}" for f in conv.fallbacks]
        if q in LLAMA_QUANTS:
            warnings += width_fallbacks(model_dir, q)
            for note in warnings:
                log.warning(note)
            report("quantize", 0, 1)
            quantize_gguf(target, partial, q)
            target.unlink()
            report("quantize", 1, 1)
        publish(partial, gguf_path)

        # 3. Verify against the HF model in float32.
        verification = None
        if not verify:
            warnings.append("verification skipped (--no-verify)")
        elif not _llama_cpp_available():
            warnings.append(
                "verification skipped: llama-cpp-python is not installed (pip install 'backpropagate[export]')"
            )
            log.warning(warnings[-1])
        else:
            report("verify", 0, 1)
            verification = _verify(model_dir, gguf_path, q, out_dir / f"{name}.verify.json")
            report("verify", 1, 1)

        # 4. Ollama Modelfile next to the GGUF, and what registration needs later.
        template = read_chat_template(model_dir)
        ctx = config.get("max_position_embeddings")
        eos = _eos_token(model_dir)
        write_text_atomic(out_dir / "Modelfile", render_modelfile(gguf_path.name, template, ctx, eos))
        meta = {
            "gguf": gguf_path.name,
            "quantization": q,
            "chat_template": template,
            "context_length": ctx,
            "eos_token": eos,
        }
        write_text_atomic(out_dir / "export.json", json.dumps(meta, indent=2) + "\n")
    finally:
        clear_leftovers(out_dir)  # the scratch folder, and a GGUF that never completed
    return ExportResult("gguf", q, str(gguf_path), str(out_dir), verification=verification, warnings=warnings)


def _eos_token(model_dir: Path) -> str | None:
    path = model_dir / "tokenizer_config.json"
    eos = json.loads(path.read_text()).get("eos_token") if path.is_file() else None
    return eos.get("content") if isinstance(eos, dict) else eos


def _base_config(src: ExportSource) -> dict[str, Any]:
    base = Path(src.base_model)
    if (base / "config.json").is_file():
        return json.loads((base / "config.json").read_text())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(src.base_model).to_dict()
    except Exception:  # noqa: BLE001 - the default (f32) is always safe
        return {}


def _verify(model_dir: Path, gguf_path: Path, q: str, report_path: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from backpropagate.export.verify import verify_gguf

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    rep = verify_gguf(gguf_path, model, tokenizer, q, report_path=report_path)
    return json.loads(rep.to_json())


__all__ = ["ExportResult", "export_run", "load_merged_model"]
