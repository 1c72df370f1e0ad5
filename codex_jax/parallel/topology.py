"""The machine a layout is planned for: device kind, counts, hosts, memory and link bandwidths per device."""

from __future__ import annotations

import dataclasses
import os

GB = 1e9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """Published per-device figures of one device kind (bytes, bytes/s, FLOP/s)."""

  name: str
  platform: str  # tpu | gpu | cpu
  match: tuple[str, ...]  # Lower-case substrings of jax's device_kind that mean this kind.
  peak_flops: float  # Dense bf16 matmul peak (cpu: f32, the whole host).
  memory: float  # HBM per device.
  hbm_bw: float
  fast_bw: float  # ICI / NVLink: what one device moves per second in a ring collective (one direction).
  slow_bw: float  # DCN / InfiniBand: the same across hosts (GPU) or slices (TPU).
  devices_per_host: int
  fast_spans: str  # "slice": ICI joins every host of a TPU slice; "host": NVLink stops at the host.
  latency: float  # Seconds a collective costs whatever its size (launch and synchronisation).
  source: str


# TPU: Cloud TPU system-architecture pages (docs.cloud.google.com/tpu/docs/v4, v5e, v5p, v6e). Their
# "bidirectional ICI bandwidth per chip" is twice what a chip moves in an all-reduce; the pages'
# "all-reduce bandwidth per pod" / chips gives the one-direction figure we use (v5e 51.2 TB/s / 256 =
# 200 GB/s = 400 / 2). GPU: NVIDIA data sheets (A100 80GB SXM, H100 SXM, H200 SXM); NVLink is quoted
# bidirectional (600 / 900 GB/s), we use half; network is one ConnectX NIC per GPU as in DGX/HGX nodes
# (A100: HDR 200 Gb/s, H100/H200: NDR 400 Gb/s).
DEVICE_SPECS: tuple[DeviceSpec, ...] = (
    DeviceSpec("TPU v4", "tpu", ("tpu v4",), 275e12, 32 * GIB, 1200 * GB,
               fast_bw=1.1e15 / 4096,  # All-reduce bandwidth per pod 1.1 PB/s over 4096 chips.
               slow_bw=25e9 / 8,  # DCN per chip is not published for v4; assumed as v5e (25 Gb/s).
               devices_per_host=4, fast_spans="slice", latency=10e-6, source="cloud.google.com/tpu/docs/v4"),
    DeviceSpec("TPU v5e", "tpu", ("tpu v5 lite", "tpu v5e"), 197e12, 16 * GB, 819 * GB,
               fast_bw=400 * GB / 2, slow_bw=2 * 100e9 / 8 / 8,  # 2 x 100 Gb/s NICs per 8-chip host.
               devices_per_host=8, fast_spans="slice", latency=10e-6, source="cloud.google.com/tpu/docs/v5e"),
    DeviceSpec("TPU v5p", "tpu", ("tpu v5p", "tpu v5"), 459e12, 95 * GIB, 2765 * GB,
               fast_bw=1200 * GB / 2, slow_bw=50e9 / 8,  # DCN 50 Gb/s per chip.
               devices_per_host=4, fast_spans="slice", latency=10e-6, source="cloud.google.com/tpu/docs/v5p"),
    DeviceSpec("TPU v6e", "tpu", ("tpu v6 lite", "tpu v6e", "tpu v6"), 918e12, 32 * GB, 1638 * GB,
               fast_bw=800 * GB / 2,
               slow_bw=2 * 100e9 / 8 / 8,  # v6e's page gives no DCN figure; assumed as v5e's per chip.
               devices_per_host=8, fast_spans="slice", latency=10e-6, source="cloud.google.com/tpu/docs/v6e"),
    DeviceSpec("NVIDIA A100", "gpu", ("a100",), 312e12, 80 * GB, 2039 * GB,
               fast_bw=600 * GB / 2, slow_bw=200e9 / 8, devices_per_host=8, fast_spans="host", latency=15e-6,
               source="NVIDIA A100 data sheet (80GB SXM); DGX A100: 8 x HDR 200 Gb/s"),
    DeviceSpec("NVIDIA H100", "gpu", ("h100",), 989.4e12, 80 * GB, 3350 * GB,
               fast_bw=900 * GB / 2, slow_bw=400e9 / 8, devices_per_host=8, fast_spans="host", latency=15e-6,
               source="NVIDIA H100 data sheet (SXM); DGX H100: 8 x NDR 400 Gb/s"),
    DeviceSpec("NVIDIA H200", "gpu", ("h200",), 989.4e12, 141 * GB, 4800 * GB,
               fast_bw=900 * GB / 2, slow_bw=400e9 / 8, devices_per_host=8, fast_spans="host", latency=15e-6,
               source="NVIDIA H200 data sheet (SXM); HGX H200: 8 x NDR 400 Gb/s"),
    # This 2-core VM, not measured at run time: ~20 GB/s memory, ~230 GFLOP/s f32 (the matmul probe
    # of telemetry/peak.py on the whole host). Fake devices (--xla_force_host_platform_device_count)
    # share the host, so the "interconnect" between them is a memory copy, and the peak and the
    # bandwidths are the host's, divided among its devices by the topology.
    DeviceSpec("cpu", "cpu", ("cpu",), 230e9, 0.0, 20 * GB, fast_bw=20 * GB, slow_bw=20 * GB,
               devices_per_host=1, fast_spans="host", latency=50e-6,
               source="measured once on the 2-core dev VM"),
)
KINDS = tuple(spec.name for spec in DEVICE_SPECS)


@dataclasses.dataclass(frozen=True)
class Topology:
  """Devices a run has (or would have), how they are grouped, and the per-device budget of each."""

  spec: DeviceSpec
  devices: int
  hosts: int
  memory_per_device: float  # Bytes a device may allocate.
  memory_source: str  # "memory_stats" | "table" | "host RAM"
  slices: int = 1  # TPU multislice: ICI within a slice, DCN between slices.
  hypothetical: bool = False
  shared_host: bool = False  # CPU: devices are threads of one host and share its FLOPs and bandwidth.

  @property
  def devices_per_host(self) -> int:
    return self.devices // self.hosts

  @property
  def fast_domain(self) -> int:
    """Devices joined by the fast link: a whole TPU slice, one GPU host."""
    return self.devices // self.slices if self.spec.fast_spans == "slice" else self.devices_per_host

  @property
  def peak_flops(self) -> float:
    """Per device; fake CPU devices split the host's peak."""
    return self.spec.peak_flops / (self.devices_per_host if self.shared_host else 1)

  def bandwidth(self, link: str) -> float:
    """Bytes/s per device over "hbm", "fast" or "slow"; shared-host devices split the host's memory bus."""
    bw = {"hbm": self.spec.hbm_bw, "fast": self.spec.fast_bw, "slow": self.spec.slow_bw}[link]
    return bw / (self.devices_per_host if self.shared_host else 1)

  def describe(self) -> str:
    what = "hypothetical " if self.hypothetical else ""
    slices = f" in {self.slices} slices" if self.slices > 1 else ""
    return (f"{what}{self.devices} x {self.spec.name} on {self.hosts} host(s){slices}, "
            f"{self.memory_per_device / GB:.1f} GB per device ({self.memory_source}), "
            f"fast link across {self.fast_domain} device(s)")


def find_spec(device_kind: str) -> DeviceSpec | None:
  """The table row whose name or jax device_kind substring matches (case-insensitive), or None."""
  kind = device_kind.strip().lower()
  for spec in DEVICE_SPECS:
    if kind == spec.name.lower():
      return spec
  for spec in DEVICE_SPECS:
    if any(m in kind for m in spec.match):
      return spec
  return None


def discover(devices: list | None = None) -> Topology:
  """The topology of this JAX job: kind, device and process counts, memory per device."""
  import jax

  devices = list(jax.devices()) if devices is None else list(devices)
  first = devices[0]
  spec = find_spec(first.device_kind) or find_spec(first.platform)
  if spec is None:  # An accelerator not in the table: plan with the CPU row's shape, flagged in the name.
    spec = dataclasses.replace(find_spec("cpu"), name=f"{first.device_kind} (unknown: cpu figures)")
  hosts = len({d.process_index for d in devices})
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  memory, source = _device_memory(first)
  if memory is None and spec.memory > 0:
    memory, source = spec.memory, "table"
  if memory is None:
    memory, source = _host_ram() * hosts / len(devices), "host RAM"
  shared = first.platform == "cpu"
  return Topology(spec, len(devices), hosts, memory, source, slices=slices, shared_host=shared)


def hypothetical(device_kind: str, devices: int, hosts: int | None = None) -> Topology:
  """A cluster you do not have: `devices` of `device_kind` on `hosts` hosts (default: the kind's usual)."""
  spec = find_spec(device_kind)
  if spec is None:
    raise ValueError(f"--device-kind={device_kind!r}: unknown device kind; expected one of {list(KINDS)}")
  if devices < 1:
    raise ValueError(f"--devices={devices}: must be a positive device count")
  if hosts is None:
    hosts = max(1, devices // spec.devices_per_host) if spec.platform != "cpu" else 1
  if hosts < 1 or devices % hosts:
    raise ValueError(f"--hosts={hosts}: must be positive and divide --devices={devices}")
  if spec.memory > 0:
    memory, source = spec.memory, "table"
  else:
    memory, source = _host_ram() / devices * hosts, "host RAM"
  return Topology(spec, devices, hosts, memory, source, hypothetical=True, shared_host=spec.platform == "cpu")


def _device_memory(device) -> tuple[float | None, str]:
  try:
    stats = device.memory_stats()
  except Exception:  # CPU and some backends do not implement it.
    return None, ""
  limit = (stats or {}).get("bytes_limit")
  return (float(limit), "memory_stats") if limit else (None, "")


def _host_ram() -> float:
  try:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  except (ValueError, OSError, AttributeError):
    return 16 * GB
