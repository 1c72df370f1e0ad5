"""`codex scaling fit RUNS...` (planning/fit.py), `sweep DIR` (planning/sweep.py), `exchange-rate DIR` (planning/exchange_rate.py)."""

from __future__ import annotations

import json
import os
import time

from absl import flags

from codex_jax import atomic
from codex_jax.cli import common  # noqa: F401  (--config, --json)

USAGE = ("codex scaling fit RUNS... [--fit-out=FIT.json] [--plot=FIT.png] [--bootstrap=100] [--confidence=0.95]\n"
         "       codex scaling sweep DIR [--budgets=1e12,2e12] [--sizes-per-budget=5] [--params-range=2e4,5e5] "
         "[--sweep-vocab=512] [--config=experiments/codex.py:tiny]\n"
         "       codex scaling exchange-rate DIR [--modality=image] [--fraction=0.25] [--config=...]")
flags.DEFINE_string("fit-out", "FIT.json", "fit: where to write the constants and intervals.")
flags.DEFINE_string("plot", None, "fit: PNG of the fitted law against the points (default: FIT.json's name, .png).")
flags.DEFINE_integer("bootstrap", 100, "fit: bootstrap resamples for the confidence intervals.")
flags.DEFINE_float("confidence", 0.95, "fit: confidence level of the intervals.")
flags.DEFINE_integer("seed", 0, "fit: bootstrap seed.")
# Default budgets: 10 runs, about 35 minutes on an idle 2-core CPU; at both, 20k parameters is under-sized
# and 470k over-sized (docs/planning.md, "Planning: the method"). At 3e11 the smallest size is already at the minimum.
flags.DEFINE_list("budgets", ["1e12", "2e12"], "sweep: training FLOP budgets (C = 6 N D).")
DEFAULT_CONFIG = "experiments/codex.py:tiny"
flags.DEFINE_string("modality", "image", "exchange-rate: the modality whose rate is measured.")
flags.DEFINE_float("fraction", 0.25, "exchange-rate: share of effective tokens moved from text to the modality.")
flags.DEFINE_integer("sizes-per-budget", 5, "sweep: model sizes trained per budget.")
flags.DEFINE_list("params-range", ["2e4", "5e5"], "sweep: smallest and largest parameter count (embeddings included).")
# A sweep-local vocabulary (a tokenizer of that size is trained once and cached): at the tiny config's 4,096
# the embedding tables were 55-89% of the sweep's models (planning/sweep.py).
flags.DEFINE_integer("sweep-vocab", 512, "sweep: vocabulary size of every run; 0: --config's.")


def run(flag_values, args: list[str]):
  if args[:1] == ["fit"] and len(args) >= 2:
    return _fit(flag_values, args[1:], flag_values["fit-out"].value)
  if args[:1] == ["sweep"] and len(args) == 2:
    return _sweep(flag_values, args[1])
  if args[:1] == ["exchange-rate"] and len(args) == 2:
    return _exchange_rate(flag_values, args[1])
  raise flags.ValidationError(f"expected `{USAGE}`, got `codex scaling {' '.join(args)}`")


def _fit(flag_values, paths: list[str], out: str):
  from codex_jax.planning import fit
  if not 0 < flag_values.confidence < 1:
    raise flags.ValidationError(f"--confidence={flag_values.confidence}: must be between 0 and 1")
  points = fit.read_runs(paths)
  result = fit.fit(points, bootstrap=flag_values.bootstrap, confidence=flag_values.confidence,
                   seed=flag_values.seed)
  result["runs"] = paths
  atomic.write_json(out, result)
  result["fit"] = out
  result["plot"] = fit.plot(points, result, flag_values.plot or out.rsplit(".", 1)[0] + ".png")
  if not flag_values.json:
    for k, v in result["constants"].items():
      lo, hi = result["intervals"].get(k, [float("nan")] * 2)
      print(f"{k:6s} {v:10.4g}   {result['confidence']:.0%} CI [{lo:.4g}, {hi:.4g}]")
    if result["unidentified"]:
      print(f"warning: {', '.join(result['unidentified'])}: their term is under 0.1% of the loss at every point, so "
            f"the points do not determine them (did each budget's sizes bracket its loss minimum?)")
    print(f"{result['points']} points, {result['bootstrap']} bootstrap fits; wrote {out} and {result['plot']}")
  return result


def _floats(flag_values, name: str) -> list[float]:
  try:
    values = [float(v) for v in flag_values[name].value]
  except ValueError as e:
    raise flags.ValidationError(f"--{name}={','.join(flag_values[name].value)}: {e}") from e
  if not values or any(not v > 0 for v in values):
    raise flags.ValidationError(f"--{name}: positive numbers are required, got {values}")
  return values


def _base(flag_values) -> dict:
  from codex_jax.config import load as config_load
  if flag_values.config is None:
    flag_values["config"].parse(DEFAULT_CONFIG)
  return config_load.to_dict(flag_values.config)


def _config(base: dict, overrides: dict):
  """(typed Config, plain dict) of the base experiment with 'group.key' overrides."""
  import jax

  from codex_jax.config import load as config_load
  as_dict = json.loads(json.dumps(base))
  for dotted, value in overrides.items():
    group, key = dotted.split(".")
    as_dict[group][key] = value
  return config_load.load(as_dict, num_devices=jax.device_count()), as_dict


def _train(base: dict, overrides: dict, workdir: str) -> dict:
  from codex_jax.train.loop import train
  start = time.time()
  summary = train(*_config(base, overrides), workdir, progress=False)
  return {**summary, "wall_s": time.time() - start}


def _sweep(flag_values, out: str):

  from codex_jax.planning import sweep
  budgets, params_range = _floats(flag_values, "budgets"), _floats(flag_values, "params-range")
  sizes = flag_values["sizes-per-budget"].value
  if len(params_range) != 2 or params_range[0] > params_range[1] or sizes < 1:
    raise flags.ValidationError("--params-range needs two counts, smallest first, and --sizes-per-budget >= 1")
  base = _base(flag_values)
  vocab = flag_values["sweep-vocab"].value or base["model"]["vocab_size"]
  os.makedirs(out, exist_ok=True)
  manifest = sweep.one_phase_manifest(base["data"]["manifest"], os.path.join(out, "manifest.yaml"))
  tokens_per_step = base["train"]["global_batch"] * base["data"]["seq_len"]
  runs = sweep.plan_runs(budgets, sizes, tuple(params_range), vocab, tokens_per_step)
  if not runs:
    raise flags.ValidationError(f"--budgets={budgets}: every planned run has under {sweep.MIN_STEPS} steps")
  start = time.time()
  records = sweep.sweep(out, runs, lambda run, workdir: _train(base, sweep.run_overrides(run, manifest), workdir),
                        log=(lambda s: None) if flag_values.json else print)
  result = {"runs": records, "runs_file": os.path.join(out, "RUNS.jsonl"), "sweep_wall_s": time.time() - start}
  if len(records) >= 5:
    result["fit"] = _fit(flag_values, [result["runs_file"]], os.path.join(out, "FIT.json"))
  return result


def _exchange_rate(flag_values, out: str):
  from codex_jax.planning import exchange_rate
  fraction, modality = flag_values.fraction, flag_values.modality
  if not 0 < fraction < 1:
    raise flags.ValidationError(f"--fraction={fraction}: the share traded must be between 0 and 1")
  base = _base(flag_values)
  result = exchange_rate.measure(out, base["data"]["manifest"], modality, fraction, base["train"]["steps"],
                                 lambda workdir, overrides: _train(base, overrides, workdir),
                                 lambda workdir, manifest: _heldout(base, workdir, manifest),
                                 log=(lambda s: None) if flag_values.json else print)
  if not flag_values.json:
    print(f"{modality}: measured exchange rate {result['rate']:.3f} language tokens per position "
          f"(the manifest says {_manifest_rate(base['data']['manifest'], modality)}); wrote {out}/EXCHANGE_RATE.json")
  return result


def _manifest_rate(path: str, modality: str) -> float | None:
  from codex_jax.data.manifest import load_manifest
  sources = [s for s in load_manifest(path).sources if modality in s.modalities]
  return sources[0].exchange_rates[modality] if sources else None


def _heldout(base: dict, workdir: str, manifest: str) -> float:
  """Held-out loss of the run in `workdir` (its last checkpoint, read only) on `manifest`'s eval split."""
  import jax

  from codex_jax.checkpoint.manager import Checkpointer
  from codex_jax.data.tokenizer import pinned_path
  from codex_jax.parallel.mesh import build_mesh
  from codex_jax.runtime import feed
  from codex_jax.runtime.engine import build_engine
  from codex_jax.runtime.forward import jit_heldout_sums
  from codex_jax.runtime.inputs import RunInputs
  cfg, _ = _config(base, {"data.manifest": manifest, "data.tokenizer_path": pinned_path(workdir)})
  engine = build_engine(cfg, build_mesh(cfg.mesh))
  heldout_sums = jit_heldout_sums(engine)
  checkpointer = Checkpointer(workdir, cfg.checkpoint)
  try:
    step = checkpointer.latest_step()
    params = checkpointer.restore_params(step, engine.abstract_params(), meta=checkpointer.read_meta(step))
  finally:
    checkpointer.close()
  inputs = RunInputs.create(cfg, workdir, is_main=False)
  batches, ce_sum, tokens = inputs.eval_iterator(step), 0.0, 0.0
  try:
    for _, batch in zip(range(max(cfg.eval.batches, 1)), batches, strict=False):
      out = jax.device_get(heldout_sums(params, feed.to_global(batch, engine.data_sharding)))
      ce_sum, tokens = ce_sum + float(out["ce_sum"]), tokens + float(out["tokens"])
  finally:
    batches.close()
    inputs.close()
  return ce_sum / tokens if tokens else float("nan")
