"""The error catalog: every error a user can hit, with a stable code, a hint and retryability.

Hierarchy::

    Exception
     └── BackpropError          code, message, hint, retryable, http_status, details
          (one class; the code says what went wrong)

Domain code raises ``BackpropError(ErrorCode.X, "what happened, where")``; the CLI prints
``[CODE] message`` then ``hint: ...``; the API answers ``{"code", "message", "hint"}``.
``docs/error-codes.md`` is generated from this module (``python -m backpropagate.errors``)
and a test keeps the two in step.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any


class ErrorCode(StrEnum):
    # Configuration and input
    CONFIG_INVALID = "CONFIG_INVALID"
    CONFIG_INVALID_SETTING = "CONFIG_INVALID_SETTING"
    CONFIG_GPUS_UNAVAILABLE = "CONFIG_GPUS_UNAVAILABLE"
    INPUT_AUTH_INVALID_SHAPE = "INPUT_AUTH_INVALID_SHAPE"
    INPUT_PATH_TRAVERSAL = "INPUT_PATH_TRAVERSAL"
    INPUT_UPLOAD_TOO_LARGE = "INPUT_UPLOAD_TOO_LARGE"
    INPUT_UPLOAD_TYPE = "INPUT_UPLOAD_TYPE"
    INPUT_REQUEST_INVALID = "INPUT_REQUEST_INVALID"
    INPUT_REQUEST_TOO_LARGE = "INPUT_REQUEST_TOO_LARGE"
    INPUT_URL_TOO_LONG = "INPUT_URL_TOO_LONG"
    INPUT_URL_INVALID = "INPUT_URL_INVALID"
    UI_OUTPUT_DIR_FORBIDDEN = "UI_OUTPUT_DIR_FORBIDDEN"
    # Data sets
    DATASET_NOT_FOUND = "DATASET_NOT_FOUND"
    DATASET_PARSE_FAILED = "DATASET_PARSE_FAILED"
    DATASET_FORMAT_UNSUPPORTED = "DATASET_FORMAT_UNSUPPORTED"
    DATASET_EMPTY = "DATASET_EMPTY"
    # Dependencies and hardware
    DEP_MODEL_LOAD_FAILED = "DEP_MODEL_LOAD_FAILED"
    DEP_GPU_NOT_AVAILABLE = "DEP_GPU_NOT_AVAILABLE"
    DEP_MLX_UNAVAILABLE = "DEP_MLX_UNAVAILABLE"
    DEP_TRACKER_MISSING = "DEP_TRACKER_MISSING"
    DEP_UNSLOTH_UNAVAILABLE = "DEP_UNSLOTH_UNAVAILABLE"
    DEP_EXTRA_MISSING = "DEP_EXTRA_MISSING"
    DEP_LLAMA_CPP_MISSING = "DEP_LLAMA_CPP_MISSING"
    DEP_OLLAMA_REGISTRATION_FAILED = "DEP_OLLAMA_REGISTRATION_FAILED"
    DEP_HUB_PUSH_FAILED = "DEP_HUB_PUSH_FAILED"
    DEP_TUNNEL_FAILED = "DEP_TUNNEL_FAILED"
    # Runtime
    RUNTIME_GPU_OOM = "RUNTIME_GPU_OOM"
    RUNTIME_OOM_RECOVERY_EXHAUSTED = "RUNTIME_OOM_RECOVERY_EXHAUSTED"
    RUNTIME_GPU_TEMPERATURE_CRITICAL = "RUNTIME_GPU_TEMPERATURE_CRITICAL"
    RUNTIME_GPU_MONITORING_FAILED = "RUNTIME_GPU_MONITORING_FAILED"
    RUNTIME_FP8_UNSUPPORTED = "RUNTIME_FP8_UNSUPPORTED"
    RUNTIME_TRAINING_FAILED = "RUNTIME_TRAINING_FAILED"
    RUNTIME_WORKER_CRASHED = "RUNTIME_WORKER_CRASHED"
    RUNTIME_GGUF_EXPORT_FAILED = "RUNTIME_GGUF_EXPORT_FAILED"
    RUNTIME_EXPORT_ARCH_UNSUPPORTED = "RUNTIME_EXPORT_ARCH_UNSUPPORTED"
    RUNTIME_UI_AUTH_NOT_ENFORCED = "RUNTIME_UI_AUTH_NOT_ENFORCED"
    RUNTIME_UI_BUILD_FAILED = "RUNTIME_UI_BUILD_FAILED"
    RUNTIME_INTERNAL = "RUNTIME_INTERNAL"
    RUNTIME_SERVER_UNREACHABLE = "RUNTIME_SERVER_UNREACHABLE"
    RUNTIME_DISK_FULL = "RUNTIME_DISK_FULL"
    # State
    STATE_CHECKPOINT_INVALID = "STATE_CHECKPOINT_INVALID"
    STATE_RUN_NOT_FOUND = "STATE_RUN_NOT_FOUND"
    STATE_RUN_NOT_RESUMABLE = "STATE_RUN_NOT_RESUMABLE"
    STATE_RUN_NOT_ACTIVE = "STATE_RUN_NOT_ACTIVE"
    STATE_RUN_ACTIVE = "STATE_RUN_ACTIVE"
    STATE_RUN_NOT_EXPORTABLE = "STATE_RUN_NOT_EXPORTABLE"
    STATE_RUN_NOT_EVALUABLE = "STATE_RUN_NOT_EVALUABLE"
    STATE_NOT_FOUND = "STATE_NOT_FOUND"
    # Authentication (served by the guard)
    AUTH_REQUIRED = "AUTH_REQUIRED"
    AUTH_INVALID_CREDENTIALS = "AUTH_INVALID_CREDENTIALS"
    AUTH_RATE_LIMITED = "AUTH_RATE_LIMITED"
    AUTH_HOST_FORBIDDEN = "AUTH_HOST_FORBIDDEN"
    AUTH_ORIGIN_FORBIDDEN = "AUTH_ORIGIN_FORBIDDEN"


@dataclass(frozen=True)
class ErrorSpec:
    """What the catalog knows about a code before any particular occurrence."""

    title: str
    hint: str
    retryable: bool = False
    http_status: int = 400


C = ErrorCode
CATALOG: dict[ErrorCode, ErrorSpec] = {
    C.CONFIG_INVALID: ErrorSpec(
        "The run configuration is invalid.",
        "Fix the fields listed in the message; `backprop train --help` lists every option.",
        http_status=422,
    ),
    C.CONFIG_INVALID_SETTING: ErrorSpec(
        "A setting is not valid on this machine or in this combination.",
        "Change the named setting; the message says which value would work here.",
        http_status=422,
    ),
    C.CONFIG_GPUS_UNAVAILABLE: ErrorSpec(
        "The run asks for more GPUs than this machine has.",
        "Lower `gpus` to the number `backprop info` lists (0 or `device: cpu` trains on the CPU).",
        http_status=422,
    ),
    C.INPUT_AUTH_INVALID_SHAPE: ErrorSpec(
        "The credentials given are malformed.",
        "Pass --auth user:password (both non-empty) or --auth-file PATH, not both.",
    ),
    C.INPUT_PATH_TRAVERSAL: ErrorSpec(
        "A path points outside the folders this app may use.",
        "Use a path inside BACKPROPAGATE_HOME (or the folder named in the message).",
        http_status=403,
    ),
    C.INPUT_UPLOAD_TOO_LARGE: ErrorSpec(
        "The uploaded file is larger than the limit.",
        "Split the file, or raise BACKPROPAGATE_SERVER__MAX_UPLOAD_MB on the server.",
        http_status=413,
    ),
    C.INPUT_UPLOAD_TYPE: ErrorSpec(
        "This file type cannot be uploaded.",
        "Upload a .jsonl, .json, .csv, .parquet or .txt file.",
        http_status=415,
    ),
    C.INPUT_REQUEST_INVALID: ErrorSpec(
        "The request is malformed.",
        "Send valid JSON matching the API schema (see /api/docs).",
        http_status=422,
    ),
    C.INPUT_REQUEST_TOO_LARGE: ErrorSpec(
        "The request body is larger than the server accepts.",
        "Send less in one request; upload data sets as files (limit BACKPROPAGATE_SERVER__MAX_UPLOAD_MB), "
        "or raise BACKPROPAGATE_SERVER__MAX_REQUEST_KB on the server.",
        http_status=413,
    ),
    C.INPUT_URL_TOO_LONG: ErrorSpec(
        "The request's path or query string is too long.",
        "Shorten the URL; send long values in a JSON body instead.",
        http_status=414,
    ),
    C.INPUT_URL_INVALID: ErrorSpec(
        "The request's path or query string holds a NUL byte or another control character.",
        "Remove the control characters from the URL (file names never contain them).",
    ),
    C.UI_OUTPUT_DIR_FORBIDDEN: ErrorSpec(
        "That output folder is a system or credential folder.",
        "Choose a folder under your home or BACKPROPAGATE_HOME.",
        http_status=403,
    ),
    C.DATASET_NOT_FOUND: ErrorSpec(
        "The data set could not be found.",
        "Check the path (or upload id); hub data sets need a network connection.",
        http_status=404,
    ),
    C.DATASET_PARSE_FAILED: ErrorSpec(
        "A row of the data set could not be read.",
        "Fix the row named in the message, or pass --skip-bad-rows to skip and count bad rows.",
        http_status=422,
    ),
    C.DATASET_FORMAT_UNSUPPORTED: ErrorSpec(
        "The data set's format was not recognised.",
        "Use ShareGPT (conversations), OpenAI (messages), Alpaca (instruction/output), "
        "text, or preference pairs (prompt/chosen/rejected); see docs/datasets.md.",
        http_status=422,
    ),
    C.DATASET_EMPTY: ErrorSpec(
        "The data set has no usable rows.",
        "Add rows, or check that --skip-bad-rows did not skip them all.",
        http_status=422,
    ),
    C.DEP_MODEL_LOAD_FAILED: ErrorSpec(
        "The model could not be loaded.",
        "Check the model id or folder; gated models need `huggingface-cli login` (HF_TOKEN); "
        "offline machines need a local folder or `demo`.",
        retryable=True,
        http_status=424,
    ),
    C.DEP_GPU_NOT_AVAILABLE: ErrorSpec(
        "No usable GPU was found.",
        "Install a CUDA build of torch and check `nvidia-smi`; or run on CPU with --device cpu.",
        http_status=424,
    ),
    C.DEP_MLX_UNAVAILABLE: ErrorSpec(
        "MLX (Apple silicon) training is not available.",
        "Use the transformers backend, or install mlx-lm on an Apple silicon Mac.",
        http_status=424,
    ),
    C.DEP_TRACKER_MISSING: ErrorSpec(
        "An experiment tracker named in report_to is not installed.",
        "Install the tracker's package (the message names the command), or remove it from report_to.",
        http_status=424,
    ),
    C.DEP_UNSLOTH_UNAVAILABLE: ErrorSpec(
        "Unsloth could not be loaded and the fallback is off.",
        "Install it with `pip install 'backpropagate[unsloth]'` on a CUDA machine, "
        "or allow the fallback (unsloth_fallback=True).",
        http_status=424,
    ),
    C.DEP_EXTRA_MISSING: ErrorSpec(
        "An optional dependency is missing.",
        "Install the extra named in the message, e.g. `pip install 'backpropagate[ui]'`.",
        http_status=424,
    ),
    C.DEP_LLAMA_CPP_MISSING: ErrorSpec(
        "llama-cpp-python is needed for this quantization or for verification.",
        "From the Backpropagate checkout: `.venv/bin/pip install -e '.[export]'` (the `backpropagate` "
        "on PyPI is another project; building it needs a C compiler and cmake: "
        "`apt-get install build-essential cmake`); f16 and q8_0 work without it.",
        http_status=424,
    ),
    C.DEP_OLLAMA_REGISTRATION_FAILED: ErrorSpec(
        "The model could not be registered with Ollama.",
        "Start the daemon with `ollama serve` (or set OLLAMA_HOST) and try again.",
        retryable=True,
        http_status=502,
    ),
    C.DEP_HUB_PUSH_FAILED: ErrorSpec(
        "The upload to the Hugging Face Hub failed.",
        "Set HF_TOKEN with write access (`huggingface-cli login`) and check the repo name.",
        retryable=True,
        http_status=502,
    ),
    C.DEP_TUNNEL_FAILED: ErrorSpec(
        "The share tunnel could not be started.",
        "Install cloudflared, or use an SSH tunnel: `ssh -L 7860:localhost:7860 HOST`.",
        retryable=True,
        http_status=502,
    ),
    C.RUNTIME_GPU_OOM: ErrorSpec(
        "The GPU ran out of memory.",
        "Lower --batch-size or --max-seq-len, enable gradient checkpointing, use QLoRA, "
        "or leave oom_recovery on.",
        retryable=True,
        http_status=507,
    ),
    C.RUNTIME_OOM_RECOVERY_EXHAUSTED: ErrorSpec(
        "Out of memory even at micro-batch 1 after the allowed retries.",
        "Lower --max-seq-len, use QLoRA or gradient checkpointing, or a smaller model.",
        http_status=507,
    ),
    C.RUNTIME_GPU_TEMPERATURE_CRITICAL: ErrorSpec(
        "The GPU is too hot; training paused (or stopped) to protect it.",
        "Improve cooling or airflow; training resumes by itself once the card cools.",
        retryable=True,
        http_status=503,
    ),
    C.RUNTIME_GPU_MONITORING_FAILED: ErrorSpec(
        "GPU telemetry (NVML) is unavailable; training continues without it.",
        "Install the NVIDIA driver's NVML library (nvidia-ml-py) to see temperature and VRAM.",
        http_status=503,
    ),
    C.RUNTIME_FP8_UNSUPPORTED: ErrorSpec(
        "FP8 training was asked for, but this machine cannot run it.",
        "FP8 needs an NVIDIA GPU with compute capability 8.9 or newer (L4, L40S, RTX 4090, H100, H200, "
        "B200); drop --fp8 to train in bf16 here.",
        http_status=422,
    ),
    C.RUNTIME_TRAINING_FAILED: ErrorSpec(
        "Training failed.",
        "Read the run's worker.log for the traceback; resume from the last checkpoint once fixed.",
        retryable=True,
        http_status=500,
    ),
    C.RUNTIME_WORKER_CRASHED: ErrorSpec(
        "The training process exited without finishing.",
        "Resume the run; it continues from its last checkpoint. worker.log has the details.",
        retryable=True,
        http_status=500,
    ),
    C.RUNTIME_GGUF_EXPORT_FAILED: ErrorSpec(
        "The GGUF export failed or did not match the trained model.",
        "Read the verification report in the message; export f16 to compare, or report a bug.",
        http_status=500,
    ),
    C.RUNTIME_EXPORT_ARCH_UNSUPPORTED: ErrorSpec(
        "This model architecture cannot be exported to GGUF yet.",
        "Export merged weights instead and convert them with llama.cpp's converter.",
        http_status=422,
    ),
    C.RUNTIME_UI_AUTH_NOT_ENFORCED: ErrorSpec(
        "Refusing to start: the app would be reachable without authentication.",
        "Add --auth user:password (or --auth-file / --users), or bind to 127.0.0.1 and use an SSH tunnel.",
        http_status=500,
    ),
    C.RUNTIME_UI_BUILD_FAILED: ErrorSpec(
        "The web front end could not be built.",
        "Install the ui extra (`pip install 'backpropagate[ui]'`) and read the build log named.",
        retryable=True,
        http_status=500,
    ),
    C.RUNTIME_INTERNAL: ErrorSpec(
        "An unexpected internal error occurred.",
        "Retry; if it persists, report it with the server log.",
        retryable=True,
        http_status=500,
    ),
    C.RUNTIME_SERVER_UNREACHABLE: ErrorSpec(
        "The server named by --url could not be reached.",
        "Is `backprop serve-api` or `backprop ui` running at that URL? Check the host and port.",
        retryable=True,
        http_status=503,
    ),
    C.RUNTIME_DISK_FULL: ErrorSpec(
        "The disk is full (no space left while writing a checkpoint, an export or an upload).",
        "Free space on the disk named in the message (old runs: `backprop runs delete ID`), "
        "then resume the run; it continues from its last complete checkpoint.",
        retryable=True,
        http_status=507,
    ),
    C.STATE_CHECKPOINT_INVALID: ErrorSpec(
        "A checkpoint is missing, partial or corrupted.",
        "The previous good checkpoint is used; delete the broken folder named in the message.",
        http_status=409,
    ),
    C.STATE_RUN_NOT_FOUND: ErrorSpec(
        "No run with that id.",
        "List runs with `backprop runs list` or GET /api/runs.",
        http_status=404,
    ),
    C.STATE_RUN_NOT_RESUMABLE: ErrorSpec(
        "This run cannot be resumed.",
        "Only stopped, failed or interrupted runs resume; completed runs can be cloned.",
        http_status=409,
    ),
    C.STATE_RUN_NOT_ACTIVE: ErrorSpec(
        "The run is not running, so there is nothing to stop.",
        "Only running or paused runs can be stopped; `backprop runs show ID` gives its status.",
        http_status=409,
    ),
    C.STATE_RUN_ACTIVE: ErrorSpec(
        "The run is still active.",
        "Stop it first (`backprop runs stop RUN_ID`).",
        http_status=409,
    ),
    C.STATE_RUN_NOT_EXPORTABLE: ErrorSpec(
        "This run has no trained weights to export.",
        "Export a completed or stopped run; resume a failed run first, "
        "or export a checkpoint folder with `backprop export PATH`.",
        http_status=409,
    ),
    C.STATE_RUN_NOT_EVALUABLE: ErrorSpec(
        "This run has no trained weights to evaluate.",
        "Evaluate a completed or stopped run; resume a failed run first.",
        http_status=409,
    ),
    C.STATE_NOT_FOUND: ErrorSpec(
        "The requested item does not exist.",
        "Check the id or name.",
        http_status=404,
    ),
    C.AUTH_REQUIRED: ErrorSpec(
        "Authentication is required.",
        "Log in, open the URL with the token that `backprop ui` printed, or send HTTP Basic credentials.",
        http_status=401,
    ),
    C.AUTH_INVALID_CREDENTIALS: ErrorSpec(
        "Wrong user name or password.",
        "Check the credentials; `backprop users list` shows the accounts.",
        http_status=401,
    ),
    C.AUTH_RATE_LIMITED: ErrorSpec(
        "Too many requests or failed logins.",
        "Wait a minute and try again.",
        retryable=True,
        http_status=429,
    ),
    C.AUTH_HOST_FORBIDDEN: ErrorSpec(
        "The Host header is not one this server answers to.",
        "Open the app through localhost (or the share URL); add the address with --host.",
        http_status=421,
    ),
    C.AUTH_ORIGIN_FORBIDDEN: ErrorSpec(
        "The request came from a page on another origin.",
        "Use the app's own pages; cross-site requests are refused.",
        http_status=403,
    ),
}


class BackpropError(Exception):
    """An error a user can act on: stable code, message, hint, retryability."""

    def __init__(
        self,
        code: ErrorCode | str,
        message: str | None = None,
        *,
        hint: str | None = None,
        retryable: bool | None = None,
        **details: Any,
    ) -> None:
        self.code = ErrorCode(code)
        spec = CATALOG[self.code]
        self.message = message or spec.title
        self.hint = hint or spec.hint
        self.retryable = spec.retryable if retryable is None else retryable
        self.http_status = spec.http_status
        self.details = details
        super().__init__(f"[{self.code}] {self.message}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "code": str(self.code),
            "message": self.message,
            "hint": self.hint,
            "retryable": self.retryable,
        }
        if self.details:
            out["details"] = self.details
        return out


# How a full disk shows up: OSError ENOSPC from Python, safetensors' "(os error 28)", and torch.save's
# "[enforce fail at inline_container.cc:...] unexpected pos" (no errno: told apart by free space).
_DISK_FULL_TEXTS = ("No space left on device", "os error 28", "StorageFull")
_NEARLY_FULL_BYTES = 64 * 2**20


def _free_bytes(path: str | os.PathLike[str] | None) -> int | None:
    if path is None:
        return None
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full_error(exc: BaseException, path: str | os.PathLike[str] | None = None) -> BackpropError | None:
    """RUNTIME_DISK_FULL (with the path and the free space left) when ``exc``, or an exception it
    was raised from, is a full disk; None otherwise. ``path``: where the write went, when known."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, BackpropError) and current.code == ErrorCode.RUNTIME_DISK_FULL:
            return current
        text = str(current)
        where = getattr(current, "filename", None) or path
        full = getattr(current, "errno", None) == errno.ENOSPC or any(t in text for t in _DISK_FULL_TEXTS)
        if not full and "inline_container" in text and "unexpected pos" in text:
            if where is None:
                from backpropagate.settings import get_settings

                where = get_settings().home  # torch names no file; the runs live there
            free = _free_bytes(where)
            full = free is not None and free < _NEARLY_FULL_BYTES
        if full:
            free = _free_bytes(where)
            said = f" writing {where}" if where else ""
            left = f"; {free / 2**20:.1f} MB free on that disk" if free is not None else ""
            return BackpropError(
                ErrorCode.RUNTIME_DISK_FULL,
                f"No space left on the disk{said}{left}.",
                path=str(where) if where else None,
                free_bytes=free,
            )
        current = current.__cause__ or current.__context__
    return None


def render_markdown() -> str:
    """The text of docs/error-codes.md."""
    lines = [
        "# Error codes",
        "",
        "Every error Backpropagate reports carries one of these stable codes. The CLI prints",
        '`[CODE] message` and a `hint:` line; the API answers `{"code", "message", "hint"}`.',
        "Symptoms and fixes in more depth: [troubleshooting.md](troubleshooting.md).",
        "",
        "<!-- generated by `python -m backpropagate.errors`; do not edit by hand -->",
        "",
        "| code | meaning | what to do | retryable | HTTP |",
        "| --- | --- | --- | --- | --- |",
    ]
    for code, spec in CATALOG.items():
        hint = spec.hint.replace("|", "\\|")
        retry = "yes" if spec.retryable else "no"
        lines.append(f"| `{code}` | {spec.title} | {hint} | {retry} | {spec.http_status} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
