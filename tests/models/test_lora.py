"""LoRA adapters: the unmerged forward against the base and the merged weights, the adapters'
gradient against the chain rule, target matching, PEFT files (names, shapes, config, round trip,
refusals) and sharding by logical axes on 8 devices."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bgpo_jax.models import dream, llada, lora, transformer

ROOT = Path(__file__).resolve().parents[2]
D1_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")
# Tiny presets, 2 layers: every family's weights (Dream's q / k / v biases, GQA 4 / 2 heads).
CONFIGS = {"llada": llada.LLaDAConfig.preset("tiny", n_layers=2),
           "dream": dream.DreamConfig.preset("tiny", n_layers=2)}
# Every block matrix under each family's HF names.
ALL = {"llada": ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"), "dream": D1_TARGETS}


def _model(name):
  """(config, params, spec over every block matrix, adapters with random non-zero B, tokens, mask)."""
  cfg = CONFIGS[name]
  params = transformer.init_params(cfg, jax.random.key(0))
  spec = lora.LoraSpec(r=4, alpha=8.0, targets=ALL[name])
  rng = np.random.default_rng(2)
  adapters = {k: {"a": ab["a"], "b": jnp.asarray(0.05 * rng.standard_normal(ab["b"].shape), jnp.float32)}
              for k, ab in lora.init_adapters(cfg, spec, jax.random.key(1)).items()}
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
  mask = jnp.ones((2, 12), jnp.int32).at[1, :3].set(0)  # left padding on one row
  return cfg, params, spec, adapters, tokens, mask


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
  """_model's tuple plus the jitted forwards: base(params, tokens, mask) and
  adapted(params, tokens, mask, adapters) (compiled once per family)."""
  cfg, *rest = _model(request.param)
  spec = rest[1]
  base = jax.jit(lambda p, t, m: transformer.forward(cfg, p, t, m))
  adapted = jax.jit(lambda p, t, m, a: transformer.forward(cfg, p, t, m, adapters=a, lora_scale=spec.scale))
  return (cfg, *rest, base, adapted)


def test_zero_b_gives_base_logits_bitwise(model):
  cfg, params, spec, _, tokens, mask, base, adapted = model
  fresh = lora.init_adapters(cfg, spec, jax.random.key(5))
  assert all(float(jnp.abs(ab["a"]).max()) > 0 for ab in fresh.values())
  np.testing.assert_array_equal(np.asarray(adapted(params, tokens, mask, fresh)),
                                np.asarray(base(params, tokens, mask)))


def test_merged_weights_match_unmerged_forward(model):
  cfg, params, spec, adapters, tokens, mask, base, adapted = model
  merged = base(lora.merge(cfg, params, adapters, spec), tokens, mask)
  unmerged = adapted(params, tokens, mask, adapters)
  assert float(jnp.abs(merged - base(params, tokens, mask)).max()) > 1e-3  # the adapters matter
  chex.assert_trees_all_close(unmerged, merged, atol=2e-5, rtol=1e-5)


def test_adapter_gradient_is_the_chain_rule_of_the_weight_gradient():
  """dL/dA = scale dW B^T and dL/dB = scale A^T dW, dW = dL/d(merged W), on Dream (every block
  matrix targeted, q / k / v biases, GQA, the shift: the shared block's superset)."""
  cfg, params, spec, adapters, tokens, mask = _model("dream")
  weights = jax.random.normal(jax.random.key(4), (2, 12, cfg.vocab_size))

  def loss(logits):
    return jnp.sum(jax.nn.log_softmax(logits) * weights) / logits.shape[1]

  g_ad = jax.jit(jax.grad(lambda a: loss(transformer.forward(cfg, params, tokens, mask, adapters=a,
                                                             lora_scale=spec.scale))))(adapters)
  merged = lora.merge(cfg, params, adapters, spec)
  g_w = jax.jit(jax.grad(lambda p: loss(transformer.forward(cfg, p, tokens, mask))))(merged)["blocks"]
  hi = jax.lax.Precision.HIGHEST
  want = {k: {"a": spec.scale * jnp.einsum("lio,lro->lir", g_w[k], ab["b"], precision=hi),
              "b": spec.scale * jnp.einsum("lir,lio->lro", ab["a"], g_w[k], precision=hi)}
          for k, ab in adapters.items()}
  scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(want))
  chex.assert_trees_all_close(g_ad, want, atol=1e-4 * scale, rtol=1e-3)


def test_forward_needs_the_scale():
  cfg = CONFIGS["llada"]
  spec = lora.LoraSpec(r=2, alpha=2, targets=("q_proj",))
  with pytest.raises(ValueError, match="lora_scale=spec.scale"):
    transformer.forward(cfg, transformer.init_params(cfg, jax.random.key(0)), jnp.zeros((1, 4), jnp.int32),
                        adapters=lora.init_adapters(cfg, spec, jax.random.key(1)))


# -----------------------------------------------------------------------------------------------
# Spec, targets, init


def test_spec_checks_and_scale():
  spec = lora.LoraSpec(r=128, alpha=256, targets=["q_proj", "v_proj"], dropout=0.05)
  assert spec.targets == ("q_proj", "v_proj") and spec.scale == 2.0 and hash(spec)
  for kwargs, msg in [(dict(r=0), "rank r=0"), (dict(r=2.0), "rank r=2.0"), (dict(alpha=0), "alpha=0"),
                      (dict(alpha=float("nan")), "alpha=nan"), (dict(dropout=1.0), "dropout=1.0"),
                      (dict(targets="q_proj"), r"write \('q_proj',\)"), (dict(targets=()), "non-empty"),
                      (dict(targets=("q_proj", "q_proj")), "twice")]:
    with pytest.raises(ValueError, match=msg):
      lora.LoraSpec(**{**dict(r=4, alpha=8, targets=("q_proj",)), **kwargs})


def test_targets_match_like_peft():
  ll, dr = CONFIGS["llada"], CONFIGS["dream"]
  # d1's list: LLaDA names its o / gate / down projections attn_out / ff_proj / ff_out.
  assert lora.targets_of(ll, D1_TARGETS) == ("q_proj", "k_proj", "v_proj", "up_proj")
  assert lora.targets_of(dr, D1_TARGETS) == ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj",
                                             "ff_out")
  assert lora.targets_of(dr, ("self_attn.o_proj", "mlp.down_proj")) == ("attn_out", "ff_out")
  assert lora.targets_of(ll, ("attn_out", "ff_out")) == ("attn_out", "ff_out")
  assert lora.targets_of(ll, ("blocks.0.q_proj", "v_proj")) == ("v_proj",)  # per-layer names match nothing
  with pytest.raises(ValueError, match=r"\['o_proj', 'down_proj', 'gate_proj'\] match no LLaDA .*'attn_out'"):
    lora.targets_of(ll, D1_TARGETS, strict=True)
  with pytest.raises(ValueError, match=r"match no Dream block weight.*'self_attn.o_proj'"):
    lora.targets_of(dr, ("lm_head", "embed_tokens", "input_layernorm"))
  with pytest.raises(ValueError, match="string 'q_proj'"):
    lora.targets_of(ll, "q_proj")


def test_init_follows_peft_and_axes():
  cfg = CONFIGS["dream"]
  spec = lora.LoraSpec(r=8, alpha=16, targets=("q_proj", "down_proj"))
  ad = lora.init_adapters(cfg, spec, jax.random.key(0))
  L, D, M = cfg.n_layers, cfg.d_model, cfg.mlp_hidden_size
  assert jax.tree.map(jnp.shape, ad) == {"q_proj": {"a": (L, D, 8), "b": (L, 8, D)},
                                         "ff_out": {"a": (L, M, 8), "b": (L, 8, D)}}
  assert jax.tree.map(jnp.shape, ad) == lora.adapter_shapes(cfg, spec)
  for k, fan_in in (("q_proj", D), ("ff_out", M)):  # U(-1/sqrt(in), 1/sqrt(in)), B = 0
    a = np.asarray(ad[k]["a"])
    assert a.dtype == np.float32 and np.abs(a).max() <= 1 / np.sqrt(fan_in)
    assert np.abs(a).max() > 0.9 / np.sqrt(fan_in) and abs(a.std() * np.sqrt(3 * fan_in) - 1) < 0.1
    assert not np.asarray(ad[k]["b"]).any()
  assert lora.init_adapters(cfg, spec, jax.random.key(0), jnp.bfloat16)["q_proj"]["a"].dtype == jnp.bfloat16
  assert lora.adapter_logical_axes(cfg, ad) == {
    "q_proj": {"a": ("layers", "embed", None), "b": ("layers", None, "heads")},
    "ff_out": {"a": ("layers", "mlp", None), "b": ("layers", None, "embed")}}
  with pytest.raises(ValueError, match=r"adapter keys \['q_bias'\] are not Dream block matrices"):
    lora.adapter_logical_axes(cfg, {"q_bias": {}})


# -----------------------------------------------------------------------------------------------
# PEFT files


def test_save_load_peft_round_trip(model, tmp_path):
  cfg, params, spec, adapters, *_ = model
  name = "dream" if isinstance(cfg, dream.DreamConfig) else "llada"
  lora.save_peft(adapters, cfg, spec, tmp_path, base_model_name_or_path="GSAI-ML/LLaDA-8B-Instruct")
  conf = json.loads((tmp_path / "adapter_config.json").read_text())
  assert {k: conf[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias")} == {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none"}
  assert conf["base_model_name_or_path"] == "GSAI-ML/LLaDA-8B-Instruct"
  assert not conf["use_rslora"] and not conf["use_dora"] and not conf["fan_in_fan_out"]
  tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
  layer = {"llada": "base_model.model.model.transformer.blocks.1.", "dream": "base_model.model.model.layers.1."}[name]
  down = {"llada": "ff_out", "dream": "mlp.down_proj"}[name]
  assert len(tensors) == 2 * cfg.n_layers * 7
  np.testing.assert_array_equal(tensors[layer + down + ".lora_A.weight"], np.asarray(adapters["ff_out"]["a"][1]).T)
  assert tensors[layer + down + ".lora_B.weight"].shape == (cfg.d_model, 4)  # [out, r]
  q = {"llada": "q_proj", "dream": "self_attn.q_proj"}[name]
  assert tensors[layer + q + ".lora_A.weight"].shape == (4, cfg.d_model)  # [r, in]
  loaded, spec2 = lora.load_peft(tmp_path, cfg)
  assert spec2 == spec
  assert jax.tree.map(lambda x: x.dtype, loaded) == jax.tree.map(lambda x: x.dtype, adapters)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), loaded, adapters)


def test_ff_out_on_llada_exports_a_regex_that_spares_the_head(tmp_path):
  """PEFT's suffix rule would also put "ff_out" on LLaDA's head (model.transformer.ff_out)."""
  cfg = CONFIGS["llada"]
  spec = lora.LoraSpec(r=2, alpha=4, targets=("q_proj", "ff_out"))
  pattern = lora.peft_target_modules(cfg, spec)
  assert isinstance(pattern, str)
  assert re.fullmatch(pattern, "model.transformer.blocks.1.ff_out")
  assert re.fullmatch(pattern, "model.transformer.blocks.0.q_proj")
  assert not re.fullmatch(pattern, "model.transformer.ff_out") and not re.fullmatch(pattern, "model.transformer.wte")
  assert not re.fullmatch(pattern, "model.transformer.blocks.0.k_proj")
  ad = lora.init_adapters(cfg, spec, jax.random.key(0), jnp.bfloat16)
  lora.save_peft(ad, cfg, spec, tmp_path)
  loaded, spec2 = lora.load_peft(tmp_path, cfg)
  assert spec2 == spec and loaded["ff_out"]["a"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(loaded["ff_out"]["a"]), np.asarray(ad["ff_out"]["a"]))
  assert lora.peft_target_modules(cfg, lora.LoraSpec(r=2, alpha=4, targets=D1_TARGETS)) == list(D1_TARGETS)


def _rewrite(path: Path, config_edit=None, tensors_edit=None):
  if config_edit:
    conf = json.loads((path / "adapter_config.json").read_text())
    config_edit(conf)
    (path / "adapter_config.json").write_text(json.dumps(conf))
  if tensors_edit:
    tensors = load_file(str(path / "adapter_model.safetensors"))
    tensors = tensors_edit(tensors) or tensors
    save_file(tensors, str(path / "adapter_model.safetensors"))


def test_load_reads_peft_name_variants(tmp_path):
  """Names with the ".default" adapter infix (PEFT's in-memory state dict) or without the
  "base_model.model." prefix load as well."""
  cfg = CONFIGS["llada"]
  spec = lora.LoraSpec(r=2, alpha=4, targets=("q_proj", "v_proj"))
  ad = lora.init_adapters(cfg, spec, jax.random.key(0))
  for variant in ("infix", "bare"):
    path = tmp_path / variant
    lora.save_peft(ad, cfg, spec, path)
    if variant == "infix":
      edit = lambda t: {re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", k): v for k, v in t.items()}
    else:
      edit = lambda t: {k.removeprefix("base_model.model."): v for k, v in t.items()}
    _rewrite(path, tensors_edit=edit)
    loaded, _ = lora.load_peft(path, cfg)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), loaded, ad)


_HEAD = "base_model.model.model.transformer.ff_out.lora_A.weight"
_Q0A = "base_model.model.model.transformer.blocks.0.q_proj.lora_A.weight"
_BAD_FILES = {
  "peft_type": (lambda c: c.update(peft_type="IA3"), None, "peft_type 'IA3' is not supported"),
  "rslora": (lambda c: c.update(use_rslora=True), None, "use_rslora=True"),
  "dora": (lambda c: c.update(use_dora=True), None, "use_dora=True"),
  "fan_in_fan_out": (lambda c: c.update(fan_in_fan_out=True), None, "fan_in_fan_out=True"),
  "modules_to_save": (lambda c: c.update(modules_to_save=["lm_head"]), None, "modules_to_save=\\['lm_head'\\]"),
  "bias": (lambda c: c.update(bias="lora_only"), None, "bias='lora_only' \\(supported: 'none'\\)"),
  "no targets": (lambda c: c.update(target_modules=["lm_head"]), None, "match no LLaDA block weight"),
  "not a name list": (lambda c: c.update(target_modules=[1]), None, "must be a non-empty list of module names"),
  "some layers": (lambda c: c.update(target_modules=r"model\.transformer\.blocks\.0\.(q|v)_proj"), None,
                  r"adapts \['q_proj', 'v_proj'\] in only some layers"),
  "head tensor": (None, lambda t: t.update({_HEAD: np.zeros((2, 64), np.float32)}),
                  "1 tensors are not LoRA .*model.transformer.ff_out.lora_A.weight.*head is not supported"),
  "untargeted layer tensor": (lambda c: c.update(target_modules=["v_proj"]), None,
                              "tensors are not LoRA .*blocks.0.q_proj"),
  "missing": (None, lambda t: t.__delitem__(_Q0A), "1 tensors missing .*blocks.0.q_proj.lora_A.weight"),
  "shape": (None, lambda t: t.update({_Q0A: np.zeros((3, 128), np.float32)}),
            r"blocks.0.q_proj.lora_A has shape \(3, 128\), expected \(2, 128\)"),
  "nan": (None, lambda t: t[_Q0A].__setitem__((0, 0), np.nan), "blocks.0.q_proj.lora_A holds NaN"),
  "two adapters": (None, lambda t: t.update({_Q0A.replace("lora_A.", "lora_A.other."): t[_Q0A]}),
                   r"several adapters \['None', 'other'\]"),
}


@pytest.mark.parametrize("case", sorted(_BAD_FILES))
def test_load_refuses_what_would_not_load_exactly(tmp_path, case):
  cfg = CONFIGS["llada"]
  spec = lora.LoraSpec(r=2, alpha=4, targets=("q_proj", "v_proj"))
  lora.save_peft(lora.init_adapters(cfg, spec, jax.random.key(0)), cfg, spec, tmp_path)
  config_edit, tensors_edit, msg = _BAD_FILES[case]
  _rewrite(tmp_path, config_edit, tensors_edit)
  with pytest.raises(lora.PeftFileError, match=msg) as e:
    lora.load_peft(tmp_path, cfg)
  assert "\n" not in str(e.value)


def test_load_refuses_a_missing_file(tmp_path):
  with pytest.raises(lora.PeftFileError, match="no adapter_config.json"):
    lora.load_peft(tmp_path, CONFIGS["llada"])


def test_save_checks_the_adapters(tmp_path):
  cfg = CONFIGS["llada"]
  spec = lora.LoraSpec(r=2, alpha=4, targets=("q_proj", "v_proj"))
  ad = lora.init_adapters(cfg, spec, jax.random.key(0))
  with pytest.raises(ValueError, match=r"adapters hold \['q_proj'\] but spec.targets"):
    lora.save_peft({"q_proj": ad["q_proj"]}, cfg, spec, tmp_path)
  with pytest.raises(ValueError, match=r"adapters\['q_proj'\]\['a'\] has shape \(2, 128, 2\), expected \(2, 128, 3\)"):
    lora.save_peft(ad, cfg, lora.LoraSpec(r=3, alpha=4, targets=("q_proj", "v_proj")), tmp_path)


# -----------------------------------------------------------------------------------------------
# 8 host devices


_SHARDED = textwrap.dedent("""
  import json
  import jax, jax.numpy as jnp
  from bgpo_jax.models import dream, lora, sharding, transformer
  cfg = dream.DreamConfig.preset("tiny", n_layers=2)
  spec = lora.LoraSpec(r=4, alpha=8, targets=("q_proj", "o_proj", "down_proj"))
  params = transformer.init_params(cfg, jax.random.key(0))
  ad = lora.init_adapters(cfg, spec, jax.random.key(1))
  ad = {k: {"a": v["a"], "b": 0.05 * jnp.ones_like(v["b"])} for k, v in ad.items()}
  tokens = jax.random.randint(jax.random.key(3), (8, 12), 0, cfg.vocab_size)
  fwd = lambda p, a: transformer.forward(cfg, p, tokens, adapters=a, lora_scale=spec.scale)
  ref = jax.jit(fwd)(params, ad)
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  put = lambda tree, axes: jax.device_put(tree, sharding.logical_to_sharding(axes, mesh, shapes=tree))
  p_s = put(params, transformer.param_logical_axes(cfg))
  a_s = put(ad, lora.adapter_logical_axes(cfg, ad))
  specs = {k: [list(v[ab].sharding.spec) for ab in "ab"] for k, v in a_s.items()}
  got = jax.jit(sharding.under_mesh(fwd, mesh))(p_s, a_s)
  grad = jax.jit(sharding.under_mesh(jax.grad(lambda a: fwd(p_s, a).sum()), mesh))(a_s)
  ref_grad = jax.jit(jax.grad(lambda a: fwd(params, a).sum()))(ad)
  pairs = list(zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), jax.tree.leaves(a_s)))
  err = max(float(jnp.abs(g - r).max() / jnp.abs(r).max()) for g, r, _ in pairs)
  same = all(g.sharding.is_equivalent_to(a.sharding, g.ndim) for g, _, a in pairs)
  print("RESULT", json.dumps(dict(specs=specs, diff=float(jnp.abs(got - ref).max()), grad_err=err, same=same)))
""")


@pytest.mark.slow  # 8-device subprocess
def test_adapters_shard_by_logical_axes_on_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  p = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1]
  got = json.loads(line[len("RESULT "):])
  # A split like its weight's rows, B like its columns (fsdp = "embed", tensor = heads / mlp).
  assert got["specs"] == {"q_proj": [[None, "fsdp", None], [None, None, "tensor"]],
                          "attn_out": [[None, "tensor", None], [None, None, "fsdp"]],
                          "ff_out": [[None, "tensor", None], [None, None, "fsdp"]]}
  assert got["diff"] < 1e-4 and got["grad_err"] < 1e-4 and got["same"]


def test_dropout_rows_masks_each_row_from_its_key():
  from bgpo_jax.models import layers
  x = jnp.ones((3 * 50, 40), jnp.float32)  # 3 rows of 50 positions, flattened as norm_dense's
  keys = jax.random.split(jax.random.key(0), 3)
  y = np.asarray(layers.dropout_rows(x, keys, 0.25)).reshape(3, 50, 40)
  assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}  # inverted dropout: kept entries scaled
  assert abs((y == 0).mean() - 0.25) < 0.03
  # A row's mask is a function of its key alone: row 1 on its own equals row 1 of the batch.
  alone = np.asarray(layers.dropout_rows(jnp.ones((1, 50, 40)), keys[1:2], 0.25))[0]
  np.testing.assert_array_equal(alone, y[1])
  assert not np.array_equal(y[0], y[1])


def test_dropout_forward_changes_only_the_adapters_path(model):
  cfg, params, spec, adapters, tokens, mask, _, adapted = model
  keys = jax.random.split(jax.random.key(3), tokens.shape[0])
  view = lora.adapted(params, adapters, spec)
  fwd = jax.jit(lambda v, t, m: transformer.forward(cfg, v, t, m))
  drop = fwd(view.with_dropout(0.5, keys), tokens, mask)
  np.testing.assert_array_equal(np.asarray(fwd(view.with_dropout(0.5, keys), tokens, mask)), np.asarray(drop))
  assert float(jnp.abs(drop - adapted(params, tokens, mask, adapters)).max()) > 1e-4
  # With B = 0 the adapters add nothing, dropped or not: the base's logits.
  fresh = lora.adapted(params, lora.init_adapters(cfg, spec, jax.random.key(5)), spec)
  chex.assert_trees_all_close(fwd(fresh.with_dropout(0.5, keys), tokens, mask),
                              transformer.forward(cfg, params, tokens, mask), atol=1e-6)
  with pytest.raises(ValueError, match="one per row"):
    fwd(view.with_dropout(0.5, keys[:1]), tokens, mask)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_unmerged_sampler_gives_the_merged_samplers_tokens(model, cache):
  from bgpo_jax.diffusion import sampler
  cfg, params, spec, adapters, tokens, mask, _, _ = model
  settings = sampler.SamplerSettings(gen_length=8, steps=4, block_length=4, temperature=0.0, cache=cache)
  gen = jax.jit(lambda p, t, m: sampler.generate(cfg, p, t, m, settings, jax.random.key(0)))
  prompt = tokens.at[:, -1].set(tokens[:, 0])  # no mask token in the prompt
  merged = gen(lora.merge(cfg, params, adapters, spec), prompt, mask)
  unmerged = gen(lora.adapted(params, adapters, spec), prompt, mask)
  np.testing.assert_array_equal(np.asarray(unmerged), np.asarray(merged))
  assert (np.asarray(merged)[:, 12:] != cfg.mask_token_id).all()
