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


@dataclasses.dataclass(frozen=True)
class PeakFlops:
  per_device: float  # FLOP/s.
  total: float  # FLOP/s of all devices of the job, the denominator of MFU.
  source: str  # "table:<device kind>" or "probe:<cache path>".


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
  measured = _cached_probe(kind, dtype)
  if _platform() == "cpu":
    total = measured * jax.process_count()
    return PeakFlops(total / n_devices, total, f"probe:{cache_path()}")
  return PeakFlops(measured, measured * n_devices, f"probe:{cache_path()}")


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


def _cached_probe(kind: str, dtype: str) -> float:
  # The key holds what changes the answer: the chip, how many cores XLA may use, the compiler.
  key = f"{kind}|cpus={os.cpu_count()}|jax={jax.__version__}|{dtype}"
  path = cache_path()
  entry = _read(path).get(key)
  if entry and entry.get("flops", 0) > 0:
    return float(entry["flops"])
  flops = _measure(dtype)
  cache = _read(path)  # Re-read: another process may have added keys while we measured.
  cache[key] = {"flops": flops, "measured_at": time.time(), "matmul": _PROBE_N}
  atomic.write_json(path, cache, sort_keys=True)
  return flops


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
