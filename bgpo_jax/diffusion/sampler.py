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

EOS options (both off by default):
- `suppress_eos`: the EOS logit is set to -inf after CFG, so EOS is never proposed.
- `suppress_eos_confidence`: candidates equal to `eos_id` or `eot_id` rank after every other
  candidate of the row (confidence lowered by 2, below the [0, 1] range, ordering among them
  kept), so they are committed only when the schedule asks for more positions than there are
  other candidates. (The torch reference approximates this by zeroing their probability.)
"""

from __future__ import annotations

from typing import Callable

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
  """Host-side check that no real prompt position holds the mask token (skipped under jit)."""
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
  if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
    raise ValueError(f"prompt_tokens {prompt_tokens.shape} and prompt_mask {prompt_mask.shape} "
                     f"must both be [batch, prompt_len]")
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
    k_sample, k_conf = jax.random.split(key)
    start = blk_idx * block_length
    logits = block_logits(canvas, start)
    blk = lax.dynamic_slice_in_dim(canvas, plen + start, block_length, axis=1)  # [B, bl]
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

    masked = blk == mask_id
    if conf_ids:
      conf = jnp.where(jnp.isin(cand, jnp.asarray(conf_ids, jnp.int32)),
                       conf - confidence_lib.rank_last_offset(remasking, logits.shape[-1]), conf)
    conf = jnp.where(masked, conf, -jnp.inf)
    # Rank of each position in descending confidence (stable: lower index first on ties);
    # a dynamic per-row k then is a comparison, no top_k with a static k needed.
    order = jnp.argsort(-conf, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    commit = (rank < counts[:, i][:, None]) & masked
    blk = jnp.where(commit, cand, blk)
    return lax.dynamic_update_slice_in_dim(canvas, blk, plen + start, axis=1)

  def block_body(blk_idx: jax.Array, canvas: jax.Array) -> jax.Array:
    blk = lax.dynamic_slice_in_dim(canvas, plen + blk_idx * block_length, block_length, axis=1)
    counts = transfer_schedule(jnp.sum(blk == mask_id, axis=1), steps_per_block)
    return lax.fori_loop(0, steps_per_block,
                         lambda i, c: step(blk_idx, i, counts, c), canvas)

  return lax.fori_loop(0, num_blocks, block_body, canvas)
