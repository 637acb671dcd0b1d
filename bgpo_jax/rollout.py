"""Host-side rollout sampler: chat prompts -> G sampled responses per prompt.

Tokenization, padding and decoding stay on the host; the whole reverse process is one jitted
call (`diffusion.sampler.generate`, with the KV cache / parallel decoding its settings name) that
takes the params as an argument, so a run compiles one program per prompt-length bucket and never
per step. The params it runs from are a compute-dtype copy made once per call of
`inference_params` (once per RL step / eval pass), gathered over FSDP when they fit.

Prompt lengths are bucketed: a batch is left-padded to the smallest bucket >= its longest
prompt. A prompt longer than the largest bucket is an error, or, with
`truncate_long_prompts=True`, loses its oldest (leftmost) tokens; `Rollout.num_truncated` counts
such prompts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bgpo_jax.diffusion import sampler
from bgpo_jax.models import family, llada, transformer

BATCH_MESH_AXES = ("data", "fsdp")
DEFAULT_BUCKETS = (64, 128, 256, 512, 1024)


# Reverse-process settings (SPEC sections 4 and 4b); they live with the sampler.
SamplerSettings = sampler.SamplerSettings


class InferenceParams:
  """Params made ready for sampling by `RolloutSampler.inference_params` (compute dtype, and
  gathered over FSDP when asked); passing one to `sample*` skips the cast."""

  def __init__(self, tree: Any):
    self.tree = tree


@dataclasses.dataclass
class Rollout:
  """One batch of rollouts; N = num_prompts * group_size rows, group members adjacent.

  All arrays are host NumPy arrays holding this process's rows (all rows on one host).

  tokens: int32 [N, P+L] prompt (left padded) + response.
  prompt_mask: int32 [N, P], 1 = real prompt token.
  attention_mask: int32 [N, P+L] = [prompt_mask | 1].
  prompt_len: P (the bucket).
  completions: decoded responses, cut at the first EOS/EOT.
  response_lengths: int32 [N], tokens up to and including the first EOS/EOT, else L.
  group_ids: int32 [N], index of each row's prompt in the messages batch.
  num_truncated: prompts shortened to fit the largest bucket.
  """

  tokens: np.ndarray
  prompt_mask: np.ndarray
  attention_mask: np.ndarray
  prompt_len: int
  completions: list[str]
  response_lengths: np.ndarray
  group_ids: np.ndarray
  num_truncated: int = 0

  @property
  def gen_length(self) -> int:
    return self.tokens.shape[1] - self.prompt_len

  @property
  def response_tokens(self) -> np.ndarray:
    """int32 [N, L] the responses."""
    return self.tokens[:, self.prompt_len:]


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in global order, as NumPy."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = {}
  for sh in x.addressable_shards:  # replicas along other mesh axes repeat a row range
    shards.setdefault(sh.index[0].start or 0, sh.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)


def response_lengths(responses: np.ndarray, stop_ids: Sequence[int]) -> np.ndarray:
  """responses int [N, L] -> int32 [N]: index of the first stop token + 1, or L if none."""
  responses = np.asarray(responses)
  stop = np.isin(responses, np.asarray(list(stop_ids)))
  first = np.argmax(stop, axis=1)
  return np.where(stop.any(axis=1), first + 1, responses.shape[1]).astype(np.int32)


class RolloutSampler:
  """Samples `group_size` responses for each chat prompt of a batch.

  Args:
    tokenizer: a bgpo_jax.tokenizer tokenizer (CharTokenizer / HFTokenizer); its mask and EOS
      ids must equal the model config's.
    config: the model's LLaDAConfig.
    settings: SamplerSettings.
    group_size: G responses per prompt.
    prompt_buckets: allowed padded prompt lengths.
    mesh: optional; rows are sharded over its ("data", "fsdp") axes (the call runs under
      `jax.set_mesh(mesh)`). Params keep whatever sharding they arrive with. With several
      processes each passes its own prompts (its share of the global batch) and gets its own
      rows back.
    truncate_long_prompts: left-truncate prompts longer than the largest bucket instead of
      raising.
    gather_weights: "auto" / "on" / "off": whether `inference_params` replicates the weights
      over the mesh's "fsdp" axis (auto: when they take at most 30% of a device's memory).
  """

  def __init__(self, tokenizer: Any, config: llada.LLaDAConfig,
               settings: SamplerSettings = SamplerSettings(), *, group_size: int = 1,
               prompt_buckets: Sequence[int] = DEFAULT_BUCKETS, mesh: Mesh | None = None,
               truncate_long_prompts: bool = False, gather_weights: str = "auto"):
    if tokenizer.mask_id != config.mask_token_id or tokenizer.eos_id != config.eos_token_id:
      raise ValueError(f"tokenizer mask/eos ids ({tokenizer.mask_id}, {tokenizer.eos_id}) differ "
                       f"from the model config's ({config.mask_token_id}, "
                       f"{config.eos_token_id}); use the matching tokenizer")
    if group_size < 1:
      raise ValueError(f"group_size must be >= 1, got {group_size}")
    buckets = sorted({int(b) for b in prompt_buckets})
    if not buckets or buckets[0] < 1:
      raise ValueError(f"prompt_buckets must be positive ints, got {prompt_buckets!r}")
    # The settings checked themselves when built; here the EOS options against the ids.
    self.ids = sampler.TokenIds.of(config, eot_id=tokenizer.eot_id)
    settings.check_ids(self.ids)
    if gather_weights not in ("auto", "on", "off"):
      raise ValueError(f"gather_weights {gather_weights!r} is not one of auto / on / off")
    self.gather_weights = gather_weights
    self._cast = None
    self.tokenizer = tokenizer
    self.config = config
    self.settings = settings
    self.group_size = int(group_size)
    self.buckets = tuple(buckets)
    self.mesh = mesh
    self.truncate_long_prompts = truncate_long_prompts
    self.stop_ids = tuple(i for i in (tokenizer.eos_id, tokenizer.eot_id) if i is not None)
    self._batch_sharding = None
    if mesh is not None:
      axes = tuple(a for a in BATCH_MESH_AXES if a in mesh.shape and mesh.shape[a] > 1)
      self._batch_shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
      self._batch_sharding = NamedSharding(mesh, PartitionSpec(axes if axes else None))
    self._generate = jax.jit(self._generate_impl)

  # -- device side ------------------------------------------------------------------------------
  def _generate_impl(self, params: Any, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                     rng: jax.Array) -> jax.Array:
    return sampler.generate(self.config, params, prompt_tokens, prompt_mask, self.settings, rng,
                            ids=self.ids)

  # -- inference weights -------------------------------------------------------------------------
  def weight_layout(self) -> str:
    """"gathered" when `inference_params` replicates the weights over the "fsdp" mesh axis,
    "sharded" when they keep the training layout (each layer gathered at each step), "local"
    without a multi-device FSDP mesh."""
    fsdp = self.mesh.shape.get("fsdp", 1) if self.mesh is not None else 1
    if fsdp <= 1 or self.gather_weights == "off":
      return "local" if fsdp <= 1 else "sharded"
    if self.gather_weights == "on":
      return "gathered"
    cfg = self.config
    tensor = self.mesh.shape.get("tensor", 1)
    nbytes = cfg.num_params() * jnp.dtype(cfg.compute_jnp_dtype).itemsize / tensor
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return "gathered" if not limit or nbytes <= 0.3 * limit else "sharded"

  def inference_params(self, params: Any) -> InferenceParams:
    """The params as the sampler runs them: cast to the compute dtype once (not at every
    denoising step, and never the float32 masters when computing in bfloat16) and, with
    `weight_layout() == "gathered"`, replicated over "fsdp" once per call instead of one
    all-gather per layer per step. Call once per RL step / eval pass; idempotent."""
    if isinstance(params, InferenceParams):
      return params
    if isinstance(params, transformer.Adapted):  # LoRA unmerged: the base as above, adapters as they are
      base = self.inference_params(params.base).tree
      return InferenceParams(transformer.Adapted(base, params.adapters, params.scale))
    cdt = self.config.compute_jnp_dtype
    layout = self.weight_layout()
    if layout != "gathered" and all(x.dtype == cdt for x in jax.tree.leaves(params)):
      return InferenceParams(params)  # nothing to do (e.g. float32 compute)
    if self._cast is None:
      shardings = None
      if layout == "gathered":
        from bgpo_jax.models import sharding as sharding_lib
        axes = jax.tree.map(lambda a: tuple(None if n == "embed" else n for n in a),
                            family.module_for(self.config).param_logical_axes(self.config),
                            is_leaf=lambda a: isinstance(a, tuple))
        shardings = sharding_lib.logical_to_sharding(axes, self.mesh, shapes=params)
      self._cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(cdt), p),
                           out_shardings=shardings)
    return InferenceParams(self._cast(params))

  @property
  def num_compiled(self) -> int:
    """Distinct programs compiled so far (one per bucket used)."""
    return self._generate._cache_size()

  def generate_tokens(self, params: Any, prompt_tokens: np.ndarray, prompt_mask: np.ndarray,
                      rng: jax.Array) -> jax.Array:
    """Jitted generate on already padded prompts [N, P] -> tokens int32 [N, P+L] on device
    (with a mesh: a global array whose rows are the processes' local prompts, batch-sharded)."""
    sampler.check_prompt(prompt_tokens, prompt_mask, self.config.mask_token_id)
    plen = prompt_tokens.shape[1]
    if plen + self.settings.gen_length > self.config.max_sequence_length:
      raise ValueError(f"prompt length {plen} + gen_length {self.settings.gen_length} exceeds "
                       f"the model's max_sequence_length {self.config.max_sequence_length}")
    params = self.inference_params(params).tree
    toks = jnp.asarray(prompt_tokens, jnp.int32)
    mask = jnp.asarray(prompt_mask, jnp.int32)
    if self.mesh is None:
      return self._generate(params, toks, mask, rng)
    n = toks.shape[0] * jax.process_count()
    if n % self._batch_shards:
      raise ValueError(f"{n} rollout rows are not divisible by the {self._batch_shards} batch "
                       f"shards of the mesh {dict(self.mesh.shape)}; change the prompt batch "
                       f"or group size")
    toks = jax.make_array_from_process_local_data(self._batch_sharding, np.asarray(toks))
    mask = jax.make_array_from_process_local_data(self._batch_sharding, np.asarray(mask))
    with jax.set_mesh(self.mesh):
      return self._generate(params, toks, mask, rng)

  # -- host side --------------------------------------------------------------------------------
  def bucket_for(self, length: int) -> int:
    """Smallest bucket >= length (the largest bucket if truncation is on)."""
    for b in self.buckets:
      if b >= length:
        return b
    if self.truncate_long_prompts:
      return self.buckets[-1]
    raise ValueError(f"a prompt has {length} tokens, more than the largest bucket "
                     f"{self.buckets[-1]}; add a larger bucket or set truncate_long_prompts=True")

  def encode_prompts(self, messages_batch: Sequence[Sequence[Mapping[str, str]]]
                     ) -> tuple[np.ndarray, np.ndarray, int]:
    """Chat-templates and left-pads one row per prompt -> (tokens [B, P], mask [B, P],
    num_truncated)."""
    if not messages_batch:
      raise ValueError("messages_batch is empty")
    return self.pad_prompt_ids([self.tokenizer.apply_chat_template(list(m), add_generation_prompt=True)
                                for m in messages_batch])

  def pad_prompt_ids(self, ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Left-pads already templated prompt ids to their bucket -> (tokens, mask, num_truncated)."""
    if not ids:
      raise ValueError("no prompts given")
    longest = max(len(i) for i in ids)
    if jax.process_count() > 1:
      # Every host must pick the same bucket: the generate call is one program over all hosts.
      from jax.experimental import multihost_utils
      longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
    plen = self.bucket_for(longest)
    num_truncated = sum(len(i) > plen for i in ids)
    ids = [list(i[len(i) - plen:]) if len(i) > plen else list(i) for i in ids]
    toks, mask = self.tokenizer.pad_left(ids, length=plen)
    return toks, mask, num_truncated

  def sample(self, params: Any, messages_batch: Sequence[Sequence[Mapping[str, str]]],
             rng: jax.Array) -> Rollout:
    """G responses for each prompt; rows i*G .. i*G+G-1 belong to messages_batch[i]."""
    return self._sample_padded(params, *self.encode_prompts(messages_batch), rng)

  def sample_ids(self, params: Any, prompt_ids: Sequence[Sequence[int]], rng: jax.Array) -> Rollout:
    """Like `sample` for prompts already templated to ids (e.g. data.PromptBatch.prompt_ids, which
    keeps an assistant prefill such as MBPP's "[BEGIN]")."""
    return self._sample_padded(params, *self.pad_prompt_ids(prompt_ids), rng)

  def _sample_padded(self, params: Any, toks: np.ndarray, mask: np.ndarray, num_truncated: int,
                     rng: jax.Array) -> Rollout:
    num_prompts = toks.shape[0]
    g = self.group_size
    toks, mask = np.repeat(toks, g, axis=0), np.repeat(mask, g, axis=0)
    out = local_rows(self.generate_tokens(params, toks, mask, rng))
    plen = toks.shape[1]
    resp = out[:, plen:]
    lengths = response_lengths(resp, self.stop_ids)
    completions = [self.tokenizer.decode(r[:n], stop_at_eos=True) for r, n in zip(resp, lengths)]
    attn = np.concatenate([mask, np.ones_like(resp, dtype=np.int32)], axis=1)
    return Rollout(tokens=out, prompt_mask=mask, attention_mask=attn, prompt_len=plen,
                   completions=completions, response_lengths=lengths,
                   group_ids=np.repeat(np.arange(num_prompts, dtype=np.int32), g),
                   num_truncated=int(num_truncated))


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
  """One Rollout from several chunks of the same step (left-padded to the longest prompt bucket)."""
  if len(parts) == 1:
    return parts[0]
  plen = max(r.prompt_len for r in parts)

  def pad(x, r, value):
    extra = plen - r.prompt_len
    return np.pad(np.asarray(x), ((0, 0), (extra, 0)), constant_values=value) if extra else np.asarray(x)

  pad_id = parts[0].tokens.dtype.type(0)
  offsets = np.cumsum([0] + [int(r.group_ids.max()) + 1 for r in parts[:-1]])
  return Rollout(
      tokens=np.concatenate([pad(r.tokens, r, pad_id) for r in parts]),
      prompt_mask=np.concatenate([pad(r.prompt_mask, r, 0) for r in parts]),
      attention_mask=np.concatenate([pad(r.attention_mask, r, 0) for r in parts]),
      prompt_len=plen,
      completions=[c for r in parts for c in r.completions],
      response_lengths=np.concatenate([r.response_lengths for r in parts]),
      group_ids=np.concatenate([r.group_ids + o for r, o in zip(parts, offsets)]),
      num_truncated=sum(r.num_truncated for r in parts))
