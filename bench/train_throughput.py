"""Training throughput on a GPU: our engine against plain loops, side by side in one run.

Rows (each in its own subprocess, so peaks and Unsloth's patches never leak between rows):
  a  plain transformers + PEFT loop (the baseline)
  b  plain Unsloth loop
  c  our engine, transformers + PEFT fallback path (backend="transformers")
  d  our engine with Unsloth (backend="unsloth")
  e  a full `python -m backpropagate.worker` run (best backend): events and telemetry on
  auto  our engine with batch_size="auto" (checks the automatic choice against a/c)

Shapes: random-init models with the real dimensions of Qwen2.5-0.5B (micro-batch 8) and
Qwen2.5-7B (micro-batch 2), seq 2048, LoRA r16 on all linear layers, bf16, no checkpointing.

MFU counts 4·N (forward + input gradients of the frozen base) + 6·N_lora + causal attention
6·L·h·seq FLOPs per token against the card's dense bf16 peak.

    python bench/train_throughput.py [--models 0.5b,7b] [--rows a,b,c,d,e] [--steps 30] [--warmup 20]
Writes bench/results/train_throughput.json and bench/RESULTS.md (or --out DIR).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEQ = 2048
LORA_R = 16
SHAPES = {
    "0.5b": {
        "label": "Qwen2.5-0.5B shape",
        "micro_batch": 8,
        "config": {
            "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True,
        },
    },
    "7b": {
        "label": "Qwen2.5-7B shape",
        "micro_batch": 2,
        "config": {
            "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "intermediate_size": 18944, "vocab_size": 152064, "tie_word_embeddings": False,
        },
    },
}  # fmt: skip
ROW_NAMES = {
    "a": "a. transformers+PEFT loop (baseline)",
    "b": "b. Unsloth loop",
    "c": "c. engine, fallback path",
    "d": "d. engine, Unsloth",
    "e": "e. backprop worker (events+telemetry)",
    "auto": "engine, batch_size=auto",
}
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2}


def flops_per_token(cfg: dict) -> float:
    from backpropagate.training.memory import shape_from_config

    shape = shape_from_config({**cfg, "model_type": "qwen2"})
    return 4 * shape.n_params + 6 * shape.lora_params(LORA_R) + 6 * shape.layers * shape.hidden * SEQ


# ---------------------------------------------------------------------------- model folders
def prepare_model_dir(shape_key: str, root: Path) -> Path:
    """A random-init Qwen2 checkpoint with the real dimensions and a small local tokenizer."""
    out = root / f"qwen2-{shape_key}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**SHAPES[shape_key]["config"], max_position_embeddings=32768, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    try:
        from backpropagate.models.demo import resolve_model
    except ImportError:  # plain-loop rows feed random ids and need no tokenizer
        return out
    demo = Path(resolve_model("demo-qwen2"))
    for f in demo.iterdir():  # tokenizer files: any vocabulary smaller than the model's will do
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def write_text_data(path: Path, rows: int = 4000) -> Path:
    """Plain text rows of random words: packing turns them into full 2048-token sequences."""
    import random

    rng = random.Random(0)
    words = "the model learns from data and every step moves the weights a little closer".split()
    with path.open("w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(400))}) + "\n")
    return path


# ---------------------------------------------------------------------------- plain loops
def plain_loop(row: str, model_dir: Path, micro_batch: int, steps: int, warmup: int) -> dict:
    import torch

    if row == "b":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            str(model_dir), max_seq_length=SEQ, dtype=torch.bfloat16, load_in_4bit=False
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=LORA_R,
            lora_alpha=32,
            lora_dropout=0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            use_gradient_checkpointing=False,
        )
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0}
        )
        model = get_peft_model(
            model, LoraConfig(r=LORA_R, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
        )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = 4000
    gen = torch.Generator(device="cuda").manual_seed(0)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        ids = torch.randint(0, vocab, (micro_batch, SEQ), device="cuda", generator=gen)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {
        "tokens_per_s": micro_batch * SEQ * len(times) / sum(times),
        **steady_rate(times, micro_batch * SEQ),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "micro_batch": micro_batch,
        "grad_ckpt": False,
    }


def steady_rate(step_seconds: list[float], tokens_per_step: int) -> dict:
    """The median step's rate, and how many timed steps took over 1.5x the median.

    A slow step inside the timed window is almost always a kernel compiled on first use of a new
    shape or value (Triton, torch.compile): a one-off that a long run never sees again.
    """
    median = statistics.median(step_seconds)
    return {
        "median_tokens_per_s": tokens_per_step / median,
        "slow_steps": sum(1 for t in step_seconds if t > 1.5 * median),
    }


# ---------------------------------------------------------------------------- engine rows
def parse_row(row: str, default_mb: int) -> tuple[str, int, bool]:
    """'c' -> ('c', default, False); sweep rows 'c:16' and 'c:16:ckpt' set micro-batch and checkpointing."""
    base, *rest = row.split(":")
    mb = int(rest[0]) if rest else default_mb
    return base, mb, "ckpt" in rest


def row_name(row: str) -> str:
    base, *rest = row.split(":")
    if not rest:
        return ROW_NAMES[base]
    return f"sweep: engine fallback, mb {rest[0]}{', ckpt' if 'ckpt' in rest else ''}"


def engine_config(
    row: str, model_dir: Path, data: Path, micro_batch: int, steps: int, ckpt: bool = False
) -> dict:
    return {
        "model": str(model_dir),
        "data": str(data),
        "steps": steps,
        "max_seq_len": SEQ,
        "packing": True,
        "train_on": "all",
        "batch_size": "auto" if row == "auto" else micro_batch,
        "grad_accum": 1,
        "lora_r": LORA_R,
        "lora_alpha": 32,
        "target_modules": "all-linear",
        "gradient_checkpointing": "auto" if row == "auto" else ckpt,
        # e runs the worker on the best backend, to compare with b and d
        "backend": {"d": "unsloth", "e": "auto"}.get(row, "transformers"),
        "unsloth_fallback": False,
        "eval_fraction": 0.0,
        "save_every": 10_000,  # checkpoint cost is not throughput; the final save comes after timing
        "seed": 0,
        "telemetry_interval_s": 2.0,
    }


def throughput_from_events(events: list[dict], warmup: int) -> tuple[float, int, int, dict]:
    """Tokens/s between the step events after ``warmup`` (rows are packed full to SEQ tokens)."""
    steps = [e for e in events if e["type"] == "step"]
    if len(steps) <= warmup + 1:
        raise RuntimeError(f"only {len(steps)} step events")
    timed = steps[warmup:]
    mb, ga = timed[-1].get("micro_batch") or 1, timed[-1].get("grad_accum") or 1
    tokens = (len(timed) - 1) * mb * ga * SEQ
    gaps = [b["ts"] - a["ts"] for a, b in zip(timed, timed[1:], strict=False)]
    return tokens / (timed[-1]["ts"] - timed[0]["ts"]), mb, ga, steady_rate(gaps, mb * ga * SEQ)


def engine_row(
    row: str, model_dir: Path, data: Path, micro_batch: int, steps: int, warmup: int, ckpt: bool = False
) -> dict:
    import torch

    from backpropagate.config import RunConfig
    from backpropagate.training import run_training

    config = RunConfig(**engine_config(row, model_dir, data, micro_batch, steps + warmup, ckpt))
    events: list[dict] = []
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{row}-"))
    torch.cuda.reset_peak_memory_stats()
    run_training(config, run_dir, lambda e: events.append({**e.model_dump(), "ts": time.time()}))
    tps, mb, _, steady = throughput_from_events(events, warmup)
    started = next((e for e in events if e["type"] == "run_started"), {})
    return {
        "tokens_per_s": tps,
        **steady,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "micro_batch": mb,
        "grad_ckpt": ckpt if row != "auto" else None,
        "backend": started.get("backend"),
        "warnings": [e["message"] for e in events if e["type"] == "warning"],
    }


def worker_row(model_dir: Path, data: Path, micro_batch: int, steps: int, warmup: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="bench-e-")) / "bench-worker"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(
        json.dumps(engine_config("e", model_dir, data, micro_batch, steps + warmup))
    )
    proc = subprocess.run([sys.executable, "-m", "backpropagate.worker", str(run_dir)], env=os.environ)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    if proc.returncode != 0:
        raise RuntimeError(f"worker exited {proc.returncode}: {events[-1] if events else 'no events'}")
    tps, mb, _, steady = throughput_from_events(events, warmup)
    gpu = [d for e in events if e["type"] == "gpu" for d in e["devices"]]
    return {
        "tokens_per_s": tps,
        **steady,
        # NVML's view: what the process holds, context and allocator cache included
        "peak_gib": max((d["memory_used_mb"] or 0) for d in gpu) / 1024 if gpu else None,
        "micro_batch": mb,
        "grad_ckpt": False,
        "gpu_events": len([e for e in events if e["type"] == "gpu"]),
        "max_temperature_c": max((d["temperature_c"] or 0) for d in gpu) if gpu else None,
    }


def run_one(args: argparse.Namespace) -> None:
    """Child process: one row on one shape; prints one JSON line."""
    model_dir = Path(args.model_dir)
    row, mb, ckpt = parse_row(args.row, SHAPES[args.shape]["micro_batch"])
    if row in ("a", "b"):
        out = plain_loop(row, model_dir, mb, args.steps, args.warmup)
    elif row == "e":
        out = worker_row(model_dir, Path(args.data), mb, args.steps, args.warmup)
    else:
        out = engine_row(row, model_dir, Path(args.data), mb, args.steps, args.warmup, ckpt)
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------- driver
def recompile_reasons(stderr: str, limit: int = 5) -> list[str]:
    """torch.compile's "Recompiling ..." log lines with the guard failure that follows each."""
    lines = stderr.splitlines()
    found = [i for i, line in enumerate(lines) if "Recompiling" in line][:limit]
    return [" / ".join(line.strip() for line in lines[i : i + 3])[-400:] for i in found]


def environment() -> dict:
    import torch

    def ver(name: str) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(name)
        except PackageNotFoundError:
            return None

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "card": card,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "versions": {
            n: ver(n)
            for n in ("torch", "transformers", "peft", "trl", "unsloth", "liger-kernel", "backpropagate")
        },
        "cuda": torch.version.cuda,
    }


def estimate_for(row: str, shape: str, entry: dict) -> float | None:
    """Our memory model's prediction for transformers rows (a: plain loss; c and sweeps: Liger's fused loss)."""
    from backpropagate.training.memory import estimate_memory, shape_from_config

    if row.split(":")[0] not in ("a", "c") or not isinstance(entry.get("grad_ckpt"), bool):
        return None
    est = estimate_memory(
        shape_from_config(SHAPES[shape]["config"]),
        seq_len=SEQ,
        micro_batch=entry["micro_batch"],
        gradient_checkpointing=entry["grad_ckpt"],
        lora_r=LORA_R,
        fused_loss=row != "a",
    )
    return est.total_gib


def peak_tflops(card: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in card), None)


def render(rows: list[dict], env: dict) -> str:
    lines = [
        "# Training throughput",
        "",
        f"Card: **{env['card']}** · CUDA {env['cuda']} · {env['date']} · "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
        "",
        f"Random-init models with real dimensions, seq {SEQ}, LoRA r{LORA_R} all-linear, bf16. "
        "Ratios are to row a of the same shape, measured in the same run. tokens/s is the mean over "
        "the timed steps (rows run more than once: the median run, with the range of all runs); "
        "median step is the rate of the median step; slow steps took over 1.5x the median "
        "(kernels compiled on first use of a shape or value).",
        "",
        "| row | model | micro-batch | grad ckpt | tokens/s | median step | slow steps | peak GiB "
        "| estimate GiB | MFU | ratio to a |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['model']} | | | failed: {r['error'][:120]} | | | | | | |")
            continue
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "?"
        mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") else "?"
        ratio = f"{r['ratio_to_baseline']:.2f}x" if r.get("ratio_to_baseline") else "?"
        est = ""
        if r.get("est_gib") and r.get("peak_gib"):
            est = f"{r['est_gib']:.1f} ({(r['est_gib'] / r['peak_gib'] - 1) * 100:+.0f}%)"
        median = f"{r['median_tokens_per_s']:,.0f}" if r.get("median_tokens_per_s") else "?"
        spread = ""
        if len(r.get("runs") or []) > 1:
            spread = f" ({min(r['runs']):,.0f}-{max(r['runs']):,.0f}, {len(r['runs'])} runs)"
        lines.append(
            f"| {r['name']} | {r['model']} | {r['micro_batch']} | {r['grad_ckpt']} | "
            f"{r['tokens_per_s']:,.0f}{spread} | {median} | {r.get('slow_steps', '?')} | {peak} | {est} | {mfu} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="0.5b,7b")
    p.add_argument("--rows", default="a,b,c,d,e")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeat", type=int, default=1, help="run every row this many times; report the median")
    p.add_argument("--work", default="/tmp/bench-models")
    p.add_argument("--out", default=str(REPO / "bench"))
    p.add_argument("--merge", help="earlier results JSON whose other shapes join this table")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--row")
    p.add_argument("--shape")
    p.add_argument("--model-dir")
    p.add_argument("--data")
    args = p.parse_args()
    if args.one:
        run_one(args)
        return

    env = environment()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = write_text_data(work / "text.jsonl")
    runs: list[dict] = []
    for shape in args.models.split(","):
        model_dir = prepare_model_dir(shape, work)
        # Repeats go round all rows in turn, so a slow drift of the card touches every row alike.
        for repeat in range(args.repeat):
            for row in args.rows.split(","):
                entry = run_row(row, shape, model_dir, data, args)
                entry["repeat"] = repeat
                runs.append(entry)
                write_results(summarize(runs, env), env, args)
                print(f"{entry['name']:<42} {shape:>5} {entry.get('tokens_per_s', 0):>10,.0f} tok/s  "
                      f"{entry.get('peak_gib') or 0:6.1f} GiB  {entry.get('error', '')}", flush=True)  # fmt: skip

    print(write_results(summarize(runs, env), env, args))


def run_row(row: str, shape: str, model_dir: Path, data: Path, args: argparse.Namespace) -> dict:
    """One row in a child process of its own."""
    cmd = [sys.executable, __file__, "--one", "--row", row, "--shape", shape,
           "--model-dir", str(model_dir), "--data", str(data),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    t0 = time.time()
    # Every row compiles its kernels from scratch, as on a fresh machine (otherwise a row would
    # reuse what an earlier row compiled), and logs why torch.compile recompiled.
    child_env = {
        **os.environ,
        "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton-"),
        "TORCH_LOGS": "recompiles",
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir(), env=child_env)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    entry = {"name": row_name(row), "row": row, "shape": shape, "model": SHAPES[shape]["label"],
             "wall_s": time.time() - t0}  # fmt: skip
    if proc.returncode != 0 or not found:
        entry["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        sys.stderr.write(proc.stderr[-4000:])
        return entry
    entry.update(json.loads(found[-1][7:]))
    entry["recompiles"] = recompile_reasons(proc.stderr)
    entry["est_gib"] = estimate_for(row, shape, entry)
    return entry


def summarize(runs: list[dict], env: dict) -> list[dict]:
    """One line per (shape, row): the median run by tokens/s, every run's rate kept in ``runs``;
    MFU and the ratio to row a of the same shape (its median run) computed from those."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for entry in runs:
        groups.setdefault((entry["shape"], entry["row"]), []).append(entry)
    lines: list[dict] = []
    for (shape, _row), entries in groups.items():
        good = sorted((e for e in entries if "error" not in e), key=lambda e: e["tokens_per_s"])
        if not good:
            lines.append(entries[-1])
            continue
        line = dict(good[(len(good) - 1) // 2])
        line["tokens_per_s"] = statistics.median(e["tokens_per_s"] for e in good)
        line["runs"] = [round(e["tokens_per_s"], 1) for e in entries if "error" not in e]
        peak = peak_tflops(env["card"])
        line["mfu"] = (
            line["tokens_per_s"] * flops_per_token(SHAPES[shape]["config"]) / (peak * 1e12) if peak else None
        )
        lines.append(line)
    for line in lines:
        base = next((b for b in lines if b.get("shape") == line.get("shape") and b["row"] == "a"), None)
        ok = base is not None and "error" not in base and "error" not in line
        line["ratio_to_baseline"] = line["tokens_per_s"] / base["tokens_per_s"] if ok else None
    return lines


def write_results(rows: list[dict], env: dict, args: argparse.Namespace) -> str:
    """Write the JSON and the table (after every row, so a cut-off run keeps what it measured)."""
    if args.merge and Path(args.merge).exists():
        earlier = json.loads(Path(args.merge).read_text())
        ran = {SHAPES[s]["label"] for s in args.models.split(",")}
        rows = [r for r in earlier["rows"] if r["model"] not in ran] + rows
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / "train_throughput.json").write_text(json.dumps({**env, "rows": rows}, indent=2) + "\n")
    table = render(rows, env)
    (out / "RESULTS.md").write_text(table)
    return table


if __name__ == "__main__":
    main()
