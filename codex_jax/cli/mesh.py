"""`codex mesh --config=FILE[:VARIANT] [--device-kind KIND --devices N --hosts H] [--top N]`: layouts ranked.

Every valid (data, tensor, pipeline, FSDP, schedule, microbatches, remat) layout of the config on this
machine, or on a cluster you do not have, with predicted memory per device and step time, best first.
"""

from __future__ import annotations

from absl import flags

from codex_jax.cli import auto_layout, common  # noqa: F401  (common defines --config and --json)
from codex_jax.config import load as config_load
from codex_jax.parallel import layout_cost, placement, topology
from codex_jax.telemetry.flops import train_flops_per_token

flags.DEFINE_string("device-kind", None,
                    f"Plan for a hypothetical cluster of this kind: one of {list(topology.KINDS)}.")
# Also `codex config`'s flag (same meaning: a device count you may not have); whichever loads last wins.
flags.DEFINE_integer("devices", None, "Devices of the hypothetical cluster (default: this host's count).",
                     allow_override=True)
flags.DEFINE_integer("hosts", None, "Hosts of the hypothetical cluster (default: the kind's usual devices per host).")
flags.DEFINE_integer("top", 15, "Rows to print, best first (0: all).")

GB = 1e9


def run(flag_values):
  topo = _topology(flag_values)
  if flag_values.config is None:
    raise flags.ValidationError("--config is required, e.g. --config=experiments/codex.py:tiny")
  cfg = auto_layout.base_config(config_load.to_dict(flag_values.config))
  ranked = layout_cost.rank(cfg, topo)
  if not ranked:
    raise ValueError(f"no layout of this config is valid on {topo.describe()}: check train.global_batch and the "
                     "head / kv-head / MLP / vocab sizes against the device count")
  top = ranked if flag_values.top <= 0 else ranked[:flag_values.top]
  model_flops = train_flops_per_token(cfg.model, cfg.data.seq_len) * cfg.train.global_batch * cfg.data.seq_len
  rows = [{"rank": i + 1, **e.row(), "mfu": model_flops / (e.step_s * topo.peak_flops * topo.devices)}
          for i, e in enumerate(top)]
  result = {"topology": topo.describe(), "device_kind": topo.spec.name, "devices": topo.devices, "hosts": topo.hosts,
            "memory_per_device": topo.memory_per_device, "candidates": len(ranked), "layouts": rows,
            "best": ranked[0].layout.mesh_values() | {"remat": ranked[0].layout.remat},
            "placement": _placement(ranked[0].layout, topo)}
  if not flag_values.json:
    print(table(result, cfg))
  return result


def _topology(flag_values) -> topology.Topology:
  kind, devices, hosts = flag_values["device-kind"].value, flag_values.devices, flag_values.hosts
  if devices is not None and devices < 1:
    raise ValueError(f"--devices={devices}: must be a positive device count")
  if hosts is not None and hosts < 1:
    raise ValueError(f"--hosts={hosts}: must be a positive host count")
  if kind is None and devices is None and hosts is None:
    return topology.discover()
  if kind is None:
    import jax
    kind = jax.devices()[0].device_kind
  if devices is None:
    spec = topology.find_spec(kind)
    devices = (hosts or 1) * (spec.devices_per_host if spec else 1)
  return topology.hypothetical(kind, devices, hosts)


def _placement(layout: layout_cost.Layout, topo: topology.Topology) -> str:
  return placement.describe(layout.sizes(), topo.fast_domain, topo.spec.fast_spans)


def table(result: dict, cfg) -> str:
  """The ranked layouts as aligned text."""
  m = cfg.model
  lines = [f"{result['topology']}",
           f"model d{m.d_model} x {m.num_layers} layers, batch {cfg.train.global_batch} x {cfg.data.seq_len}; "
           f"{result['candidates']} valid layouts, best first (memory per device; step time predicted)", ""]
  head = (f"{'#':>3} {'data':>5} {'tens':>4} {'pipe':>4} {'fsdp':>4} {'schedule':>8} {'M':>3} {'R':>2} "
          f"{'remat':>5} {'param+opt':>9} {'activ':>7} {'total GB':>8} {'fits':>4} {'compute':>8} {'comm':>7} "
          f"{'bubble':>6} {'step s':>8} {'MFU':>5}  links t/p/d")
  lines += [head, "-" * len(head)]
  for r in result["layouts"]:
    pipe = r["pipeline"] > 1
    lines.append(
        f"{r['rank']:>3} {r['data']:>5} {r['tensor']:>4} {r['pipeline']:>4} {'yes' if r['fsdp'] else '-':>4} "
        f"{r['schedule'] if pipe else '-':>8} {r['microbatches'] if pipe else '-':>3} "
        f"{r['repeats'] if pipe else '-':>2} {r['remat'][:5]:>5} "
        f"{(r['params_bytes'] + r['optimizer_bytes']) / GB:>9.2f} {r['activation_bytes'] / GB:>7.2f} "
        f"{r['total_bytes'] / GB:>8.2f} {'yes' if r['fits'] else 'NO':>4} {_seconds(r['compute_s']):>8} "
        f"{_seconds(r['comm_s']):>7} {r['bubble']:>6.1%} {_seconds(r['predicted_step_s']):>8} {r['mfu']:>5.1%}  "
        + "/".join(r["links"][axis] if r[axis] > 1 else "-" for axis in ("tensor", "pipeline", "data")))
  lines += ["", f"placement of #1: {result['placement']}"]
  return "\n".join(lines)


def _seconds(s: float) -> str:
  return f"{s * 1e3:.1f}ms" if s < 1 else f"{s:.3g}s"
