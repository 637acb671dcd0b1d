"""Every configuration key with its default and meaning, and validation of a whole config.

Config files in configs/ start from `base_config()` and change what their task needs; the
command line overrides any key: --config.rl.num_mc_samples=32.
"""

import ml_collections
from ml_collections import config_dict

SCHEDULES = ("constant", "cosine", "linear")  # learning-rate schedules after warmup (optim / sft)


def micro_batch_rows(per_device: int, batch_rows: int, data_parallel_size: int) -> int:
  """Global rows per micro-batch (0 = the whole batch in one pass). A micro-batch larger than a
  device's share of the batch means the whole share."""
  return min(per_device * data_parallel_size, batch_rows) if per_device else 0


def base_config() -> ml_collections.ConfigDict:
  """All keys with defaults (the paper's LLaDA-8B-Instruct settings where it has one)."""
  c = ml_collections.ConfigDict()

  c.mode = "rl"  # rl: BGPO-style RL; sft: masked-diffusion SFT (prompt never masked, 1/t weights)
  c.seed = 0  # one seed drives init, data order, rollouts and MC masks
  c.total_steps = 100  # optimizer updates of the run (rl: rollout batches; sft: SFT batches)
  c.checkpoint_every = 50  # save every this many steps (and at the end / on SIGTERM)
  c.keep_checkpoints = 3  # keep the last K checkpoints (plus the best by eval metric)
  c.eval_every = 50  # evaluate on the test split every this many steps (also at step 0); 0 = never
  c.log_every = 1  # write metrics every this many steps
  c.distributed = "auto"  # jax.distributed.initialize(): auto (multi-host detected) / on / off
  c.plot_at_end = True  # write workdir/curves.png at the end of training

  # --- model
  c.model = ml_collections.ConfigDict()
  c.model.preset = "llada_8b"  # tiny / small / llada_8b (overridden by a Hugging Face config.json)
  c.model.param_dtype = "float32"  # master weights (float32 keeps small updates exact)
  c.model.compute_dtype = "bfloat16"  # matmul dtype; norms, RoPE, softmax and logits stay float32
  c.model.remat_policy = "full"  # per-block rematerialization: none / full / dots_saveable
  c.model.scan_unroll = 1  # layers per layer-scan iteration (n_layers = fully unrolled; small models)
  # Attention kernel (llada.ATTENTION_IMPLS): auto = Pallas splash on TPU, cuDNN flash on GPU
  # (bf16/fp16 compute), batched matmuls elsewhere; "xla" = the original grouped einsum.
  c.model.attention_impl = "auto"
  # Response positions per chunk of the vocab head + log_softmax (0 = all at once). Bounds the
  # float32 logits to [rows, chunk, vocab]: LLaDA's 126k vocabulary makes [rows, 256, vocab] 129 MB
  # a row; 64 keeps a quarter of that for one extra head matmul of recompute in the backward.
  c.model.logits_chunk = 64
  # Architecture overrides of the preset (None = keep the preset's value).
  c.model.d_model = config_dict.placeholder(int)
  c.model.n_layers = config_dict.placeholder(int)
  c.model.n_heads = config_dict.placeholder(int)
  c.model.n_kv_heads = config_dict.placeholder(int)
  c.model.mlp_hidden_size = config_dict.placeholder(int)

  # --- initialization
  c.init = ml_collections.ConfigDict()
  # A Hugging Face LLaDA directory (config.json + safetensors) or an Orbax checkpoint directory
  # written by this trainer; "" = random init (only sensible with a warm-up SFT, see sft_steps).
  c.init.checkpoint = ""

  # --- tokenizer
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "hf"  # hf: tokenizer.json of a checkpoint dir; char: built-in character tokenizer
  c.tokenizer.path = ""  # "" = init.checkpoint

  # --- task and data
  c.task = ml_collections.ConfigDict()
  c.task.name = "gsm8k"  # gsm8k / math / countdown / sudoku / code (humaneval, mbpp for eval) / demo
  c.task.data_dir = ""  # folder with train_*.parquet / test_*.parquet (or JSONL) files
  c.task.train_file = ""  # optional explicit train file (a code JSONL of {prompt, tests}, ...)
  c.task.eval_tasks = ""  # comma-separated eval tasks; "" = the task's own test split
  c.task.max_prompt_tokens = 512  # longer prompts are handled by task.truncation
  c.task.truncation = "left"  # left: keep the end of the prompt; drop: skip the row (counted)
  c.task.instruction = ""  # "" = the task's default instruction (answer tags / \boxed{})
  c.task.tfds_dir = ""  # where TFDS array_record datasets are built; "" = WORKDIR/tfds
  # task.name == "demo": a procedurally generated task, no files needed.
  c.task.demo_task = "countdown"  # countdown / sudoku
  c.task.demo_train_size = 2000
  c.task.demo_test_size = 200

  # --- rollouts (training)
  c.rollout = ml_collections.ConfigDict()
  c.rollout.gen_length = 256
  c.rollout.steps = 128  # diffusion steps over the whole gen_length
  c.rollout.block_length = 32
  c.rollout.temperature = 0.6
  c.rollout.remasking = "low_confidence"  # low_confidence / random
  c.rollout.cfg_scale = 0.0
  c.rollout.prompt_buckets = (64, 128, 256, 512)  # prompts are left-padded to one of these lengths
  c.rollout.batch_size = 0  # sequences per generate call; 0 = the whole rollout batch

  # --- RL
  c.rl = ml_collections.ConfigDict()
  c.rl.objective = "bgpo"  # bgpo / vrpo_ol / diffu_grpo
  c.rl.num_mc_samples = 16  # n: MC samples of the ELBO per response
  c.rl.mc_estimator = "stratified"  # stratified (mask counts L/l_j) / continuous (t ~ U, 1/t)
  c.rl.group_size = 8  # G responses per prompt
  c.rl.prompts_per_step = 16  # prompts per rollout batch (batch = prompts * G responses)
  # Rows per device in one gradient-accumulation micro-batch (the scan runs over micro-batches, then
  # over MC samples); 0 = the whole per-device batch at once. 1 is the memory-lean choice for 8B.
  c.rl.micro_batch_per_device = 0
  # Train only on prompt groups with some non-zero advantage (all-equal rewards give A = 0 and
  # exactly zero gradient); the update is unchanged, the step is cheaper.
  c.rl.skip_zero_advantage = True
  c.rl.reset_optimizer = True  # fresh AdamW moments when RL starts after the SFT warm-up
  c.rl.updates_per_batch = 1  # mu: 1 = on-policy (paper); >1 stores old terms and clips
  c.rl.normalize_length = True  # divide ELBO differences by the response length
  c.rl.clip_eps = config_dict.placeholder(float)  # PPO clip of the per-sample ratio (off-policy)
  c.rl.dual_clip = config_dict.placeholder(float)  # dual clip c for A < 0
  c.rl.kl_beta = 0.0  # diffu_grpo: k3 KL to the initial policy
  c.rl.prompt_mask_prob = 0.15  # diffu_grpo: prompt masking probability
  c.rl.advantage_std = True  # divide group advantages by the group std (False: d1 style)
  c.rl.format_reward = 0.0  # bonus for a well-formed answer (0 = off)

  # --- optimizer
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 5e-7
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"  # constant / cosine / linear (after warmup)
  c.optim.final_lr_fraction = 0.0  # cosine / linear end value as a fraction of learning_rate
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.grad_clip_norm = 1.0  # 0 = no clipping

  # --- SFT (mode=sft, or the warm-up before RL when sft_steps > 0)
  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 0  # warm-up SFT steps before RL (0 = none)
  c.sft.batch_size = 32
  c.sft.num_mc_samples = 1
  # continuous (LLaDA SFT: t ~ U, weight 1/t) / stratified (mask counts, weight L/l <= L): the
  # stratified weights are bounded, so its loss is less heavy-tailed (not better on the demo).
  c.sft.mc_estimator = "continuous"
  c.sft.learning_rate = 1e-4
  c.sft.warmup_steps = 0
  c.sft.schedule = "constant"  # constant / cosine / linear (decays over the SFT steps)
  c.sft.final_lr_fraction = 0.0  # cosine / linear end value as a fraction of sft.learning_rate
  c.sft.micro_batch_per_device = 0
  c.sft.eval_every = 0  # evaluate every this many warm-up steps (0 = config.eval_every)

  # --- evaluation
  c.eval = ml_collections.ConfigDict()
  c.eval.gen_length = 256
  c.eval.steps = 256
  c.eval.block_length = 32
  c.eval.temperature = 0.0
  c.eval.num_examples = 0  # 0 = the whole test split
  c.eval.batch_size = 16
  c.eval.at_start = True  # evaluate before the first step (False: skip it, e.g. for a random init)

  # --- rewards
  c.rewards = ml_collections.ConfigDict()
  c.rewards.code_timeout_s = 5.0
  c.rewards.code_memory_mb = 1024
  c.rewards.code_workers = 0  # sandbox processes in parallel; 0 = number of CPUs

  # --- devices
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = the devices left
  return c


def paper_config(task: str, *, gen_length: int, train_steps: int, eval_steps: int, num_mc_samples: int,
                 eval_tasks: str = "") -> ml_collections.ConfigDict:
  """LLaDA-8B-Instruct with the BGPO paper's settings for one task (SPEC section 3): block 32,
  G = 8, 16 prompts per step, lr 5e-7, rollout temperature 0.6, greedy evaluation."""
  c = base_config()
  c.task.name = task
  c.task.eval_tasks = eval_tasks
  c.rollout.gen_length = gen_length
  c.rollout.steps = train_steps
  c.rollout.block_length = 32
  c.rollout.temperature = 0.6
  c.eval.gen_length = gen_length
  c.eval.steps = eval_steps
  c.eval.block_length = 32
  c.rl.objective = "bgpo"
  c.rl.num_mc_samples = num_mc_samples
  c.rl.group_size = 8
  c.rl.prompts_per_step = 16
  c.rl.micro_batch_per_device = 1  # memory-lean for 8B; raise it when memory allows
  c.optim.learning_rate = 5e-7
  return c


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key, the value and the fix."""


MODES = ("rl", "sft")
RL_OBJECTIVES = ("bgpo", "vrpo_ol", "diffu_grpo")
ESTIMATORS = ("stratified", "continuous")
REMASKING = ("low_confidence", "random")
TOKENIZERS = ("hf", "char")
PRESETS = ("tiny", "small", "llada_8b")
DTYPES = ("float32", "bfloat16")


def _check_sampler(c, section: str) -> None:
  s = c[section]
  key = f"config.{section}"
  if s.gen_length <= 0 or s.block_length <= 0 or s.steps <= 0:
    raise ConfigError(f"{key}.gen_length/block_length/steps must be positive, got "
                      f"{s.gen_length}/{s.block_length}/{s.steps}")
  if s.gen_length % s.block_length:
    raise ConfigError(f"{key}.gen_length {s.gen_length} is not a multiple of {key}.block_length "
                      f"{s.block_length}; e.g. set {key}.gen_length={s.gen_length // s.block_length * s.block_length or s.block_length}")
  blocks = s.gen_length // s.block_length
  if s.steps % blocks:
    raise ConfigError(f"{key}.steps {s.steps} is not a multiple of the number of blocks {blocks} "
                      f"(gen_length {s.gen_length} / block_length {s.block_length}); "
                      f"e.g. set {key}.steps={max(1, s.steps // blocks) * blocks}")
  if s.steps > s.gen_length:
    raise ConfigError(f"{key}.steps {s.steps} exceeds {key}.gen_length {s.gen_length}: some steps would "
                      f"commit no token; use at most {s.gen_length}")
  if s.temperature < 0:
    raise ConfigError(f"{key}.temperature {s.temperature} must be >= 0 (0 = greedy)")
  if section == "rollout":
    if s.remasking not in REMASKING:
      raise ConfigError(f"{key}.remasking {s.remasking!r} is unknown; use one of {REMASKING}")


def validate(c, *, data_parallel_size: int | None = None) -> None:
  """Checks a whole config before anything compiles; raises ConfigError naming the key and the fix."""
  import os

  def one_of(key, value, options):
    if value not in options:
      raise ConfigError(f"config.{key} {value!r} is unknown; use one of {options}")

  one_of("mode", c.mode, MODES)
  one_of("rl.objective", c.rl.objective, RL_OBJECTIVES)
  one_of("rl.mc_estimator", c.rl.mc_estimator, ESTIMATORS)
  one_of("sft.mc_estimator", c.sft.mc_estimator, ESTIMATORS)
  one_of("tokenizer.kind", c.tokenizer.kind, TOKENIZERS)
  one_of("model.param_dtype", c.model.param_dtype, DTYPES)
  one_of("model.compute_dtype", c.model.compute_dtype, DTYPES)
  from bgpo_jax.models.llada import ATTENTION_IMPLS
  one_of("model.attention_impl", c.model.attention_impl, ATTENTION_IMPLS)
  if c.model.logits_chunk < 0:
    raise ConfigError(f"config.model.logits_chunk {c.model.logits_chunk} must be >= 0 (0 = no chunking)")
  if not c.init.checkpoint:
    one_of("model.preset", c.model.preset, PRESETS)
  for key in ("total_steps", "checkpoint_every", "log_every", "keep_checkpoints"):
    if c[key] < 1:
      raise ConfigError(f"config.{key} {c[key]} must be >= 1")
  if c.eval_every < 0:
    raise ConfigError(f"config.eval_every {c.eval_every} must be >= 0 (0 = never)")
  for key, value in (("optim.schedule", c.optim.schedule), ("sft.schedule", c.sft.schedule)):
    if value not in SCHEDULES:
      raise ConfigError(f"config.{key} {value!r} is unknown; use one of {SCHEDULES}")
  if c.sft.eval_every < 0:
    raise ConfigError(f"config.sft.eval_every {c.sft.eval_every} must be >= 0 (0 = config.eval_every)")
  _check_sampler(c, "rollout")
  _check_sampler(c, "eval")
  rl = c.rl
  if rl.num_mc_samples < 1:
    raise ConfigError(f"config.rl.num_mc_samples {rl.num_mc_samples} must be >= 1")
  if c.mode == "rl" and rl.group_size < 2:
    raise ConfigError(f"config.rl.group_size {rl.group_size} must be >= 2: group advantages of a single "
                      "response are always 0")
  if rl.prompts_per_step < 1:
    raise ConfigError(f"config.rl.prompts_per_step {rl.prompts_per_step} must be >= 1")
  if rl.updates_per_batch < 1:
    raise ConfigError(f"config.rl.updates_per_batch {rl.updates_per_batch} must be >= 1 (1 = on-policy)")
  for key, value in (("rl.clip_eps", rl.clip_eps), ("rl.dual_clip", rl.dual_clip)):
    if value is not None and value <= 0:
      raise ConfigError(f"config.{key} {value} must be positive (or unset)")
  if rl.dual_clip is not None and rl.dual_clip <= 1:
    raise ConfigError(f"config.rl.dual_clip {rl.dual_clip} must be > 1 (the paper's reference uses 3)")
  if c.rollout.batch_size < 0:
    raise ConfigError(f"config.rollout.batch_size {c.rollout.batch_size} must be >= 0 (0 = whole batch)")
  rows = rl.prompts_per_step * rl.group_size
  if c.rollout.batch_size and rows % c.rollout.batch_size:
    raise ConfigError(f"config.rollout.batch_size {c.rollout.batch_size} must divide the rollout batch "
                      f"{rows} (rl.prompts_per_step {rl.prompts_per_step} x rl.group_size {rl.group_size})")
  if data_parallel_size:
    for key, n in (("rl.prompts_per_step x rl.group_size", rows), ("sft.batch_size", c.sft.batch_size)):
      if n % data_parallel_size:
        raise ConfigError(f"config.{key} = {n} is not divisible by the data-parallel size "
                          f"{data_parallel_size} (mesh data x fsdp); change the batch or config.mesh.shape")
    for key, per_dev, n in (("rl.micro_batch_per_device", rl.micro_batch_per_device, rows),
                            ("sft.micro_batch_per_device", c.sft.micro_batch_per_device, c.sft.batch_size)):
      if per_dev < 0:
        raise ConfigError(f"config.{key} {per_dev} must be >= 0 (0 = whole batch)")
      micro = micro_batch_rows(per_dev, n, data_parallel_size)
      if micro and n % micro:
        raise ConfigError(f"config.{key} {per_dev} x {data_parallel_size} devices does not divide the batch "
                          f"of {n} rows; pick a divisor of {n // data_parallel_size}")
  if c.init.checkpoint and not c.init.checkpoint.startswith("gs://") and not os.path.isdir(c.init.checkpoint):
    raise ConfigError(f"config.init.checkpoint {c.init.checkpoint!r} is not a directory; give a Hugging Face "
                      "LLaDA directory (config.json + safetensors) or an Orbax checkpoint of this trainer")
  if c.tokenizer.kind == "hf" and not (c.tokenizer.path or c.init.checkpoint):
    raise ConfigError("config.tokenizer.kind 'hf' needs config.tokenizer.path or config.init.checkpoint "
                      "(a directory with tokenizer.json); or use --config.tokenizer.kind=char")
  if c.tokenizer.path and not os.path.isdir(c.tokenizer.path):
    raise ConfigError(f"config.tokenizer.path {c.tokenizer.path!r} is not a directory")
  if c.task.data_dir and not os.path.isdir(c.task.data_dir):
    raise ConfigError(f"config.task.data_dir {c.task.data_dir!r} is not a directory")
  if c.task.train_file and not os.path.isfile(c.task.train_file):
    raise ConfigError(f"config.task.train_file {c.task.train_file!r} does not exist")
  if c.mode == "rl" and c.task.name == "code" and not c.task.train_file:
    raise ConfigError("config.task.name 'code' trains on a JSONL of {prompt, tests}: set "
                      "--config.task.train_file=/path/train.jsonl")
  if c.task.name not in ("demo",) and not c.task.data_dir and not c.task.train_file:
    raise ConfigError(f"config.task.name {c.task.name!r} reads data: set --config.task.data_dir to a folder of "
                      "train_*/test_* parquet or JSONL files (or use configs/demo.py, which needs none)")
  if c.task.name == "demo" and c.task.demo_task not in ("countdown", "sudoku"):
    raise ConfigError(f"config.task.demo_task {c.task.demo_task!r} is unknown; use countdown or sudoku")
  if c.task.truncation not in ("left", "drop"):
    raise ConfigError(f"config.task.truncation {c.task.truncation!r} is unknown; use left or drop")
