"""FP8 LoRA on the device, in one call: the layer's numerics and speed, then the engine with fp8 on and off.

(a) Every LoRA-wrapped linear shape of Qwen2.5-0.5B (16,384 tokens) and 7B (4,096 tokens): forward
    and input gradient of the ``_scaled_mm`` layer against an fp32 reference, ‖out−ref‖/‖ref‖, beside
    plain bf16's error on the same inputs; the fp32 emulation against ``_scaled_mm``; milliseconds for
    forward + input gradient in bf16, in FP8 with compiled and with eager row quantization.
(b) The engine (run_training, transformers + PEFT, LoRA r16 all-linear, micro-batch 8, packed to
    seq 2048) on a random-init 0.5B-shape model, 60 steps, same seed: bf16, fp8, fp8 with eager
    quantization. Median tokens/s after 10 warm-up steps; the loss curves' difference.
(c) Exact resume with fp8: stopped at step 20 by a RunControl stop request, resumed, against (b)'s run.

    PYTHONPATH=/tmp/gpusite/site:$PWD python3 bench/fp8_check.py [--steps 60] [--skip-engine]
Prints a table last; writes $OUT/fp8_check.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_throughput's model and data helpers

LAYERS = {  # (in, out) of each LoRA-wrapped linear layer, and the tokens of one micro-batch
    "0.5b": {"tokens": 8 * 2048, "hidden": 896, "kv": 128, "inter": 4864},
    "7b": {"tokens": 2 * 2048, "hidden": 3584, "kv": 512, "inter": 18944},
}


def shapes(key: str) -> dict[str, tuple[int, int]]:
    s = LAYERS[key]
    h, kv, i = s["hidden"], s["kv"], s["inter"]
    return {"q_proj": (h, h), "k_proj": (h, kv), "o_proj": (h, h), "up_proj": (h, i), "down_proj": (i, h)}


def rel(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def time_ms(fn, reps: int = 20) -> float:
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ------------------------------------------------------------------------------------ (a) the layer
def layer_check() -> list[dict]:
    import torch

    from backpropagate.training import fp8

    rows = []
    for model_key in LAYERS:
        m = LAYERS[model_key]["tokens"]
        for name, (k, n) in shapes(model_key).items():
            torch.manual_seed(hash((model_key, name)) % 2**31)
            linear = torch.nn.Linear(
                k, n, bias=name in ("q_proj", "k_proj"), device="cuda", dtype=torch.bfloat16
            )
            torch.nn.init.normal_(linear.weight, std=k**-0.5)
            linear.requires_grad_(False)
            layer = fp8.Fp8Linear(linear)
            # Fresh random data, with per-token magnitudes that differ as hidden states' do.
            x = torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda").add(0.1) * 4
            x = x.bfloat16()
            g = (torch.randn(m, n, device="cuda") * 1e-3).bfloat16()
            w32, x32, g32 = linear.weight.float(), x.float(), g.float()
            ref_y = x32 @ w32.t() + (linear.bias.float() if linear.bias is not None else 0)
            ref_dx = g32 @ w32

            def run(module, x=x, g=g):
                xi = x.detach().requires_grad_(True)
                y = module(xi)
                y.backward(g)
                return y, xi.grad

            y_bf, dx_bf = run(linear)
            y8, dx8 = run(layer)
            layer.emulate = True
            y_em, dx_em = run(layer)
            layer.emulate = False
            fp8.FAST_ACCUM_FORWARD = False
            y_slow, _ = run(layer)
            fp8.FAST_ACCUM_FORWARD = True
            finite = bool(torch.isfinite(y8).all() and torch.isfinite(dx8).all())
            ms_bf = time_ms(lambda mod=linear: run(mod))
            fp8.compile_quantize = True
            ms_fp8 = time_ms(lambda mod=layer: run(mod))
            fp8.compile_quantize = False
            ms_eager = time_ms(lambda mod=layer: run(mod))
            fp8.compile_quantize = True
            rows.append({
                "model": model_key, "layer": name, "m": m, "k": k, "n": n,
                "fwd_rel_fp8": rel(y8, ref_y), "fwd_rel_bf16": rel(y_bf, ref_y),
                "fwd_rel_fp8_no_fast_accum": rel(y_slow, ref_y),
                "dx_rel_fp8": rel(dx8, ref_dx), "dx_rel_bf16": rel(dx_bf, ref_dx),
                "fwd_fp8_vs_emulation": rel(y8, y_em.float()), "dx_fp8_vs_emulation": rel(dx8, dx_em.float()),
                "finite": finite, "ms_bf16": ms_bf, "ms_fp8": ms_fp8, "ms_fp8_eager_quant": ms_eager,
            })  # fmt: skip
            del layer, linear, x, g
            torch.cuda.empty_cache()
    # An odd token count (generation, the last batch): M needs no alignment.
    linear = torch.nn.Linear(896, 896, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    odd = torch.randn(7, 896, device="cuda", dtype=torch.bfloat16)
    rows.append({"model": "odd-m", "layer": "m=7", "m": 7, "k": 896, "n": 896,
                 "fwd_rel_fp8": rel(fp8.Fp8Linear(linear)(odd), odd.float() @ linear.weight.float().t()
                                    + linear.bias.float())})  # fmt: skip
    return rows


# ------------------------------------------------------------------------------- (b), (c) the engine
def engine_runs(steps: int, out_dir: Path) -> dict:
    import torch
    from train_throughput import engine_config, prepare_model_dir, throughput_from_events, write_text_data

    from backpropagate.config import RunConfig
    from backpropagate.training import fp8, run_training
    from backpropagate.training.control import RunControl

    root = Path(tempfile.mkdtemp(prefix="fp8-check-"))
    model_dir = prepare_model_dir("0.5b", root)
    data = write_text_data(root / "text.jsonl")
    base = engine_config("c", model_dir, data, 8, steps)
    base.update(save_every=20, keep_checkpoints=5, lr_scheduler="cosine", warmup_ratio=0.05)

    def train(
        name: str, run_dir: Path, control: RunControl | None = None, stop_at: int | None = None, **over
    ):
        events: list[dict] = []

        def emit(event) -> None:
            events.append({**event.model_dump(mode="json"), "ts": time.time()})
            if stop_at is not None and event.type == "step" and event.step == stop_at:
                control.request_stop("user")

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        started = time.time()
        result = run_training(RunConfig(**{**base, **over}), run_dir, emit, control)
        print(f"  {name}: {result.status} at step {result.step} in {time.time() - started:.0f} s", flush=True)
        return result, events

    out: dict = {"runs": {}}
    histories = {}
    for name, over, eager in (
        ("bf16", {}, False),
        ("fp8", {"fp8": True}, False),
        ("fp8_eager_quant", {"fp8": True}, True),
    ):
        fp8.compile_quantize = not eager
        try:
            result, events = train(name, root / name, **over)
        finally:
            fp8.compile_quantize = True
        _tps, _mb, _ga, steady = throughput_from_events(events, warmup=10)
        histories[name] = result.history
        warnings = [e["message"] for e in events if e["type"] == "warning"]
        out["runs"][name] = {
            "median_tokens_per_s": steady["median_tokens_per_s"], "slow_steps": steady["slow_steps"],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "final_loss": result.history[-1]["loss"],
            "first_loss": result.history[0]["loss"], "losses": [h["loss"] for h in result.history],
            "warnings": warnings, "adapter": str(result.adapter_path),
        }  # fmt: skip
    b, f = out["runs"]["bf16"], out["runs"]["fp8"]
    last = lambda h: statistics.mean(x["loss"] for x in h[-10:])  # noqa: E731
    out["final_loss_rel_diff"] = abs(f["final_loss"] - b["final_loss"]) / b["final_loss"]
    out["last10_loss_rel_diff"] = abs(last(histories["fp8"]) - last(histories["bf16"])) / last(
        histories["bf16"]
    )
    out["max_step_loss_rel_diff"] = max(
        abs(x["loss"] - y["loss"]) / y["loss"]
        for x, y in zip(histories["fp8"], histories["bf16"], strict=True)
    )
    out["speedup"] = f["median_tokens_per_s"] / b["median_tokens_per_s"]

    # (c) stop at 20 and resume, against the uninterrupted fp8 run
    control = RunControl()
    stopped, _ = train("fp8 stopped at 20", root / "resume", control, stop_at=20, fp8=True)
    resumed, events = train("fp8 resumed", root / "resume", fp8=True)
    started = next(e for e in events if e["type"] == "run_started")
    want = {h["step"]: h["loss"] for h in histories["fp8"]}
    got = {h["step"]: h["loss"] for h in resumed.history}
    diffs = [abs(got[s] - want[s]) for s in sorted(got) if s > 20 and s in want]
    from safetensors.torch import load_file

    a = load_file(str(Path(out["runs"]["fp8"]["adapter"]) / "adapter_model.safetensors"))
    r = load_file(str(resumed.adapter_path / "adapter_model.safetensors"))
    out["resume"] = {
        "stopped_status": stopped.status, "stopped_step": stopped.step,
        "resumed_from_step": started.get("resumed_from_step"), "steps_compared": len(diffs),
        "max_abs_loss_diff": max(diffs) if diffs else None, "exact": bool(diffs) and max(diffs) == 0.0,
        "adapter_keys_same": a.keys() == r.keys(),
        "adapter_max_abs_diff": max((a[k].float() - r[k].float()).abs().max().item() for k in a) if a.keys() == r.keys() else None,
    }  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------- driver
def environment() -> dict:
    import platform

    import torch

    return {
        "card": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def table(results: dict) -> str:
    lines = ["", "(a) layer: rel error vs fp32 (fp8 | bf16), fwd+dx ms (bf16 | fp8 | fp8 eager quant)"]
    for r in results.get("layers", []):
        if "dx_rel_fp8" not in r:
            lines.append(f"  {r['model']:6} {r['layer']:9} fwd {r['fwd_rel_fp8']:.4f}")
            continue
        lines.append(
            f"  {r['model']:4} {r['layer']:9} {r['m']:>6}x{r['k']:<5}x{r['n']:<5} "
            f"fwd {r['fwd_rel_fp8']:.4f} | {r['fwd_rel_bf16']:.4f} (slow acc {r['fwd_rel_fp8_no_fast_accum']:.4f})  "
            f"dx {r['dx_rel_fp8']:.4f} | {r['dx_rel_bf16']:.4f}  emul {r['fwd_fp8_vs_emulation']:.1e}  "
            f"ms {r['ms_bf16']:.3f} | {r['ms_fp8']:.3f} | {r['ms_fp8_eager_quant']:.3f}"
            + ("" if r["finite"] else "  NON-FINITE")
        )
    eng = results.get("engine")
    if eng:
        lines.append("(b) engine, 0.5B shape, mb 8 x 2048: median tokens/s, peak GiB, loss first -> last")
        for name, r in eng["runs"].items():
            lines.append(
                f"  {name:16} {r['median_tokens_per_s']:>10,.0f}  {r['peak_gib']:5.1f}  "
                f"{r['first_loss']:.4f} -> {r['final_loss']:.4f}  slow steps {r['slow_steps']}"
            )
        lines.append(
            f"  fp8/bf16 speed {eng['speedup']:.3f}x; final loss diff {eng['final_loss_rel_diff']:.2%}, "
            f"last-10 mean {eng['last10_loss_rel_diff']:.2%}, worst step {eng['max_step_loss_rel_diff']:.2%}"
        )
        res = eng["resume"]
        lines.append(
            f"(c) resume: stopped {res['stopped_status']} at {res['stopped_step']}, resumed from "
            f"{res['resumed_from_step']}; {res['steps_compared']} steps, max |loss diff| {res['max_abs_loss_diff']}, "
            f"exact {res['exact']}; adapter max |diff| {res['adapter_max_abs_diff']}"
        )
    for key, err in results.get("errors", {}).items():
        lines.append(f"ERROR in {key}: {err.splitlines()[-1] if err else ''}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict = {"environment": environment(), "errors": {}}
    # Each part reports what it has; a failure in one does not lose the others.
    for key, fn in (("layers", layer_check), ("engine", lambda: engine_runs(args.steps, out_dir))):
        if key == "engine" and args.skip_engine:
            continue
        started = time.time()
        try:
            results[key] = fn()
        except Exception:
            results["errors"][key] = traceback.format_exc()
            print(results["errors"][key], file=sys.stderr, flush=True)
        print(f"[{key}] {time.time() - started:.0f} s", flush=True)
        (out_dir / "fp8_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
