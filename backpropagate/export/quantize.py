"""K-quants (q4_k_m, q5_k_m, q6_k, ...) through llama.cpp's quantizer (llama-cpp-python)."""

from __future__ import annotations

import json
from pathlib import Path

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.export.gguf_convert import DIRECT_TYPES

# Quantization name -> llama.cpp's LLAMA_FTYPE_MOSTLY_* value.
LLAMA_QUANTS = {
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 8,
    "q5_1": 9,
    "q2_k": 10,
    "q3_k_s": 11,
    "q3_k_m": 12,
    "q3_k_l": 13,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
}
QUANTIZATIONS = (*DIRECT_TYPES, *LLAMA_QUANTS)
K_BLOCK = 256  # K-quant super-block: every quantized row width must be a multiple of it


def require_llama_cpp(purpose: str) -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise BackpropError(
            ErrorCode.DEP_LLAMA_CPP_MISSING, f"llama-cpp-python is not installed; it is needed for {purpose}"
        ) from exc


def width_fallbacks(model_dir: Path, quantization: str) -> list[str]:
    """Widths llama.cpp cannot K-quantize (it silently picks another type): say so up front."""
    if not quantization.endswith(("_k", "_k_s", "_k_m", "_k_l")):
        return []
    config = json.loads((Path(model_dir) / "config.json").read_text())
    notes = []
    for key in ("hidden_size", "intermediate_size"):
        width = int(config.get(key, 0))
        if width % K_BLOCK:
            notes.append(
                f"{key}={width} is not a multiple of {K_BLOCK}: llama.cpp falls back to a "
                f"non-K type for the tensors of that width, so the file is not pure {quantization}"
            )
    return notes


def quantize_gguf(src: Path, dst: Path, quantization: str, threads: int = 0) -> Path:
    """Quantize an f16/f32 GGUF into ``dst`` with llama.cpp (0 threads = all cores)."""
    import ctypes

    ftype = LLAMA_QUANTS.get(quantization)
    if ftype is None:
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING,
            f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}",
        )
    require_llama_cpp(f"{quantization} quantization")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not Path(dst).is_file():
        raise BackpropError(
            ErrorCode.RUNTIME_GGUF_EXPORT_FAILED,
            f"llama.cpp could not quantize {src} to {quantization} (return code {rc})",
        )
    return Path(dst)
