"""Checkpoints: write them crash-safely, find the last good one, keep the last N plus the best.

A checkpoint is a folder ``checkpoints/step-NNNNNN/`` holding the trainable weights (adapter, or
the whole model for full fine-tuning), optimizer, scheduler and RNG states, and ``state.json``
(data position, micro-batch, accumulation, history). It is written as ``step-NNNNNN.partial/``,
each file and the folder fsynced, ``meta.json`` (sizes and sha256 of every file) written last,
then renamed: a folder without ``.partial`` whose hashes match is complete. ``manifest.json``
indexes the checkpoints for readers (UI, run service) and is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng.pt"
STATE = "state.json"
META = "meta.json"
MANIFEST = "manifest.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


# Durable file writing ---------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories make renames and new entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file, fsync and rename: readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# RNG --------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Saving -----------------------------------------------------------------------------------------
def trainable_state_dict(model: Any) -> dict[str, Any]:
    """The parameters that change in training: the adapter, or every weight for full fine-tuning."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


@dataclass
class SavedCheckpoint:
    step: int
    path: Path
    bytes: int
    best: bool = False


def save_checkpoint(
    ckpt_root: Path,
    *,
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    eval_loss: float | None,
    keep: int,
    scaler: Any = None,
) -> SavedCheckpoint:
    """Write a complete checkpoint for ``step``, update the manifest, prune old ones."""
    import torch
    from safetensors.torch import save_file

    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / checkpoint_name(step)
    partial = ckpt_root / (final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()

    save_file(trainable_state_dict(model), partial / WEIGHTS)
    torch.save(optimizer.state_dict(), partial / OPTIMIZER)
    sched_state = {"scheduler": scheduler.state_dict()}
    if scaler is not None:
        sched_state["scaler"] = scaler.state_dict()
    torch.save(sched_state, partial / SCHEDULER)
    torch.save(capture_rng(), partial / RNG)
    (partial / STATE).write_text(json.dumps({**state, "step": step, "eval_loss": eval_loss}, indent=1))

    files = {}
    for name in (WEIGHTS, OPTIMIZER, SCHEDULER, RNG, STATE):
        path = partial / name
        fsync_path(path)
        files[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    meta = {"step": step, "eval_loss": eval_loss, "files": files}
    write_json_atomic(partial / META, meta)
    fsync_path(partial)

    if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
        shutil.rmtree(final)
    os.rename(partial, final)
    fsync_path(ckpt_root)

    manifest = _rebuild_manifest(ckpt_root)
    best = _prune(ckpt_root, manifest, keep)
    size = sum(f["bytes"] for f in files.values())
    return SavedCheckpoint(step, final, size, best=best == step)


def _rebuild_manifest(ckpt_root: Path) -> dict[str, Any]:
    entries = []
    for folder in sorted(ckpt_root.glob("step-*")):
        if folder.name.endswith(".partial") or not (folder / META).exists():
            continue
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        entries.append({"name": folder.name, "path": str(folder), **meta})
    manifest = {"version": 1, "checkpoints": entries}
    write_json_atomic(ckpt_root / MANIFEST, manifest)
    return manifest


def _prune(ckpt_root: Path, manifest: dict[str, Any], keep: int) -> int | None:
    """Delete all but the newest ``keep`` checkpoints and the best one; return the best step."""
    entries = sorted(manifest["checkpoints"], key=lambda e: e["step"])
    scored = [e for e in entries if e.get("eval_loss") is not None]
    best = min(scored, key=lambda e: e["eval_loss"])["step"] if scored else None
    keep_steps = {e["step"] for e in entries[-keep:]} | ({best} if best is not None else set())
    removed = False
    for entry in entries:
        if entry["step"] not in keep_steps:
            shutil.rmtree(ckpt_root / entry["name"], ignore_errors=True)
            removed = True
    if removed:
        _rebuild_manifest(ckpt_root)
    return best


def read_manifest(ckpt_root: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt_root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return {"version": 1, "checkpoints": []}


# Loading ----------------------------------------------------------------------------------------
@dataclass
class LoadedCheckpoint:
    path: Path
    state: dict[str, Any]
    weights: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """Check every file against meta.json; raise STATE_CHECKPOINT_INVALID naming what is wrong."""

    def invalid(why: str) -> BackpropError:
        return BackpropError(
            ErrorCode.STATE_CHECKPOINT_INVALID, f"Checkpoint {folder}: {why}.", path=str(folder)
        )

    try:
        meta = json.loads((folder / META).read_text())
    except FileNotFoundError:
        raise invalid(f"{META} is missing (the checkpoint was not finished)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise invalid(f"{META} is unreadable ({exc})") from None
    for name, expected in meta.get("files", {}).items():
        path = folder / name
        if not path.exists():
            raise invalid(f"{name} is missing")
        if path.stat().st_size != expected["bytes"]:
            raise invalid(f"{name} has {path.stat().st_size} bytes, expected {expected['bytes']}")
        if sha256_file(path) != expected["sha256"]:
            raise invalid(f"{name} does not match its sha256 (corrupted)")
    if set(meta.get("files", {})) != {WEIGHTS, OPTIMIZER, SCHEDULER, RNG, STATE}:
        raise invalid(f"{META} does not list the expected files")
    return meta


def load_latest_checkpoint(ckpt_root: Path) -> tuple[LoadedCheckpoint | None, list[BackpropError]]:
    """The newest checkpoint that verifies (or None), and the errors of newer, broken ones skipped."""
    import torch
    from safetensors.torch import load_file

    if not ckpt_root.exists():
        return None, []
    for stale in ckpt_root.glob("step-*.partial"):  # a crash mid-write: never complete, never used
        shutil.rmtree(stale, ignore_errors=True)
    skipped: list[BackpropError] = []
    folders = sorted((p for p in ckpt_root.glob("step-*") if p.is_dir()), reverse=True)
    for folder in folders:
        try:
            verify_checkpoint(folder)
            loaded = LoadedCheckpoint(
                path=folder,
                state=json.loads((folder / STATE).read_text()),
                weights=load_file(folder / WEIGHTS),
                optimizer=torch.load(folder / OPTIMIZER, weights_only=True),
                scheduler=torch.load(folder / SCHEDULER, weights_only=True),
                rng=torch.load(folder / RNG, weights_only=True),
            )
        except BackpropError as err:
            skipped.append(err)
            continue
        except Exception as exc:  # hashes matched but the content does not load: still unusable
            err = BackpropError(
                ErrorCode.STATE_CHECKPOINT_INVALID,
                f"Checkpoint {folder} could not be read: {exc}",
                path=str(folder),
            )
            skipped.append(err)
            continue
        return loaded, skipped
    return None, skipped


def apply_weights(model: Any, weights: dict[str, Any]) -> None:
    """Load saved trainable weights into ``model``; every saved name must match a trainable parameter."""
    import torch

    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    missing += [n for n in weights if n in params and tuple(weights[n].shape) != tuple(params[n].shape)]
    if missing:
        raise BackpropError(
            ErrorCode.STATE_CHECKPOINT_INVALID,
            f"Checkpoint weights do not fit this model (unknown or reshaped: {missing[:3]}); "
            "was the config (model, method, lora_r, target modules) changed since the run started?",
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
