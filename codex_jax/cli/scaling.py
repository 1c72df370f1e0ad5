"""`codex scaling fit RUNS... [--fit-out FIT.json] [--plot PNG]`: fit the loss law to runs (see planning/fit.py)."""

from __future__ import annotations

import json

from absl import flags

from codex_jax.cli import common  # noqa: F401  (--json)

USAGE = "codex scaling fit RUNS... [--fit-out=FIT.json] [--plot=FIT.png] [--bootstrap=100] [--confidence=0.95]"
flags.DEFINE_string("fit-out", "FIT.json", "fit: where to write the constants and intervals.")
flags.DEFINE_string("plot", None, "fit: PNG of the fitted law against the points (default: FIT.json's name, .png).")
flags.DEFINE_integer("bootstrap", 100, "fit: bootstrap resamples for the confidence intervals.")
flags.DEFINE_float("confidence", 0.95, "fit: confidence level of the intervals.")
flags.DEFINE_integer("seed", 0, "fit: bootstrap seed.")


def run(flag_values, args: list[str]):
  if args[:1] != ["fit"] or len(args) < 2:
    raise flags.ValidationError(f"expected `{USAGE}`, got `codex scaling {' '.join(args)}`")
  from codex_jax.planning import fit
  if not 0 < flag_values.confidence < 1:
    raise flags.ValidationError(f"--confidence={flag_values.confidence}: must be between 0 and 1")
  points = fit.read_runs(args[1:])
  result = fit.fit(points, bootstrap=flag_values.bootstrap, confidence=flag_values.confidence,
                   seed=flag_values.seed)
  out = flag_values["fit-out"].value
  result["runs"] = args[1:]
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  result["fit"] = out
  result["plot"] = fit.plot(points, result, flag_values.plot or out.rsplit(".", 1)[0] + ".png")
  if not flag_values.json:
    for k, v in result["constants"].items():
      lo, hi = result["intervals"].get(k, [float("nan")] * 2)
      print(f"{k:6s} {v:10.4g}   {result['confidence']:.0%} CI [{lo:.4g}, {hi:.4g}]")
    print(f"{result['points']} points, {result['bootstrap']} bootstrap fits; wrote {out} and {result['plot']}")
  return result
