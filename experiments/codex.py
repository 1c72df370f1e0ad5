"""The codex decoder-only experiment, from a multimodal CPU smoke run to 7B text on a pod.

Run:
  codex train --config=experiments/codex.py:tiny --workdir=runs/tiny
  codex train --config=experiments/codex.py:tiny --workdir=runs/tiny --config.train.steps=200

Variants (the part after the colon):
  tiny            CPU, a few minutes: the default `make train` run, all five objectives on.
  small           CPU, longer: a model worth looking at (text only, as every variant below).
  bench           the reference benchmark shape (d512, 8 layers, seq 512, batch 8), f32 compute.
  bench_bf16      the same shape with bfloat16 compute.
  150m_v5p, 150m_h100, 1b_v5p, 1b_h100, 7b_v5p, 7b_h100
                  accelerator scales with mesh and batch for a TPU v5p pod slice or one 8xH100 node;
                  TARGET_DEVICES below says how many devices each expects.
"""

import ml_collections

# Devices each accelerator variant's mesh is laid out for (v5p: one device per chip).
TARGET_DEVICES = {
    "150m_v5p": 16,   # v5p-32 slice.
    "150m_h100": 8,
    "1b_v5p": 64,     # v5p-128 slice.
    "1b_h100": 8,
    "7b_v5p": 256,    # v5p-512 slice.
    "7b_h100": 8,
}


def base_config() -> ml_collections.ConfigDict:
  """Every key an experiment can set, with the values of the `tiny` CPU run."""
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.vocab_size = 4096
  config.model.d_model = 128
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.num_kv_heads = 2          # Grouped-query attention: 2 query heads per kv head.
  config.model.head_dim = 0              # 0: d_model // num_heads.
  config.model.mlp_dim = 512             # SwiGLU hidden width.
  config.model.rope_theta = 10_000.0
  config.model.norm_eps = 1e-5
  config.model.tie_embeddings = False
  config.model.init_std = 0.02
  config.model.param_dtype = "float32"
  config.model.compute_dtype = "float32"  # On this CPU bf16 is no faster; accelerators use bf16.
  config.model.scan_layers = True        # One compiled block, scanned: compile time flat in depth.
  config.model.remat = "full"            # none | full | dots | dots_no_batch; full is fastest on CPU.
  config.model.attention_impl = "auto"   # auto lets XLA pick a fused kernel on TPU/GPU.
  config.model.attention_chunks = 4      # Query chunks skip the masked upper blocks: pays on CPU.
  config.model.feature_dim = 96          # Values per non-text position: the widest is a video tubelet.
  # Multi-token prediction (DeepSeek-V3): D extra modules, depth k predicts token t+k+1 (training
  # only; dropped from exports). Off here: at this width its extra output head costs ~50% more FLOPs.
  config.model.mtp_depth = 0

  config.data = ml_collections.ConfigDict()
  # The mixture: sources, SPDX licences, effective-token shares per phase, exchange rates. The default
  # one is the embedded multimodal corpus (`codex data build-default`; `make train` builds it).
  config.data.manifest = "experiments/data/default.yaml"
  config.data.phase = "pretrain"         # A resume with another manifest hash must name a new phase.
  config.data.licence_policy = "permissive"  # permissive | copyleft | research-only.
  config.data.licence_allow = ()         # SPDX ids admitted whatever the policy.
  config.data.licence_deny = ()          # SPDX ids refused whatever the policy.
  config.data.on_malformed = "fail"      # fail (naming file:record) | skip (counted, quarantine log).
  config.data.tokenizer_path = ""        # "": train a byte-level BPE on the manifest's text, cached.
  config.data.tokenizer_train_bytes = 8_000_000
  config.data.seq_len = 256
  config.data.seed = 0
  config.data.eval_fraction = 0.01
  config.data.num_workers = 0            # Decoding worker processes per source.
  config.data.shuffle_window = 256       # Packed rows shuffled together before batching.
  config.data.shuffle_block = 64         # Consecutive records read together; blocks shuffled per epoch.
  config.data.image_size = 16            # Pictures and frames resized to 16x16 ...
  config.data.patch_size = 4             # ... and cut into 4x4 patches: 16 positions of 48 values.
  config.data.video_frames = 8           # Frames sampled per clip, ...
  config.data.tubelet_frames = 2         # ... 2 per position: 64 positions of 96 values per clip.
  config.data.audio_sample_rate = 8000
  config.data.audio_mels = 12            # Log-mel bins per 10 ms frame, ...
  config.data.audio_patch_frames = 8     # ... 8 frames per position: 96 values (a 1 s clip: 13 positions).

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 3e-3
  config.optimizer.min_lr_ratio = 0.1    # Cosine decays to 10% of the peak.
  config.optimizer.warmup_fraction = 0.02
  # cosine | wsd: warmup-stable-decay (peak held, then a linear anneal over the last decay_fraction).
  # tiny anneals over its last 60 steps (the data's anneal phase): the objective evals score the latest
  # parameters (a snapshot average has no EMA target encoder), and at step 300 the anneal took every one of
  # them lower (world vs copy-last 1.02 -> 0.82, align 1.99 -> 1.86, text 5.11 -> 4.94); held-out text of
  # the annealed latest 4.914, of its average of 4 snapshots 4.925, of the un-annealed run's average 4.902.
  config.optimizer.decay = "wsd"
  config.optimizer.decay_fraction = 0.2
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.1
  config.optimizer.clip_norm = 1.0
  config.optimizer.no_decay = ("norm", "bias", "embed")  # Parameter-path substrings spared decay.

  config.train = ml_collections.ConfigDict()
  config.train.steps = 300
  config.train.global_batch = 16
  config.train.seed = 0
  config.train.z_loss = 1e-4
  config.train.log_every = 10
  # Numerics guard: a step whose loss or gradient norm is NaN/Inf, or whose loss spikes above
  # mean + spike_sigmas * std of the last spike_window accepted losses, is skipped (params and optimizer
  # state untouched); max_consecutive_bad skipped steps in a row stop the run.
  config.train.spike_window = 100        # 0: spike detection off (NaN/Inf steps are still skipped).
  config.train.spike_sigmas = 6.0
  config.train.spike_min_steps = 20      # Losses the window must hold before it judges spikes.
  config.train.max_consecutive_bad = 5
  # MTP loss weight lambda: loss = CE + lambda / mtp_depth * sum_k CE_k; lambda is mtp_weight until
  # mtp_weight_switch * steps, then mtp_weight_final (DeepSeek-V3: 0.3 for the first ~68%, then 0.1).
  config.train.mtp_weight = 0.3
  config.train.mtp_weight_final = 0.1
  config.train.mtp_weight_switch = 0.68
  # Gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018), the critical batch size in
  # sequences, logged as noise_scale/* every noise_scale_every steps from the step's batch split in
  # noise_scale_microbatches parts (costs that many extra backward passes each time); 0: off.
  config.train.noise_scale_every = 0
  config.train.noise_scale_microbatches = 4
  config.train.noise_scale_ema = 0.9     # Moving-average decay of |G|^2 and tr(Sigma) before the ratio.
  # Gradient accumulation: each update's global_batch rows come as grad_accum micro-batches of
  # global_batch / grad_accum rows (the data pipeline's batch; activation memory is one micro-batch's).
  config.train.grad_accum = 1
  # Batch-size ramp: micro-batches per update grow linearly from batch_ramp_start to grad_accum over the
  # first batch_ramp_steps updates (0: off), and with batch_ramp_noise_cap stay at most
  # max(1, B_simple / micro-batch rows) by the noise probe's estimate (needs noise_scale_every > 0).
  config.train.batch_ramp_steps = 0
  config.train.batch_ramp_start = 1
  config.train.batch_ramp_noise_cap = False

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1                  # -1: all devices left after tensor and pipeline.
  config.mesh.tensor = 1
  config.mesh.pipeline = 1
  config.mesh.fsdp = False               # ZeRO-3: parameters and optimizer state sharded over `data`.
  config.mesh.sequence_parallel = False  # Residual stream's length sharded over `tensor` between blocks.
  config.mesh.schedule = "gpipe"         # Pipeline schedule when mesh.pipeline > 1: gpipe | circular | 1f1b.
  config.mesh.microbatches = 0           # Pipeline microbatches per step; 0: 4 per stage.
  config.mesh.repeats = 1                # circular: layer chunks per stage (>= 2); gpipe and 1f1b: 1.
  config.mesh.auto = False               # True: the topology adapter picks the layout (see `codex mesh`).

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 100
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True
  config.checkpoint.allow_dtype_change = False  # Refuse restoring a tensor saved in another dtype.
  # Checkpoint averaging: a snapshot every average_every steps in the last average_count * average_every
  # steps before each eval and the end; their parameter mean is evaluated beside the latest checkpoint
  # (`avg/...` metrics) and `codex average` writes it. 0: off.
  config.checkpoint.average_count = 4
  config.checkpoint.average_every = 10
  config.checkpoint.average_every_seconds = 0.0  # Or space snapshots by wall-clock (then average_every = 0).
  config.checkpoint.ema_decay = 0.0      # 0: plain mean; e.g. 0.7: snapshot i (0 = newest) weighs 0.7**i.

  config.eval = ml_collections.ConfigDict()
  # Held-out loss, tasks, the snapshot average (`avg/`) and, with several objectives, their evals; each eval
  # of the multimodal tiny run costs ~20-45 s here, so three of them in 300 steps (and one at step 0).
  config.eval.every = 100
  config.eval.batches = 4
  config.eval.tasks = "builtin"          # "builtin" and/or folders of *.jsonl task files (docs/evaluation.md).
  config.eval.task_examples = 64         # Examples per task at each in-loop eval; `codex eval` scores all.
  # Evaluate the initial parameters too (step 0, a fresh run only; as HF Trainer's eval_on_start): every
  # held-out loss and score then has its untrained value beside the trained ones. ~40 s here.
  config.eval.at_start = True

  # The pretraining objectives (objectives/): text next-token CE; vision MAE + two-view InfoNCE; align
  # (image/video vs caption contrastive); world (next video chunk's latent from this one and the action);
  # action (flow matching on embodied action chunks). Weights in the order text, vision, align, world,
  # action; 0 switches one off (its heads and, without vision and world, the EMA target encoder vanish).
  config.objectives = ml_collections.ConfigDict()
  config.objectives.weights = (1.0, 1.0, 1.0, 1.0, 1.0)
  # Per manifest phase ("main", "anneal"): weights from that phase's start step on, the tuner restarting
  # from them; a phase not named uses `weights`. E.g. config.objectives.phase_weights.anneal = (1, .5, .5, .5, 1).
  config.objectives.phase_weights = ml_collections.ConfigDict()
  config.objectives.balance = ml_collections.ConfigDict()
  # fixed: the weights throughout | lagrangian: dual ascent keeps each objective's share of the gradient norm
  # on the last block's weights within [low, high] (objectives/balance.py), as near the configured weights as
  # it can.
  config.objectives.balance.mode = "lagrangian"
  # Text keeps at least a fifth of the pull; no other objective more than 0.4. World's lower bound is 0: its
  # share is under 0.004 all run (it predicts a small change from the last chunk's latent), a bound would push
  # its weight to the multiplier box, and with the anneal it beats copy-last without one.
  config.objectives.balance.low = (0.2, 0.05, 0.05, 0.0, 0.05)
  config.objectives.balance.high = (0.6, 0.4, 0.4, 0.4, 0.4)
  # Each measurement: one more trunk forward (the last block zeroed gives that block's input), then one
  # backward per objective through the last block and the heads.
  config.objectives.balance.measure_every = 10
  config.objectives.balance.dual_lr = 0.5
  config.objectives.balance.ema_decay = 0.9     # Of the measured norms, per measurement.
  config.objectives.balance.slack = 0.01        # Aim inside the bounds by this much.
  config.objectives.balance.max_multiplier = 20.0
  config.objectives.vision = ml_collections.ConfigDict()
  config.objectives.vision.mask_ratio = 0.75      # MAE: share of a masked image's patches hidden.
  config.objectives.vision.masked_fraction = 0.5  # Share of images masked; the rest stay clean for captions.
  config.objectives.vision.temperature = 0.1      # Two-view InfoNCE (online masked vs EMA clean).
  config.objectives.vision.max_images = 128       # Slots per global batch; overflow dropped and logged.
  config.objectives.align = ml_collections.ConfigDict()
  config.objectives.align.kind = "clip"           # clip (symmetric InfoNCE) | siglip (sigmoid, learned t, b).
  config.objectives.align.blind_fraction = 0.5    # Captions that cannot see their media: the align pairs.
  config.objectives.align.dim = 64
  config.objectives.align.max_pairs = 128         # Image+caption examples are short: ~150 fit a batch.
  config.objectives.align.pool = "mean"           # mean | last: the last media / caption position (causal trunk).
  config.objectives.world = ml_collections.ConfigDict()
  config.objectives.world.ema_decay = 0.99        # EMA target encoder (also vision's second view).
  config.objectives.world.max_chunks = 128        # Video chunks (one frame / tubelet slice each) per batch.
  config.objectives.action = ml_collections.ConfigDict()
  config.objectives.action.horizon = 4            # Actions per flow-matched chunk.
  config.objectives.action.dim = 1                # Leading values of an action position predicted.
  config.objectives.action.sample_steps = 10      # Euler steps of the sampler.
  config.objectives.action.max_chunks = 128       # Action position slots per global batch.
  return config


TEXT_ONLY = (1.0, 0.0, 0.0, 0.0, 0.0)


def _small(config):
  config.model.update(vocab_size=8192, d_model=256, num_layers=6, num_heads=8, num_kv_heads=4,
                      mlp_dim=1024)
  config.data.seq_len = 512
  config.train.update(steps=2000, global_batch=16)
  config.optimizer.learning_rate = 2e-3
  config.checkpoint.every = 500
  config.eval.every = 250
  config.objectives.weights = TEXT_ONLY


def _bench(config, compute_dtype):
  # Full remat is fastest on CPU: recomputing the forward costs less than storing and re-reading
  # activations at this machine's memory bandwidth (measured: none 24.4 s, dots 20.0 s, full 18.7 s).
  config.model.update(vocab_size=32000, d_model=512, num_layers=8, num_heads=8, num_kv_heads=8,
                      mlp_dim=2048, compute_dtype=compute_dtype, remat="full")
  config.data.seq_len = 512
  config.train.global_batch = 8
  config.objectives.weights = TEXT_ONLY


def _accelerator(config, size, platform):
  shapes = {
      # 134M with the 32k vocab.
      "150m": dict(d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, mlp_dim=2048),
      # ~1.1B, Llama-3.2-1B-like with grouped-query attention.
      "1b": dict(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, mlp_dim=8192),
      # ~6.7B, the Llama-2-7B shape.
      "7b": dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008),
  }
  # attention_chunks=1: the fused TPU/GPU attention kernels skip masked blocks themselves.
  config.model.update(vocab_size=32000, compute_dtype="bfloat16", attention_chunks=1, **shapes[size])
  config.model.remat = {"150m": "dots", "1b": "dots", "7b": "full"}[size]
  config.data.seq_len = 4096 if size == "7b" else 2048
  config.optimizer.learning_rate = {"150m": 6e-4, "1b": 4e-4, "7b": 3e-4}[size]
  config.optimizer.decay_fraction = 0.2  # WSD with a final anneal over the last 20% of the steps.
  config.checkpoint.update(every=1000, max_to_keep=5)
  config.eval.every = 1000
  config.eval.at_start = False
  devices = TARGET_DEVICES[f"{size}_{platform}"]
  if platform == "v5p":
    # ICI is fast in every direction: FSDP over the whole slice, tensor parallel only at 7B.
    tensor = 4 if size == "7b" else 1
    config.mesh.update(data=devices // tensor, tensor=tensor, fsdp=True)
    config.train.global_batch = {"150m": 256, "1b": 1024, "7b": 1024}[size]
  else:
    # One NVLink node: FSDP over the 8 GPUs keeps the optimizer state of 7B at ~14 GB per GPU.
    config.mesh.update(data=8, tensor=1, fsdp=size != "150m")
    config.train.global_batch = {"150m": 256, "1b": 128, "7b": 64}[size]
  config.train.steps = {"150m": 20_000, "1b": 50_000, "7b": 100_000}[size]
  config.objectives.weights = TEXT_ONLY


VARIANTS = ("tiny", "small", "bench", "bench_bf16", *TARGET_DEVICES)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"experiments/codex.py: unknown variant {variant!r}; expected one of {VARIANTS}")
  config = base_config()
  if variant == "small":
    _small(config)
  elif variant in ("bench", "bench_bf16"):
    _bench(config, "bfloat16" if variant == "bench_bf16" else "float32")
  elif variant != "tiny":
    size, platform = variant.split("_")
    _accelerator(config, size, platform)
  return config
