"""ESPO (ELBO-based Sequence-level Policy Optimization, ML-GSAI/ESPO): one importance ratio per
response from the length-normalized difference of its MC-averaged ELBO, PPO-clipped at the sequence
level, minus beta times a KL estimate on the same sequence ELBO.

Per response b with n MC samples l_j (each ELBO sample l_j = 1/2 [ (L+1)/k_j sum_{i in M_j} log p(y_i)
+ (L+1)/(L-k_j) sum_{i not in M_j} log p(y_i) ]: k_j ~ U{0..L} masked positions M_j and, with the
complementary-mask variance reduction, a second pass that masks exactly the other L - k_j):

  lbar = mean_j l_j,   r = exp((lbar - lbar_old) / L),   L = rollout.gen_length (the whole canvas)
  objective = mean_b [ min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) - beta * kl(lbar - lbar_ref) / L ]

kl is the authors' estimator of the raw (unnormalized) sequence ELBO difference D = lbar - lbar_ref:
k2 = D^2 / 2 (their choice), k1 = D with the gradient (1 + D) (their gradient correction), or
k3 = exp(-D) + D - 1; it is divided by L after the estimator (so k2 is D^2 / (2 L), not (D/L)^2 / 2).

Whole-batch (`bound=False`, the authors' form): r is exp of a MEAN over samples, non-linear in the
samples, so its gradient needs all n samples (2n forwards with the complement) in one graph per
micro-batch: memory grows with n (model.remat_policy "full").

Per-sample (`bound=True`): BGPO's bounds apply to exp(mean_j d_j) A, d_j = (l_j - l_old_j) / L:
tangent exp(mean d) >= mean_j (1 + d_j) for A >= 0, Jensen exp(mean d) <= mean_j exp(d_j) for
A < 0. The PPO clip keeps them lower bounds (A min(rho, 1 + eps) is concave non-decreasing in rho for
A >= 0, A max(rho, 1 - eps) convex non-decreasing times A < 0), and so does a per-sample k2 / k3 KL
(convex: mean_j k(D_j) >= k(mean_j D_j)). The bound is a sum of per-sample terms g_j, scanned one
sample at a time (memory flat in n); on-policy (all d_j = 0) its value and surrogate gradient equal
the authors'.

Masks: the authors draw k uniformly on 0..L (p_mask = k / (L+1)), spread over the rows of a
micro-batch (k + i (L+1) / b, rounded, mod L+1); here each row draws its own k_j and positions from
its seed (`inputs.row_seeds(update)`), fresh every inner update as theirs, so a row's masks do not
depend on the micro-batch or device layout; each row's count is uniform on 0..L, as each of theirs is
marginally (but for their half-to-even rounding of half-integer offsets). The ELBO runs over all L
response positions (the EOS fill after the stop token included), as the authors'.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from bgpo_jax.objectives.base import BatchField, Objective, RolloutInputs, register
from bgpo_jax.objectives.common import _capped_exp, _float

KL_ESTIMATORS = ("k1", "k2", "k3")


# ------------------------------------------------------------------------------ masks


@functools.partial(jax.jit, static_argnums=(1, 2))
def espo_masks(seeds: jax.Array, num_samples: int, gen_length: int) -> tuple[jax.Array, jax.Array]:
  """The authors' forward process, one row at a time: sample j of row b masks k_j uniform on 0..L
  positions, chosen uniformly.

  Args:
    seeds: [B] uint32, one per row (a row's masks depend on its seed only).
    num_samples: n; gen_length: L (static ints).
  Returns:
    masks: bool [n, B, L] (True = masked); counts: int32 [n, B] in 0..L.
  """
  L = int(gen_length)

  def row(seed):
    # One draw per row: columns 0..L-1 rank the positions, column L gives k.
    u = jax.random.uniform(jax.random.key(seed), (num_samples, L + 1), jnp.float32)
    k = jnp.minimum(jnp.floor(u[:, L] * (L + 1)).astype(jnp.int32), L)  # uniform on 0..L
    # Exactly k positions: the ranks of iid keys are a uniform random permutation.
    ranks = jnp.argsort(jnp.argsort(u[:, :L], axis=-1), axis=-1)
    return ranks < k[:, None], k

  m, k = jax.vmap(row)(jnp.asarray(seeds, jnp.uint32))  # [B, n, L], [B, n]
  return jnp.swapaxes(m, 0, 1), k.T


def espo_weights(counts: jax.Array, gen_length: int, complement: bool = True) -> tuple[jax.Array, jax.Array | None]:
  """Per-row weights of the masked pass and of the complementary pass of one ELBO sample.

  Masked pass: 1 / p_mask = (L+1) / k; complementary pass (the other L - k positions masked):
  1 / (L / (L+1) - p_mask) = (L+1) / (L - k); the two halves averaged (each weight / 2). A pass
  that masks nothing (k = 0, or k = L for the complement) gets weight 0 (its sum is empty).

  Args:
    counts: int [..., B] mask counts k in 0..L.
  Returns:
    (w_mask, w_complement) float32 [..., B]; w_complement is None when complement is False.
  """
  k = jnp.asarray(counts, jnp.float32)
  L1 = float(gen_length + 1)
  w = jnp.where(k > 0, L1 / jnp.maximum(k, 1.0), 0.0)
  if not complement:
    return w, None
  wc = jnp.where(k < gen_length, L1 / jnp.maximum(gen_length - k, 1.0), 0.0)
  return 0.5 * w, 0.5 * wc


# ------------------------------------------------------------------------------ the loss


def _torch_clip(x: jax.Array, lo: float, hi: float) -> jax.Array:
  """clip(x, lo, hi) whose gradient is 1 on the closed interval [lo, hi] (torch.clamp's), so an
  eps = 0 clip (lo = hi = 1) passes the gradient at r = 1 exactly as the authors' code does
  (jnp.clip would split it at both ties)."""
  inside = (x >= lo) & (x <= hi)
  return jnp.where(inside, x, jax.lax.stop_gradient(jnp.clip(x, lo, hi)))


def _seq_clip(ratio: jax.Array, adv: jax.Array, clip_low: float | None, clip_high: float | None) -> jax.Array:
  """min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A); ratio A when both are None."""
  surrogate = ratio * adv
  if clip_low is None and clip_high is None:
    return surrogate
  lo = -jnp.inf if clip_low is None else 1.0 - clip_low
  hi = jnp.inf if clip_high is None else 1.0 + clip_high
  return jnp.minimum(surrogate, _torch_clip(ratio, lo, hi) * adv)


def espo_kl(elbo: jax.Array, elbo_ref: jax.Array, *, length: float, estimator: str = "k2") -> jax.Array:
  """The authors' KL estimate on a sequence ELBO, divided by the length after the estimator.

  D = elbo - stop_gradient(elbo_ref) (raw, not length-normalized):
  k1: value D, gradient (1 + D) (value D plus (elbo - sg(elbo)) * (sg(elbo) - ref));
  k2: D^2 / 2; k3: exp(-D) + D - 1 (capped exp).

  Args:
    elbo: [...] sequence ELBO of the current policy (differentiable).
    elbo_ref: [...] the same under the frozen reference.
    length: L (the authors' logits_to_keep = the whole canvas).
  Returns:
    [...] float32.
  """
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"kl_estimator {estimator!r} must be one of {KL_ESTIMATORS}")
  new = _float(elbo)
  ref = jax.lax.stop_gradient(_float(elbo_ref))
  d = new - ref
  if estimator == "k1":
    sg = jax.lax.stop_gradient(new)
    kl = d + (new - sg) * (sg - ref)
  elif estimator == "k2":
    kl = 0.5 * d * d
  else:
    # exp(-D) - 1 + D via expm1: exact near D = 0 (a policy close to its reference).
    x = -d
    kl = jnp.where(x <= 20.0, jnp.expm1(jnp.minimum(x, 20.0)) - x, _capped_exp(x) - x - 1.0)
  return kl / length


def _check_shapes(elbo_new, elbo_old, advantages, elbo_ref):
  new = _float(elbo_new)
  if new.ndim != 2 or jnp.shape(elbo_old) != new.shape:
    raise ValueError(f"elbo_new {new.shape} and elbo_old {jnp.shape(elbo_old)} must both be [n, B]")
  if jnp.shape(advantages) != (new.shape[1],):
    raise ValueError(f"advantages shape {jnp.shape(advantages)} must be [B] = ({new.shape[1]},)")
  if elbo_ref is not None and jnp.shape(elbo_ref) != new.shape:
    raise ValueError(f"elbo_ref {jnp.shape(elbo_ref)} must be [n, B] = {new.shape}")
  return new


def espo_objective(elbo_new: jax.Array, elbo_old: jax.Array, advantages: jax.Array, *, length: float,
                   clip_low: float | None = 0.2, clip_high: float | None = 0.2,
                   elbo_ref: jax.Array | None = None, kl_beta: float = 0.0,
                   kl_estimator: str = "k2") -> jax.Array:
  """The authors' ESPO objective (the negative of their loss), averaged over responses.

  r = exp((mean_j l_new(j) - mean_j l_old(j)) / L); min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)
  minus kl_beta * espo_kl(mean_j l_new(j), mean_j l_ref(j)) when elbo_ref is given.

  Args:
    elbo_new: [n, B] per-sample ELBOs under the current policy (differentiable).
    elbo_old: [n, B] the same samples under the old policy; stop-gradiented here.
    advantages: [B].
    length: L, the ratio's and the KL's length normalization (the canvas length).
    clip_low / clip_high: the clip range (None: no bound on that side; both None: no clipping).
    elbo_ref: [n, B] the same samples under the frozen reference, or None (no KL).
    kl_beta: the KL weight; kl_estimator: "k1" / "k2" / "k3" (espo_kl).

  Returns:
    scalar objective to maximize.
  """
  new = _check_shapes(elbo_new, elbo_old, advantages, elbo_ref)
  lbar = jnp.mean(new, axis=0)
  lbar_old = jax.lax.stop_gradient(jnp.mean(_float(elbo_old), axis=0))
  ratio = _capped_exp((lbar - lbar_old) / length)
  adv = jnp.asarray(advantages, new.dtype)
  obj = _seq_clip(ratio, adv, clip_low, clip_high)
  if elbo_ref is not None and not (isinstance(kl_beta, (int, float)) and kl_beta == 0):
    ref = jnp.mean(_float(elbo_ref), axis=0)
    obj = obj - kl_beta * espo_kl(lbar, ref, length=length, estimator=kl_estimator)
  return jnp.mean(obj)


def espo_bound_sample_terms(elbo_new: jax.Array, elbo_old: jax.Array, advantages: jax.Array, *,
                            num_samples: int, length: float, clip_low: float | None = 0.2,
                            clip_high: float | None = 0.2, elbo_ref: jax.Array | None = None,
                            kl_beta: float = 0.0, kl_estimator: str = "k2") -> jax.Array:
  """Per-sample terms g_j of the BGPO lower bound of `espo_objective`; summed over j they give
  the bound (its mean over rows: `espo_bound_objective`).

  d_j = (l_new(j) - sg(l_old(j))) / L, rho_j = 1 + d_j for A >= 0 (tangent), exp(d_j) for A < 0
  (Jensen); g_j = [min(rho_j A, clip(rho_j) A) - kl_beta * espo_kl(l_new(j), l_ref(j))] / n.

  Args:
    elbo_new / elbo_old / elbo_ref: [..., B] one sample ([B]) or all ([n, B]).
    advantages: [B]; num_samples: n, the total count the terms are summed over.
  Returns:
    [..., B] terms.
  """
  new = _float(elbo_new)
  d = (new - jax.lax.stop_gradient(_float(elbo_old))) / length
  adv = jnp.asarray(advantages, new.dtype)
  rho = jnp.where(adv >= 0, 1.0 + d, _capped_exp(d))
  g = _seq_clip(rho, adv, clip_low, clip_high)
  if elbo_ref is not None and not (isinstance(kl_beta, (int, float)) and kl_beta == 0):
    g = g - kl_beta * espo_kl(new, elbo_ref, length=length, estimator=kl_estimator)
  return g / num_samples


def espo_bound_objective(elbo_new: jax.Array, elbo_old: jax.Array, advantages: jax.Array, **kw) -> jax.Array:
  """BGPO's lower bound of `espo_objective`: mean over rows of sum_j g_j (`espo_bound_sample_terms`
  keywords except num_samples). [n, B] inputs -> scalar to maximize."""
  new = _check_shapes(elbo_new, elbo_old, advantages, kw.get("elbo_ref"))
  g = espo_bound_sample_terms(new, elbo_old, advantages, num_samples=new.shape[0], **kw)
  return jnp.mean(jnp.sum(g, axis=0))


# ------------------------------------------------------------------------------ the objective


@dataclasses.dataclass(frozen=True)
class ESPOHparams:
  """config.rl.espo: the authors' published values (ML-GSAI/ESPO at b5f2dac)."""
  # PPO clip of the sequence ratio: trl GRPOConfig epsilon (recipes/train.yaml:18 "epsilon: 0.2";
  # trl's epsilon_high defaults to epsilon; countdown sets 0: recipes/run_countdown_llada.sh:29).
  clip_low: float = 0.2
  clip_high: float = 0.2
  # espo/espo_trainer.py:199: compute_approx_kl(..., "k2"), summed / (batch * logits_to_keep) (:200).
  kl_estimator: str = "k2"
  # The complementary-mask pass (reduce_var): espo/configs.py:74 default True, recipes/train.yaml:58;
  # compute_loss always calls _get_elbo_mc with its default reduce_var=True (espo_trainer.py:180, :446).
  complement: bool = True
  # Fresh masks every inner update (mask_seeds [accum, num_iterations, num_mc], espo_trainer.py:611);
  # False: one draw per rollout batch (old / reference terms computed once instead of per update).
  resample_masks: bool = True
  # Ours, not the authors': BGPO's per-sample lower bound (memory flat in n) instead of exp(mean).
  bound: bool = False

  def __post_init__(self):
    for name in ("clip_low", "clip_high"):
      v = getattr(self, name)
      if not 0.0 <= v < 1.0:
        raise ValueError(f"{name} {v} must lie in [0, 1) (the authors': 0.2; countdown 0)")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(f"kl_estimator {self.kl_estimator!r} must be one of {KL_ESTIMATORS} (the authors': k2)")


# The authors' recipes (recipes/run_<task>_llada.sh, LLaDA-8B-Instruct on 8 GPUs over
# recipes/train.yaml): per task its group size (num_generations), completions per update
# (8 processes x per_device_train_batch_size x gradient_accumulation_steps), KL beta, clip epsilon,
# learning rate, weight decay, grad-norm clip and diffusion steps.
_RECIPES = {
    # run_gsm8k_llada.sh: accum 4 x batch 3, G 6, beta 1e-3, lr 3e-6, wd 0.01, steps 256.
    "gsm8k": dict(G=6, rows=8 * 3 * 4, beta=1e-3, eps=0.2, lr=3e-6, wd=0.01, clip=0.2, steps=256),
    # run_math_llada.sh: accum 16 x batch 2, G 16, beta 1e-3, lr 3e-6, wd 0.01, steps 256.
    "math": dict(G=16, rows=8 * 2 * 16, beta=1e-3, eps=0.2, lr=3e-6, wd=0.01, clip=0.2, steps=256),
    # run_countdown_llada.sh: accum 4 x batch 3, G 6, beta 3e-3, epsilon 0, lr 3e-6, wd 0.01, steps 128.
    "countdown": dict(G=6, rows=8 * 3 * 4, beta=3e-3, eps=0.0, lr=3e-6, wd=0.01, clip=0.2, steps=128),
    # run_sudoku_llada.sh: accum 4 x batch 3, G 6, beta 1e-2, lr 3e-6, wd 0.01, steps 128.
    "sudoku": dict(G=6, rows=8 * 3 * 4, beta=1e-2, eps=0.2, lr=3e-6, wd=0.01, clip=0.2, steps=128),
    # run_code_llada.sh: accum 20 x batch 1, G 10, beta 1e-2, max_grad_norm 0.8, steps 256; lr 1e-6
    # and weight_decay 0.1 from train.yaml (:32, :35; not overridden); full weights (--use_peft false).
    "code": dict(G=10, rows=8 * 1 * 20, beta=1e-2, eps=0.2, lr=1e-6, wd=0.1, clip=0.8, steps=256),
}


class ESPO(Objective):
  name = "espo"
  # The authors' form (bound=False) needs every sample at once; bound=True is per-sample: `units`
  # reads the hparams (the step scans `units(cfg)` iterations).
  per_sample = False
  # The authors' form keeps all n samples' graphs (2n forwards with the complement) alive at once.
  remat_policy = "full"
  Hparams = ESPOHparams
  fields = (BatchField("row_seeds", ("B",), jnp.uint32),)
  old_field = BatchField("old_elbo", ("n", "B"), jnp.float32)
  ref_field = BatchField("ref_elbo", ("n", "B"), jnp.float32)

  # ---------------------------------------------------------------- configuration

  def units(self, cfg) -> int:
    # bound=True is a sum of per-sample terms: scan the n samples one at a time.
    return cfg.num_mc_samples if cfg.hparams.bound else 1

  def remat_for(self, config) -> str:
    # The bound holds one sample's graph (two forwards with the complement) at a time, like BGPO.
    return "activations" if self.hparams_from_config(config.rl).bound else self.remat_policy

  def warnings(self, config) -> tuple[str, ...]:
    hp = self.hparams_from_config(config.rl)
    from bgpo_jax.config import resolved_remat_policy
    if not hp.bound and config.rl.num_mc_samples > 1 and resolved_remat_policy(config) in ("activations", "none"):
      return (f"espo (bound=False) holds all {config.rl.num_mc_samples} samples' graphs "
              f"({2 if hp.complement else 1} forwards each) at once with model.remat_policy "
              f"{config.model.remat_policy!r}; use full (or rl.espo.bound=True) if memory runs out",)
    return ()

  def recipe(self, c):
    """ESPO's published LLaDA recipe for c.task.name (the demo: its demo_task; other tasks: gsm8k's),
    from ML-GSAI/ESPO recipes/run_<task>_llada.sh over recipes/train.yaml. Not reproduced: LoRA (r 128,
    alpha 64) on every task but code (we train all weights) and train.yaml's sync_ref_model (every 64
    steps; our reference stays the policy at RL start)."""
    super().recipe(c)
    task = c.task.demo_task if c.task.name == "demo" else c.task.name
    r = _RECIPES.get(task, _RECIPES["gsm8k"])
    mu = 8  # NUM_ITER=8 in every run_*_llada.sh (--num_iterations): updates per rollout batch
    c.rl.kl_beta = r["beta"]  # --beta
    c.rl.group_size = r["G"]  # --num_generations
    c.rl.prompts_per_step = r["rows"] // r["G"]  # 16 prompts on every task
    c.rl.updates_per_batch = mu
    c.rl.num_mc_samples = 2  # --num_mc 2
    # scale_rewards: false (train.yaml:19): no std division; the baseline is leave-one-out, r - mean of
    # the other G-1 rewards (espo_trainer.py:694-710, leave_one_out = True).
    c.rl.advantage_std = False
    c.rl.advantage_baseline = "leave_one_out"
    # beta > 0 everywhere: zero-advantage rows still carry the KL gradient, train on all rows.
    c.rl.skip_zero_advantage = False
    c.rl[self.name].clip_low = r["eps"]  # --epsilon (trl: epsilon_low = epsilon)
    c.rl[self.name].clip_high = r["eps"]  # trl: epsilon_high defaults to epsilon
    c.rl[self.name].kl_estimator = "k2"  # espo_trainer.py:199
    c.rl[self.name].complement = True  # reduce_var (train.yaml:58; always on in compute_loss)
    c.optim.learning_rate = r["lr"]
    # --lr_scheduler_type constant_with_warmup, --warmup_ratio 0.001 of the optimizer updates
    # (transformers: ceil(total * ratio)).
    c.optim.schedule = "constant"
    c.optim.warmup_steps = math.ceil(0.001 * c.total_steps * mu)
    c.optim.weight_decay = r["wd"]
    c.optim.grad_clip_norm = r["clip"]  # --max_grad_norm
    c.optim.b1 = 0.9  # train.yaml:33 adam_beta1
    c.optim.b2 = 0.99  # train.yaml:34 adam_beta2
    c.rollout.gen_length = 256  # train.yaml:52 max_completion_length
    c.rollout.steps = r["steps"]  # --diffusion_steps
    c.rollout.block_length = 32  # espo_trainer.py:568 (LLaDA generation, hard-coded)
    c.rollout.temperature = 1.0  # train.yaml:56 generation_temperature
    c.rollout.remasking = "low_confidence"  # espo_trainer.py:278 (generate's default, called without it)
    c.rollout.cfg_scale = 0.0  # espo_trainer.py:277
    if c.task.name != "demo":
      c.task.max_prompt_tokens = 400  # --max_prompt_length 400, left-truncated (espo_trainer.py:543-545)
    return c

  # ---------------------------------------------------------------- the step

  def _elbos(self, model_cfg, cfg, params, mb: dict, masks: jax.Array, counts: jax.Array) -> jax.Array:
    """ELBO samples [k, mb] of masks [k, mb, L] / counts [k, mb], all in one vmapped graph (the
    complementary passes stacked after the masked ones)."""
    from bgpo_jax.diffusion import elbo
    w, wc = espo_weights(counts, cfg.gen_length, cfg.hparams.complement)
    if wc is not None:
      masks, w = jnp.concatenate([masks, ~masks]), jnp.concatenate([w, wc])
    term = lambda m, x: elbo.elbo_term(model_cfg, params, mb["tokens"], mb["attention_mask"], m, x)
    l = jax.vmap(term)(masks, w)
    k = counts.shape[0]
    return l[:k] + l[k:] if wc is not None else l

  def unit_terms(self, model_cfg, cfg, params, mb: dict, u: jax.Array):
    """bound=False: the micro-batch's whole objective (u = 0), all samples in one graph;
    bound=True: sample u's terms g_u. Summed over the micro-batch rows."""
    hp, L, n = cfg.hparams, cfg.gen_length, cfg.num_mc_samples
    masks, counts = espo_masks(mb["row_seeds"], n, L)
    kw = dict(length=L, clip_low=hp.clip_low, clip_high=hp.clip_high, kl_beta=cfg.kl_beta,
              kl_estimator=hp.kl_estimator)
    sg = jax.lax.stop_gradient
    if hp.bound:
      l = self._elbos(model_cfg, cfg, params, mb, masks[u][None], counts[u][None])[0]  # [mb]
      old = mb["old_elbo"][u] if cfg.off_policy else sg(l)
      ref = mb["ref_elbo"][u] if cfg.kl_beta > 0 else None
      g = espo_bound_sample_terms(l, old, mb["advantages"], num_samples=n, elbo_ref=ref, **kw)
      l_ = sg(l)
      kl = jnp.zeros(()) if ref is None else jnp.sum(espo_kl(l_, ref, length=L, estimator=hp.kl_estimator))
      return jnp.sum(g), {"elbo": jnp.sum(l_), "abs_d": jnp.sum(jnp.abs(l_ - old)) / L, "kl": kl}
    l = self._elbos(model_cfg, cfg, params, mb, masks, counts)  # [n, mb]
    old = mb["old_elbo"] if cfg.off_policy else sg(l)
    ref = mb["ref_elbo"] if cfg.kl_beta > 0 else None
    obj = espo_objective(l, old, mb["advantages"], elbo_ref=ref, **kw)
    lbar = jnp.mean(sg(l), axis=0)
    kl = (jnp.zeros(()) if ref is None else
          jnp.sum(espo_kl(lbar, jnp.mean(ref, axis=0), length=L, estimator=hp.kl_estimator)))
    return obj * l.shape[1], {"elbo": jnp.sum(lbar), "abs_d": jnp.sum(jnp.abs(lbar - jnp.mean(old, axis=0))) / L,
                              "kl": kl}

  def old_terms(self, model_cfg, cfg, params, mb: dict) -> jax.Array:
    """ELBO samples [n, mb] of `params` on the rows' masks, one sample at a time (a scan)."""
    masks, counts = espo_masks(mb["row_seeds"], cfg.num_mc_samples, cfg.gen_length)

    def unit(_, mk):
      return None, self._elbos(model_cfg, cfg, params, mb, mk[0][None], mk[1][None])[0]

    _, l = jax.lax.scan(unit, None, (masks, counts))
    return l

  # ---------------------------------------------------------------- the trainer

  def host_fields(self, inputs: RolloutInputs) -> list[dict]:
    if not self.hparams_from_config(inputs.rl).resample_masks:
      return [{"row_seeds": inputs.row_seeds(0)}] * inputs.updates
    return [{"row_seeds": inputs.row_seeds(u)} for u in range(inputs.updates)]


register(ESPO())
