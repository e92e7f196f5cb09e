"""Preference tuning throughput: our engine's DPO and ORPO against TRL's DPOTrainer, side by side.

Rows (each in its own subprocess, so peaks and Unsloth's patches never leak between rows):
  trl  TRL DPOTrainer, transformers + PEFT, reference = the adapter switched off (its default)
  c    our engine, DPO, transformers + PEFT fallback path
  d    our engine, DPO, Unsloth
  oc   our engine, ORPO, fallback path (reference-free: no second forward)
  od   our engine, ORPO, Unsloth

Same shape, data, micro-batch (pairs), LoRA (r16, all linear layers), bf16, no checkpointing, no
accumulation. Tokens/s counts the real (unpadded) tokens of both sides of every pair in a step,
over the step's time: the median step after the warm-up, with the range of the timed steps.
Peak memory is torch's max_memory_allocated in the row's process.

    python bench/preference_throughput.py [--shapes 0.5b,7b] [--rows trl,c,d,oc,od] [--steps 15] [--warmup 5]
``--shapes tiny`` runs the demo model on the CPU (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from train_throughput import prepare_model_dir  # noqa: E402

MAX_LEN = 1024
MICRO_BATCH = {"0.5b": 4, "7b": 2, "tiny": 2}
ROWS = {
    "trl": "TRL DPOTrainer (DPO)",
    "c": "engine DPO, fallback",
    "d": "engine DPO, Unsloth",
    "oc": "engine ORPO, fallback",
    "od": "engine ORPO, Unsloth",
}


def write_pairs(path: Path, rows: int = 400) -> Path:
    """Pairs of random-word prompts and answers: about 700-900 tokens per side with the demo tokenizer."""
    rng = random.Random(0)
    words = "the model learns from data and every step moves the weights a little closer to".split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    with path.open("w") as fh:
        for _ in range(rows):
            pair = {
                "prompt": text(200),
                "chosen": text(rng.randint(140, 160)),
                "rejected": text(rng.randint(140, 160)),
            }
            fh.write(json.dumps(pair) + "\n")
    return path


def _step_stats(times: list[float], tokens: list[int]) -> dict:
    rates = [n / t for n, t in zip(tokens, times, strict=True)]
    return {
        "median_tokens_per_s": statistics.median(rates),
        "min_tokens_per_s": min(rates),
        "max_tokens_per_s": max(rates),
        "timed_steps": len(rates),
        "tokens_per_step": statistics.median(tokens),
    }


def trl_row(model_dir: Path, data: Path, mb: int, steps: int, warmup: int, device: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from backpropagate.training.backends import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    )
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tokens: list[int] = []

    class Counting(DPOTrainer):
        def _compute_loss(self, model, inputs, return_outputs):  # noqa: ANN001, ANN202
            tokens.append(int(inputs["attention_mask"].sum()))
            return super()._compute_loss(model, inputs, return_outputs)

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            if device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    args = DPOConfig(
        tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=mb, gradient_accumulation_steps=1,
        max_steps=warmup + steps, learning_rate=1e-5, bf16=device == "cuda", logging_steps=10_000,
        report_to=[], save_strategy="no", max_length=2 * MAX_LEN, beta=0.1, dataloader_num_workers=0,
        gradient_checkpointing=False, use_cpu=device != "cuda", seed=0,
    )  # fmt: skip
    trainer = Counting(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    out = _step_stats(times[warmup:], tokens[warmup : warmup + steps])
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    out["backend"] = "transformers"
    return out


def engine_row(row: str, model_dir: Path, data: Path, mb: int, steps: int, warmup: int, device: str) -> dict:
    import torch

    from backpropagate.config import RunConfig
    from backpropagate.training import run_training

    config = RunConfig(
        model=str(model_dir), data=str(data), objective="orpo" if row.startswith("o") else "dpo",
        steps=warmup + steps, max_seq_len=MAX_LEN, batch_size=mb, grad_accum=1, lora_r=16, lora_alpha=32,
        lora_dropout=0.0, target_modules="all-linear", gradient_checkpointing=False,
        backend="unsloth" if row.endswith("d") else "transformers", unsloth_fallback=False,
        eval_fraction=0.0, save_every=10_000, seed=0, log_every=1, device="cpu" if device == "cpu" else "auto",
    )  # fmt: skip
    events: list = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_training(config, Path(tempfile.mkdtemp(prefix=f"bench-{row}-")) / "run", events.append)
    timed = [e for e in events if e.type == "step"][warmup:]
    # tokens_per_s is the step's own tokens over its own time (docs/events.md)
    rates = [e.tokens_per_s for e in timed]
    started = next(e for e in events if e.type == "run_started")
    return {
        "median_tokens_per_s": statistics.median(rates),
        "min_tokens_per_s": min(rates),
        "max_tokens_per_s": max(rates),
        "timed_steps": len(rates),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "backend": started.backend,
        "final_margin": timed[-1].reward_margin,
    }


def run_one(args: argparse.Namespace) -> None:
    device = "cuda" if args.shape != "tiny" else "cpu"
    fn = trl_row if args.row == "trl" else engine_row
    if fn is trl_row:
        out = trl_row(
            Path(args.model_dir), Path(args.data), MICRO_BATCH[args.shape], args.steps, args.warmup, device
        )
    else:
        out = engine_row(
            args.row,
            Path(args.model_dir),
            Path(args.data),
            MICRO_BATCH[args.shape],
            args.steps,
            args.warmup,
            device,
        )
    print("RESULT " + json.dumps(out), flush=True)


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    card = None
    try:
        import torch

        card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - the table still prints without it
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {
        "card": card,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        # A copy of the tree may carry an older .git: the caller's commit wins when given.
        "commit": os.environ.get("BENCH_COMMIT") or commit.stdout.strip() or "?",
        "python": platform.python_version(),
        **{k: ver(k) for k in ("torch", "transformers", "peft", "trl", "unsloth")},
    }


def render(results: list[dict], env: dict) -> str:
    lines = [
        "| shape | row | backend | tokens/s median (range) | vs TRL | peak GiB | vs TRL |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    trl = {r["shape"]: r for r in results if r["row"] == "trl" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['shape']} | {ROWS[r['row']]} | — | failed: {r['error'][:80]} | | | |")
            continue
        base = trl.get(r["shape"])
        speed = f"{r['median_tokens_per_s'] / base['median_tokens_per_s']:.2f}x" if base else ""
        mem = (
            f"{r['peak_gib'] / base['peak_gib']:.2f}x"
            if base and r.get("peak_gib") and base.get("peak_gib")
            else ""
        )
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "—"
        lines.append(
            f"| {r['shape']} | {ROWS[r['row']]} | {r.get('backend')} | {r['median_tokens_per_s']:,.0f} "
            f"({r['min_tokens_per_s']:,.0f}-{r['max_tokens_per_s']:,.0f}) | {speed} | {peak} | {mem} |"
        )
    head = ", ".join(f"{k} {v}" for k, v in env.items() if v)
    return f"Preference throughput ({head})\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="0.5b")
    p.add_argument("--rows", default="trl,c,d,oc,od")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--timeout", type=int, default=240, help="seconds per row")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return run_one(args)

    root = Path(tempfile.mkdtemp(prefix="bench-pref-"))
    data = write_pairs(root / "pairs.jsonl")
    results = []
    for shape in args.shapes.split(","):
        if shape == "tiny":
            from backpropagate.models.demo import resolve_model

            model_dir = Path(resolve_model("demo"))
        else:
            model_dir = prepare_model_dir(shape, root)
        for row in args.rows.split(","):
            cmd = [sys.executable, __file__, "--one", "--row", row, "--shape", shape, "--model-dir", str(model_dir),
                   "--data", str(data), "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
            began = time.time()
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=args.timeout, cwd=tempfile.gettempdir()
                )
                found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                entry = (
                    json.loads(found[-1][7:]) if found else {"error": proc.stderr.strip().splitlines()[-1:]}
                )
            except subprocess.TimeoutExpired:
                entry = {"error": f"over {args.timeout} s"}
            if isinstance(entry.get("error"), list):
                entry["error"] = " ".join(entry["error"]) or f"exit {proc.returncode}"
            entry.update(shape=shape, row=row, wall_s=round(time.time() - began, 1))
            results.append(entry)
            print(json.dumps(entry), flush=True)
    env = environment()
    table = render(results, env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preference_throughput.json").write_text(json.dumps({"env": env, "rows": results}, indent=2))
    (out / "preference_throughput.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
