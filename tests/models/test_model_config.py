"""model.attention_impl and model.logits_chunk: validated before anything compiles, and passed
through to the model config by tasks.build_model."""

from __future__ import annotations

import pytest

from bgpo_jax import config as config_lib
from bgpo_jax import tasks
from bgpo_jax.models import llada
from bgpo_jax.tokenizer import CharTokenizer


def test_validate_rejects_bad_attention_and_chunk_keys():
  import importlib
  assert config_lib.base_config().model.attention_impl == "auto"
  assert config_lib.base_config().model.logits_chunk == 64
  c = importlib.import_module("configs.demo").get_config()  # validates without data files
  config_lib.validate(c, data_parallel_size=1)  # the defaults are valid
  c.model.attention_impl = "flash"
  with pytest.raises(config_lib.ConfigError, match="model.attention_impl 'flash' is unknown"):
    config_lib.validate(c, data_parallel_size=1)
  c.model.attention_impl = "xla"
  c.model.logits_chunk = -1
  with pytest.raises(config_lib.ConfigError, match="model.logits_chunk -1 must be >= 0"):
    config_lib.validate(c, data_parallel_size=1)


def test_build_model_passes_attention_and_chunk_through():
  c = config_lib.base_config()
  c.model.preset = "tiny"
  c.model.attention_impl = "xla"
  c.model.logits_chunk = 8
  model_cfg, params = tasks.build_model(c, CharTokenizer(), None)
  assert params is None  # random init, nothing compiled
  assert isinstance(model_cfg, llada.LLaDAConfig)
  assert (model_cfg.attention_impl, model_cfg.logits_chunk) == ("xla", 8)


def test_task_configs_remat_activations_and_its_vrpo_ol_guard(tmp_path):
  import importlib
  for name in ("math", "code", "countdown", "sudoku", "dream_math"):
    # "auto": the objective's choice, "activations" for the configs' BGPO (and diffu_grpo variant).
    shipped = importlib.import_module(f"configs.{name}").get_config()
    assert shipped.model.remat_policy == "auto", name
    assert config_lib.resolved_remat_policy(shipped) == "activations", name
  c = importlib.import_module("configs.countdown").get_config()
  c.task.data_dir = c.tokenizer.path = str(tmp_path)  # validated, not read
  config_lib.validate(c, data_parallel_size=8)
  c.model.remat_policy = "activation"
  with pytest.raises(config_lib.ConfigError, match="model.remat_policy 'activation' is unknown"):
    config_lib.validate(c, data_parallel_size=8)
  c.model.remat_policy = "activations"
  c.rl.objective = "vrpo_ol"  # every sample's activations at once: refused, naming the fix
  with pytest.raises(config_lib.ConfigError, match="--config.model.remat_policy=full"):
    config_lib.validate(c, data_parallel_size=8)
  c.model.remat_policy = "full"
  config_lib.validate(c, data_parallel_size=8)
