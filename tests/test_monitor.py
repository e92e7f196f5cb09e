"""The temperature guard, driven by a replayed trace through the same interface as NVML."""

import json
import time

import pytest

from backpropagate.config import RunConfig
from backpropagate.gpu import ReplaySource
from backpropagate.training import monitor as monitor_mod
from backpropagate.training.control import RunControl
from backpropagate.training.monitor import GpuMonitor, start_monitor


def _run(trace, **cfg):
    events, control = [], RunControl()
    mon = GpuMonitor(ReplaySource(trace), RunConfig(data="x", **cfg), events.append, control, interval_s=0)
    for _ in trace:
        mon.check(mon.source.sample())
    return events, control


def _types(events):
    return [e.type for e in events]


def test_pause_then_resume_with_hysteresis():
    events, control = _run([70, 85, 91, 88, 82, 79, 70])
    assert _types(events) == ["warning", "paused", "resumed"]
    paused = events[1]
    assert paused.reason == "temperature" and paused.temperature_c == 91
    assert paused.code == "RUNTIME_GPU_TEMPERATURE_CRITICAL"
    assert events[2].temperature_c == 79  # 88 and 82 are above the resume threshold
    assert not control.paused and not control.stop_requested


def test_loop_waits_while_paused_and_wakes_on_resume():
    control = RunControl()
    control.pause("temperature")
    woke = []
    import threading

    t = threading.Thread(target=lambda: (control.wait_while_paused(0.01), woke.append(time.time())))
    t.start()
    time.sleep(0.1)
    assert not woke
    control.resume()
    t.join(1)
    assert woke


def test_emergency_requests_a_stop_once():
    events, control = _run([85, 96, 97])
    assert control.stop_requested and control.stop_reason == "temperature"
    errors = [e for e in events if e.type == "error"]
    assert len(errors) == 1 and errors[0].code == "RUNTIME_GPU_TEMPERATURE_CRITICAL"


def test_emergency_near_the_cards_own_slowdown_limit():
    events, control = _run([{"temperature_c": 86, "slowdown_temp_c": 88}])
    assert control.stop_requested  # 86 >= 88 - 3, below the configured 95


def test_warning_rearms_after_cooling():
    events, _ = _run([81, 82, 70, 81])
    assert _types(events) == ["warning", "warning"]


def test_thresholds_are_configurable():
    events, control = _run([75, 76], temp_warn_c=60, temp_pause_c=74, temp_resume_c=65, temp_emergency_c=99)
    assert _types(events) == ["paused", "warning"] and control.paused


def test_thread_emits_gpu_events_from_a_trace_file(tmp_path, monkeypatch):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([{"temperature_c": 60, "memory_used_mb": 1000, "memory_total_mb": 8000}]))
    monkeypatch.setenv(monitor_mod.TRACE_ENV, str(trace))
    events, control = [], RunControl()
    mon = start_monitor(RunConfig(data="x", telemetry_interval_s=0.01), events.append, control)
    time.sleep(0.2)
    mon.stop()
    gpu = [e for e in events if e.type == "gpu"]
    assert len(gpu) >= 3 and gpu[0].devices[0].memory_total_mb == 8000


def test_cpu_run_has_no_monitor(monkeypatch):
    monkeypatch.delenv(monitor_mod.TRACE_ENV, raising=False)
    assert start_monitor(RunConfig(data="x", device="cpu"), lambda e: None, RunControl()) is None


def test_nvml_missing_warns_once_and_training_goes_on(monkeypatch):
    # This machine has nvidia-ml-py but no driver: NVML itself fails to start, as on a broken install.
    monkeypatch.delenv(monitor_mod.TRACE_ENV, raising=False)
    monkeypatch.setattr(monitor_mod, "_cuda_available", lambda: True)
    events = []
    assert start_monitor(RunConfig(data="x"), events.append, RunControl()) is None
    assert [(e.type, e.code) for e in events] == [("warning", "RUNTIME_GPU_MONITORING_FAILED")]


def test_sensor_lost_mid_run_warns_and_releases_a_pause():
    class Flaky:
        calls = 0

        def sample(self):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("GPU is lost")
            return ReplaySource([95]).sample()

    events, control = [], RunControl()
    mon = GpuMonitor(
        Flaky(), RunConfig(data="x", temp_emergency_c=99), events.append, control, interval_s=0.01
    )
    mon.start()
    time.sleep(0.2)
    mon.stop()
    assert [e.type for e in events] == ["gpu", "paused", "warning", "warning"]
    assert events[-1].code == "RUNTIME_GPU_MONITORING_FAILED" and not control.paused


@pytest.mark.parametrize("bad", [[]])
def test_replay_needs_readings(bad):
    with pytest.raises(ValueError):
        ReplaySource(bad)
