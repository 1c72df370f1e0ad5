"""The goodput clock: seconds by kind, per metrics row and for the whole run, and the summary line."""

import json
import time

import numpy as np
import pytest

from codex_jax.telemetry.goodput import KINDS, Goodput, summary_line


def test_each_row_gets_the_time_since_the_previous_row_and_the_run_its_totals():
  clock = Goodput(started=time.perf_counter() - 1.0)  # One second of start-up before the first step.
  clock.add("step", 2.0)
  clock.add("data", 0.5)
  with clock.timing("eval"):
    time.sleep(0.01)
  row = clock.scalars()
  assert row["time/step_s"] == 2.0 and row["time/data_s"] == 0.5 and row["time/eval_s"] >= 0.01
  assert set(row) == {f"time/{kind}_s" for kind in KINDS} | {"goodput"}
  assert clock.scalars()["time/step_s"] == 0.0  # The next row starts from zero ...
  summary = clock.summary()
  assert summary["time_s"]["step"] == 2.0  # ... the totals do not.
  # Added seconds that did not pass (2.5 s in ~1 s) leave no `other`; the wall-clock is the elapsed time.
  assert summary["time_s"]["other"] == 0.0 and summary["wall_s"] == pytest.approx(1.0, abs=0.1)


def test_goodput_is_the_share_of_wall_clock_spent_in_steps():
  clock = Goodput(started=time.perf_counter() - 10.0)
  clock.add("step", 8.0)
  clock.add("checkpoint", 1.0)
  summary = clock.summary()
  assert summary["goodput"] == pytest.approx(0.8, abs=0.01)
  assert summary["time_s"]["other"] == pytest.approx(1.0, abs=0.01)
  line = summary_line(summary)
  assert line.startswith("80.0% of 10 s: step 8.0 s") and "checkpoint 1.0 s" in line and "data" not in line


def test_the_summary_speed_is_the_median_row_not_the_last_one(tmp_path):
  """A row whose interval held an eval reads far below the training speed; the last row often is one."""
  from codex_jax.telemetry import peak
  from codex_jax.telemetry.progress import Progress
  from codex_jax.telemetry.writer import MetricsWriter
  from codex_jax.train.report import Reporter
  reporter = Reporter(MetricsWriter(str(tmp_path)), Progress(4, 0, 80, enabled=False), seq_len=10,
                      flops_per_token=1.0, xla_flops_per_row=None, peak_flops=peak.PeakFlops(1e9, 1e9, "table:x"),
                      log_every=100)
  metrics = {"loss": 1.0, "grad_norm": 1.0, "learning_rate": 1e-3}
  for step, pause in ((1, 0.01), (2, 0.01), (3, 0.01), (4, 0.3)):  # Step 4's interval holds a 0.3 s "eval".
    time.sleep(pause)
    reporter.step(step, metrics, None, None, rows=8)
  reporter.close()
  speeds = [json.loads(line)["tokens_per_s"] for line in open(tmp_path / "metrics.jsonl")]
  summary = reporter.summary()
  assert summary["tokens_per_s"] == pytest.approx(float(np.median(speeds)))
  assert summary["tokens_per_s"] > 5 * speeds[-1]
