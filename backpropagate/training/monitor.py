"""GPU monitor: samples telemetry into `gpu` events and guards the card's temperature.

Runs as a daemon thread beside the training loop. It never touches the model: it steers the
loop through :class:`RunControl` (pause / resume / stop), which the loop checks between steps,
so a step is always finished before the loop waits. Thresholds come from RunConfig:

    temp >= temp_warn_c       one `warning` per excursion (re-armed 5 °C below)
    temp >= temp_pause_c      `paused` (RUNTIME_GPU_TEMPERATURE_CRITICAL); loop waits
    temp <  temp_resume_c     `resumed` (hysteresis: resume is lower than pause)
    temp >= temp_emergency_c  `error` then stop: the loop checkpoints and ends the run
      or within 3 °C of the card's own slowdown temperature
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from backpropagate.config import RunConfig
from backpropagate.errors import CATALOG, BackpropError, ErrorCode
from backpropagate.events import Error, EventBase, Gpu, GpuDevice, Paused, Resumed, Warning_
from backpropagate.gpu import NvmlSource, ReplaySource, TelemetrySource
from backpropagate.logs import get_logger
from backpropagate.training.control import RunControl

# Replays a JSON temperature trace instead of NVML: rehearses the guard on machines without a GPU.
TRACE_ENV = "BACKPROPAGATE_GPU_TRACE"
SLOWDOWN_MARGIN_C = 3.0
WARN_REARM_C = 5.0

log = get_logger(__name__)
Emit = Callable[[EventBase], None]


class GpuMonitor:
    def __init__(
        self,
        source: TelemetrySource,
        config: RunConfig,
        emit: Emit,
        control: RunControl,
        interval_s: float | None = None,
    ) -> None:
        self.source = source
        self.config = config
        self.emit = emit
        self.control = control
        self.interval_s = interval_s if interval_s is not None else config.telemetry_interval_s
        self.current_step: int | None = None  # set by the loop; reported with pauses
        self.last_sample: list[GpuDevice] = []
        self._warned = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)

    def start(self) -> GpuMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                devices = self.source.sample()
            except Exception as exc:  # NVML can fail mid-run (driver reset, card lost)
                self._report_failure(exc)
                return
            self.last_sample = devices
            self.emit(Gpu(devices=devices))
            self.check(devices)
            self._stopped.wait(self.interval_s)

    def _report_failure(self, exc: Exception) -> None:
        spec = CATALOG[ErrorCode.RUNTIME_GPU_MONITORING_FAILED]
        self.emit(
            Warning_(
                code=ErrorCode.RUNTIME_GPU_MONITORING_FAILED, message=f"{spec.title} ({exc})", hint=spec.hint
            )
        )
        if self.control.pause_reason == "temperature":
            self.control.resume()  # never leave a run waiting on a sensor that is gone

    def check(self, devices: list[GpuDevice]) -> None:
        """Apply the thresholds to one sample (the hottest device decides)."""
        readings = [d for d in devices if d.temperature_c is not None]
        if not readings:
            return
        hottest = max(readings, key=lambda d: d.temperature_c or 0.0)
        temp = float(hottest.temperature_c or 0.0)
        cfg = self.config
        code = ErrorCode.RUNTIME_GPU_TEMPERATURE_CRITICAL

        emergency_at = cfg.temp_emergency_c
        if hottest.slowdown_temp_c:
            emergency_at = min(emergency_at, hottest.slowdown_temp_c - SLOWDOWN_MARGIN_C)
        if temp >= emergency_at and not self.control.stop_requested:
            message = f"GPU {hottest.index} at {temp:.0f} °C (limit {emergency_at:.0f} °C): checkpointing and stopping"
            log.error(message)
            self.emit(Error(code=code, message=message, hint=CATALOG[code].hint, retryable=True))
            self.control.request_stop("temperature")
            return

        if temp >= cfg.temp_pause_c and not self.control.paused:
            self.control.pause("temperature")
            self.emit(Paused(reason="temperature", step=self.current_step, temperature_c=temp, code=code))
        elif self.control.pause_reason == "temperature" and temp < cfg.temp_resume_c:
            self.control.resume()
            self.emit(Resumed(reason="temperature", step=self.current_step, temperature_c=temp))

        if temp >= cfg.temp_warn_c and not self._warned:
            self._warned = True
            self.emit(
                Warning_(
                    code=code,
                    message=f"GPU {hottest.index} is at {temp:.0f} °C (warning threshold {cfg.temp_warn_c:.0f} °C)",
                    hint=CATALOG[code].hint,
                )
            )
        elif temp < cfg.temp_warn_c - WARN_REARM_C:
            self._warned = False


def _visible_indices() -> list[int] | None:
    """NVML numbers every card; CUDA_VISIBLE_DEVICES names the ones this run owns."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return None
    try:
        return [int(part) for part in visible.split(",") if part.strip()]
    except ValueError:  # UUIDs: monitor all cards rather than guess
        return None


def start_monitor(
    config: RunConfig, emit: Emit, control: RunControl, source: TelemetrySource | None = None
) -> GpuMonitor | None:
    """Start monitoring when there is something to monitor; None on CPU runs.

    A missing or broken NVML gives one RUNTIME_GPU_MONITORING_FAILED warning and training goes on.
    """
    if source is None:
        trace = os.environ.get(TRACE_ENV)
        if trace:
            source = ReplaySource.from_file(Path(trace))
        elif config.device == "cpu" or config.gpus == 0 or not _cuda_available():
            return None
        else:
            try:
                source = NvmlSource(_visible_indices())
            except BackpropError as err:
                emit(Warning_(code=err.code, message=err.message, hint=err.hint))
                return None
    return GpuMonitor(source, config, emit, control).start()


def _cuda_available() -> bool:
    import torch  # the worker has it loaded already

    return torch.cuda.is_available()
