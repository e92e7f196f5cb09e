"""The tiny offline demo models: a Llama and a Qwen2 built from a seed, briefly trained on a bundled corpus.

``resolve_model("demo")`` gives a local folder that transformers loads like any hub model, so every
feature (training, export, chat) can be tried and tested without downloading weights.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.settings import get_settings

DEMO_NAMES = ("demo", "demo-llama", "demo-qwen2")
# `demo` is Qwen2: its q/k/v biases and unpermuted rope exercise more of the export path
# than Llama does, and most small instruct models people fine-tune are Qwen-family.
DEMO_ALIASES = {"demo": "demo-qwen2"}
BUILT_NAMES = ("demo-llama", "demo-qwen2")

# Bumped whenever the recipe below changes what gets built; older folders are rebuilt.
RECIPE_VERSION = 3
CORPUS_DIR = Path(__file__).parent / "corpus"
MARKER = "demo.json"

Progress = Callable[[str, int, int], None]
"""``progress(model_name, steps_done, steps_total)``; called as training advances."""


@dataclass(frozen=True)
class DemoSpec:
    """The shape and training budget of one demo model."""

    architecture: str  # "llama" | "qwen2"
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 3e-3
    base: str | None = None  # another demo model whose weights this one starts from


# Hidden and FFN widths are multiples of 256 so that GGUF K-quants (Q4_K_M, ...) apply to every
# weight; llama.cpp silently falls back to another type otherwise.
# Qwen2 differs from Llama only by biases on q/k/v, so it starts from the trained Llama's weights
# (biases at zero) and trains a few more steps, which gives it learned, non-zero biases: two
# models for little more than the price of one.
SPECS = {
    "demo-llama": DemoSpec("llama"),
    "demo-qwen2": DemoSpec("qwen2", steps=40, lr=1e-3, base="demo-llama"),
}


def canonical_name(name: str) -> str:
    """``demo`` -> ``demo-qwen2``; the other demo names are their own folder names."""
    return DEMO_ALIASES.get(name, name)


def demo_path(name: str, models_dir: Path | None = None) -> Path:
    """Where the demo model ``name`` (alias or not) lives, built or not."""
    return Path(models_dir or get_settings().models_dir) / canonical_name(name)


def is_built(path: Path) -> bool:
    """A demo folder is complete when its marker names the current recipe (it is written last)."""
    try:
        info = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return info.get("recipe_version") == RECIPE_VERSION and (path / "model.safetensors").is_file()


def resolve_model(name: str) -> str:
    """Turn what a user typed into something ``from_pretrained`` accepts.

    Demo names become their local folder (built on first use); an existing local folder becomes
    its absolute path; anything else (a hub id) is returned unchanged, or, offline, becomes its
    folder in the local cache (DEP_MODEL_LOAD_FAILED at once when it is not there).
    """
    if name in DEMO_NAMES:
        path = demo_path(name)
        if not is_built(path):
            make_demo_models(path.parent, names=(canonical_name(name),))
        return str(path)
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if not name.startswith((".", "/", "~")):  # a missing folder is reported as one by the loader
        from backpropagate.models.hub import cached_snapshot, is_offline

        if is_offline():
            return cached_snapshot(name)
    return name


@contextmanager
def _build_lock(models_dir: Path) -> Iterator[None]:
    # One builder at a time per models folder, across processes: test workers and a server may
    # all ask for the demo model on first use. The others wait, then find it built.
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / ".demo-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def make_demo_models(
    models_dir: Path | None = None,
    *,
    force: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
    names: tuple[str, ...] = BUILT_NAMES,
    steps: int | None = None,
) -> dict[str, Path]:
    """Build the demo models under ``models_dir`` (default: the settings' models folder).

    Folders already built by the current recipe are kept unless ``force``. ``steps`` replaces
    the base model's training budget (others scale alike; tests use a tiny one). Returns
    ``{name: folder}`` for ``names``.
    """
    models_dir = Path(models_dir or get_settings().models_dir)
    wanted = [canonical_name(n) for n in names]
    for name in wanted:
        if name not in SPECS:
            raise BackpropError(
                ErrorCode.STATE_NOT_FOUND,
                f"No demo model named {name!r}; the demo models are {', '.join(DEMO_NAMES)}.",
            )
    with _build_lock(models_dir):
        _remove_stale_partials(models_dir)
        todo = [name for name in wanted if force or not is_built(models_dir / name)]
        if todo:
            _build(models_dir, todo, seed=seed, steps=steps, progress=progress)
    return {name: models_dir / name for name in wanted}


def _build(
    models_dir: Path, todo: list[str], *, seed: int, steps: int | None, progress: Progress | None
) -> None:
    """Build each of ``todo`` (in SPECS order, bases first) and move it into place."""
    import torch

    tokenizer = build_tokenizer()
    stream = torch.tensor(corpus_token_stream(tokenizer), dtype=torch.long)
    if len(stream) < 10_000:
        raise BackpropError(
            ErrorCode.RUNTIME_INTERNAL,
            f"The demo corpus in {CORPUS_DIR} is missing or truncated ({len(stream)} tokens).",
            hint="Reinstall backpropagate; its package data includes models/corpus/*.txt.",
        )
    trained: dict[str, Any] = {}

    def budget(name: str) -> int:
        # `steps` is the base model's budget; the others scale alike (tests use a tiny one).
        if steps is None:
            return SPECS[name].steps
        return max(1, steps * SPECS[name].steps // SPECS["demo-llama"].steps)

    def base_model(name: str) -> tuple[Any, dict[str, Any]]:
        if name in trained:  # built earlier in this call
            return trained[name]
        folder = models_dir / name
        if _matches(folder, seed, budget(name)):
            from transformers import AutoModelForCausalLM

            info = json.loads((folder / MARKER).read_text())
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), info
        # Needed only as a base, and the folder on disk is missing or from another seed/budget:
        # train it in memory; save it only where that replaces nothing.
        trained[name] = _train(name, tokenizer, stream, None, seed, budget(name), progress)
        if not is_built(folder):
            _save(name, *trained[name], tokenizer, models_dir)
        return trained[name]

    for name in SPECS:
        if name not in todo:
            continue
        base = SPECS[name].base
        start = base_model(base) if base else None
        trained[name] = _train(name, tokenizer, stream, start, seed, budget(name), progress)
        _save(name, *trained[name], tokenizer, models_dir)


def _matches(folder: Path, seed: int, steps: int) -> bool:
    if not is_built(folder):
        return False
    info = json.loads((folder / MARKER).read_text())
    return info.get("seed") == seed and info.get("steps") == steps


def _remove_stale_partials(models_dir: Path) -> None:
    # Called under the lock: any partial folder left now belongs to a builder that died.
    for leftover in models_dir.glob(".demo-*.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in models_dir.glob(".demo-*.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    """Put ``new`` at ``target`` with renames, so readers never see a half-written folder."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- corpus


def corpus_documents() -> tuple[list[str], list[list[dict[str, str]]]]:
    """The bundled corpus: plain-text documents and chat conversations.

    ``dialogues.txt`` holds blank-line separated blocks of ``User:``/``Assistant:`` lines; the
    other files hold blank-line separated paragraphs.
    """
    texts: list[str] = []
    chats: list[list[dict[str, str]]] = []
    for path in sorted(CORPUS_DIR.glob("*.txt")):
        blocks = [b.strip() for b in path.read_text(encoding="utf-8").split("\n\n") if b.strip()]
        if path.stem == "dialogues":
            for block in blocks:
                chats.append(_parse_dialogue(block, path))
        else:
            texts.extend(blocks)
    return texts, chats


def _parse_dialogue(block: str, path: Path) -> list[dict[str, str]]:
    roles = {"System": "system", "User": "user", "Assistant": "assistant"}
    messages = []
    for line in block.splitlines():
        speaker, sep, content = line.partition(": ")
        if not sep or speaker not in roles:
            raise BackpropError(
                ErrorCode.DATASET_PARSE_FAILED,
                f"{path}: dialogue line {line!r} does not start with 'User: ', 'Assistant: ' or 'System: '.",
            )
        messages.append({"role": roles[speaker], "content": content})
    return messages


def build_tokenizer() -> Any:
    """The demo tokenizer, trained on the corpus (deterministic: BPE training has no randomness)."""
    from backpropagate.models.tokenizer import train_tokenizer, wrap_tokenizer

    texts, chats = corpus_documents()
    chat_text = ["\n".join(m["content"] for m in chat) for chat in chats]
    return wrap_tokenizer(train_tokenizer(texts + chat_text))


def corpus_token_stream(tokenizer: Any) -> list[int]:
    """Every corpus document as token ids, each ended by an end token, in file order."""
    texts, chats = corpus_documents()
    ids: list[int] = []
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.append(eot)
    for chat in chats:
        ids.extend(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
        ids.append(eot)
    return ids


# ----------------------------------------------------------------------------- model


def model_config(spec: DemoSpec, tokenizer: Any) -> Any:
    """A transformers config for ``spec`` whose vocabulary is exactly the tokenizer's."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
    )
    if spec.architecture == "llama":
        return LlamaConfig(**common)
    return Qwen2Config(**common, use_sliding_window=False)


def _train(
    name: str,
    tokenizer: Any,
    stream: Any,
    start: tuple[Any, dict[str, Any]] | None,
    seed: int,
    steps: int,
    progress: Progress | None,
) -> tuple[Any, dict[str, Any]]:
    """Initialise ``name`` (from ``start``'s weights when given) and train it; returns (model, info)."""
    import torch
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    spec = SPECS[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(spec, tokenizer), dtype=torch.float32)
    if start is not None:
        base_model, base_info = start
        missing, unexpected = model.load_state_dict(base_model.state_dict(), strict=False)
        # Only the architecture's extra parameters may be new; they start at zero so the
        # copied network computes exactly what the base did before training goes on.
        if unexpected or any(not key.endswith(".bias") for key in missing):
            raise BackpropError(
                ErrorCode.RUNTIME_INTERNAL,
                f"demo model {name}: weights of {spec.base} do not fit "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}).",
            )
        with torch.no_grad():
            for key in missing:
                model.get_parameter(key).zero_()
    losses = train_on_stream(model, stream, spec, steps=steps, seed=seed, progress=progress, name=name)
    info = {
        "name": name,
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "steps": steps,
        "spec": asdict(spec),
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "train_seconds": round(time.monotonic() - started, 2),
    }
    if start is not None:
        info["base"] = {k: start[1][k] for k in ("name", "seed", "steps")}
    return model, info


def _save(name: str, model: Any, info: dict[str, Any], tokenizer: Any, models_dir: Path) -> None:
    """Write a complete HF folder beside the target, then rename it into place."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    partial = models_dir / f".{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        partial.mkdir(parents=True)
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            max_new_tokens=64,
        )
        # transformers draws a progress bar per saved shard; it would garble the CLI's own bar.
        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(partial)
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(partial)
        # The marker goes last: a folder with a marker is complete.
        (partial / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        for path in partial.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _replace_dir(partial, models_dir / name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def train_on_stream(
    model: Any,
    stream: Any,
    spec: DemoSpec,
    *,
    steps: int,
    seed: int,
    progress: Progress | None = None,
    name: str = "",
) -> list[float]:
    """A short pre-training run on random windows of ``stream``; returns the loss per step."""
    import math

    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 10)

    def lr_at(step: int) -> float:
        # Linear warm-up, then cosine down to a tenth: the usual shape, short.
        if step < warmup:
            return spec.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    # One thread: these matrices are too small to gain from more, a busy machine makes extra
    # threads spin against each other (measured 7x slower wall time under load), and the
    # result does not depend on the core count (the order of float sums would).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    losses = []
    try:
        for step in range(steps):
            batch = sample_windows(stream, spec.batch_size, spec.seq_len, generator)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
            if progress is not None:
                progress(name, step + 1, steps)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return losses


def sample_windows(stream: Any, batch_size: int, seq_len: int, generator: Any) -> Any:
    """``batch_size`` random windows of ``seq_len`` tokens from a 1-D token tensor."""
    import torch

    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
