"""Multi-run: the chunking rules, the merge math, the samples check, validation per run, crash + resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.training import slao
from backpropagate.training.multirun import plan_chunks


# Chunking -------------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    n_rows=st.integers(2, 400),
    num_runs=st.integers(1, 12),
    samples=st.integers(1, 120),
    seed=st.integers(0, 2**16),
    wrap=st.booleans(),
)
def test_chunks_never_overlap_the_holdout_or_each_other(n_rows, num_runs, samples, seed, wrap):
    try:
        plan = plan_chunks(n_rows, num_runs, samples, seed=seed, wrap=wrap)
    except BackpropError as err:  # only when a chunk cannot fit in the pool
        assert samples > n_rows - max(1, round(n_rows * 0.1)) and err.code == ErrorCode.CONFIG_INVALID
        return
    holdout = set(plan.holdout)
    assert len(holdout) == len(plan.holdout) == max(1, min(round(n_rows * 0.1), n_rows - 1))
    assert plan.pool == n_rows - len(holdout)
    for chunk in plan.chunks:
        assert len(chunk) == samples and len(set(chunk)) == samples  # full chunks, no row twice
        assert not holdout & set(chunk) and all(0 <= i < n_rows for i in chunk)
    # Without wrap, chunks are disjoint; with it, only the chunks of one pass over the pool are.
    per_pass = plan.pool // samples
    for start in range(0, len(plan.chunks), per_pass if wrap else max(len(plan.chunks), 1)):
        rows = [
            i
            for chunk in plan.chunks[start : start + (per_pass if wrap else len(plan.chunks))]
            for i in chunk
        ]
        assert len(rows) == len(set(rows))
    if wrap:
        assert len(plan.chunks) == num_runs and not plan.exhausted
    else:
        assert len(plan.chunks) == min(num_runs, per_pass) and plan.exhausted == (per_pass < num_runs)


def test_samples_check_names_the_real_pool_size():
    # 50 rows: 5 held out, 45 left to train on.
    with pytest.raises(BackpropError) as err:
        plan_chunks(50, 3, 46, seed=1)
    assert err.value.code == ErrorCode.CONFIG_INVALID
    assert err.value.message.endswith("Reduce --samples (Python: samples_per_run) below 45")
    assert len(plan_chunks(50, 1, 45, seed=1).chunks[0]) == 45
    # Without validation nothing is held out and the check is skipped: a chunk is all the rows.
    plan = plan_chunks(50, 2, 60, seed=1, validate=False)
    assert plan.holdout == [] and [len(c) for c in plan.chunks] == [50]


def test_samples_check_fires_from_the_python_api_and_the_cli(tmp_path):
    from backpropagate import Trainer

    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20))
    )  # 2 held out, 18 left
    with pytest.raises(BackpropError) as err:
        Trainer("demo").multi_run(data, num_runs=2, steps_per_run=1, samples_per_run=19)
    assert err.value.code == ErrorCode.CONFIG_INVALID
    assert "Reduce --samples (Python: samples_per_run) below 18" in err.value.message
    out = subprocess.run(
        [sys.executable, "-m", "backpropagate", "multi-run", "--data", str(data), "--runs", "2",
         "--steps", "1", "--samples", "19"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 1 and out.stderr.startswith("[CONFIG_INVALID]"), out.stderr
    assert "Reduce --samples (Python: samples_per_run) below 18" in out.stderr


# Merge math -----------------------------------------------------------------------------------------
def _adapter(gen: torch.Generator, r: int = 4) -> dict[str, torch.Tensor]:
    return {
        "m.q.lora_A.weight": torch.randn(r, 10, generator=gen),
        "m.q.lora_B.weight": torch.randn(6, r, generator=gen),
        "m.v.lora_A.weight": torch.randn(r, 8, generator=gen),
        "m.v.lora_B.weight": torch.randn(5, r, generator=gen),
    }


def test_slao_lambda_is_one_over_sqrt_i_clamped():
    assert [slao.slao_lambda(i) for i in (1, 4, 25, 100, 101, 10_000)] == pytest.approx(
        [1.0, 0.5, 0.2, 0.1, 0.1, 0.1]
    )
    assert slao.slao_lambda(2) == pytest.approx(1 / math.sqrt(2))


def test_slao_merge_equals_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    runs = [_adapter(gen) for _ in range(3)]
    merged = None
    for i, new in enumerate(runs, start=1):
        merged = slao.merge_adapters(merged, new, i, "slao")
    # By hand: B1, then B1 + λ2 (B2 - B1), then that + λ3 (B3 - it); A is the last run's A.
    for key in ("m.q.lora_B.weight", "m.v.lora_B.weight"):
        b1, b2, b3 = (run[key] for run in runs)
        step2 = b1 + (1 / math.sqrt(2)) * (b2 - b1)
        expected = step2 + (1 / math.sqrt(3)) * (b3 - step2)
        assert torch.allclose(merged[key], expected, atol=1e-6)
    for key in ("m.q.lora_A.weight", "m.v.lora_A.weight"):
        assert torch.equal(merged[key], runs[2][key])


def test_linear_merge_is_the_mean_of_the_runs():
    gen = torch.Generator().manual_seed(1)
    runs = [_adapter(gen) for _ in range(4)]
    merged = None
    for i, new in enumerate(runs, start=1):
        merged = slao.merge_adapters(merged, new, i, "linear")
    for key in runs[0]:
        assert torch.allclose(merged[key], torch.stack([r[key] for r in runs]).mean(0), atol=1e-6)
    assert slao.next_run_init(merged, "linear")["m.q.lora_A.weight"].equal(merged["m.q.lora_A.weight"])


def test_next_run_starts_from_a_sign_corrected_orthogonal_basis_of_a():
    gen = torch.Generator().manual_seed(2)
    merged = _adapter(gen)
    init = slao.next_run_init(merged, "slao")
    for key in ("m.q.lora_A.weight", "m.v.lora_A.weight"):
        a, q_t = merged[key].double().numpy(), init[key].double().numpy()
        # Direct computation: numpy's QR of Aᵀ, columns' signs flipped so that diag(R) >= 0.
        q, r = np.linalg.qr(a.T)
        q = q * np.sign(np.diag(r))
        assert np.allclose(q_t, q.T, atol=1e-5)
        assert np.allclose(q_t @ q_t.T, np.eye(a.shape[0]), atol=1e-5)  # orthonormal rows
        assert np.allclose(a @ np.linalg.pinv(q_t) @ q_t, a, atol=1e-5)  # the same row space
        assert (np.diag(a @ q_t.T) > 0).all()  # sign-corrected: each row points along A's
    for key in ("m.q.lora_B.weight", "m.v.lora_B.weight"):
        assert init[key].equal(merged[key])  # B carries over unchanged


def test_api_refuses_an_initial_adapter_outside_the_allowed_folders(isolated_home):
    from fastapi.testclient import TestClient

    from backpropagate.server.app import create_app

    with TestClient(create_app(gpu_indices=[])) as client:
        body = {"model": "demo", "data": "examples/quickstart.jsonl", "init_adapter": "/etc"}
        refused = client.post("/api/runs", json=body)
        assert refused.status_code == 403 and refused.json()["code"] == "INPUT_PATH_TRAVERSAL", refused.text
        bad = client.post("/api/runs", json={**body, "init_adapter": None, "multi_run": {"num_runs": 0}})
        assert bad.status_code == 422 and bad.json()["code"] == "CONFIG_INVALID"
        assert "multi_run.num_runs" in bad.json()["message"]
