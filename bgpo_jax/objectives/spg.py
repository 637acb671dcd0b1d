"""SPG (Sandwiched Policy Gradient, Wang et al. 2025): REINFORCE on a lower bound of log p(y|x)
for rewarded responses and an upper bound for the others, on block-wise masks.

Per response b (advantage A_b, completion mask c_b = its tokens up to and including the first stop
token, length |c_b|) and MC sample j (mask M_j, the positions replaced by the mask token;
k_j = M_j & c_b, the counted ones; per-token log-probs l_ij = log p_theta(y_i | masked input j)):

  e_j      = sum_i k_ij l_ij / |k_j|                        per-sample masked-token mean ("ELBO")
  ELBO_b   = mean_j e_j
  t_j      = |k_j| / |c_b|                                  the sample's empirical mask ratio
  EUBO_b   = (1 / beta) mean_{i in U} log( mean_j k_ij exp(beta l_ij) / t_j ),  U = {i: some k_ij}
  s_b      = ELBO_b                                          for A_b > 0
             EUBO_b | w EUBO_b + (1 - w) ELBO_b | ELBO_b | 0 for A_b <= 0 (logp_estimation eubo / mix /
                                                              elbo / zero)
  R        = mean_b  rho_b A_b s_b,   rho_b = |c_b| / mean_{b' in chunk(b)} |c_b'|

rho_b is the authors' token weighting: each device's loss is sum_b(-A_b s_b |c_b|) / sum_b |c_b| over
its rows, and with their per_device_train_batch_size = num_generations a device holds exactly one
prompt's group (TRL's RepeatRandomSampler puts a prompt's G copies in a row), so the chunk is the
group (length_weighting "group"; "batch": the whole rollout batch; "none": rho = 1).

There is no old policy and no ratio: every inner update (rl.updates_per_batch) is a plain
REINFORCE step on the same rollouts, with fresh masks.

Per-sample or whole-batch: e_j enters linearly, so with logp_estimation "elbo" or "zero" R is a sum
of per-sample terms and the step scans the n samples one at a time (memory flat in n). The EUBO is
a log of a mean over the samples, per token: with "eubo" or "mix" the step holds all n sample
graphs at once (one call per micro-batch; memory grows with n; the authors' recipe has n = 2).

BGPO's bounds do not apply: they bound exp(mean_j d_j) of per-sample log-RATIOS, and SPG has no
ratio. Jensen on the EUBO's log-mean-exp (log mean_j x_j >= mean_j log x_j) points the wrong way
for A < 0 (it would bound the objective from above). The tangent of log at a stop-gradient point
y0 = mean_j(...) does give a per-sample lower bound, log y <= log y0 + y / y0 - 1, exact in value
and gradient at y = y0; it needs every sample's value under the current policy before the scan
(an extra no-gradient pass of all n samples per update), so it is not offered here.

Masks (`spg_masks`, the authors' "block_random" forward process): the response is cut into blocks
of `block_length`; each sample j picks a block k_j (a random permutation of the blocks, its first
n entries taken modulo the number of blocks the completion reaches: distinct picks when it reaches
every block, possibly repeated otherwise), masks a uniform number in [max(floor(m min_t), 1),
min(floor(m max_t), m)] of block k_j's m completion tokens, every token of the later blocks and
every token after the completion; each token of the prompt and of the blocks before k_j is masked
with probability p_mask_prompt (the authors' "prompt" masking also covers those clean blocks).
The draw is a pure function of a per-row key from `row_seeds`: the same on any topology, fresh
for every inner update, as the authors' per-iteration mask seeds.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bgpo_jax.objectives.base import BatchField, Objective, RolloutInputs, register
from bgpo_jax.objectives.common import _float

LOGP_ESTIMATIONS = ("eubo", "mix", "elbo", "zero")
LENGTH_WEIGHTINGS = ("group", "batch", "none")


# ------------------------------------------------------------------------------ the loss


def _check_shapes(logp: jax.Array, masks: jax.Array, completion_mask: jax.Array, advantages: jax.Array) -> None:
  if logp.ndim != 3 or jnp.shape(masks) != logp.shape:
    raise ValueError(f"logp {logp.shape} and masks {jnp.shape(masks)} must both be [n, B, L]")
  if jnp.shape(completion_mask) != logp.shape[1:]:
    raise ValueError(f"completion_mask {jnp.shape(completion_mask)} must be [B, L] = {logp.shape[1:]}")
  if jnp.shape(advantages) != logp.shape[1:2]:
    raise ValueError(f"advantages {jnp.shape(advantages)} must be [B] = ({logp.shape[1]},)")


def spg_sample_means(logp: jax.Array, masks: jax.Array, completion_mask: jax.Array) -> jax.Array:
  """Per-sample ELBO estimates e_j: the mean log-prob over the masked completion tokens.

  Args:
    logp: [..., B, L] per-token log p(y_i | masked input) (e.g. [n, B, L], or [B, L] for one sample).
    masks: [..., B, L] bool, True = position masked in that sample's input.
    completion_mask: [B, L], nonzero for the response's tokens up to and including its first stop.

  Returns:
    [..., B]; 0 for a sample with no masked completion token.
  """
  k = jnp.asarray(masks, bool) & jnp.asarray(completion_mask, bool)
  total = jnp.sum(jnp.where(k, logp, 0.0), axis=-1)  # where, not multiply: no 0 * -inf
  return total / jnp.maximum(jnp.sum(k, axis=-1).astype(logp.dtype), 1.0)


def spg_eubo(logp: jax.Array, masks: jax.Array, completion_mask: jax.Array, *, eubo_beta: float) -> jax.Array:
  """The authors' upper-bound estimate per response, EUBO_b (module docstring).

  Per completion token i: log( (1/n) sum_{j: i masked in j} exp(beta l_ij) / t_j ), t_j the
  sample's masked fraction of the completion; averaged over the tokens masked in at least one
  sample, divided by beta. Computed as a log-sum-exp (the authors form p^beta in probability
  space, where a token with p^beta below float32's range would drop out; here it stays).

  Args:
    logp: [n, B, L] per-token log-probs; masks [n, B, L] bool; completion_mask [B, L].
    eubo_beta: beta > 0.

  Returns:
    [B]; 0 for a response with no masked completion token.
  """
  n = logp.shape[0]
  comp = jnp.asarray(completion_mask, bool)
  k = jnp.asarray(masks, bool) & comp  # [n, B, L]
  t = jnp.sum(k, axis=-1) / jnp.maximum(jnp.sum(comp, axis=-1), 1)  # [n, B]
  log_t = jnp.log(jnp.maximum(t, 1e-8)).astype(logp.dtype)
  x = eubo_beta * logp - log_t[..., None]
  # Double where: the unmasked entries are excluded from the log-sum-exp with finite values, so
  # neither the forward nor the gradient ever sees -inf.
  x_max = jnp.max(jnp.where(k, x, -jnp.inf), axis=0)  # [B, L]
  used = jnp.any(k, axis=0)
  x_max = jnp.where(used, x_max, 0.0)
  s = jnp.sum(jnp.where(k, jnp.exp(jnp.where(k, x, 0.0) - x_max), 0.0), axis=0)
  log_mean = x_max + jnp.log(jnp.where(used, s, 1.0)) - jnp.log(float(n))
  per_row = jnp.sum(jnp.where(used, log_mean, 0.0), axis=-1) / jnp.maximum(jnp.sum(used, axis=-1), 1)
  return per_row / eubo_beta


def length_weights(completion_mask: jax.Array) -> jax.Array:
  """rho_b = |c_b| / mean_b |c_b|: the authors' loss sum_b(-A_b s_b |c_b|) / sum_b |c_b| on these
  rows (one device's batch) as a mean over rows. [B, L] -> [B]."""
  n_tok = jnp.sum(jnp.asarray(completion_mask, bool), axis=-1).astype(jnp.float32)
  return n_tok / jnp.maximum(jnp.mean(n_tok), 1e-8)


def host_length_weights(lengths: np.ndarray, group_size: int, mode: str) -> np.ndarray:
  """rho_b of the rows `lengths` [rows] (global rows, group order: rows g*G .. g*G+G-1 answer
  prompt g): |c_b| over the mean length of b's group ("group"), of all rows ("batch"), or 1."""
  lengths = np.asarray(lengths, np.float64)
  if mode == "none":
    return np.ones(lengths.shape, np.float32)
  if mode == "group":
    if lengths.size % group_size:
      raise ValueError(f"{lengths.size} rows are not whole groups of rl.group_size {group_size}")
    mean = np.repeat(lengths.reshape(-1, group_size).mean(axis=1), group_size)
  elif mode == "batch":
    mean = np.full(lengths.shape, lengths.mean())
  else:
    raise ValueError(f"length_weighting {mode!r} must be one of {LENGTH_WEIGHTINGS}")
  return (lengths / np.maximum(mean, 1e-8)).astype(np.float32)


def spg_objective(
    logp: jax.Array,
    masks: jax.Array,
    completion_mask: jax.Array,
    advantages: jax.Array,
    *,
    logp_estimation: str = "mix",
    eubo_beta: float = 1.5,
    mix_weight: float = 0.5,
    row_weights: jax.Array | None = None,
) -> jax.Array:
  """SPG objective R = mean_b rho_b A_b s_b (module docstring): the negative of the authors' loss.

  Args:
    logp: [n, B, L] per-token log-probs of the response under the n masked inputs (differentiable).
    masks: [n, B, L] bool, True = masked in that sample (positions after the completion may be
      True too: they are masked in the input but never counted).
    completion_mask: [B, L], nonzero for each response's tokens up to and including its first stop.
    advantages: [B]; A > 0 takes the ELBO, A <= 0 the `logp_estimation` estimate.
    logp_estimation: "eubo", "mix", "elbo" or "zero" for the A <= 0 rows.
    eubo_beta: beta of the EUBO.
    mix_weight: w of "mix": w EUBO + (1 - w) ELBO.
    row_weights: [B] rho_b; None = `length_weights(completion_mask)` (the authors' weighting over
      these B rows). The train step passes weights normalized over the whole rollout batch.

  Returns:
    scalar objective to maximize.
  """
  if logp_estimation not in LOGP_ESTIMATIONS:
    raise ValueError(f"logp_estimation {logp_estimation!r} must be one of {LOGP_ESTIMATIONS}")
  lp = _float(logp)
  _check_shapes(lp, masks, completion_mask, advantages)
  adv = jnp.asarray(advantages, lp.dtype)
  elbo = jnp.mean(spg_sample_means(lp, masks, completion_mask), axis=0)  # [B]
  if logp_estimation == "elbo":
    neg = elbo
  elif logp_estimation == "zero":
    neg = jnp.zeros_like(elbo)
  else:
    eubo = spg_eubo(lp, masks, completion_mask, eubo_beta=eubo_beta)
    neg = eubo if logp_estimation == "eubo" else mix_weight * eubo + (1.0 - mix_weight) * elbo
  s = jnp.where(adv > 0, elbo, neg)
  rho = length_weights(completion_mask) if row_weights is None else jnp.asarray(row_weights, lp.dtype)
  return jnp.mean(rho * adv * s)


def spg_sample_terms(e: jax.Array, advantages: jax.Array, row_weights: jax.Array, *, num_samples: int,
                     logp_estimation: str) -> jax.Array:
  """Per-sample terms of R when it is linear in the samples ("elbo" / "zero"): rho A e_j / n, and
  0 for the A <= 0 rows under "zero". Summed over j and averaged over B they give R.

  Args:
    e: [..., B] per-sample estimates e_j (`spg_sample_means`).
    advantages, row_weights: [B].
    num_samples: n, the total number of samples summed over.
    logp_estimation: "elbo" or "zero".

  Returns:
    [..., B].
  """
  if logp_estimation not in ("elbo", "zero"):
    raise ValueError(f"logp_estimation {logp_estimation!r} is not linear in the samples; per-sample terms "
                     "exist for 'elbo' and 'zero' only (use spg_objective)")
  e = _float(e)
  adv = jnp.asarray(advantages, e.dtype)
  g = jnp.asarray(row_weights, e.dtype) * adv * e / num_samples
  return g if logp_estimation == "elbo" else jnp.where(adv > 0, g, 0.0)


# ------------------------------------------------------------------------------ the masks


def _row_masks(key: jax.Array, length: jax.Array, real_prompt: jax.Array, *, num_samples: int, gen_length: int,
               block_length: int, min_t: float, max_t: float, p_mask_prompt: float):
  """One row's n masks (module docstring): (prompt [n, P] bool, response [n, L] bool)."""
  n, L, bl = num_samples, gen_length, block_length
  nb, P = L // bl, real_prompt.shape[0]
  k_perm, k_num, k_part, k_ctx = jax.random.split(key, 4)
  length = jnp.clip(length, 1, L)  # a response always has its stop token (or all L tokens)
  reach = (length - 1) // bl + 1  # blocks the completion reaches
  block = jax.random.permutation(k_perm, nb)[:n] % reach  # [n]
  m = jnp.minimum(bl, length - bl * block)  # completion tokens in the block, >= 1
  mf = m.astype(jnp.float32)
  lo = jnp.maximum(jnp.floor(mf * min_t).astype(jnp.int32), 1)
  # The authors assert lo <= hi; an empty range (m * max_t < 1) takes lo here.
  hi = jnp.maximum(jnp.minimum(jnp.floor(mf * max_t).astype(jnp.int32), m), lo)
  count = jax.random.randint(k_num, (n,), lo, hi + 1)
  # Exactly `count` of the block's first m positions: the ranks of iid keys are a uniform
  # permutation (the positions past m get keys above every valid one).
  q = jnp.arange(bl)
  u = jnp.where(q[None] < m[:, None], jax.random.uniform(k_part, (n, bl)), 2.0)
  chosen = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1) < count[:, None]  # [n, bl]
  pos = jnp.arange(L)
  blk = (pos // bl)[None]
  ctx = jax.random.uniform(k_ctx, (n, P + L)) < p_mask_prompt
  resp = (((blk == block[:, None]) & chosen[:, pos % bl]) | (blk > block[:, None]) | (pos[None] >= length)
          | ((blk < block[:, None]) & ctx[:, P:]))
  return real_prompt[None] & ctx[:, :P], resp


def spg_masks(keys: jax.Array, lengths: jax.Array, real_prompt: jax.Array, *, num_samples: int, gen_length: int,
              block_length: int, min_t: float = 0.0, max_t: float = 1.0,
              p_mask_prompt: float = 0.15) -> tuple[jax.Array, jax.Array]:
  """The block-wise masks of n samples per row, each row from its own key.

  Args:
    keys: [B] typed PRNG keys (jax.random.key), one per row.
    lengths: int [B], completion tokens (up to and including the first stop token; <= L).
    real_prompt: bool [B, P], True for real prompt tokens (padding is never masked).
    num_samples: n <= gen_length // block_length (the authors' num_t <= number of blocks).
    gen_length, block_length: L, a multiple of block_length.
    min_t, max_t: the range of the masked fraction of the partially masked block.
    p_mask_prompt: each clean context token (prompt, earlier blocks) is masked with it.

  Returns:
    (prompt masks bool [n, B, P], response masks bool [n, B, L]); True = replaced by the mask token.
  """
  if gen_length % block_length:
    raise ValueError(f"gen_length {gen_length} must be a multiple of block_length {block_length}")
  if not 1 <= num_samples <= gen_length // block_length:
    raise ValueError(f"num_samples {num_samples} must lie in [1, {gen_length // block_length}] (the number of "
                     f"blocks of {block_length} in {gen_length})")
  return _spg_masks(keys, jnp.asarray(lengths, jnp.int32), jnp.asarray(real_prompt, bool), int(num_samples),
                    int(gen_length), int(block_length), float(min_t), float(max_t), float(p_mask_prompt))


# Jitted as one program (inside the train step it is traced into the step): eagerly, each random
# op would be its own compile.
@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8))
def _spg_masks(keys, lengths, real_prompt, n, L, bl, min_t, max_t, p_mask_prompt):
  fn = functools.partial(_row_masks, num_samples=n, gen_length=L, block_length=bl, min_t=min_t, max_t=max_t,
                         p_mask_prompt=p_mask_prompt)
  pm, rm = jax.vmap(fn)(keys, lengths, real_prompt)
  return jnp.swapaxes(pm, 0, 1), jnp.swapaxes(rm, 0, 1)


def _row_keys(seeds: jax.Array) -> jax.Array:
  """[B] uint32 seeds -> [B] typed PRNG keys."""
  return jax.vmap(jax.random.key)(seeds)


# ------------------------------------------------------------------------------ the objective


@dataclasses.dataclass(frozen=True)
class SPGHparams:
  # The A <= 0 rows' estimate; the README's headline variant is "SPG w/ Mixture"
  # (spg/slurm_scripts/spg_mix/*.sbatch: --logp_estimation mix; spg_eubo/*: eubo).
  logp_estimation: str = "mix"
  eubo_beta: float = 1.5  # spg/diffu_grpo_config.py:411 (eubo_beta); gsm8k / math scripts: 1.5
  mix_weight: float = 0.5  # spg/diffu_grpo_config.py:415 (mix_weight); spg_mix/*.sbatch: 0.5
  block_length: int = 32  # spg/slurm_scripts/train.yaml (block_length: 32; the rollout's block length too)
  min_t: float = 0.0  # spg/diffu_grpo_config.py:399; every SPG script: --min_t 0
  max_t: float = 1.0  # spg/diffu_grpo_config.py:403; every SPG script: --max_t 1
  # spg/slurm_scripts/train.yaml (p_mask_prompt: 0.15, use_mask_prompt: true); 0 = no context masking.
  p_mask_prompt: float = 0.15
  # The authors' loss weights each row by its completion length within a device's batch
  # (spg/spg_trainer.py:117-118), one prompt's group in their scripts (module docstring).
  length_weighting: str = "group"

  def __post_init__(self):
    if self.logp_estimation not in LOGP_ESTIMATIONS:
      raise ValueError(f"logp_estimation {self.logp_estimation!r} must be one of {LOGP_ESTIMATIONS}")
    if not self.eubo_beta > 0:
      raise ValueError(f"eubo_beta {self.eubo_beta} must be > 0 (the authors use 1.0 to 2.0)")
    if not 0.0 <= self.mix_weight <= 1.0:
      raise ValueError(f"mix_weight {self.mix_weight} must lie in [0, 1]")
    if self.block_length < 1:
      raise ValueError(f"block_length {self.block_length} must be >= 1")
    if not 0.0 <= self.min_t <= self.max_t <= 1.0:
      raise ValueError(f"min_t {self.min_t} and max_t {self.max_t} must satisfy 0 <= min_t <= max_t <= 1")
    if self.length_weighting not in LENGTH_WEIGHTINGS:
      raise ValueError(f"length_weighting {self.length_weighting!r} must be one of {LENGTH_WEIGHTINGS}")
    if not 0.0 <= self.p_mask_prompt < 1.0:
      raise ValueError(f"p_mask_prompt {self.p_mask_prompt} must lie in [0, 1) (0 = no context masking)")


class SPG(Objective):
  name = "spg"
  # "eubo" / "mix" (the defaults) are whole-batch; `units` scans samples for "elbo" / "zero".
  per_sample = False
  remat_policy = "full"  # the n sample graphs are alive together
  Hparams = SPGHparams
  fields = (BatchField("response_mask", ("B", "L"), jnp.float32),
            BatchField("length_weights", ("B",), jnp.float32),
            BatchField("row_seeds", ("B",), jnp.uint32))
  old_field = None  # no old policy: plain REINFORCE at every inner update
  ref_field = None  # no KL (the authors raise for beta != 0)

  @staticmethod
  def linear(hp: SPGHparams) -> bool:
    """Whether R is a sum of per-sample terms (the step then scans the samples)."""
    return hp.logp_estimation in ("elbo", "zero")

  def units(self, cfg) -> int:
    return cfg.num_mc_samples if self.linear(cfg.hparams) else 1

  def check_config(self, config) -> None:
    from bgpo_jax.config import ConfigError
    hp = self.hparams_from_config(config.rl)
    L, bl, n = config.rollout.gen_length, hp.block_length, config.rl.num_mc_samples
    if L % bl:
      raise ConfigError(f"config.rollout.gen_length {L} is not a multiple of config.rl.spg.block_length {bl}: "
                        f"SPG masks whole blocks; use a block length that divides it (e.g. "
                        f"{np.gcd(L, bl)}) or a gen_length of a multiple of {bl}")
    if n > L // bl:
      raise ConfigError(f"config.rl.num_mc_samples {n} exceeds the {L // bl} blocks of "
                        f"config.rl.spg.block_length {bl} in gen_length {L}: each SPG sample masks a distinct "
                        f"block; use num_mc_samples <= {L // bl} (the authors' recipe: 2)")
    # rl.kl_beta > 0 is refused by config.validate: SPG has no reference terms (the authors' trainer
    # raises for beta != 0 too).

  def warnings(self, config) -> tuple[str, ...]:
    hp = self.hparams_from_config(config.rl)
    if config.mode == "rl" and hp.block_length != config.rollout.block_length:
      return (f"config.rl.spg.block_length {hp.block_length} differs from config.rollout.block_length "
              f"{config.rollout.block_length}; the SPG authors mask with the rollout's block length",)
    return ()

  def recipe(self, c):
    """The SPG authors' published settings (SPG w/ Mixture) for a task config, each from the
    facebookresearch/SPG scripts: spg/slurm_scripts/train.yaml (shared) and
    spg/slurm_scripts/spg_mix/<task>_base_spg_mix_*.sbatch (per task)."""
    super().recipe(c)
    task = c.task.name
    c.rl.kl_beta = 0.0  # spg_mix/*.sbatch: --beta 0.0
    c.rl.group_size = 6  # spg_mix/*.sbatch: --num_generations 6
    # 8 GPUs x per_device_train_batch_size 6 x gradient_accumulation_steps 2 = 96 responses per
    # update (sudoku: 3 x 4, the same 96) = 16 prompts x 6.
    c.rl.prompts_per_step = 16
    c.rl.updates_per_batch = 4  # spg_mix/*.sbatch: NUM_ITER=4 (--num_iterations)
    c.rl.num_mc_samples = 2  # spg_mix/*.sbatch: --num_t 2
    c.rl.advantage_std = False  # spg/spg_trainer.py:720: advantages = rewards - group mean
    # The authors' length-weighted mean counts every row's tokens, zero-advantage rows included.
    c.rl.skip_zero_advantage = False
    c.rl.spg.logp_estimation = "mix"  # spg_mix/*.sbatch: --logp_estimation mix
    c.rl.spg.mix_weight = 0.5  # spg_mix/*.sbatch: --mix_weight 0.5
    # spg_mix/{gsm,math,countdown}_*.sbatch: --eubo_beta 1.5; sudoku_new_*: 1.0 (no code recipe: 1.5).
    c.rl.spg.eubo_beta = 1.0 if task == "sudoku" else 1.5
    c.rl.spg.block_length = 32  # train.yaml: block_length 32 (the masks' blocks are the rollout's)
    c.rl.spg.min_t = 0.0  # spg_mix/*.sbatch: --min_t 0
    c.rl.spg.max_t = 1.0  # spg_mix/*.sbatch: --max_t 1
    c.rl.spg.p_mask_prompt = 0.15  # train.yaml: p_mask_prompt 0.15, use_mask_prompt true
    # spg/spg_trainer.py:117-118 per device; per_device_train_batch_size 6 = num_generations 6: one
    # group per device (sudoku_new_*.sbatch: 3 rows per device, half a group: not expressible here).
    c.rl.spg.length_weighting = "group"
    # train.yaml; the authors train LoRA adapters (r 128, alpha 64, dropout 0.05) on a 4-bit base
    # model: here the full weights train.
    c.optim.learning_rate = 3e-6  # train.yaml: learning_rate 3e-6
    c.optim.schedule = "constant"  # train.yaml: lr_scheduler_type constant_with_warmup
    c.optim.warmup_steps = 1  # train.yaml: warmup_ratio 0.0001 (HF rounds up: one update at lr 0)
    c.optim.weight_decay = 0.1  # train.yaml: weight_decay 0.1
    c.optim.grad_clip_norm = 0.2  # train.yaml: max_grad_norm 0.2
    c.optim.b1 = 0.9  # train.yaml: adam_beta1 0.9
    c.optim.b2 = 0.99  # train.yaml: adam_beta2 0.99
    c.rollout.gen_length = 256  # train.yaml: max_completion_length 256
    c.rollout.steps = 128  # train.yaml: diffusion_steps 128
    c.rollout.block_length = 32  # train.yaml: block_length 32
    # spg/diffu_grpo_config.py:187 (temperature 0.9); sudoku_new_*.sbatch: --temperature 0.3.
    c.rollout.temperature = 0.3 if task == "sudoku" else 0.9
    return c

  # ---------------------------------------------------------------- the step

  def _noised(self, model_cfg, cfg, mb: dict):
    """(noised inputs int32 [n, mb, S], counted masks bool [n, mb, L], completion mask bool [mb, L])."""
    hp, L = cfg.hparams, cfg.gen_length
    tokens, attn = mb["tokens"], mb["attention_mask"]
    P = tokens.shape[1] - L
    comp = mb["response_mask"] > 0
    real = attn[:, :P] != 0
    pm, rm = spg_masks(_row_keys(mb["row_seeds"]), jnp.sum(comp, axis=-1), real, num_samples=cfg.num_mc_samples,
                       gen_length=L, block_length=hp.block_length, min_t=hp.min_t, max_t=hp.max_t,
                       p_mask_prompt=hp.p_mask_prompt)
    noisy = jnp.where(jnp.concatenate([pm, rm], axis=-1), jnp.asarray(model_cfg.mask_token_id, tokens.dtype),
                      tokens[None]).astype(jnp.int32)
    return noisy, rm, comp

  def unit_terms(self, model_cfg, cfg, params, mb: dict, u: jax.Array):
    """"eubo" / "mix": the micro-batch's whole objective (u = 0, all n samples in one vmapped graph);
    "elbo" / "zero": sample u's terms. Summed over the micro-batch rows."""
    from bgpo_jax.diffusion import elbo
    hp, L, n = cfg.hparams, cfg.gen_length, cfg.num_mc_samples
    if cfg.kl_beta > 0:
      raise ValueError(f"kl_beta {cfg.kl_beta}: SPG has no KL term (no reference terms); use kl_beta=0")
    noisy, rm, comp = self._noised(model_cfg, cfg, mb)
    targets, attn = mb["tokens"][:, -L:], mb["attention_mask"]
    logps = lambda x: elbo.response_token_logps(model_cfg, params, x, attn, targets)
    rho = mb["length_weights"]
    zero = jnp.zeros(())
    if self.linear(hp):
      e = spg_sample_means(logps(noisy[u]), rm[u], comp)  # [mb]
      g = spg_sample_terms(e, mb["advantages"], rho, num_samples=n, logp_estimation=hp.logp_estimation)
      return jnp.sum(g), {"elbo": jnp.sum(jax.lax.stop_gradient(e)), "abs_d": zero, "kl": zero}
    logp = jax.vmap(logps)(noisy)  # [n, mb, L]
    obj = spg_objective(logp, rm, comp, mb["advantages"], logp_estimation=hp.logp_estimation,
                        eubo_beta=hp.eubo_beta, mix_weight=hp.mix_weight, row_weights=rho)
    e = spg_sample_means(jax.lax.stop_gradient(logp), rm, comp)
    return obj * logp.shape[1], {"elbo": jnp.sum(e) / n, "abs_d": zero, "kl": zero}

  def old_terms(self, model_cfg, cfg, params, mb: dict) -> jax.Array:
    raise NotImplementedError("SPG stores no old-policy or reference terms (old_field and ref_field are None)")

  # ---------------------------------------------------------------- the trainer

  def host_fields(self, inputs: RolloutInputs) -> list[dict]:
    # The authors draw new masks (a new mask seed) for every inner update; the completion mask and
    # the length weights are the rollout's.
    from bgpo_jax import distributed as dist
    hp = self.hparams_from_config(inputs.rl)
    L = inputs.gen_length
    lengths = np.minimum(np.asarray(inputs.lengths), L)
    rmask = (np.arange(L)[None] < lengths[:, None]).astype(np.float32)
    # From the GLOBAL rows (group order; a host's rows are its host_slice of them, also when
    # rl.skip_zero_advantage moves rows between hosts), so the weights do not depend on the topology.
    every = dist.allgather_rows(lengths)
    weights = host_length_weights(every, int(inputs.rl.group_size), hp.length_weighting)
    weights = weights[dist.host_slice(every.size)]
    return [{"response_mask": rmask, "length_weights": weights, "row_seeds": inputs.row_seeds(u)}
            for u in range(inputs.updates)]


register(SPG())
