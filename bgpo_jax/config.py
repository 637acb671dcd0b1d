"""Every configuration key with its default and meaning, and validation of a whole config.

Config files in configs/ start from `base_config()` and change what their task needs; the
command line overrides any key: --config.rl.num_mc_samples=32.
"""

import math
import numbers
import os

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
  # Steps of the run (rl: rollout batches, each giving rl.updates_per_batch optimizer updates;
  # sft: SFT batches). The task configs set the BGPO recipe's lengths (paper_config).
  c.total_steps = 100
  c.checkpoint_every = 50  # save every this many steps (and at the end / on SIGTERM)
  c.keep_checkpoints = 3  # keep the last K checkpoints (plus the best by eval metric)
  c.eval_every = 50  # evaluate on the test split every this many steps (also at step 0); 0 = never
  c.log_every = 1  # write metrics every this many steps
  c.distributed = "auto"  # jax.distributed.initialize(): auto (multi-host detected) / on / off
  c.plot_at_end = True  # write workdir/curves.png at the end of training

  # --- model
  c.model = ml_collections.ConfigDict()
  c.model.preset = "llada_8b"  # tiny / small / llada_8b (dream: tiny / small / dream_7b); an HF config.json overrides it
  # Model family (models/family.py): llada (default: the BGPO paper's model) or dream (Dream-v0-7B:
  # Qwen2 blocks with QKV biases, shifted logits). An HF checkpoint must match it (its model_type).
  c.model.family = "llada"
  c.model.param_dtype = "float32"  # master weights (float32 keeps small updates exact)
  c.model.compute_dtype = "bfloat16"  # matmul dtype; norms, RoPE, softmax and logits stay float32
  # Per-block rematerialization (models.layers.REMAT_POLICIES): full = save each layer's input only and
  # recompute its forward in the backward; activations = save what the backward reads and
  # recompute no matmul; none = plain autodiff; save_attn = q, k, v and context only; auto = the objective's
  # choice (`remat_policy`: bgpo / diffu_grpo / sft activations, vrpo_ol full; the task configs').
  c.model.remat_policy = "full"
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
  # A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, e.g. d1's) to
  # start the adapters from, on the base of init.checkpoint; needs lora.rank > 0 and the adapter's
  # r / alpha / targets equal to config.lora's. "" = fresh adapters (B = 0: the base model).
  c.init.adapter = ""

  # --- LoRA (docs/lora.md): train low-rank adapters on a frozen base instead of every weight
  c.lora = ml_collections.ConfigDict()
  # Adapter rank r; 0 = full fine-tuning (every weight trained, no adapters).
  c.lora.rank = 0
  # The adapter's output is scaled by alpha / rank (PEFT's default scaling; no rsLoRA).
  c.lora.alpha = 64.0
  # PEFT's lora_dropout on the adapters' input (training forwards only; a fresh mask per step,
  # micro-batch and MC sample); 0 = none. Rollouts, evaluation and the old / reference terms run
  # without it, as PEFT in eval mode.
  c.lora.dropout = 0.0
  # Comma-separated Hugging Face module names, matched like PEFT's target_modules (a module whose
  # name equals one or ends with "." + one). d1's list; on LLaDA it selects q / k / v / up_proj only
  # (LLaDA names its o / gate / down projections attn_out / ff_proj / ff_out), on Dream all seven.
  c.lora.targets = "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj"
  # Storage dtype of the frozen base weights (bfloat16 halves their memory; float32 keeps them
  # exactly as loaded). The adapters and their AdamW moments are model.param_dtype.
  c.lora.base_dtype = "bfloat16"
  # The rollout / evaluation samplers' weights: "merged" (base + scale * A @ B folded into one
  # compute-dtype copy once per RL step / eval pass: plain matmuls while sampling) or "unmerged"
  # (base + adapters, each targeted matmul adding its low-rank term: no second copy of the base,
  # which is what lets LLaDA-8B's rollouts fit one 40 GB device; docs/lora.md).
  c.lora.sampler_weights = "merged"

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
  # left: keep the end of the prompt; drop: skip the row (counted); error: stop the run
  # (data.dataset.TRUNCATION). rollout.prompt_buckets must hold max_prompt_tokens.
  c.task.truncation = "left"
  c.task.instruction = ""  # "" = the task's default instruction (answer tags / \boxed{})
  c.task.tfds_dir = ""  # where TFDS array_record datasets are built; "" = WORKDIR/tfds
  # task.name == "demo": a procedurally generated task, no files needed.
  c.task.demo_task = "countdown"  # countdown / sudoku / sudoku4 (64-token answers: docs/mc_samples.md)
  c.task.demo_train_size = 2000
  c.task.demo_test_size = 200

  # --- rollouts (training)
  c.rollout = ml_collections.ConfigDict()
  c.rollout.gen_length = 256
  c.rollout.steps = 128  # diffusion steps over the whole gen_length
  c.rollout.block_length = 32
  c.rollout.temperature = 0.6
  # low_confidence / random (LLaDA) or Dream's maskgit_plus / topk_margin / entropy (RL on Dream
  # uses entropy); also used by the eval sampler.
  c.rollout.remasking = "low_confidence"
  c.rollout.cfg_scale = 0.0
  c.rollout.prompt_buckets = (64, 128, 256, 512)  # prompts are left-padded to one of these lengths
  # KV cache of the sampler (SPEC section 4b, Fast-dLLM): none (exact LLaDA sampling) / prefix
  # (each block's steps after the first run on the canvas from the block on, over the cached
  # prefix K/V) / dual (only the block's positions, over the whole cache). An approximation of the
  # sampling distribution, not of the objective (ELBO terms use the final sequence). Default none:
  # exact, and what the demo's published numbers used. Measured (BENCHMARKS.md "Cached sampler",
  # 2-core CPU, gen 256, block 32, d512 x 8 layers): prefix 2.2x, dual 4.5x the exact sampler; on
  # the demo checkpoint no measurable accuracy change, and 30 RL steps learn the same with 3.4x
  # faster rollouts. The paper configs (config.paper_config) roll out with prefix, as DARE's BGPO
  # recipes do.
  c.rollout.cache = "none"
  # Fast-dLLM's confidence-threshold parallel decoding: at each step commit every masked block
  # position with confidence >= threshold (and always the most confident one) until the block
  # is done; rollout.steps then sets nothing. None = the fixed schedule of rollout.steps. On the
  # demo checkpoint 0.9 needs 5 model calls for 16 tokens at the same greedy accuracy; not a
  # default because the number of steps then depends on the model (off = the paper's schedule).
  c.rollout.threshold = config_dict.placeholder(float)
  # Never propose EOS (its logit -> -inf) / commit EOS and EOT candidates last (SPEC section 4
  # options; both samplers, training and eval). Off in the paper's settings.
  c.rollout.suppress_eos = False
  c.rollout.suppress_eos_confidence = False
  # Rollouts and evaluation run from a compute-dtype copy of the params made once per RL step (or
  # eval pass). gather_weights: on an FSDP mesh that copy is also gathered once (replicated over
  # "fsdp", tensor splits kept) instead of every layer's weights at every denoising step.
  # auto = gather when the copy takes at most 30% of a device's memory (CPU: always); on / off.
  c.rollout.gather_weights = "auto"
  c.rollout.batch_size = 0  # sequences per generate call; 0 = the whole rollout batch

  # --- RL
  c.rl = ml_collections.ConfigDict()
  c.rl.objective = "bgpo"  # bgpo / vrpo_ol / diffu_grpo / espo / spg / coupled_grpo / wd1, or a registered one
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
  # mu: optimizer updates per rollout batch. 1 = on-policy (the paper); > 1 stores the old policy's
  # terms once per rollout batch (ELBO terms [n, B], or diffu_grpo's token log-probs per update)
  # and makes mu PPO-clipped updates on them.
  c.rl.updates_per_batch = 1
  # d_j = (l_theta(j) - l_old(j)) / L with L = rollout.gen_length, the whole canvas (SPEC section 2:
  # the BGPO reference code divides by the canvas length, not by the tokens before EOS). Also
  # scales the ELBO log-ratio inside the k3 KL (rl.kl_beta). False: raw ELBO differences.
  c.rl.normalize_length = True
  # PPO clip eps of the per-sample ratio (diffu_grpo: per token). Unset = SPEC's 0.2 when
  # updates_per_batch > 1 and no clipping on-policy (inactive there anyway); 0 = off.
  c.rl.clip_eps = config_dict.placeholder(float)
  # Dual clip c > 1 for A < 0 (every objective). Unset = SPEC's 3.0 when updates_per_batch > 1 and
  # off on-policy; 0 = off (d1's diffu-GRPO has none).
  c.rl.dual_clip = config_dict.placeholder(float)
  # beta of a k3 KL penalty to a frozen reference policy (the policy at RL start), every
  # objective; 0 = no reference (the BGPO paper). docs/objectives.md has the estimators.
  c.rl.kl_beta = 0.0
  # Storage dtype of the frozen reference copy (sharded like the params): bfloat16 halves its
  # memory (16 GB for LLaDA-8B); float32 makes the KL exactly 0 at RL start.
  c.rl.reference_dtype = "bfloat16"
  # diffu_grpo: each real prompt token masked with this probability, freshly drawn per row and per
  # inner update (d1: p_mask_prompt 0.15).
  c.rl.prompt_mask_prob = 0.15
  c.rl.advantage_std = True  # divide group advantages by the group std (False: d1 style)
  # The group baseline subtracted from each reward: "mean" (GRPO, d1, BGPO) or "leave_one_out", the
  # mean of the other G - 1 rewards (DiffuCoder's coupled-GRPO, ESPO): G / (G - 1) times "mean".
  c.rl.advantage_baseline = "mean"
  # Bonus weight w: reward += w * format_score (1 for <reasoning>..</reasoning><answer>..</answer>,
  # 0.5 for an answer tag or box alone). 0 = off (the paper's rewards have none). Never counted in
  # accuracy: evaluation uses the grade's correctness flag, not the reward.
  c.rl.format_reward = 0.0
  # Each registered objective with its own hyper-parameters: config.rl.<objective>.<field>, the
  # defaults of its Hparams dataclass (its authors' published values; docs/objectives.md).
  from bgpo_jax import objectives

  for name in objectives.names():
    section = objectives.config_section(objectives.get(name))
    if section is not None:
      c.rl[name] = ml_collections.ConfigDict(section)

  # --- optimizer
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 5e-7
  c.optim.warmup_steps = 0  # in optimizer updates (an RL step makes rl.updates_per_batch of them)
  c.optim.schedule = "constant"  # constant / cosine / linear (after warmup), over all RL updates
  c.optim.final_lr_fraction = 0.0  # cosine / linear end value as a fraction of learning_rate
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.grad_clip_norm = 1.0  # 0 = no clipping
  # An update whose loss or gradient norm is NaN/Inf is skipped (params and moments unchanged);
  # this many skipped in a row stop the run (the model or data is broken, not one unlucky batch).
  c.optim.max_nonfinite_steps = 3

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
  # Global prompts per eval generate call: a multiple of the data-parallel size (mesh data x fsdp).
  # Any split size works: the last batch is padded to eval.batch_size and the padding not scored.
  c.eval.batch_size = 16
  # Evaluation sampler cache / threshold (as rollout.cache / rollout.threshold). Default none and
  # fixed steps: the paper reports exact LLaDA sampling at temperature 0.
  c.eval.cache = "none"
  c.eval.threshold = config_dict.placeholder(float)
  c.eval.at_start = True  # evaluate before the first step (False: skip it, e.g. for a random init)

  # --- rewards
  c.rewards = ml_collections.ConfigDict()
  c.rewards.code_timeout_s = 5.0  # wall-clock limit of one sandboxed test program
  c.rewards.code_memory_mb = 1024  # its address-space limit
  # Sandboxed programs run at once (the code-reward SandboxPool's size); 0 = 2 x CPUs, at most 32
  # (much of a short run is process start-up latency, so more runs than cores still pay off).
  c.rewards.code_workers = 0
  # Training reward recipes (docs: README "Rewards"). countdown: "d1" = the d1 / TinyZero reward
  # (1 correct, 0.1 for a well-formed wrong answer, 0 none), "binary" = 1 / 0. sudoku: "fraction"
  # = d1's fraction of empty cells solved, "binary" = 1 for a fully valid grid. Defaults are the
  # published recipes; evaluation accuracy is always "fully correct" whatever these say.
  c.rewards.countdown = "d1"
  c.rewards.sudoku = "fraction"

  # Persistent XLA compilation cache, so a resumed or repeated run loads its programs instead of
  # recompiling them: "" = WORKDIR/jax_cache for the trainer (evaluation: the user cache,
  # ~/.cache/bgpo_jax/jax_cache), "off" = none, or a directory (e.g. shared across runs).
  c.compilation_cache_dir = ""

  # --- devices
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = the devices left
  return c


def paper_config(task: str, *, gen_length: int, train_steps: int, eval_steps: int, num_mc_samples: int,
                 eval_tasks: str = "", total_steps: int = 100, eval_every: int = 50,
                 checkpoint_every: int = 50) -> ml_collections.ConfigDict:
  """LLaDA-8B-Instruct with the BGPO paper's settings for one task (SPEC section 3): block 32,
  G = 8, 16 prompts per step, lr 5e-7, rollout temperature 0.6, greedy evaluation.

  total_steps / eval_every / checkpoint_every: the run's length in rollout batches (the task
  configs pass the BGPO recipe's: math 700, code 5 epochs of 112, sudoku 400, countdown 560)."""
  c = base_config()
  c.total_steps = total_steps
  c.eval_every = eval_every
  c.checkpoint_every = checkpoint_every
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
  # The objective's choice. BGPO: each block saves the activations its backward reads
  # (llada.ACTIVATION_NAMES) instead of recomputing its forward ("full"): ~1/4 fewer train-step
  # FLOPs, no matmul recomputed. Per device on 8 devices the train step plans 28.7 GB for math
  # (full: 22.3 GB), still below the dual-cache sampler's 35.2 GB peak, so the run's peak does not
  # grow. VRPO-OL (rl.objective=vrpo_ol) keeps all n samples' graphs at once: "full" there
  # (BENCHMARKS.md, 8B plan).
  c.model.remat_policy = "auto"
  # Pure FSDP over every device: LLaDA-8B's float32 weights, AdamW moments and gradient
  # accumulator (~128 GB) do not fit one 80 GB device, sharded 8 ways they take ~22 GB per device
  # (`python -m bgpo_jax.benchmarks.memory --plan-8b --config=configs/math.py`, BENCHMARKS.md).
  # Any device count dividing the 128-row batch works; add data parallelism (e.g. (2, 8, 1) on 16
  # devices) only where the FSDP all-gathers get too slow.
  c.mesh.shape = (1, -1, 1)
  c.optim.learning_rate = 5e-7
  # Rollouts with Fast-dLLM's dual KV cache (4.5x faster sampling on CPU at 256 tokens), exact
  # sampling for the reported greedy evaluation. DARE's BGPO recipes use the prefix cache, but
  # ours unrolls its shrinking blocks and, with the whole 128-row batch in one call, plans
  # 172 GB per device at 512 tokens on 8 devices (dual: 27 GB; BENCHMARKS.md 8B plan); for
  # prefix set rollout.cache=prefix and rollout.batch_size=32 (46 GB).
  c.rollout.cache = "dual"
  c.eval.cache = "none"
  return c


# d1's diffu-GRPO recipe, read from the d1 code (github.com/dllm-reasoning/d1, diffu-grpo/:
# slurm_scripts/train.yaml, run.sh and diffu_grpo_trainer.py, as mirrored by its public forks):
# beta 0.04, epsilon 0.5, p_mask_prompt 0.15, learning_rate 3e-6 (constant), weight_decay 0.1,
# max_grad_norm 0.2, adam (0.9, 0.99), num_generations 6, 8 GPUs x per-device batch 6 x gradient
# accumulation 2 = 96 completions = 16 prompts per update, max_completion_length 256, block 32,
# diffusion_steps 128, temperature 0.9 (DiffuGRPOConfig's default), advantages r - mean(r) (no std
# division), a fresh prompt-mask seed per inner update (random_masking), and num_iterations
# (mu, the inner updates per rollout batch) 12 for gsm8k / math and 8 for countdown / sudoku
# (run.sh: "NUM_ITERS = (8 12 12 8)" for countdown, gsm8k, math, sudoku). d1's KL reference is the
# base model (LoRA adapters disabled), i.e. the policy at RL start, as here.
# d1 trains LoRA adapters (r 128, alpha 64) on a 4-bit base: `:diffu_grpo+lora` does too (a
# bfloat16 base, `d1_lora`); plain `:diffu_grpo` updates all weights, so its lr 3e-6 may need
# lowering there. Each task's mu is its spec's `d1_inner_updates` (bgpo_jax/tasks/builtin.py).


def d1_diffu_grpo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Applies d1's published diffu-GRPO settings (above) to a task config, in place; returns it.

  `--config=configs/countdown.py:diffu_grpo` runs countdown with them (every task config takes
  the `diffu_grpo` variant). Evaluation settings and the run length stay the task's.
  """
  c.rl.objective = "diffu_grpo"
  c.rl.kl_beta = 0.04
  from bgpo_jax.tasks import registry  # each task's spec holds its mu

  spec = registry.find(c.task.name)  # None for the demo
  c.rl.updates_per_batch = spec.d1_inner_updates if spec else registry.D1_DEFAULT_INNER_UPDATES
  c.rl.clip_eps = 0.5
  c.rl.dual_clip = 0.0  # d1 has no dual clip
  c.rl.prompt_mask_prob = 0.15
  c.rl.advantage_std = False
  c.rl.group_size = 6
  c.rl.prompts_per_step = 16
  c.rl.skip_zero_advantage = False  # zero-advantage rows still carry the KL gradient: train on all
  c.optim.learning_rate = 3e-6
  c.optim.schedule = "constant"
  c.optim.weight_decay = 0.1
  c.optim.grad_clip_norm = 0.2
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.rollout.gen_length = 256
  c.rollout.steps = 128
  c.rollout.block_length = 32
  c.rollout.temperature = 0.9
  return c


def d1_lora(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Applies d1's LoRA settings to a config, in place; returns it (`--config=configs/<task>.py:lora`,
  or combined: `:diffu_grpo+lora`): the PEFT LoraConfig of d1's diffu-GRPO training
  (github.com/dllm-reasoning/d1: r 128, lora_alpha 64, lora_dropout 0.05, task_type CAUSAL_LM and
  the seven target_modules below)."""
  # r 128: d1's lora_r; on LLaDA-8B's q / k / v / up_proj (32 layers) 168M weights, 2% of its 8B.
  c.lora.rank = 128
  # alpha 64: d1's lora_alpha, so the adapters' scale is alpha / r = 0.5 (PEFT's scaling).
  c.lora.alpha = 64.0
  # d1's lora_dropout: on the adapters' inputs in the trained forward (not the old / reference
  # terms or the samplers).
  c.lora.dropout = 0.05
  # d1's target_modules, as written there: on LLaDA PEFT (and models.lora.targets_of) selects only
  # q / k / v / up_proj of them (LLaDA names its o / gate / down projections attn_out / ff_proj /
  # ff_out), on Dream all seven; kept as d1 ran it.
  c.lora.targets = "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj"
  # d1 loads the base in 4 bits (bitsandbytes) and computes in bfloat16; a bfloat16 base is the
  # nearest this trainer has (no quantized base), half the float32 base's memory.
  c.lora.base_dtype = "bfloat16"
  # What lets the whole run fit one 40 GB device (LLaDA-8B, configs/math.py:lora; BENCHMARKS.md
  # "LoRA on one device", `memory --plan-8b --config=configs/math.py:lora --devices 1`):
  # - the samplers run base + adapters unmerged: a merged copy would add the base again (16 GB;
  #   the rollout sampler's plan at 16 rows: 57 GB merged, 41 GB unmerged);
  c.lora.sampler_weights = "unmerged"
  # - rollouts in calls of 8 rows (the dual KV cache grows with the rows: 30 GB at 8 rows, 41 GB at
  #   16); on more devices a larger chunk fits (rollout.batch_size is global rows per call). A call
  #   holds whole groups and splits over 8 devices: with d1's G = 6 (`:diffu_grpo+lora`), 24 rows of
  #   its shorter 256-token responses;
  c.rollout.batch_size = math.lcm(8, c.rl.group_size)
  # - evaluation in batches of as many rows: it runs without a KV cache (eval.cache), so it holds
  #   less than the rollout sampler at the same rows.
  c.eval.batch_size = 8
  # The train step (n = 16, one row per micro-batch, remat) plans at 30 GB: the base 16, the
  # adapters with their AdamW moments and accumulator 2.7, the rest activations and the head.
  return c


# Variants a task config takes besides the objectives' recipes.
VARIANTS = {"lora": d1_lora}


def task_config(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """A task config's `--config=configs/<task>.py:<variant>`: "" = BGPO (the paper); any registered
  objective's name = that objective's published recipe (`Objective.recipe`: "diffu_grpo" is d1's,
  "espo" ESPO's authors', ...); "lora" = d1's LoRA adapters instead of full fine-tuning
  (`d1_lora`). Several joined by "+" apply left to right (`diffu_grpo+lora`: d1's recipe as d1 ran
  it). Evaluation settings and the run length stay the task's."""
  from bgpo_jax import objectives

  if variant == "":
    return c
  names = variant.split("+")
  for name in names:
    if name not in objectives.names() and name not in VARIANTS:
      raise ValueError(f"config variant {name!r} is unknown; use configs/<task>.py (BGPO), "
                       f"configs/<task>.py:<objective> with one of {objectives.names()} (its authors' recipe), :lora (d1's LoRA settings), "
                       f"or several joined by '+' (e.g. :diffu_grpo+lora)")
  if sum(n in objectives.names() for n in names) > 1 or len(set(names)) != len(names):
    raise ValueError(f"config variant {variant!r} names an objective twice or two objectives; combine at most "
                     f"one objective with lora, e.g. :diffu_grpo+lora")
  for name in names:
    c = VARIANTS[name](c) if name in VARIANTS else objectives.get(name).recipe(c)
  return c


def resolved_remat_policy(c) -> str:
  """The model's remat policy: config.model.remat_policy, or for "auto" the objective's choice
  (rl.objective's; the SFT loss's for mode=sft). The model builder, the memory planner and
  validate all resolve it here."""
  if c.model.remat_policy != "auto":
    return c.model.remat_policy
  from bgpo_jax import objectives
  return objectives.get(c.rl.objective if c.mode == "rl" else "sft").remat_for(c)


def resolved_clip(rl) -> tuple[float | None, float | None]:
  """(clip_eps, dual_clip) the RL step uses: unset means SPEC's 0.2 / 3.0 when off-policy
  (rl.updates_per_batch > 1) and no clipping on-policy; 0 means off."""
  off_policy = rl.updates_per_batch > 1
  eps = rl.clip_eps if rl.clip_eps is not None else (0.2 if off_policy else None)
  dual = rl.dual_clip if rl.dual_clip is not None else (3.0 if off_policy else None)
  return (eps or None), (dual or None)


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key, the value and the fix."""


MODES = ("rl", "sft")
ESTIMATORS = ("stratified", "continuous")
ADVANTAGE_BASELINES = ("mean", "leave_one_out")  # rl.advantage_baseline
REMASKING = ("low_confidence", "random", "maskgit_plus", "topk_margin", "entropy")
FAMILIES = ("llada", "dream")
TOKENIZERS = ("hf", "char")
PRESETS = ("tiny", "small", "llada_8b")
FAMILY_PRESETS = {"llada": PRESETS, "dream": ("tiny", "small", "dream_7b")}
DTYPES = ("float32", "bfloat16")
CACHES = ("none", "prefix", "dual")  # = diffusion.sampler.CACHES
GATHER_WEIGHTS = ("auto", "on", "off")


def _ge(lo):
  return lambda v: v >= lo


def _gt(lo):
  return lambda v: v > lo


def _unit(v):  # [0, 1)
  return 0 <= v < 1


def _mesh_shape(v):
  return len(v) == 3 and all(s == -1 or s >= 1 for s in v) and list(v).count(-1) <= 1


_POSITIVE_OR_UNSET = "be >= 1, or unset for the preset's value"
# The valid range of every numeric key: (key, kind, valid, must). kind is the type the code reads:
# int, float (an int is fine; NaN / inf are not), "int?" / "float?" for a placeholder that may stay
# unset (None), or "ints" for a tuple of ints. valid(value) checks a value of that kind; `must`
# completes the error "config.<key> <value> must ...". A numeric key added to base_config needs a
# row here (tests/test_config_validation.py walks base_config for one).
NUMERIC_RULES = (
    ("seed", int, lambda v: 0 <= v < 2**32, "lie in [0, 2**32) (JAX keys and the data order use 32 bits)"),
    ("total_steps", int, _ge(1), "be >= 1"),
    ("checkpoint_every", int, _ge(1), "be >= 1"),
    ("keep_checkpoints", int, _ge(1), "be >= 1"),
    ("eval_every", int, _ge(0), "be >= 0 (0 = never)"),
    ("log_every", int, _ge(1), "be >= 1"),
    ("model.scan_unroll", int, _ge(1), "be >= 1 (n_layers or more = fully unrolled)"),
    ("model.logits_chunk", int, _ge(0), "be >= 0 (0 = no chunking)"),
    ("model.d_model", "int?", _ge(1), _POSITIVE_OR_UNSET),
    ("model.n_layers", "int?", _ge(1), _POSITIVE_OR_UNSET),
    ("model.n_heads", "int?", _ge(1), _POSITIVE_OR_UNSET),
    ("model.n_kv_heads", "int?", _ge(1), _POSITIVE_OR_UNSET),
    ("model.mlp_hidden_size", "int?", _ge(1), _POSITIVE_OR_UNSET),
    ("task.max_prompt_tokens", int, _ge(1), "be >= 1"),
    ("task.demo_train_size", int, _ge(1), "be >= 1"),
    ("task.demo_test_size", int, _ge(1), "be >= 1"),
    ("rollout.gen_length", int, _ge(1), "be >= 1"),
    ("rollout.steps", int, _ge(1), "be >= 1"),
    ("rollout.block_length", int, _ge(1), "be >= 1"),
    ("rollout.temperature", float, _ge(0), "be >= 0 (0 = greedy)"),
    ("rollout.cfg_scale", float, _ge(0), "be >= 0 (0 = no classifier-free guidance)"),
    ("rollout.prompt_buckets", "ints", lambda v: len(v) > 0 and min(v) >= 1,
     "be a non-empty tuple of prompt lengths >= 1, e.g. (64, 128, 256, 512)"),
    ("rollout.threshold", "float?", lambda v: 0 < v <= 1,
     "lie in (0, 1] (Fast-dLLM uses 0.9), or be unset for the fixed schedule of config.rollout.steps"),
    ("rollout.batch_size", int, _ge(0), "be >= 0 (0 = the whole rollout batch)"),
    ("rl.num_mc_samples", int, _ge(1), "be >= 1"),
    ("rl.group_size", int, _ge(1), "be >= 1"),
    ("rl.prompts_per_step", int, _ge(1), "be >= 1"),
    ("rl.micro_batch_per_device", int, _ge(0), "be >= 0 (0 = whole batch)"),
    ("rl.updates_per_batch", int, _ge(1), "be >= 1 (1 = on-policy)"),
    ("rl.clip_eps", "float?", lambda v: v == 0 or 0 < v < 1,
     "lie in (0, 1) (SPEC: 0.2), or be 0 (off) or unset"),
    ("rl.dual_clip", "float?", lambda v: v == 0 or v > 1,
     "be > 1 (the paper's reference uses 3), or be 0 (off) or unset"),
    ("rl.kl_beta", float, _ge(0), "be >= 0 (0 = no reference policy)"),
    ("rl.prompt_mask_prob", float, _unit, "lie in [0, 1) (d1: 0.15)"),
    ("rl.format_reward", float, _ge(0), "be >= 0 (0 = off)"),
    ("optim.learning_rate", float, _gt(0), "be > 0 (the paper: 5e-7)"),
    ("optim.warmup_steps", int, _ge(0), "be >= 0 (0 = no warmup)"),
    ("optim.final_lr_fraction", float, lambda v: 0 <= v <= 1, "lie in [0, 1]"),
    ("optim.weight_decay", float, _ge(0), "be >= 0"),
    ("optim.b1", float, _unit, "lie in [0, 1) (AdamW's usual 0.9)"),
    ("optim.b2", float, _unit, "lie in [0, 1) (AdamW's usual 0.99)"),
    ("optim.eps", float, _gt(0), "be > 0 (1e-8)"),
    ("optim.grad_clip_norm", float, _ge(0), "be >= 0 (0 = no clipping)"),
    ("optim.max_nonfinite_steps", int, _ge(1), "be >= 1"),
    ("lora.rank", int, _ge(0), "be >= 0 (0 = full fine-tuning; d1 trains rank 128)"),
    ("lora.alpha", float, _gt(0), "be > 0 (the adapters are scaled by alpha / rank; d1: 64)"),
    ("lora.dropout", float, _unit, "lie in [0, 1) (d1: 0.05)"),
    ("sft.steps", int, _ge(0), "be >= 0 (0 = no warm-up SFT)"),
    ("sft.batch_size", int, _ge(1), "be >= 1"),
    ("sft.num_mc_samples", int, _ge(1), "be >= 1"),
    ("sft.learning_rate", float, _gt(0), "be > 0"),
    ("sft.warmup_steps", int, _ge(0), "be >= 0 (0 = no warmup)"),
    ("sft.final_lr_fraction", float, lambda v: 0 <= v <= 1, "lie in [0, 1]"),
    ("sft.micro_batch_per_device", int, _ge(0), "be >= 0 (0 = whole batch)"),
    ("sft.eval_every", int, _ge(0), "be >= 0 (0 = config.eval_every)"),
    ("eval.gen_length", int, _ge(1), "be >= 1"),
    ("eval.steps", int, _ge(1), "be >= 1"),
    ("eval.block_length", int, _ge(1), "be >= 1"),
    ("eval.temperature", float, _ge(0), "be >= 0 (0 = greedy)"),
    ("eval.num_examples", int, _ge(0), "be >= 0 (0 = the whole split)"),
    ("eval.batch_size", int, _ge(1), "be >= 1"),
    ("eval.threshold", "float?", lambda v: 0 < v <= 1,
     "lie in (0, 1] (Fast-dLLM uses 0.9), or be unset for the fixed schedule of config.eval.steps"),
    ("rewards.code_timeout_s", float, _gt(0), "be > 0 (seconds)"),
    ("rewards.code_memory_mb", int, _gt(0), "be > 0 (MB)"),
    ("rewards.code_workers", int, _ge(0), "be >= 0 (0 = 2 x CPUs)"),
    ("mesh.shape", "ints", _mesh_shape,
     "be 3 sizes (data, fsdp, tensor), each >= 1 or -1 (the devices left; at most one -1)"),
)
_KIND_NAMES = {int: "an int", float: "a finite number", "int?": "an int or unset",
               "float?": "a finite number or unset", "ints": "a tuple of ints"}


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _of_kind(v, kind) -> bool:
  if v is None:
    return kind in ("int?", "float?")
  if kind in (int, "int?"):
    return _is_int(v)
  if kind in (float, "float?"):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
  return isinstance(v, (tuple, list)) and all(_is_int(x) for x in v)


def _lookup(c, key: str):
  node = c
  for part in key.split("."):
    if part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def check_numeric(c) -> None:
  """Every NUMERIC_RULES key of c has its kind and lies in its range (keys c lacks are skipped).
  Reads a plain-dict snapshot: checking a key's range is not using it (the test that every key
  is read by something that acts on it must not count these reads)."""
  plain = c.to_dict() if hasattr(c, "to_dict") else c
  for key, kind, valid, must in NUMERIC_RULES:
    v = _lookup(plain, key)
    if v is _MISSING:
      continue
    if not _of_kind(v, kind):
      raise ConfigError(f"config.{key} {v!r} is not {_KIND_NAMES[kind]}: it must {must}")
    if v is not None and not valid(v):
      raise ConfigError(f"config.{key} {v!r} must {must}")


def _check_sampler(c, section: str) -> None:
  s = c[section]  # positive lengths, temperature and threshold: NUMERIC_RULES
  key = f"config.{section}"
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
  if s.cache not in CACHES:
    raise ConfigError(f"{key}.cache {s.cache!r} is unknown; use one of {CACHES}")
  if section == "rollout":
    if s.remasking not in REMASKING:
      raise ConfigError(f"{key}.remasking {s.remasking!r} is unknown; use one of {REMASKING}")
    if s.gather_weights not in GATHER_WEIGHTS:
      raise ConfigError(f"{key}.gather_weights {s.gather_weights!r} is unknown; use one of {GATHER_WEIGHTS}")


def _check_task(c) -> None:
  """config.task: its files, its names and the reward recipes against the task registry
  (bgpo_jax.tasks, which owns them: built-in tasks and any a config file registers), and its
  prompt limit against the prompt pipeline and the rollout buckets."""
  from bgpo_jax.data.dataset import TRUNCATION  # the prompt pipeline owns the modes
  from bgpo_jax.tasks import registry

  # URIs (gs://, s3://, ...) are read through epath later; only local paths are checked here.
  if c.task.data_dir and "://" not in c.task.data_dir and not os.path.isdir(c.task.data_dir):
    raise ConfigError(f"config.task.data_dir {c.task.data_dir!r} is not a directory")
  if c.task.train_file and "://" not in c.task.train_file and not os.path.isfile(c.task.train_file):
    raise ConfigError(f"config.task.train_file {c.task.train_file!r} does not exist")
  spec = registry.find(c.task.name)
  if c.task.name != "demo" and (spec is None or not spec.is_train_task):
    raise ConfigError(f"config.task.name {c.task.name!r} is unknown; use one of "
                      f"{registry.names('train')} or demo")
  if c.mode == "rl" and spec is not None and spec.train_file and not c.task.train_file:
    raise ConfigError(f"config.task.name {c.task.name!r} trains on {spec.train_file}: set "
                      "--config.task.train_file=/path/train.jsonl")
  if c.task.name not in ("demo",) and not c.task.data_dir and not c.task.train_file:
    raise ConfigError(f"config.task.name {c.task.name!r} reads data: set --config.task.data_dir to a folder of "
                      "train_*/test_* parquet or JSONL files (or use configs/demo.py, which needs none)")
  if c.task.name == "demo" and c.task.demo_task not in registry.names("demo"):
    raise ConfigError(f"config.task.demo_task {c.task.demo_task!r} is unknown; use "
                      f"{' or '.join(registry.names('demo'))}")
  for s in registry.specs():  # rewards.<task>: the recipe of a task that offers several
    if s.is_grader and s.recipes and s.name in c.rewards and c.rewards[s.name] not in s.recipes:
      raise ConfigError(f"config.rewards.{s.name} {c.rewards[s.name]!r} is unknown; use one of {s.recipes}")
  eval_sets = registry.names("grader")
  bad_evals = [n.strip() for n in c.task.eval_tasks.split(",") if n.strip() and n.strip() not in eval_sets]
  if bad_evals and c.task.name != "demo":
    raise ConfigError(f"config.task.eval_tasks {c.task.eval_tasks!r} names unknown test sets {bad_evals}; "
                      f"use a comma-separated list of {eval_sets}")
  if c.task.truncation not in TRUNCATION:
    raise ConfigError(f"config.task.truncation {c.task.truncation!r} is unknown; use one of {TRUNCATION}")
  buckets, limit = tuple(c.rollout.prompt_buckets), c.task.max_prompt_tokens
  if max(buckets) < limit:
    # The samplers pad each prompt to a bucket: a prompt the data keeps (up to max_prompt_tokens)
    # but longer than every bucket is cut again (truncation left) or stops the run (drop / error).
    raise ConfigError(f"config.rollout.prompt_buckets {buckets}: the largest bucket {max(buckets)} is below "
                      f"config.task.max_prompt_tokens {limit}, so longer prompts would not fit a bucket; "
                      f"add a bucket >= {limit} (e.g. --config.rollout.prompt_buckets="
                      f"'{tuple(sorted(set(buckets) | {limit}))}') "
                      f"or set --config.task.max_prompt_tokens={max(buckets)}")


def validate(c, *, data_parallel_size: int | None = None) -> None:
  """Checks a whole config before anything compiles; raises ConfigError naming the key and the fix."""
  def one_of(key, value, options):
    if value not in options:
      raise ConfigError(f"config.{key} {value!r} is unknown; use one of {options}")

  check_numeric(c)  # kinds and ranges of every numeric key first: the checks below compute with them
  one_of("mode", c.mode, MODES)
  from bgpo_jax import objectives  # the registry owns the names (built-in and registered ones)

  one_of("rl.objective", c.rl.objective, objectives.names())
  one_of("rl.mc_estimator", c.rl.mc_estimator, ESTIMATORS)
  one_of("rl.advantage_baseline", c.rl.advantage_baseline, ADVANTAGE_BASELINES)
  one_of("sft.mc_estimator", c.sft.mc_estimator, ESTIMATORS)
  one_of("tokenizer.kind", c.tokenizer.kind, TOKENIZERS)
  one_of("model.param_dtype", c.model.param_dtype, DTYPES)
  one_of("model.compute_dtype", c.model.compute_dtype, DTYPES)
  one_of("model.family", c.model.family, FAMILIES)
  from bgpo_jax.models.llada import ATTENTION_IMPLS, REMAT_POLICIES
  one_of("model.attention_impl", c.model.attention_impl, ATTENTION_IMPLS)
  one_of("model.remat_policy", c.model.remat_policy, REMAT_POLICIES + ("auto",))
  objective = objectives.get(c.rl.objective)
  try:
    objective.hparams_from_config(c.rl)  # the Hparams dataclass checks its own ranges
  except (TypeError, ValueError) as e:
    where = "config.rl" if objective.flat_hparams else f"config.rl.{objective.name}"
    raise ConfigError(f"{where}: {e}") from None
  if c.mode == "rl" and c.rl.kl_beta > 0 and objective.ref_field is None:
    raise ConfigError(f"config.rl.kl_beta {c.rl.kl_beta} needs reference terms, which rl.objective "
                      f"{objective.name!r} does not define (its authors' loss has no KL); set --config.rl.kl_beta=0")
  objective.check_config(c)  # e.g. vrpo_ol refuses an explicit "activations"
  if resolved_remat_policy(c) not in REMAT_POLICIES:
    raise ConfigError(f"config.model.remat_policy 'auto' resolves to {resolved_remat_policy(c)!r} (the "
                      f"objective's remat_policy), which is not one of {REMAT_POLICIES}")
  if not c.init.checkpoint:
    one_of("model.preset", c.model.preset, FAMILY_PRESETS[c.model.family])
  for key, value in (("optim.schedule", c.optim.schedule), ("sft.schedule", c.sft.schedule)):
    if value not in SCHEDULES:
      raise ConfigError(f"config.{key} {value!r} is unknown; use one of {SCHEDULES}")
  _check_sampler(c, "rollout")
  _check_sampler(c, "eval")
  rl = c.rl
  if c.mode == "rl" and rl.group_size < 2:
    raise ConfigError(f"config.rl.group_size {rl.group_size} must be >= 2: group advantages of a single "
                      "response are always 0")
  one_of("rl.reference_dtype", rl.reference_dtype, DTYPES)
  rows = rl.prompts_per_step * rl.group_size
  if c.rollout.batch_size and rows % c.rollout.batch_size:
    raise ConfigError(f"config.rollout.batch_size {c.rollout.batch_size} must divide the rollout batch "
                      f"{rows} (rl.prompts_per_step {rl.prompts_per_step} x rl.group_size {rl.group_size})")
  if c.rollout.batch_size and c.rollout.batch_size % rl.group_size:
    # A chunk holds whole prompt groups (its G responses come from one generate call).
    raise ConfigError(f"config.rollout.batch_size {c.rollout.batch_size} is not a multiple of "
                      f"config.rl.group_size {rl.group_size}; use a multiple such as "
                      f"{max(1, c.rollout.batch_size // rl.group_size) * rl.group_size}")
  if data_parallel_size:
    sft_runs = c.mode == "sft" or c.sft.steps > 0
    for key, n in (("rl.prompts_per_step x rl.group_size", rows), ("sft.batch_size", c.sft.batch_size)):
      if key.startswith("sft") and not sft_runs:
        continue  # no SFT phase: its batch is never built
      if n % data_parallel_size:
        raise ConfigError(f"config.{key} = {n} is not divisible by the data-parallel size "
                          f"{data_parallel_size} (mesh data x fsdp); change the batch or config.mesh.shape")
    # Every generate call's rows split over the batch shards: the rollout chunks and the eval
    # batches (eval pads the split's last batch to eval.batch_size, so any split size works).
    dp = data_parallel_size
    for key, n in (("rollout.batch_size", c.rollout.batch_size), ("eval.batch_size", c.eval.batch_size)):
      if n and n % dp:
        raise ConfigError(f"config.{key} {n} is not divisible by the data-parallel size {dp} (mesh data x "
                          f"fsdp): each generate call splits its rows over the devices; use a multiple of "
                          f"{dp} such as {-(-n // dp) * dp}")
    for key, per_dev, n in (("rl.micro_batch_per_device", rl.micro_batch_per_device, rows),
                            ("sft.micro_batch_per_device", c.sft.micro_batch_per_device, c.sft.batch_size)):
      if key.startswith("sft") and not sft_runs:
        continue
      micro = micro_batch_rows(per_dev, n, data_parallel_size)
      if micro and n % micro:
        raise ConfigError(f"config.{key} {per_dev} x {data_parallel_size} devices does not divide the batch "
                          f"of {n} rows; pick a divisor of {n // data_parallel_size}")
  # URIs (gs://, s3://, ...) are read through epath later; only local paths are checked here.
  if c.init.checkpoint and "://" not in c.init.checkpoint and not os.path.isdir(c.init.checkpoint):
    raise ConfigError(f"config.init.checkpoint {c.init.checkpoint!r} is not a directory; give a Hugging Face "
                      "LLaDA directory (config.json + safetensors) or an Orbax checkpoint of this trainer")
  if c.tokenizer.kind == "hf" and not (c.tokenizer.path or c.init.checkpoint):
    raise ConfigError("config.tokenizer.kind 'hf' needs config.tokenizer.path or config.init.checkpoint "
                      "(a directory with tokenizer.json); or use --config.tokenizer.kind=char")
  if c.tokenizer.path and "://" not in c.tokenizer.path and not os.path.isdir(c.tokenizer.path):
    raise ConfigError(f"config.tokenizer.path {c.tokenizer.path!r} is not a directory")
  _check_task(c)
  _check_lora(c)


def lora_targets(c) -> tuple[str, ...]:
  """config.lora.targets as a tuple of module names ("q_proj, v_proj" -> ("q_proj", "v_proj"))."""
  return tuple(t.strip() for t in str(c.lora.targets).split(",") if t.strip())


def lora_spec(c):
  """The run's models.lora.LoraSpec, or None for full fine-tuning (lora.rank 0)."""
  if not c.lora.rank:
    return None
  from bgpo_jax.models.lora import LoraSpec
  return LoraSpec(r=int(c.lora.rank), alpha=float(c.lora.alpha), targets=lora_targets(c),
                  dropout=float(c.lora.dropout))


def _check_lora(c) -> None:
  """config.lora / init.adapter (ranges: NUMERIC_RULES). Which targets exist depends on the model
  family; the run builder checks them against the model (models.lora.targets_of)."""
  if c.lora.sampler_weights not in ("merged", "unmerged"):
    raise ConfigError(f"config.lora.sampler_weights {c.lora.sampler_weights!r} is unknown; use merged or unmerged")
  if c.lora.base_dtype not in DTYPES:
    raise ConfigError(f"config.lora.base_dtype {c.lora.base_dtype!r} is unknown; use one of {DTYPES}")
  if not c.lora.rank:
    if c.init.adapter:
      raise ConfigError(f"config.init.adapter {c.init.adapter!r} needs LoRA training: set --config.lora.rank to "
                        f"the adapter's r (or --config.init.adapter='' for full fine-tuning)")
    return
  names = lora_targets(c)
  if not names or len(set(names)) != len(names) or any(not n.replace(".", "").replace("_", "").isalnum()
                                                       for n in names):
    raise ConfigError(f"config.lora.targets {c.lora.targets!r} must be distinct comma-separated module names, "
                      f"e.g. --config.lora.targets=q_proj,v_proj")
  if c.init.adapter and "://" not in c.init.adapter and not os.path.isdir(c.init.adapter):
    raise ConfigError(f"config.init.adapter {c.init.adapter!r} is not a directory; give a PEFT LoRA adapter "
                      "directory (adapter_config.json + adapter_model.safetensors)")


# ------------------------------------------------------------------------------ command line


def flat_keys(c, prefix: str = "") -> list[str]:
  """Every dotted key of a config ("rl.kl_beta", ...), sections excluded."""
  out = []
  for k in c.keys():
    v = c[k]
    if isinstance(v, ml_collections.ConfigDict):
      out += flat_keys(v, f"{prefix}{k}.")
    else:
      out.append(prefix + k)
  return out


def _load_config_file(spec: str):
  """Like config_flags: 'path.py' or 'path.py:variant' -> get_config() / get_config(variant)."""
  import importlib.util
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_bgpo_config_file", path)
  if module_spec is None or module_spec.loader is None:
    return None
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def closest_keys(key: str, keys: list[str], n: int = 3) -> list[str]:
  """The n keys most like `key`: same section first, then by string similarity (difflib)."""
  import difflib
  section, leaf = key.rpartition(".")[0], key.rpartition(".")[2]

  def score(k):
    ks, kl = k.rpartition(".")[0], k.rpartition(".")[2]
    return (ks == section) + difflib.SequenceMatcher(None, leaf, kl).ratio() + \
        0.5 * difflib.SequenceMatcher(None, key, k).ratio()

  return sorted(keys, key=score, reverse=True)[:n]


def check_override_keys(argv, flag: str = "config") -> None:
  """Raises ConfigError (one line: the key and the closest valid keys) for a `--config.<key>=...`
  that names no key of the config file; ml_collections itself only raises AttributeError("'key'")."""
  spec = None
  overrides = []
  for i, a in enumerate(argv[1:], start=1):
    if a.startswith(f"--{flag}="):
      spec = a.split("=", 1)[1]
    elif a == f"--{flag}" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif a.startswith((f"--{flag}.", f"--no{flag}.")):
      overrides.append(a.split("=", 1)[0].split(".", 1)[1])
  if not overrides or not spec or not os.path.isfile(spec.partition(":")[0]):
    return  # nothing to check here; absl reports a missing or unreadable --config itself
  c = _load_config_file(spec)
  if c is None:
    return
  keys = flat_keys(c)
  for key in overrides:
    node = c
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict):
        break  # an index into a tuple value (mesh.shape[0]): ml_collections checks it
      if part not in node:
        raise ConfigError(f"unknown config key --{flag}.{key} (config file {spec}); closest valid keys: "
                          + ", ".join(f"--{flag}.{k}" for k in closest_keys(key, keys)))
      node = node[part]


def parse_flags(argv):
  """absl flags parser for the CLIs: a mistyped --config.<key> is one line on stderr and exit 2."""
  import sys
  from absl import app
  try:
    check_override_keys(argv)
  except ConfigError as e:
    print(f"{os.path.basename(argv[0])}: error: {e}", file=sys.stderr)
    sys.exit(2)
  return app.parse_flags_with_usage(argv)
