"""Peak FLOP/s of the devices we run on, for MFU: a table of published peaks, else a cached probe."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from codex_jax import atomic
from codex_jax.cache import cache_dir

# Dense (no sparsity) peaks per device in FLOP/s: (device_kind substring, bf16, f32 or None = as bf16).
# First match wins, so more specific names come first ("tpu v5 lite" before "tpu v5", "h100 pcie"
# before "h100"). TPU f32: JAX's default matmul precision runs f32 dots as bf16 MXU passes, so the
# nominal peak is the bf16 one. NVIDIA f32: default precision uses TF32 tensor cores on Ampere and
# later, so the f32 column is the dense TF32 peak.
_TABLE: tuple[tuple[str, float, float | None], ...] = (
    ("tpu v6 lite", 918e12, None),  # v6e (Trillium).
    ("tpu v6e", 918e12, None),
    ("tpu v5 lite", 197e12, None),  # v5e.
    ("tpu v5e", 197e12, None),
    ("tpu v5p", 459e12, None),
    ("tpu v5", 459e12, None),  # v5p reports itself as plain "TPU v5".
    ("tpu v4", 275e12, None),
    ("h100 pcie", 756e12, 378e12),
    ("h100 nvl", 835e12, 418e12),
    ("h100", 989.4e12, 494.7e12),  # SXM: "NVIDIA H100 80GB HBM3".
    ("h200", 989.4e12, 494.7e12),  # Same die as H100 SXM; only memory differs.
    ("a100", 312e12, 156e12),  # SXM and PCIe share the tensor-core peak.
    ("b200", 2250e12, 1100e12),
)

_DTYPES = {"float32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "bfloat16", "f16": "bfloat16"}  # fp16 and bf16 tensor-core peaks are equal.

_PROBE_N = 2048
_PROBE_CALL_S = 0.2  # Target length of one timing; the probe takes about 7x this in all.
_PROBE_REPEATS = 5
_PROBE_TOLERANCE = 0.3  # How far a fresh probe may read from the cached one (`checked_peak`).


@dataclasses.dataclass(frozen=True)
class PeakFlops:
  per_device: float  # FLOP/s.
  total: float  # FLOP/s of all devices of the job, the denominator of MFU.
  source: str  # "table:<device kind>" or "probe:<cache path>".
  measured_at: float | None = None  # Unix time of the probe; None for a table peak.


def cache_path() -> str:
  root = cache_dir()
  return os.path.join(root, "peak_flops.json")


def table_peak(device_kind: str, dtype: str = "float32") -> float | None:
  """Published dense peak for a device kind (case-insensitive substring match), or None."""
  kind, dtype = device_kind.lower(), _normalize(dtype)
  for name, bf16, f32 in _TABLE:
    if name in kind:
      return f32 if dtype == "float32" and f32 is not None else bf16
  return None


def peak_flops(dtype: str = "float32") -> PeakFlops:
  """Peak FLOP/s per device and for the whole job, for matmuls in `dtype`.

  CPU: the probe runs on one device, and XLA's CPU matmuls use the host's whole thread pool, so it
  measures the host. Fake CPU devices (--xla_force_host_platform_device_count) share those cores, so
  the host peak is the job's total and each device gets an equal slice of it; multiplying the probe
  by the device count would overstate the peak that many times. Assumes one process per host.
  """
  dtype = _normalize(dtype)
  kind = _device_kind()
  n_devices = jax.device_count()
  peak = table_peak(kind, dtype)
  if peak is not None:
    return PeakFlops(peak, peak * n_devices, f"table:{kind}")
  measured, at = _cached_probe(kind, dtype)
  if _platform() == "cpu":
    total = measured * jax.process_count()
    return PeakFlops(total / n_devices, total, f"probe:{cache_path()}", at)
  return PeakFlops(measured, measured * n_devices, f"probe:{cache_path()}", at)


def checked_peak(dtype: str, model_flops_per_s: float) -> tuple[PeakFlops, float | None, str]:
  """(peak, MFU or None, note) for a measured rate, never an MFU above 1. A probed peak is checked against a
  fresh probe. A busy machine reads low, so the higher of the two is the peak: a cached probe more than 30%
  under the fresh one (measured while the machine was busy), or one giving an MFU above 1, is replaced; a
  fresh probe more than 30% under the cached one keeps the cache and says the machine is busy now (so are
  the timings). An MFU still above 1 is refused (None) with the reason in the note."""
  peak, note = peak_flops(dtype), ""
  if peak.measured_at is not None:
    kind, dtype = _device_kind(), _normalize(dtype)
    cached, fresh = _cached_probe(kind, dtype)[0], _measure(dtype)
    apart = abs(fresh / cached - 1.0)
    if fresh > cached * (1 + _PROBE_TOLERANCE) or mfu(model_flops_per_s, peak) > 1.0:
      _store(kind, dtype, fresh)
      stale, peak = peak.total, peak_flops(dtype)
      note = f"cached peak {stale:.3g} FLOP/s replaced by a fresh probe's {peak.total:.3g} ({100 * apart:.0f}% apart)"
    elif fresh < cached * (1 - _PROBE_TOLERANCE):
      note = (f"a fresh probe read {100 * apart:.0f}% under the cached peak: the machine is busy, so are these "
              "timings")
  value = mfu(model_flops_per_s, peak)
  if value > 1.0:
    return peak, None, (note + "; " if note else "") + (
        f"MFU {value:.2f} above 1 against {peak.source}: refused (the peak is wrong for this device)")
  return peak, value, note


def mfu(model_flops_per_s: float, peak: PeakFlops | float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the job's peak (`PeakFlops.total`)."""
  total = peak.total if isinstance(peak, PeakFlops) else float(peak)
  return float(model_flops_per_s) / total


def _normalize(dtype) -> str:
  name = dtype.lower() if isinstance(dtype, str) else jnp.dtype(dtype).name
  if name not in _DTYPES:
    raise ValueError(f"no peak for dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def _device_kind() -> str:
  return jax.devices()[0].device_kind


def _platform() -> str:
  return jax.devices()[0].platform


def _probe_key(kind: str, dtype: str) -> str:
  # What changes the answer: the chip, how many cores XLA may use, the compiler.
  return f"{kind}|cpus={os.cpu_count()}|jax={jax.__version__}|{dtype}"


def _cached_probe(kind: str, dtype: str) -> tuple[float, float]:
  """(FLOP/s, unix time measured) from the cache, or measured now and cached."""
  entry = _read(cache_path()).get(_probe_key(kind, dtype))
  if entry and entry.get("flops", 0) > 0:
    return float(entry["flops"]), float(entry.get("measured_at", 0.0))
  return _store(kind, dtype, _measure(dtype))


def _store(kind: str, dtype: str, flops: float) -> tuple[float, float]:
  now = time.time()
  cache = _read(cache_path())  # Re-read: another process may have added keys while we measured.
  cache[_probe_key(kind, dtype)] = {"flops": flops, "measured_at": now, "matmul": _PROBE_N}
  atomic.write_json(cache_path(), cache, sort_keys=True)
  return flops, now


def _measure(dtype: str) -> float:
  """Best-of-N FLOP/s of n x n matmuls on the first device."""
  n, device = _PROBE_N, jax.local_devices()[0]  # Not jax.devices()[0]: in process 1 of many it is remote.
  rng = np.random.default_rng(0)  # numpy: jax.random would spend a compilation on the inputs.
  x, w = (jax.device_put(jnp.asarray(rng.standard_normal((n, n), np.float32), dtype), device)
          for _ in range(2))
  # One matmul per call, `calls` dispatched back to back: async dispatch hides the per-call overhead
  # on fast devices. Best-of-N because shared hosts (VMs, CI) are often slowed by their neighbours.
  matmul = jax.jit(jnp.matmul)

  def timed(calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
      y = matmul(x, w)
    y.block_until_ready()
    return time.perf_counter() - start

  timed(1)  # Compile.
  first = timed(1)
  calls = max(1, round(_PROBE_CALL_S / max(first, 1e-6)))
  seconds = [first] if calls == 1 else []  # On CPU one matmul is a whole timing: reuse it.
  seconds += [timed(calls) / calls for _ in range(_PROBE_REPEATS - len(seconds))]
  return 2.0 * n**3 / min(seconds)


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}
