"""The web app's view of preference runs: reward points on the run page, reward overlays in Compare."""

from __future__ import annotations

from ui_app.pages.compare import metrics_in, overlay
from ui_app.state.runview import RunView


def _events(objective: str) -> list[dict]:
    started = {
        "type": "run_started",
        "seq": 1,
        "ts": 1.0,
        "pid": 1,
        "config": {"objective": objective},
        "total_steps": 2,
    }
    steps = [
        {"type": "step", "seq": 1 + i, "ts": 1.0 + i, "step": i, "total_steps": 2, "epoch": 0.5 * i,
         "loss": 0.7 - 0.1 * i, "lr": 1e-3, **({"reward_margin": 0.1 * i, "reward_accuracy": 0.5 * i}
                                               if objective != "sft" else {})}
        for i in (1, 2)
    ]  # fmt: skip
    return [started, *steps]


def test_a_dpo_run_charts_its_rewards_and_an_sft_run_does_not():
    dpo, sft = RunView(run_id="a"), RunView(run_id="b")
    for ev in _events("dpo"):
        dpo.apply(ev)
    for ev in _events("sft"):
        sft.apply(ev)
    assert dpo.preference and not sft.preference
    assert [(p["step"], p["reward_margin"], p["reward_accuracy"]) for p in dpo.chart_points()] == [
        (1, 0.1, 0.5),
        (2, 0.2, 1.0),
    ]
    assert all("reward_margin" not in p for p in sft.chart_points())


def test_compare_offers_rewards_only_when_a_run_has_them_and_overlays_them():
    dpo, sft = RunView(run_id="a"), RunView(run_id="b")
    for ev in _events("dpo"):
        dpo.apply(ev)
    for ev in _events("sft"):
        sft.apply(ev)
    curves = {"a": dpo.chart_points(), "b": sft.chart_points()}
    assert metrics_in({"b": curves["b"]}) == ["Loss"]
    assert metrics_in(curves) == ["Loss", "Reward margin", "Reward accuracy"]
    assert overlay(curves, "reward_accuracy") == [{"step": 1, "a": 0.5}, {"step": 2, "a": 1.0}]
    assert overlay(curves)[0] == {"step": 1, "a": 0.6, "b": 0.6}
