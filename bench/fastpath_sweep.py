"""Which fallback-path options pay for themselves on a GPU: one training loop, one option at a time.

Each variant runs in its own subprocess on the same random-init Qwen2.5-0.5B-shape model and the
same packed batches (from our data pipeline), and prints tokens/s and peak memory:

  attention   causal (no isolation, the ceiling) | 4d (block-diagonal mask) | position_ids
  liger       Liger kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU) on or off
  adapters    fp32 LoRA weights under autocast | LoRA weights in bf16 (no casts)

    python bench/fastpath_sweep.py [--model-dir DIR] [--steps 15]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import SEQ, prepare_model_dir, write_text_data  # noqa: E402

VARIANTS = [
    {"attention": "causal", "liger": False, "adapters": "fp32"},
    {"attention": "4d", "liger": False, "adapters": "fp32"},
    {"attention": "position_ids", "liger": False, "adapters": "fp32"},
    {"attention": "4d", "liger": True, "adapters": "fp32"},
    {"attention": "position_ids", "liger": True, "adapters": "fp32"},
    {"attention": "position_ids", "liger": True, "adapters": "bf16"},
    {"attention": "causal", "liger": True, "adapters": "bf16"},
]


def one(variant: dict, model_dir: Path, data: Path, micro_batch: int, steps: int, warmup: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from backpropagate.config import RunConfig
    from backpropagate.data import collate, prepare_datasets
    from backpropagate.models.tokenizer import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    cfg = RunConfig(model=str(model_dir), data=str(data), max_seq_len=SEQ, train_on="all", eval_fraction=0.0)
    rows = list(prepare_datasets(cfg, tok).train)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.to("cuda")
    model.config.use_cache = False
    if variant["liger"]:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(model, lora, autocast_adapter_dtype=variant["adapters"] == "fp32")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    use_autocast = variant["adapters"] == "fp32"
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        chunk = [rows[(i * micro_batch + j) % len(rows)] for j in range(micro_batch)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if variant["attention"] == "causal":
            batch = collate([{k: v for k, v in r.items() if k != "seq_lens"} for r in chunk], pad_id=0)
            batch.pop("attention_mask", None)
        else:
            batch = collate(chunk, pad_id=0, attention=variant["attention"], dtype=torch.bfloat16)
        batch = {k: v.to("cuda", non_blocking=True) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    tokens = sum(len(r["input_ids"]) for r in chunk) * len(times)
    return {"tokens_per_s": tokens / sum(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/bench-models")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--variant")
    p.add_argument("--model-dir")
    p.add_argument("--data")
    args = p.parse_args()
    if args.variant:
        out = one(
            json.loads(args.variant),
            Path(args.model_dir),
            Path(args.data),
            args.micro_batch,
            args.steps,
            args.warmup,
        )
        print("RESULT " + json.dumps(out), flush=True)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model_dir("0.5b", work)
    data = write_text_data(work / "text.jsonl", rows=1500)
    print(f"{'attention':<13} {'liger':<6} {'adapters':<9} {'tokens/s':>10} {'peak GiB':>9}")
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", json.dumps(v), "--model-dir", str(model_dir),
               "--data", str(data), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--micro-batch", str(args.micro_batch)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir())
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not found:
            print(f"{v['attention']:<13} {v['liger']!s:<6} {v['adapters']:<9} failed: {proc.stderr[-800:]}")
            continue
        r = json.loads(found[-1][7:])
        print(
            f"{v['attention']:<13} {v['liger']!s:<6} {v['adapters']:<9} {r['tokens_per_s']:>10,.0f} {r['peak_gib']:>9.1f}"
        )


if __name__ == "__main__":
    main()
