"""Per-example scores of a generation against its expected answer, and bootstrap intervals.

Text is compared as words: lower-cased, punctuation and extra whitespace ignored ("The sky is
blue." and "the sky is blue" are an exact match). ``token_f1`` is the harmonic mean of word
precision and recall, counting repeated words as often as they occur (as SQuAD scores answers).

Intervals are percentile bootstraps over examples with a fixed seed, so the same results give
the same interval on every machine. A difference between two models is bootstrapped *paired*:
each resample takes the same examples for both, which is what makes a small set informative.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

TEXT_METRICS = ("exact_match", "contains", "regex", "token_f1")
RESAMPLES = 2000
SEED = 0
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def exact_match(prediction: str, expected: str) -> float:
    return float(words(prediction) == words(expected))


def contains(prediction: str, expected: str) -> float:
    """1 when the expected answer's words appear, in order and adjacent, in the prediction."""
    want, got = words(expected), words(prediction)
    if not want:
        return 1.0
    return float(any(got[i : i + len(want)] == want for i in range(len(got) - len(want) + 1)))


def regex_match(prediction: str, pattern: str) -> float:
    return float(re.search(pattern, prediction) is not None)


def token_f1(prediction: str, expected: str) -> float:
    got, want = words(prediction), words(expected)
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, expected: str, pattern: str | None = None) -> dict[str, float | None]:
    """Every text metric of one example; ``regex`` is None when the row gives no pattern."""
    return {
        "exact_match": exact_match(prediction, expected),
        "contains": contains(prediction, expected),
        "regex": None if pattern is None else regex_match(prediction, pattern),
        "token_f1": token_f1(prediction, expected),
    }


def _resample(n: int, seed: int, resamples: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(values: Any) -> list[float]:
    import numpy as np

    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def bootstrap_ci(
    values: Sequence[float], *, seed: int = SEED, resamples: int = RESAMPLES
) -> list[float] | None:
    """95% percentile interval of the mean of ``values``; None for no values."""
    import numpy as np

    if not values:
        return None
    data = np.asarray(values, dtype=float)
    return _percentiles(data[_resample(len(data), seed, resamples)].mean(axis=1))


def paired_bootstrap_ci(
    a: Sequence[float], b: Sequence[float], *, seed: int = SEED, resamples: int = RESAMPLES
) -> list[float] | None:
    """95% interval of mean(a) - mean(b), resampling the same examples for both."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    if not a:
        return None
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return _percentiles(diff[_resample(len(diff), seed, resamples)].mean(axis=1))


def weighted_loss(losses: Sequence[float], tokens: Sequence[int]) -> float | None:
    """Token-weighted mean loss: every predicted token counts once, as in training."""
    total = sum(tokens)
    return sum(loss * n for loss, n in zip(losses, tokens, strict=True)) / total if total else None


def loss_ci(
    losses: Sequence[float], tokens: Sequence[int], *, seed: int = SEED, resamples: int = RESAMPLES
) -> list[float] | None:
    """95% interval of the token-weighted loss, resampling examples (a ratio bootstrap)."""
    import numpy as np

    if not losses:
        return None
    loss, tok = np.asarray(losses, dtype=float), np.asarray(tokens, dtype=float)
    idx = _resample(len(loss), seed, resamples)
    sums = (loss * tok)[idx].sum(axis=1)
    return _percentiles(sums / np.maximum(tok[idx].sum(axis=1), 1.0))


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def summarise(
    scores: Sequence[dict[str, float | None]],
    losses: Sequence[float] = (),
    tokens: Sequence[int] = (),
    *,
    seed: int = SEED,
) -> dict[str, Any]:
    """The metrics object of one model: each mean with its ``<metric>_ci``; None where not measured."""
    out: dict[str, Any] = {"n": len(scores)}
    for name in TEXT_METRICS:
        values = [s[name] for s in scores if s.get(name) is not None]
        out[name] = sum(values) / len(values) if values else None
        out[f"{name}_ci"] = bootstrap_ci(values, seed=seed)  # type: ignore[arg-type]
    loss = weighted_loss(losses, tokens) if losses else None
    ci = loss_ci(losses, tokens, seed=seed) if losses else None
    out["loss"], out["loss_ci"] = loss, ci
    out["perplexity"] = perplexity(loss)
    out["perplexity_ci"] = None if ci is None else [perplexity(ci[0]), perplexity(ci[1])]
    return out


def compare(
    run_scores: Sequence[dict[str, float | None]],
    vs_scores: Sequence[dict[str, float | None]],
    run_loss: tuple[Sequence[float], Sequence[int]] = ((), ()),
    vs_loss: tuple[Sequence[float], Sequence[int]] = ((), ()),
    *,
    seed: int = SEED,
) -> dict[str, dict[str, Any]]:
    """Per metric: run minus vs, its paired 95% interval, and whether the interval excludes 0.

    Both lists score the same examples in the same order. Loss is paired per example (weighted
    by the run's tokens); lower is better there, higher everywhere else.
    """
    out: dict[str, dict[str, Any]] = {}
    for name in TEXT_METRICS:
        pairs = [
            (a[name], b[name])
            for a, b in zip(run_scores, vs_scores, strict=True)
            if a.get(name) is not None and b.get(name) is not None
        ]
        if pairs:
            a_vals, b_vals = [p[0] for p in pairs], [p[1] for p in pairs]
            out[name] = _difference(a_vals, b_vals, seed)  # type: ignore[arg-type]
    (a_loss, a_tok), (b_loss, _) = run_loss, vs_loss
    if a_loss and b_loss and len(a_loss) == len(b_loss):
        total = sum(a_tok) or 1
        # Each example's share of the weighted mean, so the mean of the pairs is the loss difference.
        # Both sides use the run's token counts: another tokenizer may split the answers differently.
        a_w = [x * n * len(a_tok) / total for x, n in zip(a_loss, a_tok, strict=True)]
        b_w = [x * n * len(a_tok) / total for x, n in zip(b_loss, a_tok, strict=True)]
        out["loss"] = _difference(a_w, b_w, seed, higher_is_better=False)
    return out


def _difference(
    a: Sequence[float], b: Sequence[float], seed: int, higher_is_better: bool = True
) -> dict[str, Any]:
    diff = sum(a) / len(a) - sum(b) / len(b)
    ci = paired_bootstrap_ci(a, b, seed=seed)
    assert ci is not None
    excludes = ci[0] > 0 or ci[1] < 0
    better = (diff > 0) == higher_is_better
    return {
        "diff": diff,
        "diff_ci": ci,
        "excludes_zero": excludes,
        "verdict": ("better" if better else "worse") if excludes else "no clear difference",
    }
