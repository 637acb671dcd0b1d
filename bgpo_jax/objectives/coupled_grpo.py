"""Coupled-GRPO (DiffuCoder, apple/ml-diffucoder): a token-level PPO surrogate on per-token
log-probs from a complementary pair of masks plus a fully masked forward, minus beta * k3 KL to a
reference.

Per response y of length L (the rollout's gen_length positions), with t ~ U(t_min, t_max) and a
mask m (each position masked independently with probability t, i.e. u_i < t for u_i ~ U(0, 1)),
three forwards of the model see the clean prompt and:
  full: every response position masked          -> a_i = log p(y_i | all masked)
  m:    the positions of m masked                -> b_i = log p(y_i | y masked by m)
  ~m:   the complementary positions masked       -> c_i = log p(y_i | y masked by ~m)
and each response token gets the coupled log-prob
  lp_i = (a_i + [m_i] b_i / t + [not m_i] c_i / (1 - t)) / 2,
so every token is scored exactly once by the pair, in the forward where it is masked, with the
ELBO's 1/t weight (coupled_grpo.py forward_process and selective_log_softmax). Per token
  s_i = min(r_i A, clip(r_i, 1 - eps_low, 1 + eps_high) A) - beta * k3(lp_ref_i - lp_i),
  r_i = exp(lp_i - lp_old_i),
averaged over the counted tokens (up to and including the first stop token) of each response,
then over the B responses ("sequence", ours), or over all tokens of the micro-batch ("batch", the
authors' per-chunk token mean). old and reference log-probs use the same masks (same row seeds).

Whole batch, not per sample: the ratio is exp of one per-token value mixing all three forwards,
so all three forwards' graphs are alive at once (three times diffu_grpo's one forward; the unit
is the micro-batch). BGPO's bounds would apply per token: lp_i - lp_old_i is the mean of two
log-ratios, the full forward's (a_i - a_old_i) and the pair's (b_i - b_old_i) / t (or c's over
1 - t), so the tangent (A >= 0) and Jensen (A < 0) bounds, and k3's convexity for the KL, turn
the objective into a sum over the three forwards (memory of one forward). Not offered: it needs
the old and reference log-probs per forward (two [B, L] arrays, not the combined one), and the
authors' loss is the exact ratio.

Masks: one key per row from `row_seeds`, drawing that row's t and uniform row inside the step,
so a row's masks are the same for the current, old and reference policies, whatever the
micro-batch or device topology. The authors draw one t for the whole batch and one uniform
matrix shared by every gradient-accumulation chunk and device (set_seed(mask_seed) on every
process); ours are independent per row with the same per-row distribution.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from bgpo_jax.objectives.base import BatchField, Objective, RolloutInputs, register
from bgpo_jax.objectives.common import _capped_exp, _dual_clip, _float, k3
from bgpo_jax.objectives.diffu_grpo import sequence_means, token_aux, token_inputs, token_terms

TOKEN_AVERAGES = ("sequence", "batch")


def coupled_masks(seeds: jax.Array, gen_length: int, ratio_min: float = 0.2,
                  ratio_max: float = 0.8) -> tuple[jax.Array, jax.Array]:
  """One mask pair per row from its seed: (t [B] float32, m [B, L] bool).

  t ~ U(ratio_min, ratio_max), m_i = u_i < t with u_i ~ U(0, 1); the pair is (m, ~m), so every
  position is masked in exactly one of the two. A pure function of `seeds` ([B] uint32).
  """
  def row(seed):
    k_t, k_u = jax.random.split(jax.random.key(seed))
    t = jax.random.uniform(k_t, (), jnp.float32, ratio_min, ratio_max)
    return t, jax.random.uniform(k_u, (gen_length,)) < t

  return jax.vmap(row)(jnp.asarray(seeds, jnp.uint32))


def coupled_token_logps(logp_full: jax.Array, logp_mask: jax.Array, logp_comp: jax.Array,
                        mask: jax.Array, ratio: jax.Array) -> jax.Array:
  """(a + where(m, b / t, c / (1 - t))) / 2: the coupled per-token log-probs.

  Args:
    logp_full: [B, L] log p(y_i) with every response position masked.
    logp_mask: [B, L] with the positions of `mask` masked (only its masked positions are used).
    logp_comp: [B, L] with the complementary positions masked (only those are used).
    mask: [B, L] bool, m.
    ratio: [B] t (or a scalar).
  Returns:
    [B, L] float32 (or wider).
  """
  a = _float(logp_full)
  t = jnp.asarray(ratio, a.dtype)
  t = t[:, None] if t.ndim == 1 else t
  pair = jnp.where(jnp.asarray(mask, bool), _float(logp_mask) / t, _float(logp_comp) / (1.0 - t))
  return 0.5 * (a + pair)


def coupled_grpo_objective(
    logp_new: jax.Array,
    logp_old: jax.Array,
    logp_ref: jax.Array | None,
    advantages: jax.Array,
    response_mask: jax.Array,
    *,
    clip_low: float = 0.5,
    clip_high: float = 0.5,
    beta: float = 0.01,
    token_average: str = "sequence",
    dual_clip: float | None = None,
) -> jax.Array:
  """Coupled-GRPO objective on coupled per-token log-probs (`coupled_token_logps`).

  Per token i of response b: r = exp(new - old),
  s = min(r A_b, clip(r, 1 - clip_low, 1 + clip_high) A_b) - beta * (exp(ref - new) - (ref - new) - 1)
  (the KL only when logp_ref is given and beta != 0; `dual_clip` c > 1: max(s_pg, c A) for A < 0
  before the KL, off by default as in the authors' code).

  Aggregation over the counted tokens (`response_mask`): "sequence" = mean over each response's
  tokens, then over B (exact under micro-batch accumulation; a response with no tokens adds 0);
  "batch" = sum over all tokens / their count, what the authors compute per gradient-accumulation
  chunk (coupled_grpo.py compute_loss).

  Args:
    logp_new: [B, L] coupled log-probs under the current policy (differentiable).
    logp_old: [B, L] under the old policy (stop-gradiented; pass logp_new on-policy).
    logp_ref: [B, L] under the reference (stop-gradiented), or None for no KL.
    advantages: [B].
    response_mask: [B, L], nonzero for the tokens that count.
    clip_low / clip_high: the ratio's clip range [1 - clip_low, 1 + clip_high].
    beta: KL coefficient.
    token_average: "sequence" or "batch".
    dual_clip: c > 1 or None.
  Returns:
    scalar objective to maximize.
  """
  new, adv = token_inputs(logp_new, logp_old, logp_ref, advantages, response_mask)
  if token_average not in TOKEN_AVERAGES:
    raise ValueError(f"token_average {token_average!r} must be one of {TOKEN_AVERAGES}")
  if isinstance(dual_clip, (int, float)) and not dual_clip > 1.0:
    raise ValueError(f"dual_clip {dual_clip} must be > 1 (typical: 3.0), or None for no dual clip")

  old = jax.lax.stop_gradient(jnp.asarray(logp_old, new.dtype))
  ratio = _capped_exp(new - old)
  a = adv[:, None]
  per_token = jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * a)
  per_token = _dual_clip(per_token, a, dual_clip)
  # Skip the KL only for a concrete beta == 0 (a traced beta is always included).
  if logp_ref is not None and not (isinstance(beta, (int, float)) and beta == 0.0):
    per_token = per_token - beta * k3(jax.lax.stop_gradient(jnp.asarray(logp_ref, new.dtype)) - new)

  if token_average == "batch":
    mask = jnp.asarray(response_mask).astype(bool)
    return jnp.sum(jnp.where(mask, per_token, 0.0)) / jnp.maximum(jnp.sum(mask.astype(new.dtype)), 1.0)
  return jnp.mean(sequence_means(per_token, response_mask))


@dataclasses.dataclass(frozen=True)
class CoupledGRPOHparams:
  """config.rl.coupled_grpo: the authors' published values (apple/ml-diffucoder at f735e01)."""
  # PPO clip: recipes/config_coupled_code.yaml:14 "epsilon: 0.5" (trl epsilon_low = epsilon; trl's
  # epsilon_high defaults to epsilon; compute_loss clamps to [1 - epsilon_low, 1 + epsilon_high],
  # src/open_r1/coupled_grpo.py:216).
  clip_low: float = 0.5
  clip_high: float = 0.5
  # Not the authors' (they have none; DARE's re-implementation uses 3.0): dual clip c > 1 for A < 0.
  dual_clip: float | None = None
  # The pair's mask ratio t ~ U(0.2, 0.8): src/open_r1/coupled_grpo.py:259 random.uniform(0.2, 0.8).
  mask_ratio_min: float = 0.2
  mask_ratio_max: float = 0.8
  # Ours: "sequence" (exact under accumulation, any topology). The authors': "batch", one token mean
  # per gradient-accumulation chunk of 5 rows per device (coupled_grpo.py:224).
  token_average: str = "sequence"
  # New masks every inner update. False = the published run: the mask seed is picked per micro-step
  # (coupled_grpo.py:197, _step % num_iterations, with _step counting chunks), so with
  # gradient_accumulation_steps 2 = num_iterations 2 (config_coupled_code.yaml:20, :23) each row meets
  # the same seed in both updates. True = the code's stated intent (random_masking, :456-458).
  resample_masks: bool = False

  def __post_init__(self):
    if not 0.0 <= self.clip_low < 1.0:
      raise ValueError(f"clip_low {self.clip_low} must lie in [0, 1) (the authors': 0.5)")
    if not self.clip_high >= 0.0:
      raise ValueError(f"clip_high {self.clip_high} must be >= 0 (the authors': 0.5)")
    if self.dual_clip is not None and not self.dual_clip > 1.0:
      raise ValueError(f"dual_clip {self.dual_clip} must be > 1 (e.g. 3.0), or None for none (the authors')")
    if not 0.0 < self.mask_ratio_min <= self.mask_ratio_max < 1.0:
      raise ValueError(f"mask_ratio_min {self.mask_ratio_min} and mask_ratio_max {self.mask_ratio_max} must satisfy "
                       "0 < min <= max < 1 (the authors': 0.2, 0.8)")
    if self.token_average not in TOKEN_AVERAGES:
      raise ValueError(f"token_average {self.token_average!r} must be one of {TOKEN_AVERAGES}")


class CoupledGRPO(Objective):
  name = "coupled_grpo"
  # Three forwards per row alive at once (full, m, ~m): recompute each block in the backward rather
  # than keep three sets of saved activations.
  remat_policy = "full"
  Hparams = CoupledGRPOHparams
  fields = (BatchField("response_mask", ("B", "L"), jnp.float32),
            BatchField("row_seeds", ("B",), jnp.uint32))
  old_field = BatchField("old_logps", ("B", "L"), jnp.float32)
  ref_field = BatchField("ref_logps", ("B", "L"), jnp.float32)

  # ---------------------------------------------------------------- configuration

  def check_config(self, config) -> None:
    from bgpo_jax.config import ConfigError
    hp = self.hparams_from_config(config.rl)
    rl = config.rl
    if hp.token_average == "batch" and rl.skip_zero_advantage and not rl.kl_beta:
      raise ConfigError("config.rl.coupled_grpo.token_average='batch' counts the tokens of zero-advantage rows "
                        "in the token mean, so dropping them (rl.skip_zero_advantage=True) changes the update; "
                        "set rl.skip_zero_advantage=False or token_average='sequence'")

  def warnings(self, config) -> tuple[str, ...]:
    if config.mode == "rl" and not config.rl.kl_beta and config.rl.updates_per_batch == 1:
      return ("coupled_grpo with rl.kl_beta=0 and rl.updates_per_batch=1 is not the authors' recipe; their "
              "settings: --config=configs/<task>.py:coupled_grpo",)
    return ()

  def recipe(self, c):
    """DiffuCoder's published coupled-GRPO recipe (apple/ml-diffucoder at f735e01:
    recipes/config_coupled_code.yaml, launched by run.sh on 8 processes). Their model is
    DiffuCoder-7B-Instruct (Dream family, full weights, no LoRA); the KL reference is re-synced to
    the policy every 64 steps (sync_ref_model, :11-12, trl mixup alpha 0.6), not reproduced: ours
    stays the policy at RL start."""
    super().recipe(c)
    mu = 2  # config_coupled_code.yaml:20 num_iterations
    c.rl.kl_beta = 0.01  # :13 beta
    c.rl.group_size = 10  # :19 num_generations
    # run.sh --num_processes 8 x per_device_train_batch_size 5 (:22) x gradient_accumulation_steps 2
    # (:23) = 80 completions per generation round = 8 prompts of 10.
    c.rl.prompts_per_step = 8 * 5 * 2 // 10
    c.rl.updates_per_batch = mu
    c.rl.num_mc_samples = 1  # one coupled pair per row (the objective draws its own masks)
    # :15 scale_rewards false: no std division. The authors' baseline is leave-one-out
    # (coupled_grpo.py:545-561: r - mean of the other G-1), i.e. G/(G-1) (r - mean(r)).
    c.rl.advantage_std = False
    if "advantage_baseline" in c.rl:
      c.rl.advantage_baseline = "leave_one_out"
    c.rl.skip_zero_advantage = False  # beta > 0: zero-advantage rows still carry the KL gradient
    c.rl[self.name].clip_low = 0.5  # :14 epsilon
    c.rl[self.name].clip_high = 0.5  # trl: epsilon_high defaults to epsilon
    c.optim.learning_rate = 1e-6  # :28
    # :38-40 cosine_with_min_lr, min_lr_rate 0.1; :69 warmup_ratio 0.0001 of the optimizer updates
    # (transformers: ceil(total * ratio)).
    c.optim.schedule = "cosine"
    c.optim.final_lr_fraction = 0.1
    c.optim.warmup_steps = math.ceil(0.0001 * c.total_steps * mu)
    c.optim.weight_decay = 0.1  # :31
    c.optim.grad_clip_norm = 0.2  # :32 max_grad_norm
    c.optim.b1 = 0.9  # :29 adam_beta1
    c.optim.b2 = 0.99  # :30 adam_beta2
    c.rollout.gen_length = 256  # :48 max_completion_length
    c.rollout.steps = 256  # :51 diffusion_steps
    # Dream's diffusion_generate (coupled_grpo.py:419-431): no blocks, entropy-ordered unmasking
    # (alg="entropy"); its top_p 0.95 is not reproduced.
    c.rollout.block_length = 256
    c.rollout.remasking = "entropy"
    c.rollout.temperature = 1.0  # :53 generation_temperature
    return c

  # ---------------------------------------------------------------- the step

  def _logps(self, model_cfg, cfg, params, mb: dict) -> jax.Array:
    """[mb, L] coupled token log-probs; the three forwards (full, m, ~m) in one vmapped graph."""
    from bgpo_jax.diffusion import elbo
    hp, L = cfg.hparams, cfg.gen_length
    t, m = coupled_masks(mb["row_seeds"], L, hp.mask_ratio_min, hp.mask_ratio_max)
    masks = jnp.stack([jnp.ones_like(m), m, ~m])  # [3, mb, L]
    tokens, attn = mb["tokens"], mb["attention_mask"]

    def forward(mask):
      noisy = elbo.masked_sequence(tokens, mask, model_cfg.mask_token_id)
      return elbo.response_token_logps(model_cfg, params, noisy, attn, tokens[:, -L:])

    lp = jax.vmap(forward)(masks)  # [3, mb, L]
    return coupled_token_logps(lp[0], lp[1], lp[2], m, t)

  def unit_terms(self, model_cfg, cfg, params, mb: dict, u: jax.Array):
    """The micro-batch's objective (u is always 0), summed over its rows."""
    hp = cfg.hparams
    logp = self._logps(model_cfg, cfg, params, mb)
    old, ref, rmask = token_terms(cfg, mb, logp)
    obj = coupled_grpo_objective(logp, old, ref, mb["advantages"], rmask, clip_low=hp.clip_low,
                                 clip_high=hp.clip_high, beta=cfg.kl_beta, token_average=hp.token_average,
                                 dual_clip=hp.dual_clip)
    return obj * logp.shape[0], token_aux(logp, old, ref, rmask)

  def old_terms(self, model_cfg, cfg, params, mb: dict) -> jax.Array:
    return self._logps(model_cfg, cfg, params, mb)

  def host_fields(self, inputs: RolloutInputs) -> list[dict]:
    rmask = inputs.response_mask()
    hp = self.hparams_from_config(inputs.rl)
    if hp.resample_masks:
      return [{"response_mask": rmask, "row_seeds": inputs.row_seeds(u)} for u in range(inputs.updates)]
    # One pair per row for every inner update: old / reference terms are computed once.
    return [{"response_mask": rmask, "row_seeds": inputs.row_seeds(0)}] * inputs.updates


register(CoupledGRPO())
