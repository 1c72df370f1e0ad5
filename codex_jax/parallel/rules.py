"""The one table that maps logical axis names (used by model code) to mesh axes."""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax

# Logical names. Parameters: vocab, embed, heads, kv_heads, head_dim, mlp, norm, layers, features,
# modalities, head_hidden, align (objective heads), stage (a pipeline stage's slice of the stacked layers).
# Activations get their own names (act_*) so that FSDP, which shards the parameters' `embed`
# over `data`, never shards an activation's feature dimension over the axis its batch is on.
MESH_AXES = ("data", "tensor", "pipeline")


def logical_axis_rules(fsdp: bool, sequence_parallel: bool = False) -> tuple[tuple[str, str | None], ...]:
  """Rules for flax's logical partitioning: (logical name, mesh axis or None=replicated)."""
  return (
      # Parameters: Megatron-style over `tensor` (columns of q/k/v/gate/up, rows of o/down) ...
      ("vocab", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("mlp", "tensor"),
      # ... and ZeRO-3 over `data` when FSDP is on: each layer's weights are gathered when used.
      ("embed", "data" if fsdp else None),
      ("head_dim", None),
      ("norm", None),
      # The stacked layers split into contiguous pipeline stages (a no-op when the axis has size 1).
      ("layers", "pipeline"),
      ("stage", "pipeline"),
      ("features", None),  # Input width of non-text positions (patch / audio / proprio / action values).
      ("modalities", None),
      # Objective heads (model/heads.py): small, replicated.
      ("head_hidden", None),
      ("align", None),
      # Activations: the batch over `data`, features over `tensor` where the math splits there.
      ("act_batch", "data"),
      ("act_length", None),
      # The residual stream between blocks: with sequence parallelism its length is split over
      # `tensor` (Megatron-SP: all-gather before the column-parallel matmuls, reduce-scatter after).
      ("act_seq", "tensor" if sequence_parallel else None),
      ("act_stage", "pipeline"),
      ("act_embed", None),
      ("act_heads", "tensor"),
      ("act_kv_heads", "tensor"),
      ("act_mlp", "tensor"),
      ("act_vocab", "tensor"),
  )


@contextlib.contextmanager
def sharding_scope(mesh: jax.sharding.Mesh, rules):
  """Mesh and logical rules in scope while a step is traced, so the model's constraints apply."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield
