"""RolloutSampler on the tiny LLaDA with the char tokenizer."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from bgpo_jax import rollout
from bgpo_jax.diffusion import sampler
from bgpo_jax.models import llada, sharding
from bgpo_jax.tokenizer import CharTokenizer

CFG = llada.LLaDAConfig.preset("tiny")
SETTINGS = rollout.SamplerSettings(gen_length=16, steps=8, block_length=8, temperature=0.8)
TOK = CharTokenizer()


@functools.lru_cache(maxsize=None)
def params():
  return llada.init_params(CFG, jax.random.key(0))


def chat(text):
  return [{"role": "user", "content": text}]


def make(**kw):
  kw.setdefault("group_size", 2)
  kw.setdefault("prompt_buckets", (40, 64))
  return rollout.RolloutSampler(TOK, CFG, SETTINGS, **kw)


def test_response_lengths():
  resp = np.array([[7, 7, 0, 9], [7, 5, 0, 0], [7, 7, 7, 7], [0, 7, 7, 7]])
  np.testing.assert_array_equal(rollout.response_lengths(resp, (0, 5)), [3, 2, 4, 1])


def test_sample_shapes_prompts_and_decoding():
  rs = make()
  batch = [chat("What is 2+3?"), chat("Hi")]
  out = rs.sample(params(), batch, jax.random.key(1))
  n, plen, L = 4, 40, 16
  assert out.prompt_len == plen and out.gen_length == L
  assert out.tokens.shape == (n, plen + L) and out.attention_mask.shape == (n, plen + L)
  np.testing.assert_array_equal(out.group_ids, [0, 0, 1, 1])

  ids = [TOK.apply_chat_template(m) for m in batch]
  ptoks, pmask = TOK.pad_left(ids, length=plen)
  toks = np.asarray(out.tokens)
  np.testing.assert_array_equal(toks[:, :plen], np.repeat(ptoks, 2, 0))
  np.testing.assert_array_equal(out.prompt_mask, np.repeat(pmask, 2, 0))
  np.testing.assert_array_equal(np.asarray(out.attention_mask),
                                np.concatenate([out.prompt_mask, np.ones((n, L), np.int32)], 1))
  resp = toks[:, plen:]
  assert not (resp == CFG.mask_token_id).any()
  np.testing.assert_array_equal(out.response_lengths,
                                rollout.response_lengths(resp, (TOK.eos_id, TOK.eot_id)))
  for r, ln, text in zip(resp, out.response_lengths, out.completions):
    assert text == TOK.decode(r[:ln])
  assert out.num_truncated == 0

  # Same key, same rollout; a second batch in the same bucket reuses the compiled program.
  again = rs.sample(params(), batch, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(again.tokens), toks)
  other = rs.sample(params(), [chat("Why?"), chat("Name a color.")], jax.random.key(2))
  assert other.prompt_len == 40
  assert rs.num_compiled == 1
  # Temperature > 0: group members are different samples.
  assert (toks[0, plen:] != toks[1, plen:]).any()


def test_long_prompts_error_or_truncate():
  long = chat("x" * 100)
  with pytest.raises(ValueError, match="largest bucket 64"):
    make().sample(params(), [long], jax.random.key(0))
  rs = make(truncate_long_prompts=True, group_size=1)
  toks, mask, num = rs.encode_prompts([long, chat("hi")])
  assert toks.shape == (2, 64) and num == 1 and mask[0].all()
  full = TOK.apply_chat_template(long)
  np.testing.assert_array_equal(toks[0], full[-64:])


def test_mesh_sharded_rollout_matches_plain_generate():
  mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
  rs = make(mesh=mesh)
  batch = [chat("What is 2+3?"), chat("Hi")]
  out = rs.sample(params(), batch, jax.random.key(1))
  toks, mask, _ = rs.encode_prompts(batch)
  toks, mask = np.repeat(toks, 2, 0), np.repeat(mask, 2, 0)
  dev = rs.generate_tokens(params(), toks, mask, jax.random.key(1))
  assert dev.sharding.mesh.shape == mesh.shape and rs.num_compiled == 1
  np.testing.assert_array_equal(rollout.local_rows(dev), out.tokens)
  # Same tokens as sampler.generate on full-sequence llada.forward logits with the same key.
  ref = jax.jit(lambda p, t, m, k: sampler.generate(
      lambda x, a: llada.forward(CFG, p, x, a), None, t, m, SETTINGS, k,
      ids=sampler.TokenIds(CFG.mask_token_id)))(params(), toks, mask, jax.random.key(1))
  np.testing.assert_array_equal(out.tokens, np.asarray(ref))


def test_bad_settings():
  with pytest.raises(ValueError, match="not a multiple of block_length"):
    rollout.RolloutSampler(TOK, CFG, rollout.SamplerSettings(gen_length=20, block_length=8))
  with pytest.raises(ValueError, match="differ from the model config"):
    rollout.RolloutSampler(TOK, llada.LLaDAConfig.preset("tiny", mask_token_id=7), SETTINGS)
