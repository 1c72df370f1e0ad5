"""Log-likelihood scoring of (context, continuation) pairs, packed into model rows; task metrics from it.

Each request is one packed segment: [media positions] [context tokens] [continuation tokens]; only the
continuation's targets are scored. Per position the device returns log p(target) and whether the target
is the argmax; the host sums them per request. Metrics per task (means over examples):

  acc       multiple choice: the gold choice has the highest log-likelihood; cloze: every continuation
            token is the greedy prediction (LAMBADA-style exact match)
  acc_norm  multiple choice: highest log-likelihood per byte of the choice
  prob      multiple choice: p(gold) normalised over the choices, exp(ll_gold) / sum exp(ll_i);
            cloze: exp(ll), the probability of the continuation
  bpb       bits per UTF-8 byte of the gold continuation: -ll_gold / (ln 2 * bytes)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from codex_jax.data.records import MODALITY_IDS
from codex_jax.eval.tasks import Task, TaskError

TEXT = MODALITY_IDS["text"]
METRICS = ("acc", "acc_norm", "prob", "bpb")


@dataclasses.dataclass(frozen=True)
class Request:
  context: np.ndarray        # int32 token ids (at least one).
  continuation: np.ndarray   # int32 token ids (at least one).
  media: np.ndarray | None = None  # float32 [n, F] feature positions before the context.
  media_modality: int = 0


def split_tokens(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
  """Context and continuation ids as the whole string tokenizes (a merge across the seam stays whole)."""
  ctx, whole = encode(context), encode(context + continuation)
  if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
    return ctx, whole[len(ctx):]
  return ctx, encode(continuation)


def task_requests(task: Task, encode, media_fn=None) -> list[list[Request]]:
  """Per example, one request per choice (cloze: one)."""
  out = []
  for example in task.examples:
    media = None if example.image is None else media_fn(example.image)
    requests = []
    for choice in example.choices:
      ctx, cont = split_tokens(encode, example.context, choice)
      requests.append(Request(np.asarray(ctx, np.int32), np.asarray(cont, np.int32), media,
                              MODALITY_IDS["image"] if media is not None else 0))
    out.append(requests)
  return out


def pack(requests: list[Request], rows: int, seq_len: int, feature_dim: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches of `rows` x `seq_len` (the training batch format plus `request`: its index, -1 elsewhere).

  Requests go first-fit in order; a context longer than a row is cut from the left.
  """
  def empty():
    batch = {name: np.zeros((rows, seq_len), np.int32) for name in ("inputs", "targets", "segment_ids", "positions",
                                                                    "modality_ids")}
    batch["loss_mask"] = np.zeros((rows, seq_len), np.float32)
    batch["features"] = np.zeros((rows, seq_len, feature_dim), np.float32)
    batch["request"] = np.full((rows, seq_len), -1, np.int32)
    return batch, [0] * rows, [0] * rows

  batch, used, segments = empty()
  for index, r in enumerate(requests):
    n_media = 0 if r.media is None else len(r.media)
    room = seq_len - n_media - len(r.continuation) + 1
    if room < 1:
      raise ValueError(f"request {index}: {n_media} media positions and a {len(r.continuation)}-token continuation "
                       f"do not fit data.seq_len={seq_len}")
    context = r.context[-room:]
    tokens = np.concatenate([context, r.continuation])
    n = n_media + len(tokens) - 1  # The last token is only a target.
    row = next((i for i in range(rows) if used[i] + n <= seq_len), None)
    if row is None:
      yield batch
      batch, used, segments = empty()
      row = 0
    s, segments[row] = used[row], segments[row] + 1
    inputs = np.concatenate([np.zeros(n_media, np.int32), tokens[:-1]])
    targets = np.concatenate([np.zeros(max(n_media - 1, 0), np.int32), tokens])[-n:] if n_media else tokens[1:]
    batch["inputs"][row, s:s + n] = inputs
    batch["targets"][row, s:s + n] = targets
    batch["segment_ids"][row, s:s + n] = segments[row]
    batch["positions"][row, s:s + n] = np.arange(n)
    batch["modality_ids"][row, s:s + n] = TEXT
    if n_media:
      batch["modality_ids"][row, s:s + n_media] = r.media_modality
      batch["features"][row, s:s + n_media, :r.media.shape[1]] = r.media
    first = n - len(r.continuation)  # Position whose target is the first continuation token.
    batch["loss_mask"][row, s + first:s + n] = 1.0
    batch["request"][row, s + first:s + n] = index
    used[row] += n
  if any(used):
    yield batch


def token_scores(logits_BLV: jax.Array, targets_BL: jax.Array) -> dict[str, jax.Array]:
  """log p(target) and whether the target is the argmax, per position (float32)."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.sum(jnp.where(jax.nn.one_hot(targets_BL, logits_BLV.shape[-1], dtype=jnp.bool_),
                                      logits_BLV, 0.0), axis=-1)
  greedy_BL = target_logit_BL >= jnp.max(logits_BLV, axis=-1)
  return {"logp": target_logit_BL - lse_BL, "greedy": greedy_BL}


def request_scores(batches, num_requests: int, run) -> tuple[np.ndarray, np.ndarray]:
  """(log-likelihood, all-greedy) per request; `run(batch)` gives token_scores as numpy."""
  ll = np.zeros(num_requests, np.float64)
  misses = np.zeros(num_requests, np.int64)
  for batch in batches:
    out = run(batch)
    index = batch["request"]
    keep = index >= 0
    np.add.at(ll, index[keep], np.asarray(out["logp"], np.float64)[keep])
    np.add.at(misses, index[keep], ~np.asarray(out["greedy"], bool)[keep])
  return ll, misses == 0


def task_metrics(task: Task, ll: np.ndarray, greedy: np.ndarray) -> dict[str, float]:
  """The metrics above from per-request scores, in task_requests order."""
  acc, acc_norm, prob, bpb, at = [], [], [], [], 0
  for example in task.examples:
    k = len(example.choices)
    scores, nbytes = ll[at:at + k], np.asarray([max(len(c.encode("utf-8")), 1) for c in example.choices], np.float64)
    gold = example.gold
    bpb.append(-scores[gold] / (math.log(2) * nbytes[gold]))
    if task.kind == "mc":
      acc.append(float(np.argmax(scores) == gold))
      acc_norm.append(float(np.argmax(scores / nbytes) == gold))
      prob.append(float(np.exp(scores[gold] - np.logaddexp.reduce(scores))))
    else:
      acc.append(float(greedy[at]))
      prob.append(float(np.exp(scores[0])))
    at += k
  out = {"acc": float(np.mean(acc)), "prob": float(np.mean(prob)), "bpb": float(np.mean(bpb))}
  if task.kind == "mc":
    out["acc_norm"] = float(np.mean(acc_norm))
  return out


def prepare(tasks: list[Task], encode, seq_len: int, media_fn=None) -> list[tuple[Task, list[Request]]]:
  """Each task with its requests, tokenized once; a request that cannot fit a row is refused here, naming it."""
  out = []
  for task in tasks:
    flat = [r for rs in task_requests(task, encode, media_fn) for r in rs]
    for r in flat:
      n_media = 0 if r.media is None else len(r.media)
      if n_media + len(r.continuation) >= seq_len:
        raise TaskError(f"{task.path}: an example's choice or continuation is {len(r.continuation)} tokens (plus "
                        f"{n_media} media positions); with its context it must fit data.seq_len={seq_len}")
    out.append((task, flat))
  return out


def score_tasks(tasks: list[Task], encode, run, *, rows: int, seq_len: int, feature_dim: int,
                media_fn=None, prepared=None) -> dict[str, float]:
  """`task/<name>/<metric>` for every task; `run(batch)` is the model's token_scores on one batch."""
  out = {}
  for task, flat in prepared or prepare(tasks, encode, seq_len, media_fn):
    ll, greedy = request_scores(pack(flat, rows, seq_len, feature_dim), len(flat), run)
    out.update({f"task/{task.name}/{k}": v for k, v in task_metrics(task, ll, greedy).items()})
  return out
