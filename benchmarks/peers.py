"""`make bench-peers`: codex-jax's `bench` step beside its PyTorch peer (benchmarks/torch_peer.py), in one run on
one machine, and the ratios. One JSON line each, then {"config": "ratio", ...}.

  python benchmarks/peers.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(command: list[str], env: dict) -> list[dict]:
  out = subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
  return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  codex = _lines([sys.executable, "-m", "codex_jax", "bench", "--config=experiments/codex.py:bench", "--name=bench",
                  f"--steps={args.steps}", "--json"], env)[-1]
  print(json.dumps(codex), flush=True)
  peers = {}
  for line in _lines([sys.executable, "benchmarks/torch_peer.py", f"--steps={args.steps}"], env):
    print(json.dumps(line), flush=True)
    peers[line["config"]] = line["tokens_per_s"]
  print(json.dumps({"config": "ratio", "codex_tokens_per_s": codex["tokens_per_s"],
                    **{f"codex_over_{name.replace('-', '_')}": codex["tokens_per_s"] / tps for name, tps in peers.items()}}))


if __name__ == "__main__":
  main()
