"""Each config key that no shipped config file changes from its default reaches what it
controls: set to another value, the piece it configures (model, optimizer, rewards, sampler,
train step, RL batch, the SFT -> RL hand-over) changes accordingly. A key whose value went
nowhere would be a knob that silently does nothing."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgpo_jax import tasks
from bgpo_jax.tokenizer import CharTokenizer
from bgpo_jax.train import loop
from bgpo_jax.train import mesh as mesh_lib
from bgpo_jax.train import run as run_lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import demo  # noqa: E402


def _config(**sets):
  c = demo.get_config()
  for key, value in sets.items():
    *sections, leaf = key.split(".")
    node = c
    for section in sections:
      node = node[section]
    node[leaf] = value
  return c


def _model_cfg(c):
  model_cfg, params = tasks.build_model(c, CharTokenizer(), mesh_lib.make_mesh(c.mesh.shape))
  assert params is None  # no checkpoint: a random init, nothing loaded
  return model_cfg


def test_model_dimensions():
  cfg = _model_cfg(_config(**{"model.d_model": 48, "model.n_heads": 4, "model.n_kv_heads": 2,
                              "model.mlp_hidden_size": 80}))
  assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_hidden_size) == (48, 4, 2, 80)
  assert _model_cfg(_config(**{"model.n_heads": 4})).n_kv_heads == 4  # unset kv heads follow n_heads


def _one_update(c, phases=None):
  """The run's optimizer applied once to a fixed gradient on a fixed parameter (2-D: decayed)."""
  optimizer, schedule = run_lib.make_optimizer(c, phases or run_lib.Phases.of(c))
  params = {"w": jnp.ones((2, 3))}
  grads = [{"w": jnp.array([[0.5, -1.0, 2.0], [1e-9, 0.0, -3.0]])}, {"w": jnp.array([[-2.0, 0.1, 1.0], [3.0, 1e-4, 0.5]])}]
  state = optimizer.init(params)
  for g in grads:  # two different gradients, so both moments' decay rates matter
    updates, state = optimizer.update(g, state, params)
  return np.asarray(updates["w"]), schedule


@pytest.mark.parametrize("key, value", [("optim.b1", 0.5), ("optim.b2", 0.5), ("optim.eps", 1e-3),
                                        ("optim.weight_decay", 0.3)])
def test_optimizer_keys(key, value):
  base = _config(**{"optim.warmup_steps": 0})
  changed = _config(**{"optim.warmup_steps": 0, key: value})
  a, _ = _one_update(base)
  b, _ = _one_update(changed)
  assert not np.allclose(a, b, rtol=1e-3, atol=0), key


@pytest.mark.parametrize("section", ["optim", "sft"])
def test_final_lr_fraction_of_each_phase(section):
  """The warm-up's last step (sft) or the run's last update (optim) ends at the fraction asked."""
  def lr_at_end(fraction):
    c = _config(**{"optim.schedule": "cosine", "optim.warmup_steps": 0, "sft.schedule": "cosine",
                   "sft.warmup_steps": 0, "sft.steps": 10, "total_steps": 4, f"{section}.final_lr_fraction": fraction})
    phases = run_lib.Phases.of(c)
    _, schedule = run_lib.make_optimizer(c, phases)
    end = phases.sft_steps if section == "sft" else phases.sft_steps + phases.rl_updates
    return float(schedule(end - 1e-3 if section == "sft" else end)) / c[section].learning_rate

  assert lr_at_end(0.0) == pytest.approx(0.0, abs=1e-3)
  assert lr_at_end(0.5) == pytest.approx(0.5, abs=1e-3)


def test_reward_keys():
  c = _config(**{"rewards.code_timeout_s": 2.5, "rewards.code_memory_mb": 512, "rewards.sudoku": "binary",
                 "rl.format_reward": 0.1})
  kw = tasks.reward_kwargs(c)
  assert (kw["code_timeout_s"], kw["code_memory_mb"], kw["format_reward"]) == (2.5, 512, 0.1)
  assert kw["recipes"]["sudoku"] == "binary"


def test_sampler_keys():
  c = _config(**{"rollout.cfg_scale": 0.5, "rollout.suppress_eos_confidence": True})
  model_cfg = _model_cfg(c)
  s = tasks.build_rollout_sampler(c, model_cfg, CharTokenizer(), mesh_lib.make_mesh(c.mesh.shape), "rollout")
  assert (s.settings.cfg_scale, s.settings.suppress_eos_confidence) == (0.5, True)


def test_train_step_keys():
  c = _config(**{"mode": "rl", "rl.normalize_length": False, "rl.clip_eps": 0.3, "rl.prompt_mask_prob": 0.4,
                 "rl.objective": "diffu_grpo", "rl.updates_per_batch": 2})
  hp = run_lib.step_config(c, "rl", data_parallel=1).hparams
  assert (hp.clip_eps, hp.prompt_mask_prob) == (0.3, 0.4)
  bgpo = run_lib.step_config(_config(**{"rl.normalize_length": False}), "rl", data_parallel=1).hparams
  assert bgpo.normalize_length is False


def test_rl_batch_keys():
  assert loop.rl_batch_settings(_config(**{"rl.advantage_std": False}), 1)["advantage_std"] is False
  assert loop.rl_batch_settings(_config(**{"rl.advantage_std": True}), 1)["advantage_std"] is True


@pytest.mark.parametrize("reset", [True, False])
def test_reset_optimizer_at_the_hand_over(tmp_path, reset):
  c = _config(**{"model.n_layers": 1, "task.demo_train_size": 16, "task.demo_test_size": 4, "sft.steps": 2,
                 "total_steps": 1, "rl.reset_optimizer": reset, "eval_every": 0, "plot_at_end": False})
  run = run_lib.build_run(c, str(tmp_path / "run"))
  # Moments as after some SFT: ones everywhere.
  run.state = run.state.replace(opt_state=jax.tree.map(lambda x: jnp.ones_like(x), run.state.opt_state))
  loop.before_step(run, 1)  # an SFT step: nothing changes
  loop.before_step(run, 2)  # the hand-over
  moments = [x for x in jax.tree.leaves(run.state.opt_state) if x.ndim == 2]
  assert moments and all(float(jnp.abs(x).max()) == (0.0 if reset else 1.0) for x in moments)
  run.ckpt.close()
  run.writer.close()
