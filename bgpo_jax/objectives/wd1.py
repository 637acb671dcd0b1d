"""wd1 (Tang, Dolga, Yoon, Bogunovic, arXiv 2507.08838; code github.com/xiaohangt/wd1): a ratio-free
weighted log-likelihood, one-step mean-field token log-probs as in d1.

For a group of G responses to one prompt with advantages A_1..A_G:

  w+_i = softmax_j(psi * A_j)_i,   w-_i = softmax_j(-psi * A_j)_i,   w_i = w+_i - lambda * w-_i,
  s_i  = sum over the response's tokens up to and including the first stop token of log p(y_t | x~),

x~ = the prompt with each token masked w.p. p, the whole response masked (d1's one-step estimate),
and the objective (to maximize) is the mean over groups of sum_i w_i * s_i, minus
beta * (mean over responses of the per-token k3 KL to a frozen reference, averaged over the
response's tokens) when rl.kl_beta > 0. Per response that is G * w_i * s_i - beta * KL_i, averaged
over the batch. The authors' code (wd1/trainers/rev_grpo_trainer.py, compute_loss) has psi = 1,
lambda = 1 (lambda = 0: the positive-only variant, rev_grpo_trainer_psr.py) and no KL term.

Whole-batch, not per-sample: one forward per row (no MC samples); the weights are constants of the
rollout (softmaxes of the advantages), so the objective is a sum of per-row terms and micro-batches
accumulate exactly. The group softmax couples a group's rows, but micro-batches interleave rows, so
the weights are computed on the host (`host_fields`, from the batch's advantages in group order)
and travel as a [B] field. The loss is linear in s_i (no importance ratio, no exp of a log-ratio),
so BGPO's bounds have nothing to bound here.

Rows with A = 0 contribute unless their whole group ties: an all-equal group has w+ = w- = 1/G,
hence w = 0 for lambda = 1 (but 1/G for the positive-only lambda = 0), while a zero-advantage row of
a mixed group has w+_i != w-_i in general. And the weights are not linear in A, so the advantage
rescaling that makes dropping dead groups exact (rl.skip_zero_advantage) does not apply:
`exact_group_skipping` is False.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bgpo_jax.objectives.base import BatchField, Objective, RolloutInputs, register
from bgpo_jax.objectives.common import _float, k3
from bgpo_jax.objectives.diffu_grpo import _row_keys, sequence_means


def wd1_group_weights(advantages: jax.Array, *, psi: float = 1.0, negative_weight: float = 1.0) -> jax.Array:
  """wd1's per-response weights w+ - lambda * w-, softmaxes over each group.

  Args:
    advantages: [P, G] advantages, one row per prompt group.
    psi: inverse temperature of both softmaxes (the authors' code: 1).
    negative_weight: lambda on the negative-sample weights w- (1: wd1; 0: positive only).

  Returns:
    [P, G] weights (float32 or wider); each group's w+ and w- each sum to 1.
  """
  a = _float(advantages)
  if a.ndim != 2:
    raise ValueError(f"advantages must be [P, G] (one row per prompt group), got shape {a.shape}")
  pos = jax.nn.softmax(psi * a, axis=1)
  neg = jax.nn.softmax(-psi * a, axis=1)
  return pos - negative_weight * neg


def sequence_sums(per_token: jax.Array, response_mask: jax.Array) -> jax.Array:
  """[B, L] token values -> [B] sums over each row's masked-in tokens."""
  # where(), not multiply: a non-finite value on a masked-out token must not leak in as 0 * inf.
  return jnp.sum(jnp.where(jnp.asarray(response_mask).astype(bool), per_token, 0.0), axis=1)


def wd1_row_terms(logp: jax.Array, weights: jax.Array, response_mask: jax.Array,
                  logp_ref: jax.Array | None = None, beta: float = 0.0) -> jax.Array:
  """Per-row objective weights_b * s_b [- beta * KL_b] -> [B] (the train step sums these).

  Args:
    logp: [B, L] per-token log-probs under the current policy (differentiable).
    weights: [B] per-row weights (constants: G * (w+ - lambda w-) of the row's group).
    response_mask: [B, L], nonzero for the tokens that count.
    logp_ref: [B, L] under the frozen reference (stop-gradiented), or None for no KL.
    beta: KL weight; KL_b = mean over the row's tokens of k3(logp_ref - logp).
  """
  new = _float(logp)
  if new.ndim != 2 or jnp.shape(response_mask) != new.shape:
    raise ValueError(f"logp {new.shape} and response_mask {jnp.shape(response_mask)} must both be [B, L]")
  w = jax.lax.stop_gradient(jnp.asarray(weights, new.dtype))
  if w.shape != (new.shape[0],):
    raise ValueError(f"weights shape {w.shape} must be [B] = ({new.shape[0]},)")
  out = w * sequence_sums(new, response_mask)
  if logp_ref is not None and not (isinstance(beta, (int, float)) and beta == 0.0):
    if jnp.shape(logp_ref) != new.shape:
      raise ValueError(f"logp_ref {jnp.shape(logp_ref)} must be [B, L] = {new.shape}")
    x = jax.lax.stop_gradient(jnp.asarray(logp_ref, new.dtype)) - new
    out = out - beta * sequence_means(k3(x), response_mask)
  return out


def wd1_objective(
    logp: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    *,
    group_size: int,
    psi: float = 1.0,
    negative_weight: float = 1.0,
    logp_ref: jax.Array | None = None,
    beta: float = 0.0,
) -> jax.Array:
  """wd1's objective on a whole batch: mean over groups of sum_i w_i * s_i [- beta * mean_b KL_b].

  Args:
    logp: [B, L] per-token one-step log-probs under the current policy.
    advantages: [B] in group order (rows g*G .. g*G+G-1 answer prompt g).
    response_mask: [B, L], nonzero for the tokens up to and including the first stop token.
    group_size: G; must divide B.
    psi, negative_weight: see `wd1_group_weights`.
    logp_ref, beta: optional k3 KL to a reference (not in the authors' loss), see `wd1_row_terms`.

  Returns:
    scalar objective to maximize (the authors' loss is its negative, for one group per call).
  """
  adv = jnp.asarray(advantages)
  B = jnp.shape(logp)[0]
  if adv.shape != (B,) or group_size < 1 or B % group_size:
    raise ValueError(f"advantages {adv.shape} must be [B] = ({B},) with B a multiple of group_size {group_size}")
  w = group_size * wd1_group_weights(adv.reshape(-1, group_size), psi=psi,
                                     negative_weight=negative_weight).reshape(-1)
  return jnp.mean(wd1_row_terms(logp, w, response_mask, logp_ref, beta))


@dataclasses.dataclass(frozen=True)
class WD1Hparams:
  # Inverse temperature of the group softmaxes: the code has none, softmax(advantages) and
  # softmax(-advantages) (xiaohangt/wd1 wd1/trainers/rev_grpo_trainer.py:145 and :156).
  psi: float = 1.0
  # lambda on the negative-sample term: 1 = wd1 (run/wll_NP_*.sh: trainer_type wll_d1_neg ->
  # rev_grpo_trainer.py:156-160, ce_loss + min_likeli_loss); 0 = the positive-only variant
  # (run/wll_P_*.sh: wll_d1_pos_only -> rev_grpo_trainer_psr.py, ce_loss alone).
  negative_weight: float = 1.0
  # Each real prompt token masked with it, freshly per row and inner update; the response is fully
  # masked (wd1/train.yaml:69 p_mask_prompt 0.15; forward_process, rev_grpo_trainer.py:319-345).
  prompt_mask_prob: float = 0.15

  def __post_init__(self):
    if not self.psi > 0:
      raise ValueError(f"psi {self.psi} must be > 0 (1 = the authors' softmax of the advantages)")
    if not self.negative_weight >= 0:
      raise ValueError(f"negative_weight {self.negative_weight} must be >= 0 (1 = wd1, 0 = positive only)")
    if not 0.0 <= self.prompt_mask_prob < 1.0:
      raise ValueError(f"prompt_mask_prob {self.prompt_mask_prob} must lie in [0, 1) (wd1: 0.15)")


class WD1(Objective):
  name = "wd1"
  remat_policy = "activations"  # one forward per row, no MC samples: the activations are small
  exact_group_skipping = False  # softmax weights are not linear in A (module docstring)
  Hparams = WD1Hparams
  fields = (BatchField("response_mask", ("B", "L"), jnp.float32),
            BatchField("row_seeds", ("B",), jnp.uint32),
            BatchField("wd1_weights", ("B",), jnp.float32))
  old_field = None  # ratio-free: no old policy terms, whatever rl.updates_per_batch
  ref_field = BatchField("ref_logps", ("B", "L"), jnp.float32)

  def warnings(self, config) -> tuple[str, ...]:
    if config.mode == "rl" and config.rl.advantage_std:
      return ("wd1 with rl.advantage_std=True: its weights are softmaxes of A / std(r), not of the "
              "authors' A = r - mean(r); --config=configs/<task>.py:wd1 sets their recipe",)
    return ()

  def recipe(self, c):
    """xiaohangt/wd1 (commit 0898985) run/wll_NP_<task>.sh with wd1/train.yaml."""
    super().recipe(c)
    c.rl.kl_beta = 0.0  # the wd1 losses have no KL (train.yaml:70's beta 0.04 is never read by them)
    c.rl.group_size = 6  # train.yaml:37 num_generations
    # 4 processes (run/wll_NP_*.sh --num_processes 4) x per-device 6 (train.yaml:43) x gradient
    # accumulation 2 (train.yaml:44) = 48 completions = 8 prompts per update.
    c.rl.prompts_per_step = 8
    # NUM_ITER: 12 in run/wll_NP_{gsm8k,math,countdown}.sh, 8 in run/wll_NP_sudoku.sh. The same
    # rollout batch serves that many optimizer updates, each with fresh prompt masks.
    c.rl.updates_per_batch = 8 if c.task.name == "sudoku" else 12
    c.rl.advantage_std = False  # rev_grpo_trainer.py:638 advantages = rewards - group mean
    c.rl.skip_zero_advantage = False  # not exact for wd1 (exact_group_skipping)
    c.optim.learning_rate = 3e-6  # train.yaml:34
    # train.yaml:35 constant_with_warmup, warmup_ratio 1e-4 (train.yaml:32): ceil(1e-4 x the run's
    # ~1e4-1e5 updates), i.e. 1 to ~12 updates; not reproduced (no warmup).
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.1  # train.yaml:25
    c.optim.grad_clip_norm = 0.2  # train.yaml:26 max_grad_norm
    c.optim.b1 = 0.9  # train.yaml:23
    c.optim.b2 = 0.99  # train.yaml:24
    c.rollout.gen_length = 256  # train.yaml:62 max_completion_length
    c.rollout.steps = 128  # train.yaml:65 diffusion_steps
    c.rollout.block_length = 32  # train.yaml:64
    c.rollout.temperature = 0.9  # DiffuGRPOConfig's default (diffu_grpo_config.py:225); train.yaml sets none
    c.rollout.remasking = "low_confidence"  # train.yaml:67
    c.rl.wd1.psi = 1.0  # rev_grpo_trainer.py:145, :156
    c.rl.wd1.negative_weight = 1.0  # run/wll_NP_*.sh (the README's "RL only" runs)
    c.rl.wd1.prompt_mask_prob = 0.15  # train.yaml:69
    # Not reproduced: the authors train LoRA adapters (train.yaml:10-11 r 128, alpha 64; run_train.py)
    # on a 4-bit base (train.yaml:5); this trainer updates all weights, so lr 3e-6 may need lowering.
    return c

  def _logps(self, model_cfg, cfg, params, mb: dict) -> jax.Array:
    """[mb, L] one-step token log-probs; one key per row, so a row's prompt mask is its own."""
    from bgpo_jax.diffusion import elbo
    return elbo.one_step_token_logps(model_cfg, params, mb["tokens"], mb["attention_mask"],
                                     gen_length=cfg.gen_length, rng=_row_keys(mb["row_seeds"]),
                                     prompt_mask_prob=cfg.hparams.prompt_mask_prob)

  def unit_terms(self, model_cfg, cfg, params, mb: dict, u: jax.Array):
    """The micro-batch's objective (u is always 0), summed over its rows."""
    logp = self._logps(model_cfg, cfg, params, mb)
    ref = mb["ref_logps"] if cfg.kl_beta > 0 else None
    rmask = mb["response_mask"]
    obj = jnp.sum(wd1_row_terms(logp, mb["wd1_weights"], rmask, ref, cfg.kl_beta))
    lp = jax.lax.stop_gradient(logp)
    kl = jnp.zeros(()) if ref is None else jnp.sum(sequence_means(k3(ref - lp), rmask))
    return obj, {"elbo": jnp.sum(sequence_sums(lp, rmask)), "abs_d": jnp.zeros(()), "kl": kl}

  def old_terms(self, model_cfg, cfg, params, mb: dict) -> jax.Array:
    """The reference's token log-probs [mb, L] on the same prompt masks (rl.kl_beta > 0)."""
    return self._logps(model_cfg, cfg, params, mb)

  def host_fields(self, inputs: RolloutInputs) -> list[dict]:
    adv = getattr(inputs, "advantages", None)
    if adv is None:
      raise ValueError("wd1 weights each row by a softmax over its group's advantages: RolloutInputs must "
                       "carry the batch's advantages [rows] (group order)")
    adv = np.asarray(adv, np.float32)
    G = int(inputs.rl.group_size)
    if adv.shape != (inputs.rows,) or inputs.rows % G:
      raise ValueError(f"wd1: advantages {adv.shape} must be [rows] = ({inputs.rows},) in whole groups of "
                       f"rl.group_size {G}")
    hp = self.hparams_from_config(inputs.rl)
    weights = G * np.asarray(wd1_group_weights(adv.reshape(-1, G), psi=hp.psi,
                                               negative_weight=hp.negative_weight)).reshape(-1)
    rmask = inputs.response_mask()
    weights = weights.astype(np.float32)
    # Fresh prompt masks for every inner update (wd1: random_masking, rev_grpo_trainer.py:548-550).
    return [{"response_mask": rmask, "row_seeds": inputs.row_seeds(u), "wd1_weights": weights}
            for u in range(inputs.updates)]


register(WD1())
