"""Where a training row's time goes, step by step, on a GPU.

Each variant trains the engine in its own process with an empty Triton cache (what a fresh
machine sees) and records, per optimizer step: wall time, host CPU time, the batch width, how many
kernels were compiled during the step (files added to the Triton cache) and the SM clock. The
last steps run under the profiler, which gives the share of the wall time the GPU was busy.
A slow row with spikes at single steps is compiling kernels; a steady gap between wall time and
GPU-busy time is host-side work.

Variants (the engine as it is, and the engine with one of its choices undone):
  c          fallback path (transformers + PEFT + Liger), widths rounded up to 64
  c-nopad    the same without rounding: each new width is a new kernel shape
  c-flex     the fallback path on FlexAttention instead of SDPA
  d          Unsloth path, packed rows' mask built on the GPU, widths rounded up to 64
  d-host     Unsloth path, mask built on the host and copied, no rounding

    python bench/step_times.py --shape 0.5b --variants c,c-nopad,d,d-host --steps 25
Prints a table and writes step_times.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402

VARIANTS = {
    "c": {"row": "c"},
    "c-nopad": {"row": "c", "pad_to_multiple": 1},
    "c-flex": {"row": "c", "attn": "flex_attention"},
    "d": {"row": "d"},
    "d-host": {"row": "d", "pad_to_multiple": 1, "attention": "4d"},
}


def _files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def run_variant(name: str, shape: str, model_dir: Path, data: Path, steps: int, profile_steps: int) -> dict:
    """Child process: train one variant and measure every step."""
    import torch

    from backpropagate import data as data_pkg
    from backpropagate.config import RunConfig
    from backpropagate.training import run_training, sft

    spec = VARIANTS[name]
    widths: list[int] = []
    original_collate = data_pkg.collate

    def collate(batch, pad_id, **kwargs):  # noqa: ANN001, ANN003, ANN202 - a test double of the same call
        for key in ("pad_to_multiple", "attention"):
            if key in spec:
                kwargs[key] = spec[key]
        if kwargs.get("attention") == "4d":
            kwargs["dtype"] = torch.bfloat16
        out = original_collate(batch, pad_id, **kwargs)
        widths.append(out["input_ids"].shape[1])
        return out

    data_pkg.collate = collate
    if "attn" in spec:
        from transformers import AutoModelForCausalLM

        loader = AutoModelForCausalLM.from_pretrained.__func__

        def from_pretrained(cls, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            kwargs["attn_implementation"] = spec["attn"]
            return loader(cls, *args, **kwargs)

        AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)

    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)

        def sm_clock() -> int | None:
            return pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
    except Exception:

        def sm_clock() -> int | None:
            return None

    cache = Path(os.environ.get("TRITON_CACHE_DIR") or tempfile.mkdtemp())
    on_gpu = torch.cuda.is_available()  # a CPU run only checks this script

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    records: list[dict] = []
    profile: dict = {}
    step_fn = sft._accumulate_and_step
    total = steps + profile_steps

    def timed(run, step, examples):  # noqa: ANN001, ANN202
        before_files, before_widths = _files(cache), len(widths)
        if step == total - profile_steps + 1:  # the last steps run under the profiler
            profile["prof"] = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            )
            profile["prof"].__enter__()
            profile["started"] = time.perf_counter()
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = step_fn(run, step, examples)
        sync()
        records.append(
            {
                "step": step,
                "wall_ms": (time.perf_counter() - t0) * 1e3,
                "cpu_ms": (time.process_time() - c0) * 1e3,
                "widths": widths[before_widths:],
                "compiled": _files(cache) - before_files,
                "sm_mhz": sm_clock(),
            }
        )
        if step == total and "prof" in profile:
            wall = time.perf_counter() - profile.pop("started")
            prof = profile.pop("prof")
            prof.__exit__(None, None, None)
            kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.self_device_time_total for e in kernels) / 1e6
            top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:8]
            profile["gpu_busy"] = busy / wall
            profile["top_kernels"] = [(e.key[:80], round(e.self_device_time_total / 1e3, 1)) for e in top]
        return out

    sft._accumulate_and_step = timed
    base, mb, _ = tt.parse_row(spec["row"], tt.SHAPES[shape]["micro_batch"])
    config = RunConfig(**tt.engine_config(base, model_dir, data, mb, total))
    events: list[dict] = []
    run_dir = Path(tempfile.mkdtemp(prefix=f"steps-{name}-"))
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    run_training(config, run_dir, lambda e: events.append(e.model_dump()))
    started = next((e for e in events if e["type"] == "run_started"), {})
    return {
        "variant": name,
        "shape": shape,
        "micro_batch": mb,
        "backend": started.get("backend"),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "steps": records,
        "profile": profile,
    }


def summarize(result: dict, warmup: int) -> dict:
    timed = [r for r in result["steps"][warmup:]]
    unprofiled = timed[: len(timed) - 3] if len(timed) > 6 else timed
    walls = [r["wall_ms"] for r in unprofiled]
    tokens = result["micro_batch"] * tt.SEQ
    return {
        "variant": result["variant"],
        "tokens_per_s": tokens * len(walls) / (sum(walls) / 1e3),
        "median_ms": statistics.median(walls),
        "max_ms": max(walls),
        "cpu_ms": statistics.median(r["cpu_ms"] for r in unprofiled),
        "compiling_steps": [r["step"] for r in result["steps"] if r["compiled"]],
        "distinct_widths": sorted({w for r in result["steps"] for w in r["widths"]}),
        "gpu_busy": result["profile"].get("gpu_busy"),
        "peak_gib": result["peak_gib"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="0.5b")
    p.add_argument("--variants", default="c,c-nopad,d,d-host")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--work", default="/tmp/bench-models")
    p.add_argument("--out", default=str(tt.REPO / "bench" / "results"))
    p.add_argument("--one")
    p.add_argument("--model-dir")
    p.add_argument("--data")
    args = p.parse_args()
    if args.one:
        out = run_variant(args.one, args.shape, Path(args.model_dir), Path(args.data), args.steps, 3)
        print("RESULT " + json.dumps(out), flush=True)
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = tt.write_text_data(work / "text.jsonl")
    model_dir = tt.prepare_model_dir(args.shape, work)
    results, summaries = [], []
    for name in args.variants.split(","):
        env = {**os.environ, "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton-")}
        cmd = [sys.executable, __file__, "--one", name, "--shape", args.shape, "--model-dir", str(model_dir),
               "--data", str(data), "--steps", str(args.steps)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not found:
            sys.stderr.write(proc.stderr[-3000:])
            summaries.append({"variant": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        result = json.loads(found[-1][7:])
        results.append(result)
        summary = summarize(result, args.warmup)
        summaries.append(summary)
        print(json.dumps(summary), flush=True)
        print("  wall ms:", [round(r["wall_ms"]) for r in result["steps"]], flush=True)
        print("  top kernels:", result["profile"].get("top_kernels"), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env_info = tt.environment()
    (out / f"step_times_{args.shape}.json").write_text(
        json.dumps({**env_info, "summaries": summaries, "results": results}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
