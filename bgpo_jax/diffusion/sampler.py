"""Reverse-process sampler with LLaDA semantics (SPEC section 4), compiled end to end.

Canvas [prompt | MASK x gen_length], decoded block by block (left to right). Within a block with
M masked positions and s = steps / num_blocks steps, step i commits
M // s + (1 if i < M % s else 0) positions: at every step the model scores the whole canvas,
each masked position of the current block proposes a candidate (argmax at T = 0, Gumbel-max on
logits / T otherwise) with a confidence (softmax probability of the candidate, uniform noise
for "random" remasking, or one of Dream's rules: diffusion/confidence.py), and the k most
confident candidates of each row are committed.

Everything runs inside two nested `lax.fori_loop`s over a fixed-shape canvas, so `generate`
traces once per (shapes, settings) and runs under `jax.jit` with batch-sharded inputs. Only the
current block's logits are post-processed (softmax, sampling, ranking); with `head_fn` the
vocab head itself runs on the current block only.

Tie-break: among equal confidences the lower position wins (stable sort), the same as
`jax.lax.top_k`; the torch reference leaves ties to `torch.topk`.

The mask token's logit is always -inf (it is not a valid output; the torch reference keeps it,
which only matters for an untrained model, where it would leave masks in the output).

`generate_cached` (end of this module) is the KV-cached variant (SPEC section 4b,
Fast-dLLM's prefix and dual caches) with confidence-threshold / factor parallel decoding; with
cache="none" and the fixed schedule it gives `generate`'s tokens.

EOS options (both off by default):
- `suppress_eos`: the EOS logit is set to -inf after CFG, so EOS is never proposed.
- `suppress_eos_confidence`: candidates equal to `eos_id` or `eot_id` rank after every other
  candidate of the row (confidence lowered by 2, below the [0, 1] range, ordering among them
  kept), so they are committed only when the schedule asks for more positions than there are
  other candidates. (The torch reference approximates this by zeroing their probability.)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bgpo_jax.diffusion import confidence as confidence_lib

REMASKING = confidence_lib.RULES  # low_confidence, random + Dream's maskgit_plus, topk_margin, entropy

# logits_fn(tokens [B, S] int32, attention_mask [B, S] int32) -> logits [B, S, V] or, to skip
# the vocab head on the prompt, only the response positions [B, gen_length, V].
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


def transfer_schedule(num_masked: jax.Array, steps: int) -> jax.Array:
  """How many positions each step of a block commits.

  Args:
    num_masked: int [B], masked positions M of each row at the start of the block.
    steps: static int s, steps of the block.
  Returns:
    int32 [B, s] with entry i = M // s + (1 if i < M % s else 0); rows sum to M.
  """
  m = jnp.asarray(num_masked, jnp.int32)[:, None]
  i = jnp.arange(steps, dtype=jnp.int32)[None, :]
  return m // steps + (i < m % steps).astype(jnp.int32)


def check_settings(*, gen_length: int, steps: int, block_length: int, temperature: float,
                   remasking: str, cfg_scale: float, mask_id: int, eos_id: int | None,
                   suppress_eos: bool, eot_id: int | None = None,
                   suppress_eos_confidence: bool = False) -> None:
  """Raises ValueError naming the bad setting and the fix."""
  for name, v in (("gen_length", gen_length), ("steps", steps), ("block_length", block_length)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  if gen_length % block_length:
    raise ValueError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
  num_blocks = gen_length // block_length
  if steps % num_blocks:
    raise ValueError(f"steps {steps} is not a multiple of the number of blocks {num_blocks} "
                     f"(gen_length {gen_length} / block_length {block_length}); use a multiple")
  if steps > gen_length:
    raise ValueError(f"steps {steps} exceeds gen_length {gen_length}: some steps would commit "
                     f"nothing; use steps <= gen_length")
  if not isinstance(temperature, (int, float, np.floating)) or not temperature >= 0:
    raise ValueError(f"temperature must be a static float >= 0, got {temperature!r}")
  if remasking not in REMASKING:
    raise ValueError(f"unknown remasking {remasking!r}; use one of {REMASKING}")
  if not isinstance(cfg_scale, (int, float, np.floating)) or not cfg_scale >= 0:
    raise ValueError(f"cfg_scale must be a static float >= 0, got {cfg_scale!r}")
  if mask_id is None:
    raise ValueError("mask_id is required")
  if suppress_eos and eos_id is None:
    raise ValueError("suppress_eos=True needs eos_id")
  if suppress_eos_confidence and eos_id is None and eot_id is None:
    raise ValueError("suppress_eos_confidence=True needs eos_id and/or eot_id")


def check_prompt(prompt_tokens, prompt_mask, mask_id: int) -> None:
  """Prompts are [batch, prompt_len] with a mask of the same shape, and (host side; skipped under
  jit) no real prompt position holds the mask token."""
  if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
    raise ValueError(f"prompt_tokens {prompt_tokens.shape} and prompt_mask {prompt_mask.shape} "
                     f"must both be [batch, prompt_len]")
  try:
    toks = np.asarray(prompt_tokens)
    msk = np.asarray(prompt_mask)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  bad = np.argwhere((toks == mask_id) & (msk != 0))
  if bad.size:
    r, c = bad[0]
    raise ValueError(f"prompt row {r} position {c} holds the mask id {mask_id} "
                     f"({len(bad)} such positions); strip mask tokens from prompts")


def _response_part(out: jax.Array, seq_len: int, gen_length: int) -> jax.Array:
  if out.ndim != 3 or out.shape[1] not in (seq_len, gen_length):
    raise ValueError(f"logits_fn returned shape {out.shape}; expected [B, {seq_len}, ...] or "
                     f"[B, {gen_length}, ...]")
  return out[:, out.shape[1] - gen_length:]


def _candidates(logits: jax.Array, blk: jax.Array, key: jax.Array, *, temperature: float,
                remasking: str, mask_id: int, eos_id: int | None, suppress_eos: bool,
                conf_ids: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """One step's proposals for a block (SPEC section 4, steps 2-3).

  logits float32 [B, bl, V] of the block, blk int32 [B, bl] its tokens -> (candidates int32
  [B, bl], confidence float32 [B, bl], -inf where the block is not masked).
  """
  k_sample, k_conf = jax.random.split(key)
  # The mask token is never a valid output: committing it would leave the position masked
  # and break the schedule (trained LLaDA gives it ~0 probability; random models do not).
  logits = logits.at[..., mask_id].set(-jnp.inf)
  if suppress_eos:
    logits = logits.at[..., eos_id].set(-jnp.inf)

  if temperature == 0.0:
    cand = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  else:
    cand = jax.random.categorical(k_sample, logits / temperature, axis=-1).astype(jnp.int32)

  if remasking == "low_confidence":
    # Select by comparison rather than gather: elementwise, fine on a vocab-sharded axis.
    vocab = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    cand_logit = jnp.max(jnp.where(vocab == cand[..., None], logits, -jnp.inf), axis=-1)
    conf = jnp.exp(cand_logit - jax.nn.logsumexp(logits, axis=-1))
  elif remasking in confidence_lib.DREAM_RULES:
    conf = confidence_lib.confidence(logits, cand, remasking, temperature=temperature)
  else:
    conf = jax.random.uniform(k_conf, blk.shape, jnp.float32)

  if conf_ids:
    conf = jnp.where(jnp.isin(cand, jnp.asarray(conf_ids, jnp.int32)),
                     conf - confidence_lib.rank_last_offset(remasking, logits.shape[-1]), conf)
  return cand, jnp.where(blk == mask_id, conf, -jnp.inf)


def _rank(conf: jax.Array) -> jax.Array:
  """Rank of each position in descending confidence (stable: lower index first on ties)."""
  order = jnp.argsort(-conf, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1)


def _commit_top_k(blk, cand, conf, count, mask_id: int) -> jax.Array:
  """Commits the `count` [B] most confident masked positions of each row."""
  # A dynamic per-row k is a comparison with the rank; no top_k with a static k needed.
  commit = (_rank(conf) < count[:, None]) & (blk == mask_id)
  return jnp.where(commit, cand, blk)


def _commit_threshold(blk, cand, conf, threshold: float, mask_id: int) -> jax.Array:
  """Fast-dLLM's threshold rule: every masked position with confidence >= threshold, and always
  the most confident one; a row without masks is unchanged."""
  masked = blk == mask_id
  commit = masked & ((conf >= threshold) | (_rank(conf) == 0))
  return jnp.where(commit, cand, blk)


def _commit_factor(blk, cand, conf, factor: float, mask_id: int) -> jax.Array:
  """Fast-dLLM's "factor" rule (get_transfer_index_dynamic): with the N masked confidences sorted
  descending c_0 >= c_1 >= ..., the i-th must reach 1 - factor / (i + 2) (c_0 always passes);
  the leading run of passes is committed, and, as in Fast-dLLM, all N when only the last fails."""
  masked = blk == mask_id
  n = jnp.sum(masked, axis=1)  # [B]
  rank = _rank(conf)
  sorted_conf = -jnp.sort(-conf, axis=-1)  # [B, bl] descending, -inf after the N masked
  i = lax.broadcasted_iota(jnp.int32, conf.shape, 1)
  thr = jnp.where(i == 0, -jnp.inf, 1.0 - factor / (i + 2.0))
  fail = (sorted_conf < thr) & (i < n[:, None])
  first_fail = jnp.min(jnp.where(fail, i, conf.shape[1]), axis=1)
  k = jnp.minimum(first_fail, n - 1)
  k = jnp.where((k == n - 1) | (k == 0), k + 1, k)
  commit = (rank < k[:, None]) & masked
  return jnp.where(commit, cand, blk)


def generate(logits_fn: LogitsFn, prompt_tokens: jax.Array, prompt_mask: jax.Array, *,
             rng: jax.Array, gen_length: int, steps: int, block_length: int,
             temperature: float = 0.0, remasking: str = "low_confidence",
             cfg_scale: float = 0.0, mask_id: int, eos_id: int | None = None,
             suppress_eos: bool = False, eot_id: int | None = None,
             suppress_eos_confidence: bool = False,
             head_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """Samples responses by iterative unmasking (SPEC section 4).

  Pure and traceable: call it inside `jax.jit` (with a `logits_fn` closing over the params
  *argument* of the jitted function); all keyword settings must be static Python values.

  Args:
    logits_fn: (tokens [B', S], attention_mask [B', S]) -> logits [B', S, V] (or only the
      response positions [B', gen_length, V]); B' = 2B with CFG.
    prompt_tokens: int [B, P], left padded.
    prompt_mask: int/bool [B, P], 1 = real prompt token, 0 = padding.
    rng: PRNG key (used for Gumbel noise at T > 0 and for "random" remasking).
    gen_length, steps, block_length: static ints; gen_length % block_length == 0 and
      steps % (gen_length // block_length) == 0.
    temperature: 0 = greedy candidates; > 0 Gumbel-max sampling of logits / T.
    remasking: "low_confidence", "random" or Dream's "maskgit_plus" / "topk_margin" / "entropy"
      (diffusion/confidence.py).
    cfg_scale: classifier-free guidance; > 0 adds a copy with the real prompt tokens masked and
      uses un + (cfg + 1) * (cond - un).
    mask_id, eos_id, eot_id: special token ids.
    suppress_eos: EOS logit set to -inf.
    suppress_eos_confidence: EOS/EOT candidates are committed last (module docstring).
    head_fn: optional vocab head, features [B', block_length, D] -> logits. When given,
      `logits_fn` returns features [B', S or gen_length, D] instead of logits and the head runs
      on the current block only (the other positions' logits are never used).
  Returns:
    int32 [B, P + gen_length]: the prompt unchanged followed by the response (no mask left).
  """
  check_settings(gen_length=gen_length, steps=steps, block_length=block_length,
                 temperature=temperature, remasking=remasking, cfg_scale=cfg_scale,
                 mask_id=mask_id, eos_id=eos_id, suppress_eos=suppress_eos, eot_id=eot_id,
                 suppress_eos_confidence=suppress_eos_confidence)
  check_prompt(prompt_tokens, prompt_mask, mask_id)

  batch, plen = prompt_tokens.shape
  seq_len = plen + gen_length
  num_blocks = gen_length // block_length
  steps_per_block = steps // num_blocks
  temperature = float(temperature)
  cfg_scale = float(cfg_scale)
  conf_ids = [i for i in (eos_id, eot_id) if i is not None] if suppress_eos_confidence else []

  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
  # Response columns are broadcast from a prompt column so they inherit its batch sharding
  # (concatenate under an Explicit mesh needs equal shardings).
  column = jnp.ones_like(prompt_tokens[:, :1])
  canvas = jnp.concatenate(
      [prompt_tokens, jnp.broadcast_to(column * mask_id, (batch, gen_length))], axis=1)
  attn = jnp.concatenate([prompt_mask, jnp.broadcast_to(column, (batch, gen_length))], axis=1)
  if cfg_scale > 0:
    # Unconditional copy: real prompt tokens -> MASK (padding keys are masked out anyway).
    un_prompt = jnp.where(prompt_mask != 0, mask_id, prompt_tokens)
    attn2 = jnp.concatenate([attn, attn], axis=0)

  def block_logits(canvas: jax.Array, start: jax.Array) -> jax.Array:  # [B, bl, V] float32
    def run(tokens, attention_mask):
      out = _response_part(logits_fn(tokens, attention_mask), seq_len, gen_length)
      out = lax.dynamic_slice_in_dim(out, start, block_length, axis=1)
      return (out if head_fn is None else head_fn(out)).astype(jnp.float32)

    if cfg_scale > 0:
      un = lax.dynamic_update_slice_in_dim(canvas, un_prompt, 0, axis=1)
      both = run(jnp.concatenate([canvas, un], 0), attn2)
      cond, unc = both[:batch], both[batch:]
      return unc + (cfg_scale + 1.0) * (cond - unc)
    return run(canvas, attn)

  def step(blk_idx: jax.Array, i: jax.Array, counts: jax.Array, canvas: jax.Array) -> jax.Array:
    key = jax.random.fold_in(rng, blk_idx * steps_per_block + i)
    start = blk_idx * block_length
    logits = block_logits(canvas, start)
    blk = lax.dynamic_slice_in_dim(canvas, plen + start, block_length, axis=1)  # [B, bl]
    cand, conf = _candidates(logits, blk, key, temperature=temperature, remasking=remasking,
                             mask_id=mask_id, eos_id=eos_id, suppress_eos=suppress_eos,
                             conf_ids=conf_ids)
    blk = _commit_top_k(blk, cand, conf, counts[:, i], mask_id)
    return lax.dynamic_update_slice_in_dim(canvas, blk, plen + start, axis=1)

  def block_body(blk_idx: jax.Array, canvas: jax.Array) -> jax.Array:
    blk = lax.dynamic_slice_in_dim(canvas, plen + blk_idx * block_length, block_length, axis=1)
    counts = transfer_schedule(jnp.sum(blk == mask_id, axis=1), steps_per_block)
    return lax.fori_loop(0, steps_per_block,
                         lambda i, c: step(blk_idx, i, counts, c), canvas)

  return lax.fori_loop(0, num_blocks, block_body, canvas)


# -----------------------------------------------------------------------------------------------
# Cached sampling and parallel decoding (SPEC section 4b)

CACHES = ("none", "prefix", "dual")


def check_cached_settings(*, cache: str, threshold: float | None, factor: float | None,
                          refresh_every: int = 0) -> None:
  """Raises ValueError naming the bad cache / parallel-decoding setting and the fix."""
  if cache not in CACHES:
    raise ValueError(f"unknown cache {cache!r}; use one of {CACHES}")
  if threshold is not None and factor is not None:
    raise ValueError(f"threshold {threshold} and factor {factor} are two parallel-decoding rules; "
                     f"set one of them (or neither for the fixed schedule)")
  if threshold is not None and not (isinstance(threshold, (int, float, np.floating))
                                    and 0.0 < threshold <= 1.0):
    raise ValueError(f"threshold must be a static float in (0, 1] (Fast-dLLM uses 0.9), got "
                     f"{threshold!r}; or None for the fixed schedule")
  if factor is not None and not (isinstance(factor, (int, float, np.floating)) and factor > 0):
    raise ValueError(f"factor must be a static float > 0 (Fast-dLLM uses 1.0), got {factor!r}")
  if not isinstance(refresh_every, (int, np.integer)) or refresh_every < 0:
    raise ValueError(f"refresh_every must be an int >= 0 (0 = refresh at block starts only), "
                     f"got {refresh_every!r}")


def generate_cached(model_cfg: Any, params: Any, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                    *, cache: str, rng: jax.Array, gen_length: int, steps: int, block_length: int,
                    temperature: float = 0.0, remasking: str = "low_confidence", mask_id: int,
                    threshold: float | None = None, factor: float | None = None,
                    cfg_scale: float = 0.0, eos_id: int | None = None, suppress_eos: bool = False,
                    eot_id: int | None = None, suppress_eos_confidence: bool = False,
                    refresh_every: int = 0, return_nfe: bool = False) -> jax.Array:
  """Samples responses with Fast-dLLM's KV caches and parallel decoding, for any model family
  (the cached forward comes from models/family.py `cached_forward_for`).

  Pure and traceable like `generate` (call it inside `jax.jit` with `params` an argument; every
  keyword except `rng` must be static). Per block [s, e) of the canvas (SPEC section 4b):
  step 0 is a full forward that commits from its logits and caches every layer's K / V; the
  block's other steps run the model on a window only:
    cache="none":   the full canvas again (no cache: `generate`'s algorithm);
    cache="prefix": positions [s, P + gen_length), attending to the cached [0, s);
    cache="dual":   positions [s, e), attending to the whole cache (prefix and suffix as cached
                    at the block start, the window's fresh K / V in place of its own).
  Left-padded prompts: padding keys are masked in every forward, cached or not. Families with
  shifted predictions (Dream) run their window from s - 1 (models/dream_cache.py).

  Commit rule per step: the fixed schedule of SPEC section 4 (`steps`), or with `threshold`
  every masked position of the block whose confidence is >= threshold plus the most confident
  one, repeated (a `lax.while_loop`) until no row has a mask left in the block; rows done early
  stay unchanged. `factor` instead uses Fast-dLLM's factor rule (`_commit_factor`). `steps`
  (validated as for `generate`) sets nothing with a threshold or factor.

  The prefix window shrinks block by block, so its blocks are unrolled (one program region per
  block, num_blocks times the compile work of one); the dual and uncached windows have one shape
  and run in a `lax.fori_loop` over blocks.

  Args:
    model_cfg: a family's model config (llada.LLaDAConfig, dream.DreamConfig).
    params: that family's parameter tree (best already in the compute dtype, see
      rollout.RolloutSampler.inference_params).
    prompt_tokens, prompt_mask: int [B, P], left padded; mask 1 = real token.
    refresh_every: 0 = refresh the cache at block starts only (Fast-dLLM); r > 0 also runs a
      full forward (commit from it, cache refreshed) at every r-th step of a block; 1 = no cache.
    return_nfe: also return the number of model calls (int32 scalar; Fast-dLLM's "nfe").
    Others as in `generate`.
  Returns:
    int32 [B, P + gen_length]: the prompt followed by the response (no mask left); with
    return_nfe, (tokens, nfe).
  """
  from bgpo_jax.models import family  # the sampler core stays model-agnostic
  model = family.module_for(model_cfg)
  cached_model = family.cached_forward_for(model_cfg)

  check_settings(gen_length=gen_length, steps=steps, block_length=block_length,
                 temperature=temperature, remasking=remasking, cfg_scale=cfg_scale,
                 mask_id=mask_id, eos_id=eos_id, suppress_eos=suppress_eos, eot_id=eot_id,
                 suppress_eos_confidence=suppress_eos_confidence)
  check_cached_settings(cache=cache, threshold=threshold, factor=factor,
                        refresh_every=refresh_every)
  check_prompt(prompt_tokens, prompt_mask, mask_id)

  batch, plen = prompt_tokens.shape
  if plen < 1 and cache != "none":
    raise ValueError(f"cache={cache!r} needs a prompt of at least one position, got prompt_tokens "
                     f"{prompt_tokens.shape}")
  seq_len = plen + gen_length
  num_blocks = gen_length // block_length
  steps_per_block = steps // num_blocks
  temperature = float(temperature)
  cfg_scale = float(cfg_scale)
  conf_ids = [i for i in (eos_id, eot_id) if i is not None] if suppress_eos_confidence else []
  if cache == "none":
    refresh_every = 1
  parallel = threshold is not None or factor is not None

  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
  column = jnp.ones_like(prompt_tokens[:, :1])
  canvas = jnp.concatenate(
      [prompt_tokens, jnp.broadcast_to(column * mask_id, (batch, gen_length))], axis=1)
  attn = jnp.concatenate([prompt_mask, jnp.broadcast_to(column, (batch, gen_length))], axis=1)
  if cfg_scale > 0:
    # Rows B..2B-1: the unconditional copy (real prompt tokens -> MASK); it has its own cache.
    un_prompt = jnp.where(prompt_mask != 0, mask_id, prompt_tokens)
    attn = jnp.concatenate([attn, attn], axis=0)

  def model_rows(canvas: jax.Array) -> jax.Array:  # [B', S]
    if cfg_scale > 0:
      return jnp.concatenate([canvas, lax.dynamic_update_slice_in_dim(canvas, un_prompt, 0, 1)], 0)
    return canvas

  def block_logits(hidden_block: jax.Array) -> jax.Array:  # [B', bl, D] -> [B, bl, V] float32
    out = model.lm_head(model_cfg, params, hidden_block).astype(jnp.float32)
    if cfg_scale > 0:
      cond, unc = out[:batch], out[batch:]
      return unc + (cfg_scale + 1.0) * (cond - unc)
    return out

  def full(canvas, start, with_cache: bool):
    """Full forward -> (block logits, cache or None)."""
    tokens = model_rows(canvas)
    if with_cache:
      hidden, kv = cached_model.prefill(model_cfg, params, tokens, attn)
    else:  # the family's own forward: bit-identical to `generate` for cache="none"
      hidden, kv = model.hidden_states(model_cfg, params, tokens, attn), None
    return block_logits(lax.dynamic_slice_in_dim(hidden, start, block_length, axis=1)), kv

  def windowed(canvas, start, kv, width: int):
    """The model on canvas [start, start + width) against the cache -> block logits. The family
    picks the positions it runs (Dream: one more, the output at start - 1 predicts start), so it
    gets whole rows (with CFG the unconditional copy's too)."""
    hidden = cached_model.window_features(model_cfg, params, model_rows(canvas), start, width,
                                          kv, attn)
    return block_logits(hidden[:, :block_length])

  def commit(canvas, logits, start, key, count):
    blk = lax.dynamic_slice_in_dim(canvas, start, block_length, axis=1)
    cand, conf = _candidates(logits, blk, key, temperature=temperature, remasking=remasking,
                             mask_id=mask_id, eos_id=eos_id, suppress_eos=suppress_eos,
                             conf_ids=conf_ids)
    if threshold is not None:
      blk = _commit_threshold(blk, cand, conf, float(threshold), mask_id)
    elif factor is not None:
      blk = _commit_factor(blk, cand, conf, float(factor), mask_id)
    else:
      blk = _commit_top_k(blk, cand, conf, count, mask_id)
    return lax.dynamic_update_slice_in_dim(canvas, blk, start, axis=1)

  def run_block(b, canvas: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """Decodes block b (a Python int for the prefix cache, else traced) -> (canvas, nfe)."""
    start = plen + b * block_length
    blk = lax.dynamic_slice_in_dim(canvas, start, block_length, axis=1)
    counts = transfer_schedule(jnp.sum(blk == mask_id, axis=1), steps_per_block)
    # Same keys as `generate` on the fixed schedule; a threshold block takes <= block_length steps.
    key_of = lambda i: jax.random.fold_in(
        rng, b * (block_length if parallel else steps_per_block) + i)
    keep_cache = refresh_every != 1

    logits, kv = full(canvas, start, keep_cache)
    canvas = commit(canvas, logits, start, key_of(0), counts[:, 0])

    def step(i, canvas, kv):
      """Step i >= 1 of the block -> (canvas, kv)."""
      if refresh_every == 1:
        logits, _ = full(canvas, start, False)
      elif refresh_every > 1:
        logits, kv = lax.cond(i % refresh_every == 0,
                              lambda c, kv: full(c, start, True),
                              lambda c, kv: (windowed(c, start, kv, width), kv), canvas, kv)
      else:
        logits = windowed(canvas, start, kv, width)
      count = counts[:, jnp.minimum(i, steps_per_block - 1)]
      return commit(canvas, logits, start, key_of(i), count), kv

    if parallel:
      def cond(carry):
        return jnp.any(lax.dynamic_slice_in_dim(carry[1], start, block_length, axis=1) == mask_id)

      if refresh_every > 1:
        body = lambda carry: (carry[0] + 1,) + step(*carry)
        out = lax.while_loop(cond, body, (jnp.int32(1), canvas, kv))
      else:
        body = lambda carry: (carry[0] + 1, step(carry[0], carry[1], kv)[0])
        out = lax.while_loop(cond, body, (jnp.int32(1), canvas))
      return out[1], out[0]
    nfe = jnp.int32(steps_per_block)
    if refresh_every > 1:
      return lax.fori_loop(1, steps_per_block, lambda i, c: step(i, *c), (canvas, kv))[0], nfe
    # The cache is a loop constant here (not carried): XLA keeps one copy.
    return lax.fori_loop(1, steps_per_block, lambda i, c: step(i, c, kv)[0], canvas), nfe

  nfe = jnp.int32(0)
  if cache == "prefix":
    for b in range(num_blocks):  # static starts: each block's window has its own shape
      canvas, n = run_block(b, canvas, seq_len - (plen + b * block_length))
      nfe = nfe + n
  else:
    def blocks(b, carry):
      canvas, n = run_block(b, carry[0], block_length)
      return canvas, carry[1] + n
    canvas, nfe = lax.fori_loop(0, num_blocks, blocks, (canvas, nfe))
  return (canvas, nfe) if return_nfe else canvas
