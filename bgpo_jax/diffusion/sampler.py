"""Reverse-process sampler: LLaDA's block decoding (SPEC section 4) with Fast-dLLM's KV caches and
parallel decoding (SPEC section 4b), compiled end to end.

Canvas [prompt | MASK x gen_length], decoded block by block (left to right). Within a block with
M masked positions and s = steps / num_blocks steps, step i commits
M // s + (1 if i < M % s else 0) positions: at every step the model scores the canvas, each
masked position of the current block proposes a candidate (argmax at T = 0, Gumbel-max on
logits / T otherwise) with a confidence (softmax probability of the candidate, uniform noise
for "random" remasking, or one of Dream's rules: diffusion/confidence.py), and the k most
confident candidates of each row are committed. With `threshold` / `factor` (parallel decoding)
a step instead commits every candidate that passes the rule, until the block has no mask left.

One block loop serves every mode, driven by one `SamplerSettings`:
  cache="none":   every step is a full forward (SPEC section 4; `refresh_every` is 1);
  cache="prefix": step 0 of a block is a full forward that caches every layer's K / V, the
                  block's other steps run positions [s, P + gen_length) against the cached [0, s);
  cache="dual":   as prefix, but the other steps run the block [s, e) only, against the whole
                  cache (prefix and suffix as cached at the block start).
The model is a family's config (models/family.py: its forward, lm_head and KV-cached forward;
any cache) or a plain logits function (cache="none" only). Either way only the current block's
logits are post-processed (softmax, sampling, ranking), and the vocab head runs on the current
block only unless the logits function computes it itself.

Everything runs inside `lax` loops over a fixed-shape canvas (blocks: a `fori_loop`, unrolled for
the prefix cache whose window shrinks block by block; steps: a `fori_loop`, or a `while_loop` for
parallel decoding), so `generate` traces once per (shapes, settings) and runs under `jax.jit` with
batch-sharded inputs. Step i of block b draws its randomness from fold_in(rng, b * n + i) with
n = steps per block (block_length with parallel decoding), the same for every cache.

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

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bgpo_jax.diffusion import confidence as confidence_lib

REMASKING = confidence_lib.RULES  # low_confidence, random + Dream's maskgit_plus, topk_margin, entropy
CACHES = ("none", "prefix", "dual")

# logits_fn(tokens [B, S] int32, attention_mask [B, S] int32) -> logits [B, S, V] or, to skip
# the vocab head on the prompt, only the response positions [B, gen_length, V].
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float, np.floating))


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Reverse-process settings (SPEC sections 4 and 4b), all static; checked when built. Defaults:
  the paper's training rollouts for sudoku / countdown.

  gen_length, steps, block_length: gen_length % block_length == 0 and steps a multiple of
    num_blocks = gen_length // block_length, at most gen_length.
  temperature: 0 = greedy candidates; > 0 Gumbel-max sampling of logits / T.
  remasking: "low_confidence", "random" or Dream's "maskgit_plus" / "topk_margin" / "entropy"
    (diffusion/confidence.py).
  cfg_scale: classifier-free guidance; > 0 adds a copy with the real prompt tokens masked and
    uses un + (cfg + 1) * (cond - un).
  suppress_eos / suppress_eos_confidence: the EOS options of the module docstring.
  cache: "none", "prefix" or "dual" (module docstring).
  threshold: confidence-threshold parallel decoding in (0, 1] (Fast-dLLM uses 0.9): every masked
    position of the block with confidence >= threshold plus the most confident one, at every
    step; None = the fixed schedule of `steps` (which then sets nothing).
  factor: Fast-dLLM's factor rule instead (`_commit_factor`); at most one of threshold / factor.
  refresh_every: with a cache, 0 = refresh it at block starts only (Fast-dLLM); r > 0 also runs
    a full forward (commit from it, cache refreshed) at every r-th step of a block; 1 = no cache.
  """

  gen_length: int = 256
  steps: int = 128
  block_length: int = 32
  temperature: float = 0.6
  remasking: str = "low_confidence"
  cfg_scale: float = 0.0
  suppress_eos: bool = False
  suppress_eos_confidence: bool = False
  cache: str = "none"
  threshold: float | None = None
  factor: float | None = None
  refresh_every: int = 0

  def __post_init__(self):
    """Raises ValueError naming the bad setting and the fix."""
    g, st, bl = self.gen_length, self.steps, self.block_length
    for name, v in (("gen_length", g), ("steps", st), ("block_length", bl)):
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    if g % bl:
      raise ValueError(f"gen_length {g} is not a multiple of block_length {bl}")
    if st % (g // bl):
      raise ValueError(f"steps {st} is not a multiple of the number of blocks {g // bl} "
                       f"(gen_length {g} / block_length {bl}); use a multiple")
    if st > g:
      raise ValueError(f"steps {st} exceeds gen_length {g}: some steps would commit nothing; "
                       f"use steps <= gen_length")
    if not _is_number(self.temperature) or not self.temperature >= 0:
      raise ValueError(f"temperature must be a static float >= 0, got {self.temperature!r}")
    if self.remasking not in REMASKING:
      raise ValueError(f"unknown remasking {self.remasking!r}; use one of {REMASKING}")
    if not _is_number(self.cfg_scale) or not self.cfg_scale >= 0:
      raise ValueError(f"cfg_scale must be a static float >= 0, got {self.cfg_scale!r}")
    if self.cache not in CACHES:
      raise ValueError(f"unknown cache {self.cache!r}; use one of {CACHES}")
    thr, fac = self.threshold, self.factor
    if thr is not None and fac is not None:
      raise ValueError(f"threshold {thr} and factor {fac} are two parallel-decoding rules; "
                       f"set one of them (or neither for the fixed schedule)")
    if thr is not None and not (_is_number(thr) and 0.0 < thr <= 1.0):
      raise ValueError(f"threshold must be a static float in (0, 1] (Fast-dLLM uses 0.9), got "
                       f"{thr!r}; or None for the fixed schedule")
    if fac is not None and not (_is_number(fac) and fac > 0):
      raise ValueError(f"factor must be a static float > 0 (Fast-dLLM uses 1.0), got {fac!r}")
    r = self.refresh_every
    if not isinstance(r, (int, np.integer)) or r < 0:
      raise ValueError(f"refresh_every must be an int >= 0 (0 = refresh at block starts only), "
                       f"got {r!r}")

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    return self.steps // self.num_blocks

  @property
  def parallel(self) -> bool:
    """Parallel decoding (threshold or factor) instead of the fixed schedule."""
    return self.threshold is not None or self.factor is not None

  def check_ids(self, ids: TokenIds) -> None:
    """Raises ValueError when an EOS option lacks the token id it acts on."""
    if self.suppress_eos and ids.eos_id is None:
      raise ValueError("suppress_eos=True needs eos_id")
    if self.suppress_eos_confidence and ids.eos_id is None and ids.eot_id is None:
      raise ValueError("suppress_eos_confidence=True needs eos_id and/or eot_id")


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """The special tokens the sampler acts on: the mask (required) and EOS / EOT (EOS options)."""

  mask_id: int
  eos_id: int | None = None
  eot_id: int | None = None

  def __post_init__(self):
    if self.mask_id is None:
      raise ValueError("mask_id is required")

  @classmethod
  def of(cls, model_cfg: Any, eot_id: int | None = None) -> TokenIds:
    """A model config's mask and EOS ids (EOT is the tokenizer's, e.g. tokenizer.eot_id)."""
    return cls(model_cfg.mask_token_id, model_cfg.eos_token_id, eot_id)


@dataclasses.dataclass(frozen=True)
class LogitsModel:
  """A plain function as the sampler's model (cache="none" only); it closes over its weights.

  logits_fn: (tokens [B', S], attention_mask [B', S]) -> logits [B', S, V] (or only the
    response positions [B', gen_length, V]); B' = 2B with CFG.
  head_fn: optional vocab head, features [B', block_length, D] -> logits. When given,
    `logits_fn` returns features [B', S or gen_length, D] instead of logits and the head runs on
    the current block only (the other positions' logits are never used).
  """

  logits_fn: LogitsFn
  head_fn: Callable[[jax.Array], jax.Array] | None = None


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


def _candidates(logits: jax.Array, blk: jax.Array, key: jax.Array, settings: SamplerSettings,
                ids: TokenIds) -> tuple[jax.Array, jax.Array]:
  """One step's proposals for a block (SPEC section 4, steps 2-3).

  logits float32 [B, bl, V] of the block, blk int32 [B, bl] its tokens -> (candidates int32
  [B, bl], confidence float32 [B, bl], -inf where the block is not masked).
  """
  temperature, remasking = float(settings.temperature), settings.remasking
  k_sample, k_conf = jax.random.split(key)
  # The mask token is never a valid output: committing it would leave the position masked
  # and break the schedule (trained LLaDA gives it ~0 probability; random models do not).
  logits = logits.at[..., ids.mask_id].set(-jnp.inf)
  if settings.suppress_eos:
    logits = logits.at[..., ids.eos_id].set(-jnp.inf)

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

  conf_ids = [i for i in (ids.eos_id, ids.eot_id) if i is not None]
  if settings.suppress_eos_confidence and conf_ids:
    conf = jnp.where(jnp.isin(cand, jnp.asarray(conf_ids, jnp.int32)),
                     conf - confidence_lib.rank_last_offset(remasking, logits.shape[-1]), conf)
  return cand, jnp.where(blk == ids.mask_id, conf, -jnp.inf)


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


def _forwards(model: Any, params: Any, attn: jax.Array, settings: SamplerSettings, plen: int):
  """The model as the block loop calls it, on model rows tokens [B', S] (B' = 2B with CFG):
  full(tokens, start, with_cache) -> (block logits float32 [B', bl, V], cache or None), start the
  block's canvas position; window(tokens, start, kv, width) -> block logits from the model on
  [start, start + width) against the cache (None for a logits function)."""
  bl = settings.block_length
  if isinstance(model, LogitsModel):
    seq_len = plen + settings.gen_length

    def fn_full(tokens, start, with_cache):
      del with_cache  # a logits function has no cache
      out = _response_part(model.logits_fn(tokens, attn), seq_len, settings.gen_length)
      out = lax.dynamic_slice_in_dim(out, start - plen, bl, axis=1)
      return (out if model.head_fn is None else model.head_fn(out)).astype(jnp.float32), None
    return fn_full, None

  # (imported here: the sampler core stays model-agnostic)
  from bgpo_jax.models import family, feature_major, sharding, transformer
  module, cached = family.module_for(model), family.cached_forward_for(model)
  rows = attn.shape[0]
  fast_cpu = (isinstance(params, dict) and jax.default_backend() == "cpu" and not sharding.context_mesh_axes())
  # A narrow window (one prompt's block) runs 1.3-1.6x as fast with the weights as
  # the row operand (models/feature_major.py); the full forwards keep the row-major weights. In
  # float32 only, not under a mesh (another copy of the weights), nor with LoRA adapters (params
  # not a dict).
  narrow = (fast_cpu and settings.cache != "none" and model.compute_dtype == "float32"
            and rows * bl <= feature_major.MAX_COLUMNS)
  narrow_params = feature_major.weights(model, params) if narrow else None
  if fast_cpu and settings.cache != "prefix":
    # On a CPU the layer scan copies every layer's weights out of the stacked arrays at every
    # step (transformer.unstack_blocks); sliced once here, outside the block and step loops, the
    # steps read them in place: the uncached m30 sampler ran 16% faster. Not for the prefix
    # cache, whose blocks are unrolled (its compile grew 6x), nor under a mesh (the copy would
    # double the sharded weights' memory on an accelerator).
    params = transformer.unstack_blocks(params)
  # Hidden states from the model and the vocab head on the current block only: ~4% of an
  # LLaDA-8B step at gen_length 256 that response-wide logits would spend.
  head = lambda hidden: module.lm_head(model, params, hidden).astype(jnp.float32)

  def full(tokens, start, with_cache):
    if with_cache:
      hidden, kv = cached.prefill(model, params, tokens, attn)
    else:  # the family's own forward
      hidden, kv = module.hidden_states(model, params, tokens, attn), None
    return head(lax.dynamic_slice_in_dim(hidden, start, bl, axis=1)), kv

  def window(tokens, start, kv, width):
    # The family picks the positions it runs (Dream: one more, the output at start - 1 predicts
    # start), so it gets whole rows (with CFG the unconditional copy's too).
    narrow_window = narrow_params is not None and rows * width <= feature_major.MAX_COLUMNS
    weights = narrow_params if narrow_window else params
    return head(cached.window_features(model, weights, tokens, start, width, kv, attn)[:, :bl])
  return full, window


class _BlockDecoder:
  """One generate call: its canvas, its model and the block loop (SPEC sections 4 and 4b)."""

  def __init__(self, model: Any, params: Any, prompt_tokens: jax.Array, prompt_mask: jax.Array,
               settings: SamplerSettings, rng: jax.Array, ids: TokenIds):
    s = self.settings = settings
    self.ids, self.rng = ids, rng
    self.batch, self.plen = prompt_tokens.shape
    # Without a cache every step is a full forward.
    self.refresh_every = 1 if s.cache == "none" else s.refresh_every
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    # Response columns are broadcast from a prompt column so they inherit its batch sharding
    # (concatenate under an Explicit mesh needs equal shardings).
    column = jnp.ones_like(prompt_tokens[:, :1])
    response = (self.batch, s.gen_length)
    self.canvas = jnp.concatenate(
        [prompt_tokens, jnp.broadcast_to(column * ids.mask_id, response)], axis=1)
    attn = jnp.concatenate([prompt_mask, jnp.broadcast_to(column, response)], axis=1)
    self.un_prompt = None
    if float(s.cfg_scale) > 0:
      # Rows B..2B-1: the unconditional copy (real prompt tokens -> MASK; padding keys are masked
      # out anyway); with a cache it has its own.
      self.un_prompt = jnp.where(prompt_mask != 0, ids.mask_id, prompt_tokens)
      attn = jnp.concatenate([attn, attn], axis=0)
    self._full, self._window = _forwards(model, params, attn, s, self.plen)

  def block(self, canvas: jax.Array, start) -> jax.Array:
    """The block of the canvas at position `start`: [B, block_length]."""
    return lax.dynamic_slice_in_dim(canvas, start, self.settings.block_length, axis=1)

  def _rows(self, canvas: jax.Array) -> jax.Array:  # [B', S]
    if self.un_prompt is None:
      return canvas
    un = lax.dynamic_update_slice_in_dim(canvas, self.un_prompt, 0, axis=1)
    return jnp.concatenate([canvas, un], axis=0)

  def _guided(self, out: jax.Array) -> jax.Array:  # [B', bl, V] -> [B, bl, V]
    if self.un_prompt is None:
      return out
    cond, unc = out[:self.batch], out[self.batch:]
    return unc + (float(self.settings.cfg_scale) + 1.0) * (cond - unc)

  def full(self, canvas, start, with_cache: bool):
    """Full forward -> (block logits [B, bl, V], cache or None)."""
    out, kv = self._full(self._rows(canvas), start, with_cache)
    return self._guided(out), kv

  def window(self, canvas, start, kv, width: int):
    """The model on canvas [start, start + width) against the cache -> block logits."""
    return self._guided(self._window(self._rows(canvas), start, kv, width))

  def commit(self, canvas, logits, start, key, count) -> jax.Array:
    """One step on the block at `start` from its logits: the rule of the settings -> canvas."""
    s, mask_id = self.settings, self.ids.mask_id
    blk = self.block(canvas, start)
    cand, conf = _candidates(logits, blk, key, s, self.ids)
    if s.threshold is not None:
      blk = _commit_threshold(blk, cand, conf, float(s.threshold), mask_id)
    elif s.factor is not None:
      blk = _commit_factor(blk, cand, conf, float(s.factor), mask_id)
    else:
      blk = _commit_top_k(blk, cand, conf, count, mask_id)
    return lax.dynamic_update_slice_in_dim(canvas, blk, start, axis=1)

  def decode_block(self, b, canvas: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """Decodes block b (a Python int for the prefix cache, else traced); the cached windows are
    `width` wide -> (canvas, model calls)."""
    s, mask_id, refresh = self.settings, self.ids.mask_id, self.refresh_every
    spb = s.steps_per_block
    start = self.plen + b * s.block_length
    counts = transfer_schedule(jnp.sum(self.block(canvas, start) == mask_id, axis=1), spb)
    # A parallel block takes <= block_length steps; the keys do not depend on the cache.
    first_key = b * (s.block_length if s.parallel else spb)

    def commit(i, canvas, logits):
      key = jax.random.fold_in(self.rng, first_key + i)
      return self.commit(canvas, logits, start, key, counts[:, jnp.minimum(i, spb - 1)])

    # step(i, state) -> state, state = (canvas,) or (canvas, cache) when refreshes replace it.
    if refresh == 1:
      first, state = 0, (canvas,)
      step = lambda i, st: (commit(i, st[0], self.full(st[0], start, False)[0]),)
    else:  # step 0: a full forward that fills the cache
      logits, kv = self.full(canvas, start, True)
      first, state = 1, (commit(0, canvas, logits),)
      if refresh == 0:  # the cache is a loop constant (not carried): XLA keeps one copy
        step = lambda i, st: (commit(i, st[0], self.window(st[0], start, kv, width)),)
      else:
        state += (kv,)

        def step(i, st):
          logits, kv = lax.cond(i % refresh == 0,
                                lambda c, kv: self.full(c, start, True),
                                lambda c, kv: (self.window(c, start, kv, width), kv), *st)
          return commit(i, st[0], logits), kv

    if s.parallel:  # until no row has a mask left in the block; rows done early stay unchanged
      cond = lambda carry: jnp.any(self.block(carry[1][0], start) == mask_id)
      body = lambda carry: (carry[0] + 1, step(*carry))
      nfe, state = lax.while_loop(cond, body, (jnp.int32(first), state))
      return state[0], nfe
    return lax.fori_loop(first, spb, step, state)[0], jnp.int32(spb)

  def decode(self) -> tuple[jax.Array, jax.Array]:
    """All blocks, left to right -> (canvas [B, S], model calls)."""
    s = self.settings
    if s.cache != "prefix":  # one window shape: a loop over blocks
      def blocks(b, carry):
        canvas, n = self.decode_block(b, carry[0], s.block_length)
        return canvas, carry[1] + n
      return lax.fori_loop(0, s.num_blocks, blocks, (self.canvas, jnp.int32(0)))
    # The prefix window shrinks block by block: one program region per block (num_blocks times
    # the compile work of one).
    canvas, nfe = self.canvas, jnp.int32(0)
    for b in range(s.num_blocks):
      canvas, n = self.decode_block(b, canvas, s.gen_length - b * s.block_length)
      nfe = nfe + n
    return canvas, nfe


def generate(model: Any, params: Any, prompt_tokens: jax.Array, prompt_mask: jax.Array,
             settings: SamplerSettings, rng: jax.Array, *, ids: TokenIds | None = None,
             return_nfe: bool = False):
  """Samples responses by iterative unmasking (SPEC sections 4 and 4b).

  Pure and traceable: call it inside `jax.jit` with `params` (or the weights a logits function
  closes over) an argument of the jitted function; `settings` and `ids` are static.

  Args:
    model: a family's model config (llada.LLaDAConfig, dream.DreamConfig; any cache), or a
      `LogitsModel` / plain logits function (tokens [B', S], attention_mask [B', S]) -> logits
      [B', S or gen_length, V] (cache="none" only); B' = 2B with CFG.
    params: that family's parameter tree (best already in the compute dtype, see
      rollout.RolloutSampler.inference_params); None with a logits function.
    prompt_tokens: int [B, P], left padded (padding keys are masked in every forward).
    prompt_mask: int/bool [B, P], 1 = real prompt token, 0 = padding.
    settings: SamplerSettings.
    rng: PRNG key (Gumbel noise at T > 0 and "random" remasking).
    ids: TokenIds; default for a model config `TokenIds.of(model)` (no EOT id), required with
      a logits function.
    return_nfe: also return the number of model calls (int32 scalar; Fast-dLLM's "nfe").
  Returns:
    int32 [B, P + gen_length]: the prompt unchanged followed by the response (no mask left);
    with return_nfe, (tokens, nfe).
  """
  if not isinstance(settings, SamplerSettings):
    raise TypeError(f"settings must be a SamplerSettings, got {type(settings).__name__}")
  fn_model = isinstance(model, LogitsModel) or callable(model)
  if fn_model:
    model = model if isinstance(model, LogitsModel) else LogitsModel(model)
    if params is not None:
      raise ValueError("a logits function closes over its own weights; pass params=None")
    if settings.cache != "none":
      raise ValueError(f"cache={settings.cache!r} needs a model config (its family's KV-cached "
                       f"forward); a logits function runs with cache='none' only")
    if ids is None:
      raise ValueError("mask_id is required: a logits function needs ids=TokenIds(mask_id, ...)")
  elif ids is None:
    ids = TokenIds.of(model)
  settings.check_ids(ids)
  check_prompt(prompt_tokens, prompt_mask, ids.mask_id)
  if prompt_tokens.shape[1] < 1 and settings.cache != "none":
    raise ValueError(f"cache={settings.cache!r} needs a prompt of at least one position, got "
                     f"prompt_tokens {prompt_tokens.shape}")

  canvas, nfe = _BlockDecoder(model, params, prompt_tokens, prompt_mask, settings, rng,
                              ids).decode()
  return (canvas, nfe) if return_nfe else canvas
