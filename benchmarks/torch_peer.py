"""The PyTorch peer of `codex bench --config=experiments/codex.py:bench`: the same Llama-style decoder (RMSNorm,
RoPE, causal attention, SwiGLU, untied output projection, AdamW) at the same shape and dtype, eager and
torch.compile'd, timed the way `codex bench` times (median step after warm-up). One JSON line per mode.

  python benchmarks/torch_peer.py [--steps 5] [--modes eager,compile]

Only `make bench-peers` runs it; PyTorch is a test/peer dependency, never a training one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

# experiments/codex.py:_bench.
VOCAB, D, LAYERS, HEADS, MLP, SEQ, BATCH = 32000, 512, 8, 8, 2048, 512, 8
LR, WEIGHT_DECAY, Z_LOSS = 3e-3, 0.1, 1e-4


class RMSNorm(nn.Module):
  def __init__(self, d: int, eps: float = 1e-6):
    super().__init__()
    self.scale, self.eps = nn.Parameter(torch.ones(d)), eps

  def forward(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


def rope(x, positions, theta: float = 10000.0):
  half = x.shape[-1] // 2
  freqs = theta ** (-torch.arange(half, dtype=torch.float32) / half)
  angles = positions[:, None].float() * freqs[None]
  cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
  def __init__(self):
    super().__init__()
    self.attention_norm, self.mlp_norm = RMSNorm(D), RMSNorm(D)
    self.qkv = nn.Linear(D, 3 * D, bias=False)
    self.o = nn.Linear(D, D, bias=False)
    self.gate_up = nn.Linear(D, 2 * MLP, bias=False)
    self.down = nn.Linear(MLP, D, bias=False)

  def forward(self, x, positions):
    B, L, _ = x.shape
    q, k, v = self.qkv(self.attention_norm(x)).view(B, L, 3, HEADS, D // HEADS).unbind(2)
    q, k = rope(q, positions), rope(k, positions)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    x = x + self.o(y.transpose(1, 2).reshape(B, L, D))
    gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
    return x + self.down(F.silu(gate) * up)


class Decoder(nn.Module):
  def __init__(self):
    super().__init__()
    self.embedding = nn.Embedding(VOCAB, D)
    self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
    self.final_norm = RMSNorm(D)
    self.unembed = nn.Linear(D, VOCAB, bias=False)

  def forward(self, tokens, targets):
    positions = torch.arange(tokens.shape[1])
    x = self.embedding(tokens)
    for block in self.blocks:
      x = block(x, positions)
    logits = self.unembed(self.final_norm(x)).float()
    lse = torch.logsumexp(logits, dim=-1)
    return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1)) + Z_LOSS * lse.pow(2).mean()


def run(mode: str, steps: int) -> dict:
  torch.manual_seed(0)
  model = Decoder()
  optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

  def step(tokens, targets):
    loss = model(tokens, targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  fn = torch.compile(step) if mode == "compile" else step
  tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
  targets = torch.roll(tokens, -1, dims=1)
  fn(tokens, targets)  # Warm-up (and compile).
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn(tokens, targets).item()
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  params = sum(p.numel() for p in model.parameters())
  return {"config": f"torch-{mode}", "torch": torch.__version__, "threads": torch.get_num_threads(),
          "params": params, "step_s": step_s, "tokens_per_s": BATCH * SEQ / step_s}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--modes", default="eager,compile")
  args = parser.parse_args()
  for mode in args.modes.split(","):
    print(json.dumps(run(mode, args.steps)), flush=True)


if __name__ == "__main__":
  main()
