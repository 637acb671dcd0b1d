"""diffu-GRPO (d1): a token-level PPO surrogate on one-step mean-field token log-probs (the prompt
randomly masked, the whole response masked), minus beta * k3 KL to a frozen reference.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from bgpo_jax.objectives.base import BatchField, Objective, RolloutInputs, register
from bgpo_jax.objectives.common import _capped_exp, _check_clip, _dual_clip, _float, _ppo_clip, k3


def diffu_grpo_objective(
    logp_new: jax.Array,
    logp_old: jax.Array,
    logp_ref: jax.Array | None,
    advantages: jax.Array,
    response_mask: jax.Array,
    *,
    clip_eps: float | None = 0.2,
    beta: float = 0.04,
    token_average: Literal["sequence", "batch"] = "sequence",
    dual_clip: float | None = None,
) -> jax.Array:
  """diffu-GRPO (d1) objective: token-level PPO surrogate minus beta * k3 KL to a reference.

  Per token i of response b: ratio = exp(new - old),
  s = min(ratio * A_b, clip(ratio, 1 - eps, 1 + eps) * A_b) - beta * (exp(ref - new) - (ref - new) - 1)
  (the KL term only when logp_ref is given and beta != 0).

  Aggregation over the masked-in tokens (`response_mask`):
  - "sequence" (default): mean over each response's tokens, then mean over B. Matches the
    "averaged over B" contract of every objective here, so micro-batch gradient accumulation
    is exact. A response with no tokens contributes 0.
  - "batch": one mean over all tokens of the batch (sum / total count), which is what d1's
    trainer computes per (micro-)batch.

  Args:
    logp_new: [B, L] per-token log-probs under the current policy (differentiable).
    logp_old: [B, L] under the old policy (stop-gradiented here; pass logp_new on-policy).
    logp_ref: [B, L] under the frozen reference (stop-gradiented), or None for no KL.
    advantages: [B].
    response_mask: [B, L], nonzero/True for tokens that count (treated as boolean).
    clip_eps: PPO clip eps, or None for no clipping.
    beta: KL coefficient.
    token_average: "sequence" or "batch", see above.
    dual_clip: per-token dual clip c > 1 for A < 0 (max(s, c * A) before the KL), or None.

  Returns:
    scalar objective to maximize.
  """
  _check_clip(clip_eps, dual_clip)
  new, adv = token_inputs(logp_new, logp_old, logp_ref, advantages, response_mask)
  if token_average not in ("sequence", "batch"):
    raise ValueError(f"token_average {token_average!r} must be 'sequence' or 'batch'")

  old = jax.lax.stop_gradient(jnp.asarray(logp_old, new.dtype))
  ratio = _capped_exp(new - old)
  per_token = _dual_clip(_ppo_clip(ratio, adv[:, None], clip_eps), adv[:, None], dual_clip)
  # Skip the KL only for a concrete beta == 0 (a traced beta is fine and always included).
  if logp_ref is not None and not (isinstance(beta, (int, float)) and beta == 0.0):
    x = jax.lax.stop_gradient(jnp.asarray(logp_ref, new.dtype)) - new
    per_token = per_token - beta * k3(x)

  if token_average == "batch":
    mask = jnp.asarray(response_mask).astype(bool)
    masked = jnp.where(mask, per_token, 0.0)
    return jnp.sum(masked) / jnp.maximum(jnp.sum(mask.astype(new.dtype)), 1.0)
  return jnp.mean(sequence_means(per_token, response_mask))


def token_inputs(logp_new, logp_old, logp_ref, advantages, response_mask) -> tuple[jax.Array, jax.Array]:
  """Checks a token-level objective's shapes (log-probs and mask [B, L], advantages [B]); returns
  (logp_new as float32 or wider, advantages in its dtype)."""
  new = _float(logp_new)
  if new.ndim != 2 or jnp.shape(logp_old) != new.shape or jnp.shape(response_mask) != new.shape:
    raise ValueError(f"logp_new {new.shape}, logp_old {jnp.shape(logp_old)} and response_mask "
                     f"{jnp.shape(response_mask)} must all be [B, L]")
  if logp_ref is not None and jnp.shape(logp_ref) != new.shape:
    raise ValueError(f"logp_ref {jnp.shape(logp_ref)} must be [B, L] = {new.shape}")
  adv = jnp.asarray(advantages, new.dtype)
  if adv.shape != (new.shape[0],):
    raise ValueError(f"advantages shape {adv.shape} must be [B] = ({new.shape[0]},)")
  return new, adv


def token_terms(cfg, mb: dict, logp: jax.Array) -> tuple:
  """A token-level objective's (old [mb, L], ref [mb, L] or None, response_mask [mb, L]) for its
  current log-probs `logp`: the stored old terms off-policy (else logp itself, stop-gradiented)
  and the reference's when rl.kl_beta > 0."""
  old = mb["old_logps"] if cfg.off_policy else jax.lax.stop_gradient(logp)
  ref = mb["ref_logps"] if cfg.kl_beta > 0 else None
  return old, ref, mb["response_mask"]


def token_aux(logp: jax.Array, old: jax.Array, ref: jax.Array | None, response_mask: jax.Array) -> dict:
  """The step's aux sums of a token-level objective on [rows, L] log-probs (stop-gradiented here):
  "elbo" the counted tokens' log-prob sum, "abs_d" mean |logp - old| per counted token times rows,
  "kl" the per-response mean k3 to the reference (0 without one), all summed over rows."""
  lp = jax.lax.stop_gradient(logp)
  kl = jnp.zeros(()) if ref is None else jnp.sum(sequence_means(k3(ref - lp), response_mask))
  rows = lp.shape[0]
  abs_d = jnp.sum(jnp.abs(lp - old) * response_mask) / jnp.maximum(jnp.sum(response_mask), 1.0) * rows
  return {"elbo": jnp.sum(lp * response_mask), "abs_d": abs_d, "kl": kl}


def sequence_means(per_token: jax.Array, response_mask: jax.Array) -> jax.Array:
  """[B, L] token values -> [B] means over each row's masked-in tokens (0 for a row with none)."""
  mask = jnp.asarray(response_mask).astype(bool)
  count = mask.astype(per_token.dtype)
  # where(), not multiply: a non-finite value on a masked-out token must not leak in as 0 * inf.
  masked = jnp.where(mask, per_token, 0.0)
  return jnp.sum(masked, axis=1) / jnp.maximum(jnp.sum(count, axis=1), 1.0)


@dataclasses.dataclass(frozen=True)
class DiffuGRPOHparams:
  clip_eps: float | None = None  # PPO clip of the per-token ratio (None = off)
  dual_clip: float | None = None  # per-token dual clip c > 1 for A < 0 (None = off)
  prompt_mask_prob: float = 0.15  # each real prompt token masked with it (d1: p_mask_prompt)


def _row_keys(seeds: jax.Array) -> jax.Array:
  """[B] uint32 seeds -> [B] typed PRNG keys (one prompt mask per row)."""
  return jax.vmap(jax.random.key)(seeds)


class DiffuGRPO(Objective):
  name = "diffu_grpo"
  remat_policy = "activations"  # one forward per row, no MC samples: the activations are small
  Hparams = DiffuGRPOHparams
  flat_hparams = True  # config.rl.clip_eps / dual_clip / prompt_mask_prob
  fields = (BatchField("response_mask", ("B", "L"), jnp.float32),
            BatchField("row_seeds", ("B",), jnp.uint32))
  old_field = BatchField("old_logps", ("B", "L"), jnp.float32)
  ref_field = BatchField("ref_logps", ("B", "L"), jnp.float32)

  def warnings(self, config) -> tuple[str, ...]:
    if config.mode == "rl" and not config.rl.kl_beta and config.rl.updates_per_batch == 1:
      return ("diffu_grpo with rl.kl_beta=0 and rl.updates_per_batch=1 is not d1's recipe; d1's settings: "
              "--config=configs/<task>.py:diffu_grpo (bgpo_jax.config.d1_diffu_grpo)",)
    return ()

  def recipe(self, config):
    """d1's published diffu-GRPO settings (bgpo_jax.config.d1_diffu_grpo, sourced there)."""
    from bgpo_jax.config import d1_diffu_grpo
    return d1_diffu_grpo(config)

  def _logps(self, model_cfg, cfg, params, mb: dict) -> jax.Array:
    """[mb, L] token log-probs; one key per row, so a row's prompt mask is its own (not its
    micro-batch's)."""
    from bgpo_jax.diffusion import elbo
    return elbo.one_step_token_logps(model_cfg, params, mb["tokens"], mb["attention_mask"],
                                     gen_length=cfg.gen_length, rng=_row_keys(mb["row_seeds"]),
                                     prompt_mask_prob=cfg.hparams.prompt_mask_prob)

  def unit_terms(self, model_cfg, cfg, params, mb: dict, u: jax.Array):
    """The micro-batch's objective (u is always 0), summed over its rows."""
    hp = cfg.hparams
    logp = self._logps(model_cfg, cfg, params, mb)
    old, ref, rmask = token_terms(cfg, mb, logp)
    obj = diffu_grpo_objective(logp, old, ref, mb["advantages"], rmask, clip_eps=hp.clip_eps,
                               beta=cfg.kl_beta, dual_clip=hp.dual_clip)
    return obj * logp.shape[0], token_aux(logp, old, ref, rmask)

  def old_terms(self, model_cfg, cfg, params, mb: dict) -> jax.Array:
    return self._logps(model_cfg, cfg, params, mb)

  def host_fields(self, inputs: RolloutInputs) -> list[dict]:
    # d1: fresh prompt masks for every inner update (and here for every row).
    rmask = inputs.response_mask()
    return [{"response_mask": rmask, "row_seeds": inputs.row_seeds(u)} for u in range(inputs.updates)]


register(DiffuGRPO())
