"""Objectives as an interface: a user objective registered from its own module runs a real train
step and a short RL run by name (--config.rl.objective), and model.remat_policy="auto" takes the
objective's choice."""

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgpo_jax import config as config_lib
from bgpo_jax import objectives
from bgpo_jax.benchmarks import memory
from bgpo_jax.diffusion import elbo, masking
from bgpo_jax.train import run as run_lib
from bgpo_jax.train.loop import train
from bgpo_jax.models import llada
from bgpo_jax.train import step as step_lib

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from configs import demo  # noqa: E402

TRACED = []  # names of the objectives whose terms the step traced


@dataclasses.dataclass(frozen=True)
class _Hparams:
  reinforce_scale: float = 1.0  # config.rl.test_reinforce_elbo.reinforce_scale, made from this default
  clip: float | None = None  # a None default is a typed placeholder in the config

  def __post_init__(self):
    if not self.reinforce_scale > 0:
      raise ValueError(f"reinforce_scale {self.reinforce_scale} must be > 0")


class ReinforceElbo(objectives.ElboObjective):
  """A tiny user objective: REINFORCE on the MC ELBO, sum_j scale * A * l_j / (n L) (on-policy
  only), a sum of per-sample terms like BGPO."""
  name = "test_reinforce_elbo"
  per_sample = True
  remat_policy = "save_attn"  # not any built-in's choice: "auto" must pick it
  Hparams = _Hparams

  def unit_terms(self, model_cfg, cfg, params, mb, u):
    TRACED.append(self.name)
    l = elbo.elbo_term(model_cfg, params, mb["tokens"], mb["attention_mask"], mb["mc_masks"][u],
                       mb["mc_weights"][u])  # [mb]
    g = cfg.hparams.reinforce_scale * mb["advantages"] * l / (cfg.num_mc_samples * cfg.gen_length)
    zero = jnp.zeros(())
    return jnp.sum(g), {"elbo": jnp.sum(jax.lax.stop_gradient(l)), "abs_d": zero, "kl": zero}


objectives.register(ReinforceElbo())


def test_registry_names_and_unknown_objectives():
  assert {"bgpo", "vrpo_ol", "diffu_grpo", "test_reinforce_elbo"} <= set(objectives.names())
  assert "sft" not in objectives.names() and "sft" in objectives.names(rl_only=False)
  with pytest.raises(ValueError, match="objective 'ppo' is unknown"):
    step_lib.StepConfig(objective="ppo")
  objectives.register(ReinforceElbo())  # a config file loaded twice registers its class again
  with pytest.raises(ValueError, match="already registered"):
    objectives.register(type("Other", (objectives.ElboObjective,), {"name": "bgpo"})())


def test_batch_layout_is_the_objectives():
  scfg = step_lib.StepConfig(objective="diffu_grpo", num_mc_samples=3, gen_length=8, off_policy=True,
                             kl_beta=0.1)
  shapes = {k: v.shape for k, v in objectives.abstract_batch(scfg, rows=4, prompt_len=6).items()}
  assert shapes == {"tokens": (4, 14), "attention_mask": (4, 14), "advantages": (4,),
                    "response_mask": (4, 8), "row_seeds": (4,), "old_logps": (4, 8), "ref_logps": (4, 8)}
  scfg = step_lib.StepConfig(objective="test_reinforce_elbo", num_mc_samples=3, gen_length=8)
  shapes = {k: v.shape for k, v in objectives.abstract_batch(scfg, rows=4, prompt_len=6).items()}
  assert shapes["mc_masks"] == (3, 4, 8) and "old_elbo" not in shapes
  assert "mc_masks [n, B, L] bool" in step_lib.__doc__


def test_custom_objective_train_step_matches_its_gradient():
  cfg = dataclasses.replace(llada.LLaDAConfig.preset("tiny"), n_layers=1)
  params = llada.init_params(cfg, jax.random.key(0))
  B, P, L, n = 4, 4, 8, 2
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.mask_token_id, (B, P + L)), jnp.int32)
  masks, weights = masking.sample_masks(jax.random.key(1), B, L, n)
  batch = {"tokens": tokens, "attention_mask": jnp.ones((B, P + L), jnp.int32),
           "advantages": jnp.asarray(rng.normal(size=B), jnp.float32), "mc_masks": masks, "mc_weights": weights}
  hp = objectives.get("test_reinforce_elbo").hparams({"reinforce_scale": 2.0})
  scfg = step_lib.StepConfig(objective="test_reinforce_elbo", num_mc_samples=n, gen_length=L, hparams=hp)
  assert scfg.hparams.reinforce_scale == 2.0
  obj, grads, _ = jax.jit(lambda p, b: step_lib.accumulate_gradients(cfg, scfg, p, b))(params, batch)

  def direct(p):
    l = jnp.stack([elbo.elbo_term(cfg, p, tokens, batch["attention_mask"], masks[j], weights[j]) for j in range(n)])
    return jnp.mean(jnp.sum(2.0 * batch["advantages"] * l / (n * L), axis=0))

  want, want_grads = jax.value_and_grad(direct)(params)
  np.testing.assert_allclose(obj, want, rtol=1e-5, atol=1e-7)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-7)


def test_short_rl_run_with_a_registered_objective(tmp_path, monkeypatch, record_rl_batches):
  """`--config.rl.objective=<registered name>` on the demo config: validated, resolved (remat
  auto -> the objective's choice, its own config key read) and trained."""
  overrides = ["--config.rl.objective=test_reinforce_elbo", "--config.model.remat_policy=auto",
               "--config.model.n_layers=1", "--config.task.demo_train_size=64", "--config.task.demo_test_size=8",
               "--config.sft.steps=0", "--config.total_steps=1", "--config.rl.prompts_per_step=2",
               "--config.rl.group_size=4", "--config.rl.num_mc_samples=2", "--config.rl.micro_batch_per_device=0",
               "--config.rl.skip_zero_advantage=False", "--config.eval_every=0", "--config.plot_at_end=False",
               "--config.rl.test_reinforce_elbo.reinforce_scale=3.0"]  # the objective's own section
  c = memory.load_config_file(str(ROOT / "configs" / "demo.py"), overrides)
  assert c.rl.test_reinforce_elbo.clip is None
  assert config_lib.resolved_remat_policy(c) == "save_attn"
  TRACED.clear()
  run = run_lib.build_run(c, str(tmp_path / "run"))
  assert run.model_cfg.remat_policy == "save_attn"
  assert run.steps.step_config("rl").hparams.reinforce_scale == 3.0
  batches = record_rl_batches(monkeypatch)
  summary = train(run)
  assert summary["step"] == 1 and "test_reinforce_elbo" in TRACED
  assert set(batches[-1]["updates"][0]) == {"tokens", "attention_mask", "advantages", "mc_masks", "mc_weights"}


def test_objective_section_is_validated_by_its_hparams():
  c = demo.get_config()
  c.rl.objective = "test_reinforce_elbo"
  config_lib.validate(c)
  c.rl.test_reinforce_elbo.reinforce_scale = -1.0
  with pytest.raises(config_lib.ConfigError, match=r"config.rl.test_reinforce_elbo: reinforce_scale -1.0 must be > 0"):
    config_lib.validate(c)
  c.rl.objective = "bgpo"  # a section of an objective not in use is not checked
  config_lib.validate(c)


def test_variant_is_an_objectives_recipe():
  from configs import math as math_config
  assert math_config.get_config("test_reinforce_elbo").rl.objective == "test_reinforce_elbo"
  assert math_config.get_config("diffu_grpo").rl.kl_beta == 0.04  # d1's recipe
  with pytest.raises(ValueError, match="config variant 'ppo' is unknown"):
    math_config.get_config("ppo")


def test_remat_auto_is_the_objectives_choice(tmp_path):
  c = demo.get_config()
  c.model.remat_policy = "auto"
  for name, policy in (("bgpo", "activations"), ("diffu_grpo", "activations"), ("vrpo_ol", "full")):
    c.rl.objective = name
    assert config_lib.resolved_remat_policy(c) == policy
    config_lib.validate(c)  # vrpo_ol with auto is fine: it resolves to full
  c.mode = "sft"
  assert config_lib.resolved_remat_policy(c) == "activations"
  c.model.remat_policy = "none"  # explicit settings win
  assert config_lib.resolved_remat_policy(c) == "none"


def _validate_on_8(c, tmp_path) -> None:
  """Validates a shipped config for 8 devices with its data paths pointed at tmp_path (validated,
  not read)."""
  with c.unlocked():
    c.task.data_dir = c.tokenizer.path = str(tmp_path)
    if c.task.name == "code":
      c.task.train_file = str(tmp_path / "train.jsonl")
      (tmp_path / "train.jsonl").touch()
  config_lib.validate(c, data_parallel_size=8)


# What an objective needs beyond `--config.rl.objective=NAME` on some shipped config (its
# check_config says so in one line): SPG masks one distinct block per MC sample, so n <= the
# number of blocks, and its blocks must tile the demo's 16-token responses.
OBJECTIVE_NEEDS = {"spg": ("--config.rl.num_mc_samples=2", "--config.rl.spg.block_length=8")}

SHIPPED = sorted(p.name for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("config_file", SHIPPED)
def test_every_registered_objective_runs_on_every_shipped_config(config_file, tmp_path):
  """`--config.rl.objective=NAME` validates on each shipped config for each registered RL
  objective: the task configs say remat "auto", which resolves to the objective's own choice
  (vrpo_ol "full", the others "activations") instead of stopping with a config error."""
  for name in objectives.names():
    obj = objectives.get(name)
    if not obj.rl:
      continue
    c = memory.load_config_file(str(ROOT / "configs" / config_file),
                                [f"--config.rl.objective={name}", *OBJECTIVE_NEEDS.get(name, ())])
    _validate_on_8(c, tmp_path)
    if c.model.remat_policy == "auto":
      assert config_lib.resolved_remat_policy(c) == obj.remat_policy, (config_file, name)


# The task configs take a variant (base.py and the demo do not: the demo's lengths are its own).
TASK_CONFIGS = [f for f in SHIPPED if f not in ("base.py", "demo.py")]


@pytest.mark.parametrize("config_file", TASK_CONFIGS)
def test_every_objectives_recipe_validates_on_every_task_config(config_file, tmp_path):
  """`--config=configs/<task>.py:<objective>` applies that objective's published recipe (its own
  config.rl.<objective> section included) and the result validates on 8 devices."""
  for name in objectives.names():
    if name.startswith("test_"):
      continue
    c = memory.load_config_file(f"{ROOT / 'configs' / config_file}:{name}", [])
    assert c.rl.objective == name, (config_file, name)
    _validate_on_8(c, tmp_path)
    objectives.get(name).hparams_from_config(c.rl)  # the section fills the objective's Hparams
