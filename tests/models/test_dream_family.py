"""The model interface over both families: ELBO terms, the train step, the samplers, the trainer's
model building and config validation run on LLaDA and on Dream (parametrized)."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgpo_jax import config as config_lib
from bgpo_jax import objectives, rollout, tasks
from bgpo_jax.config import base_config
from bgpo_jax.diffusion import elbo, masking, sampler
from bgpo_jax.models import dream, family, hf, llada
from bgpo_jax.tokenizer import CharTokenizer
from bgpo_jax.train import mesh as mesh_lib
from bgpo_jax.train import optimizer as optim_lib
from bgpo_jax.train import state as state_lib
from bgpo_jax.train import step as step_lib

FAMILIES = ["llada", "dream"]
B, P, L, N = 4, 6, 8, 2


def _cfg(name):
  return family.preset(name, "tiny", n_layers=2)


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  vocab = [i for i in range(6, cfg.vocab_size)]
  tokens = rng.choice(vocab, size=(B, P + L)).astype(np.int32)
  attn = np.ones((B, P + L), np.int32)
  attn[: B // 2, :2] = 0
  tokens[attn == 0] = cfg.pad_token_id
  masks, weights = masking.sample_masks(jax.random.key(seed), B, L, N, estimator="stratified")
  adv = rng.normal(size=(B,)).astype(np.float32)
  return {"tokens": jnp.asarray(tokens), "attention_mask": jnp.asarray(attn), "advantages": jnp.asarray(adv),
          "mc_masks": masks, "mc_weights": weights}


def _setup(name):
  cfg = _cfg(name)
  params = family.module_for(cfg).init_params(cfg, jax.random.key(1))
  return cfg, params, _batch(cfg)


# The ELBO / train-step tests of LLaDA live in test_elbo.py / test_train_step.py; these run the same
# checks on Dream (and, where cheap, on both families through the one interface).
@pytest.fixture(scope="module")
def setup():
  return _setup("dream")


@pytest.fixture(scope="module", params=FAMILIES)
def both(request):
  return _setup(request.param)


def test_family_registry_and_presets():
  assert isinstance(_cfg("dream"), dream.DreamConfig) and isinstance(_cfg("llada"), llada.LLaDAConfig)
  assert family.PRESETS == config_lib.FAMILY_PRESETS and tuple(family.FAMILIES) == config_lib.FAMILIES
  for name in family.FAMILIES:
    mod = family.module_for(name)
    for fn in ("init_params", "param_shapes", "param_logical_axes", "hidden_states", "lm_head", "forward",
               "forward_flops"):
      assert callable(getattr(mod, fn)), (name, fn)
    for p in family.PRESETS[name]:
      assert family.family_of(family.preset(name, p)) == name
  with pytest.raises(ValueError, match="unknown dream preset 'llada_8b'"):
    family.preset("dream", "llada_8b")
  with pytest.raises(ValueError, match="unknown model family"):
    family.module_for("gpt")
  s = dream.DreamConfig.preset("small")
  assert s.num_params() > 100e6 and dream.forward_flops(s, 1, 10) > 2 * s.num_params(embeddings=False) * 10


def test_elbo_term_is_the_masked_log_likelihood_of_forward(both):
  """The ELBO reads hidden_states[:, -L:] + lm_head; for Dream that must respect the shift."""
  cfg, params, batch = both
  mod = family.module_for(cfg)
  tokens, attn = batch["tokens"], batch["attention_mask"]
  mask, weight = batch["mc_masks"][0], batch["mc_weights"][0]
  got = elbo.elbo_term(cfg, params, tokens, attn, mask, weight)
  noisy = elbo.masked_sequence(tokens, mask, cfg.mask_token_id)
  logp = jax.nn.log_softmax(mod.forward(cfg, params, noisy, attn)[:, -L:], axis=-1)
  tgt = jnp.take_along_axis(logp, tokens[:, -L:, None], -1)[..., 0]
  want = weight * jnp.sum(jnp.where(mask, tgt, 0.0), -1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  chunked = elbo.elbo_term(cfg, params, tokens, attn, mask, weight, logits_chunk=4)
  np.testing.assert_allclose(chunked, got, rtol=1e-5, atol=1e-5)
  d1 = elbo.one_step_token_logps(cfg, params, tokens, attn, gen_length=L, rng=jax.random.key(0))
  assert d1.shape == (B, L) and bool(jnp.all(d1 <= 0))


def test_bgpo_gradient_equals_grad_of_vrpo_on_policy(setup):
  cfg, params, batch = setup
  scfg = step_lib.StepConfig(objective="bgpo", num_mc_samples=N, gen_length=L)
  obj, grads, _ = jax.jit(lambda p, b: step_lib.accumulate_gradients(cfg, scfg, p, b))(params, batch)

  def vrpo(p):
    l = jnp.stack([elbo.elbo_term(cfg, p, batch["tokens"], batch["attention_mask"], batch["mc_masks"][j],
                                  batch["mc_weights"][j]) for j in range(N)])
    return objectives.vrpo_objective(l, jax.lax.stop_gradient(l), batch["advantages"], lengths=jnp.full((B,), float(L)))

  ref_obj, ref_grads = jax.jit(jax.value_and_grad(vrpo))(params)  # op by op took ~30 s on CPU
  np.testing.assert_allclose(obj, ref_obj, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(grads, ref_grads, rtol=2e-4, atol=1e-7)
  assert float(jnp.abs(grads["blocks"]["q_bias"]).max()) > 0  # biases are trained


def test_jitted_sft_step_lowers_the_loss(setup):
  cfg, params, batch = setup
  c = base_config()
  c.optim.learning_rate = 3e-3
  c.optim.grad_clip_norm = 0.0
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  optimizer = optim_lib.make_optimizer(c.optim, total_steps=10)
  schedule = optim_lib.make_schedule(c.optim, total_steps=10)
  state, shardings = state_lib.create_train_state(cfg, optimizer, mesh, params=jax.tree.map(jnp.copy, params))
  assert jax.tree.structure(shardings.params) == jax.tree.structure(params)
  scfg = step_lib.StepConfig(objective="sft", num_mc_samples=N, gen_length=L)
  step = step_lib.jit_train_step(cfg, scfg, optimizer, schedule, mesh, shardings, batch)
  losses = []
  for _ in range(3):
    state, m = step(state, batch)
    losses.append(float(m["train/loss"]))
  assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("remasking", ["low_confidence", "entropy"])
def test_rollout_sampler_equals_generate_on_full_logits(both, remasking):
  """The rollout path (hidden states + head on the current block) decodes exactly what the plain
  sampler decodes from the family's full forward logits."""
  cfg, params, _ = both
  tok = CharTokenizer()
  settings = rollout.SamplerSettings(gen_length=8, steps=4, block_length=4, temperature=0.0, remasking=remasking)
  rs = rollout.RolloutSampler(tok, cfg, settings, group_size=1, prompt_buckets=(64,))
  msgs = [[{"role": "user", "content": "1+2"}], [{"role": "user", "content": "hello there"}]]
  out = rs.sample(params, msgs, jax.random.key(0))
  ptoks, pmask = out.tokens[:, :out.prompt_len], out.prompt_mask
  mod = family.module_for(cfg)
  ref = sampler.generate(lambda t, a: mod.forward(cfg, params, t, a), None, jnp.asarray(ptoks),
                         jnp.asarray(pmask), settings, jax.random.key(0),
                         ids=sampler.TokenIds(cfg.mask_token_id, cfg.eos_token_id))
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref))
  assert not (np.asarray(out.tokens)[:, out.prompt_len:] == cfg.mask_token_id).any()


def _model_config(fam, preset="tiny"):
  c = base_config()
  c.model.family = fam
  c.model.preset = preset
  c.model.n_layers = 2
  c.model.param_dtype = c.model.compute_dtype = "float32"
  c.tokenizer.kind = "char"
  return c


def test_build_model_follows_model_family_and_checks_hf_model_type(tmp_path):
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  tok = CharTokenizer()
  for fam, cls in (("llada", llada.LLaDAConfig), ("dream", dream.DreamConfig)):
    cfg, params = tasks.build_model(_model_config(fam), tok, mesh)
    assert isinstance(cfg, cls) and cfg.n_layers == 2 and params is None
  # An HF Dream checkpoint loads as Dream; config.model.family must agree.
  dcfg = dream.DreamConfig.preset("tiny", n_layers=1)
  hf.save(dcfg, dream.init_params(dcfg, jax.random.key(0)), tmp_path)
  c = _model_config("dream")
  c.init.checkpoint = str(tmp_path)
  cfg, params = tasks.build_model(c, tok, mesh)
  assert isinstance(cfg, dream.DreamConfig) and cfg.n_layers == 1 and params is not None
  c.model.family = "llada"
  with pytest.raises(ValueError, match="holds a dream checkpoint .* set --config.model.family=dream"):
    tasks.build_model(c, tok, mesh)


def test_config_validation_of_family_preset_and_remasking():
  c = _model_config("dream", "dream_7b")
  c.task.name = "demo"
  config_lib.validate(c)
  c.model.preset = "llada_8b"
  with pytest.raises(config_lib.ConfigError, match=r"config.model.preset 'llada_8b' is unknown; use one of \('tiny', 'small', 'dream_7b'\)"):
    config_lib.validate(c)
  c.model.preset = "tiny"
  c.model.family = "qwen"
  with pytest.raises(config_lib.ConfigError, match="config.model.family 'qwen' is unknown"):
    config_lib.validate(c)
  c.model.family = "dream"
  for rule in ("entropy", "maskgit_plus", "topk_margin"):
    c.rollout.remasking = rule
    config_lib.validate(c)
  c.rollout.remasking = "origin"
  with pytest.raises(config_lib.ConfigError, match="config.rollout.remasking 'origin' is unknown"):
    config_lib.validate(c)


def test_dream_math_config_validates(tmp_path):
  import importlib
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
  c = importlib.import_module("configs.dream_math").get_config()
  assert (c.model.family, c.model.preset, c.rollout.remasking) == ("dream", "dream_7b", "entropy")
  assert (c.rollout.cache, c.eval.cache) == ("dual", "none")  # the KV cache works for Dream
  c.task.data_dir = str(tmp_path)
  c.tokenizer.path = str(tmp_path)
  config_lib.validate(c, data_parallel_size=8)
