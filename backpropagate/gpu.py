"""GPU telemetry through NVML (nvidia-ml-py), behind a small interface.

``TelemetrySource.sample()`` returns one :class:`GpuDevice` reading per device. ``NvmlSource``
reads the real cards; ``ReplaySource`` replays a recorded temperature trace through the same
interface, for machines without a GPU (tests) and for rehearsing the temperature guard.
``FakeSource`` is the testing switch ``BACKPROPAGATE_FAKE_GPUS=N``: N pretend devices, so the
scheduler's placement and multi-GPU launches can be exercised on a CPU machine; ``list_gpus``
(what the scheduler and ``backprop info`` see) uses it only when that variable is set.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.events import GpuDevice

_nvml_lock = threading.Lock()
_nvml_ready = False


class TelemetrySource(Protocol):
    def sample(self) -> list[GpuDevice]: ...


def _nvml() -> Any:
    """Import and initialise NVML once per process; raise RUNTIME_GPU_MONITORING_FAILED if unusable."""
    global _nvml_ready
    try:
        import pynvml
    except ImportError as exc:
        raise BackpropError(ErrorCode.RUNTIME_GPU_MONITORING_FAILED, f"nvidia-ml-py missing: {exc}") from exc
    with _nvml_lock:
        if not _nvml_ready:
            try:
                pynvml.nvmlInit()
            except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
                raise BackpropError(
                    ErrorCode.RUNTIME_GPU_MONITORING_FAILED, f"NVML could not start: {exc}"
                ) from exc
            _nvml_ready = True
    return pynvml


def _maybe(fn: Any, *args: Any) -> Any:
    """NVML answers NotSupported for some fields on some cards: report None instead of failing."""
    try:
        return fn(*args)
    except Exception:
        return None


_THROTTLE_NAMES = {
    "nvmlClocksThrottleReasonGpuIdle": "idle",
    "nvmlClocksThrottleReasonSwPowerCap": "sw_power_cap",
    "nvmlClocksThrottleReasonHwSlowdown": "hw_slowdown",
    "nvmlClocksThrottleReasonSwThermalSlowdown": "sw_thermal",
    "nvmlClocksThrottleReasonHwThermalSlowdown": "hw_thermal",
    "nvmlClocksThrottleReasonHwPowerBrakeSlowdown": "power_brake",
}


class NvmlSource:
    """Real readings from NVML for the given device indices (default: all visible)."""

    def __init__(self, indices: Sequence[int] | None = None) -> None:
        self.nvml = _nvml()
        count = self.nvml.nvmlDeviceGetCount()
        self.indices = list(indices) if indices is not None else list(range(count))
        self.handles = [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices]

    def sample(self) -> list[GpuDevice]:
        nv = self.nvml
        out = []
        for index, handle in zip(self.indices, self.handles, strict=True):
            mem = _maybe(nv.nvmlDeviceGetMemoryInfo, handle)
            util = _maybe(nv.nvmlDeviceGetUtilizationRates, handle)
            power = _maybe(nv.nvmlDeviceGetPowerUsage, handle)
            slowdown = _maybe(
                nv.nvmlDeviceGetTemperatureThreshold, handle, nv.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
            )
            reasons = _maybe(nv.nvmlDeviceGetCurrentClocksThrottleReasons, handle) or 0
            name = _maybe(nv.nvmlDeviceGetName, handle)
            out.append(
                GpuDevice(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else name,
                    temperature_c=_maybe(nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU),
                    memory_used_mb=mem.used / 2**20 if mem else None,
                    memory_total_mb=mem.total / 2**20 if mem else None,
                    utilization_pct=float(util.gpu) if util else None,
                    power_w=power / 1000 if power is not None else None,
                    slowdown_temp_c=slowdown,
                    throttle_reasons=[
                        label
                        for attr, label in _THROTTLE_NAMES.items()
                        if reasons & getattr(nv, attr, 0) and label != "idle"
                    ],
                )
            )
        return out


class ReplaySource:
    """Replays a trace of readings, one per ``sample()`` call; the last one repeats.

    A trace is a list of temperatures (one device) or of dicts with GpuDevice fields.
    """

    def __init__(self, trace: Sequence[float | dict[str, Any]], name: str = "Replayed GPU") -> None:
        if not trace:
            raise ValueError("a replay trace needs at least one reading")
        self.trace = list(trace)
        self.name = name
        self.position = 0

    @classmethod
    def from_file(cls, path: Path) -> ReplaySource:
        return cls(json.loads(Path(path).read_text()))

    def sample(self) -> list[GpuDevice]:
        reading = self.trace[min(self.position, len(self.trace) - 1)]
        self.position += 1
        fields = {"temperature_c": float(reading)} if isinstance(reading, (int, float)) else dict(reading)
        fields.setdefault("index", 0)
        fields.setdefault("name", self.name)
        return [GpuDevice(**fields)]


class FakeSource:
    """``count`` pretend GPUs with fixed, cool readings (testing only: nothing can run on them)."""

    def __init__(self, count: int) -> None:
        self.indices = list(range(count))

    def sample(self) -> list[GpuDevice]:
        return [
            GpuDevice(
                index=i,
                name=f"Fake GPU {i} (BACKPROPAGATE_FAKE_GPUS)",
                temperature_c=40.0,
                memory_used_mb=0.0,
                memory_total_mb=16384.0,
                utilization_pct=0.0,
            )
            for i in self.indices
        ]


def fake_gpu_count() -> int:
    """The testing switch ``BACKPROPAGATE_FAKE_GPUS`` (0, the default, means off)."""
    from backpropagate.settings import Settings

    return Settings().fake_gpus  # read afresh: tests set it per process


def inventory_source() -> TelemetrySource:
    """What the machine's GPUs are read from: the fake inventory when switched on, else NVML."""
    count = fake_gpu_count()
    return FakeSource(count) if count else NvmlSource()


def list_gpus() -> list[GpuDevice]:
    """One reading of every visible GPU, or [] when there is none or NVML is unusable."""
    try:
        return inventory_source().sample()
    except BackpropError:
        return []
    except Exception:
        return []
