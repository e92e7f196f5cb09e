"""Check a GGUF against the Hugging Face model: per-token KL, top-1 agreement, greedy output.

Both run the same token ids (tokenized once, by the HF tokenizer) so the comparison is about the
weights and the runtime, not tokenization. The report is written as JSON next to the GGUF.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backpropagate.errors import BackpropError, ErrorCode

PROMPTS = (
    "The quick brown fox",
    "Fine-tuning a language model means",
    "def add(a, b):\n    return",
    "Numbers: 1, 2, 3, 4,",
)
# Mean KL(HF || GGUF) per token above which an export is refused. Measured on tiny trained
# models: f16 ~1e-6, q8_0 ~2e-4..1e-3, q4_k_m 0.01-0.15. f16 beyond 1e-3 is a conversion bug, not
# rounding; the quantized limits leave room for real models, which quantize less gracefully.
KL_LIMITS = {
    "f32": 1e-3,
    "f16": 1e-3,
    "bf16": 1e-2,
    "q8_0": 2e-2,
    "q6_k": 0.05,
    "q5_k_m": 0.1,
    "q5_k_s": 0.1,
    "q5_0": 0.1,
    "q5_1": 0.1,
    "q4_k_m": 0.25,
    "q4_k_s": 0.25,
    "q4_0": 0.3,
    "q4_1": 0.3,
    "q2_k": 1.0,
}
DEFAULT_KL_LIMIT = 0.5  # q3_k_*


@dataclass
class PromptResult:
    prompt: str
    tokens: int
    mean_kl: float
    top1_agreement: float


@dataclass
class VerifyReport:
    """What the verification measured; ``passed`` compares mean_kl with kl_limit."""

    gguf: str
    quantization: str
    mean_kl: float
    max_kl: float
    top1_agreement: float
    kl_limit: float
    passed: bool
    prompts: list[PromptResult] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-position KL(ref || other) and whether the argmax agrees; rows are positions."""
    lp, lq = _log_softmax(ref), _log_softmax(other)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return np.maximum(kl, 0.0), ref.argmax(axis=-1) == other.argmax(axis=-1)


def prompt_ids(tokenizer: Any, prompts: tuple[str, ...] = PROMPTS) -> list[list[int]]:
    """Token ids for the fixed prompts, plus one templated conversation when there is a template."""
    out = [list(tokenizer(p)["input_ids"]) for p in prompts]
    if getattr(tokenizer, "chat_template", None):
        conversation = [
            {"role": "user", "content": "Hello, who are you?"},
            {"role": "assistant", "content": "A small model."},
            {"role": "user", "content": "Tell me more."},
        ]
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        # The template writes its own special tokens; adding BOS again would double it.
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def open_gguf(path: Path, n_ctx: int = 512) -> Any:
    from backpropagate.export.quantize import require_llama_cpp

    require_llama_cpp("GGUF verification")
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0
    )


def gguf_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def verify_gguf(
    gguf_path: Path,
    model: Any,
    tokenizer: Any,
    quantization: str,
    report_path: Path | None = None,
    kl_limit: float | None = None,
) -> VerifyReport:
    """Run the prompts through both models; raise RUNTIME_GGUF_EXPORT_FAILED above the KL limit."""
    import torch

    limit = kl_limit if kl_limit is not None else KL_LIMITS.get(quantization, DEFAULT_KL_LIMIT)
    llm = open_gguf(gguf_path)
    results, all_kl, all_agree = [], [], []
    try:
        for text, ids in zip([*PROMPTS, "<chat template>"], prompt_ids(tokenizer), strict=False):
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].float().numpy()
            ours = gguf_logits(llm, ids)
            n_vocab = min(ref.shape[-1], ours.shape[-1])
            kl, agree = compare_logits(ref[:, :n_vocab], ours[:, :n_vocab])
            all_kl.append(kl)
            all_agree.append(agree)
            results.append(PromptResult(text, len(ids), float(kl.mean()), float(agree.mean())))
    finally:
        llm.close()
    kl_cat, agree_cat = np.concatenate(all_kl), np.concatenate(all_agree)
    mean_kl = float(kl_cat.mean())
    report = VerifyReport(
        gguf=str(gguf_path),
        quantization=quantization,
        mean_kl=mean_kl,
        max_kl=float(kl_cat.max()),
        top1_agreement=float(agree_cat.mean()),
        kl_limit=limit,
        passed=bool(math.isfinite(mean_kl) and mean_kl <= limit),
        prompts=results,
    )
    if report_path is not None:
        Path(report_path).write_text(report.to_json() + "\n")
    if not report.passed:
        raise BackpropError(
            ErrorCode.RUNTIME_GGUF_EXPORT_FAILED,
            f"{gguf_path.name} disagrees with the trained model: mean KL per token {mean_kl:.3g} "
            f"> {limit:g} allowed for {quantization}, top-1 agreement {report.top1_agreement:.1%} "
            f"(report: {report_path})",
            report=asdict(report),
        )
    return report


def greedy_tokens_hf(model: Any, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


def greedy_tokens_gguf(llm: Any, ids: list[int], n: int) -> list[int]:
    # Argmax over raw logits, step by step: the same rule as HF greedy, no sampler in the way.
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out
