"""Two tasks in a row on the tiny model: SLAO's merge forgets the first task less than sequential training.

Task 1 and task 2 are disjoint memorisation sets. Both schedules train run 1 on task 1 and run 2
on task 2 for the same steps; *sequential* continues from run 1's adapter and keeps what run 2
leaves, *SLAO* starts run 2 from its orthogonal init and merges (multi-run's own functions).
Forgetting is measured as the loss on task 1's answers after run 2 (exact match is printed too).
Measured on CPU, 100 steps a run: task-1 loss 0.43 after run 1; after run 2, 4.90 sequential and
4.24 SLAO; exact match on task 1 falls from 1.0 to 0.0 with both, and both answer task 2 exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from backpropagate.config import RunConfig
from backpropagate.evaluation.runner import evaluate_run
from backpropagate.training import run_training
from backpropagate.training.multirun import _read_state, _write_adapter
from backpropagate.training.slao import merge_adapters, next_run_init

pytestmark = pytest.mark.slow

TASK_1 = [
    ("What colour is the sky?", "The sky is blue."),
    ("Name a fruit.", "An apple is a fruit."),
    ("What do cats say?", "Cats say meow."),
    ("How many legs has a dog?", "A dog has four legs."),
    ("Where do fish live?", "Fish live in water."),
    ("What is ice?", "Ice is frozen water."),
    ("When do we sleep?", "We sleep at night."),
    ("What grows on trees?", "Leaves grow on trees."),
]
TASK_2 = [
    ("Which city has the tower?", "Paris has the tower."),
    ("What does a baker make?", "A baker makes bread."),
    ("Who flies a plane?", "A pilot flies a plane."),
    ("What is the sun?", "The sun is a star."),
    ("What do bees make?", "Bees make honey."),
    ("How many wheels has a bike?", "A bike has two wheels."),
    ("What falls in winter?", "Snow falls in winter."),
    ("Where do birds live?", "Birds live in nests."),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _files(folder: Path, name: str, facts: list[tuple[str, str]]) -> tuple[Path, Path]:
    train, questions = folder / f"{name}.jsonl", folder / f"{name}-questions.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": a}]}) + "\n"
                             for q, a in facts))  # fmt: skip
    questions.write_text("".join(json.dumps({"prompt": q, "expected": a}) + "\n" for q, a in facts))
    return train, questions


def _config(data: Path, **update) -> RunConfig:
    fields = dict(
        model="demo", data=str(data), packing=False, max_seq_len=64, batch_size=8, grad_accum=1, lr=3e-3,
        lora_r=32, lora_alpha=64, lr_scheduler="constant", warmup_ratio=0.0, eval_fraction=0.0, steps=100,
        seed=0, save_every=1000,
    )  # fmt: skip
    fields.update(update)
    return RunConfig(**fields)


def _train(config: RunConfig, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True)
    config.save(run_dir / "config.json")
    assert run_training(config, run_dir, lambda event: None).status == "completed"
    return run_dir


def _task(run_dir: Path, questions: Path) -> dict:
    return evaluate_run(run_dir, data=questions, save=False, max_new_tokens=16)["run"]


def test_slao_forgets_task_one_less_than_sequential_training(tmp_path, home, capsys):
    from backpropagate.models.demo import resolve_model

    resolve_model("demo")
    train1, ask1 = _files(tmp_path, "task1", TASK_1)
    train2, _ = _files(tmp_path, "task2", TASK_2)
    run1 = _train(_config(train1), tmp_path / "run1")

    # Sequential: run 2 continues from run 1's adapter; its adapter is the result.
    sequential = _train(_config(train2, init_adapter=str(run1 / "adapter")), tmp_path / "sequential")

    # SLAO: run 2 starts from the orthogonal init of run 1's adapter; the two are then merged.
    first = _read_state(run1 / "adapter")
    _write_adapter(tmp_path / "init2", next_run_init(first, "slao"), run1 / "adapter")
    slao_run2 = _train(_config(train2, init_adapter=str(tmp_path / "init2")), tmp_path / "slao-run2")
    slao = tmp_path / "slao"
    slao.mkdir()
    shutil.copy(slao_run2 / "config.json", slao / "config.json")
    merged = merge_adapters(first, _read_state(slao_run2 / "adapter"), 2, "slao")
    _write_adapter(slao / "adapter", merged, slao_run2 / "adapter")

    scores = {name: _task(folder, ask1) for name, folder in
              (("after run 1", run1), ("sequential", sequential), ("slao", slao))}  # fmt: skip
    with capsys.disabled():
        line = "; ".join(
            f"{k}: loss {v['loss']:.3f}, exact {v['exact_match']:.3f}" for k, v in scores.items()
        )
        print("\ntask 1 " + line)
    assert scores["after run 1"]["exact_match"] >= 0.75  # task 1 was learnt, so there is something to forget
    assert scores["slao"]["loss"] < scores["sequential"]["loss"]  # SLAO keeps more of task 1
