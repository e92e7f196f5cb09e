"""GGUF export benchmark: convert and quantize time and peak memory (RSS) on the CPU.

A random-init model with Qwen2.5-0.5B's dimensions (hidden 896, 24 layers, 14 heads / 2 kv,
ffn 4864, vocab 151936, tied embeddings, bf16) is built once; each step then runs in its own
process so its peak RSS is its own. Prints a table and writes bench/results/export.md.

    python bench/export.py [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "export.md"
QWEN_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
)


def _peak_rss_mb() -> float:
    # VmHWM: this process's peak resident set size.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(out))
    torch.manual_seed(0)
    # The tokenizer is tiny; the embedding has the real 151936 rows (the converter pads the vocab).
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN_05B, dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(str(out))


def step(name: str, model_dir: Path, work: Path) -> dict[str, float | str]:
    """Run one step in this process; returns seconds, peak RSS and output size."""
    started = time.perf_counter()
    if name == "build":
        build_model(model_dir)
        path = model_dir / "model.safetensors"
    elif name in ("f16", "q8_0"):
        from backpropagate.export.gguf_convert import convert_to_gguf

        path = work / f"bench-{name}.gguf"
        convert_to_gguf(model_dir, path, name)
    elif name == "q4_k_m":
        from backpropagate.export.quantize import quantize_gguf

        path = work / "bench-q4_k_m.gguf"
        quantize_gguf(work / "bench-f16.gguf", path, "q4_k_m", threads=os.cpu_count() or 1)
    else:
        raise SystemExit(f"unknown step {name}")
    return {
        "step": name,
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(_peak_rss_mb()),
        "output_mb": round(path.stat().st_size / 2**20),
    }


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def machine() -> str:
    cpu = "?"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.platform()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="Keep the model and GGUF files.")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-export-"))
    model_dir = work / "qwen2.5-0.5b-shape"
    if args.step:
        print(json.dumps(step(args.step, model_dir, work)))
        return

    load = os.getloadavg()[0]
    rows = []
    for name in ("build", "f16", "q8_0", "q4_k_m"):
        if name == "build" and (model_dir / "model.safetensors").is_file():
            continue
        cmd = [sys.executable, __file__, "--workdir", str(work), "--step", name]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"step {name} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)

    n_params = _param_count(model_dir)
    table = [
        "| step | seconds | peak RSS (MB) | output (MB) |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {r['step']} | {r['seconds']} | {r['peak_rss_mb']} | {r['output_mb']} |" for r in rows),
    ]
    text = "\n".join(
        [
            "# GGUF export benchmark",
            "",
            f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- machine: {machine()}; load average at start {load:.1f} (a shared machine: timings are",
            "  upper bounds)",
            f"- versions: python {platform.python_version()}, torch {_version('torch')}, "
            f"transformers {_version('transformers')}, gguf {_version('gguf')}, "
            f"llama-cpp-python {_version('llama_cpp_python')}",
            f"- model: random-init Qwen2.5-0.5B shape ({n_params / 1e6:.0f}M parameters, bf16 safetensors "
            f"{(model_dir / 'model.safetensors').stat().st_size / 2**20:.0f} MB, tied embeddings)",
            "- steps: `build` makes the model (once); `f16` and `q8_0` are this project's converter "
            "(one tensor in memory at a time); `q4_k_m` is llama.cpp's quantizer reading the f16 GGUF.",
            "  Each step runs in its own process; peak RSS is that process's VmHWM: the Python",
            "  interpreter and torch (~350 MB), the safetensors pages read through mmap, and the one",
            "  tensor being converted (the largest, the 151936 x 896 embedding, is 520 MB in f32).",
            "",
            *table,
            "",
            "Reproduce: `python bench/export.py` (a few minutes on 2 cores).",
            "",
        ]
    )
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


def _param_count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
            n = 1
            for d in f.get_slice(name).get_shape():
                n *= d
            total += n
    return total


if __name__ == "__main__":
    main()
