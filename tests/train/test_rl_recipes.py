"""The RL update path as a researcher runs it: off-policy mu > 1 and the k3 KL to a frozen reference
for every objective (trainer level, tiny demo), clip defaults, d1's diffu-GRPO recipe, the paper
run lengths, EOS fill after the first stop token, the SFT target format, unknown --config keys and
a check that every key of base_config() is read."""

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bgpo_jax import config as config_lib
from bgpo_jax import tasks as tasks_lib
from bgpo_jax.diffusion import elbo
from bgpo_jax.metrics import read_metrics
from bgpo_jax.train import rl_batch as rl_batch_lib
from bgpo_jax.train import run as run_lib
from bgpo_jax.train import step as step_lib
from bgpo_jax.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from configs import demo  # noqa: E402

# Keys of base_config() allowed to be unread while other work wires them; the test fails if a
# listed key IS read (so the list cannot go stale) and for every other unread key.
KNOWN_UNREAD: set = set()  # keys allowed to be unread (none: every key is wired)


def tiny(objective="bgpo", mu=2, kl=0.1, sft_steps=0):
  c = demo.get_config()
  c.model.n_layers = 2
  c.task.demo_train_size = 64
  c.task.demo_test_size = 8
  c.sft.steps = sft_steps
  c.sft.batch_size = 8
  c.sft.micro_batch_per_device = 0
  c.total_steps = 1
  c.rl.objective = objective
  c.rl.updates_per_batch = mu
  c.rl.kl_beta = kl
  c.rl.prompts_per_step = 2
  c.rl.group_size = 4
  c.rl.num_mc_samples = 2
  c.rl.micro_batch_per_device = 0
  c.optim.warmup_steps = 0  # the first update must move the policy (warmup starts at lr 0)
  c.optim.learning_rate = 1e-3
  c.rollout.gen_length = c.rollout.block_length = c.rollout.steps = 32  # room after the answer
  c.eval.gen_length = c.eval.block_length = c.eval.steps = 32
  c.eval.num_examples = 8
  c.eval.batch_size = 8
  c.eval.at_start = False
  c.eval_every = 0
  c.checkpoint_every = 1000
  c.plot_at_end = False
  c.log_every = 1
  return c


STOP_AT = 5  # the injected rollouts stop (EOT) here, then carry sampled junk


def _inject_stops(monkeypatch, tokenizer_eot):
  """Rollouts whose first rows stop early and continue with non-EOS tokens afterwards, and rewards
  that differ within every group (a random tiny model scores 0 everywhere: no update at all)."""
  original = tasks_lib.rollout_and_score

  def patched(sampler, task, params, batch, rng, **kw):
    rollout, rewards, waited, *more = original(sampler, task, params, batch, rng, **kw)
    toks = np.array(rollout.tokens)
    P = rollout.prompt_len
    toks[:2, P + STOP_AT] = tokenizer_eot
    toks[:2, P + STOP_AT + 1:] = ord("7")  # a digit, not EOS
    rollout.tokens = toks
    from bgpo_jax.rollout import response_lengths
    rollout.response_lengths = response_lengths(toks[:, P:], sampler.stop_ids)
    rewards = (np.arange(len(rewards)) % 2).astype(np.float32)
    return (rollout, rewards, waited, *more)

  monkeypatch.setattr(tasks_lib, "rollout_and_score", patched)


@contextlib.contextmanager
def tracked_reads(*configs):
  """Records every `cfg.key` / `cfg["key"]` read on these configs (and their sections) as a dotted key."""
  paths = {}

  def walk(c, prefix):
    paths[id(c)] = prefix
    for k, v in c._fields.items():
      if isinstance(v, ml_collections.ConfigDict):
        walk(v, f"{prefix}{k}.")

  for c in configs:
    walk(c, "")
  reads = set()
  cls = ml_collections.ConfigDict
  get_attr, get_item = cls.__getattr__, cls.__getitem__

  def record(self, key):
    prefix = paths.get(id(self))
    if prefix is not None and isinstance(key, str):
      reads.add(prefix + key)

  def tracked_getattr(self, key):
    record(self, key)
    return get_attr(self, key)

  def tracked_getitem(self, key):
    record(self, key)
    return get_item(self, key)

  cls.__getattr__, cls.__getitem__ = tracked_getattr, tracked_getitem
  try:
    yield reads
  finally:
    cls.__getattr__, cls.__getitem__ = get_attr, get_item


@pytest.fixture(scope="module")
def bgpo_run(tmp_path_factory, record_rl_batches):
  """One tracked run through every phase: SFT warm-up, RL with mu = 2 and a KL, final evaluation."""
  mp = pytest.MonkeyPatch()
  c = tiny("bgpo", mu=2, kl=0.1, sft_steps=1)
  c.eval_every = 2  # the end of the warm-up and the end of RL
  c.rl.reference_dtype = "bfloat16"
  workdir = str(tmp_path_factory.mktemp("bgpo_mu2"))
  with tracked_reads(c) as reads:
    run = run_lib.build_run(c, workdir)
    _inject_stops(mp, run.tokenizer.eot_id)
    batches = record_rl_batches(mp)
    params_at_init = jax.tree.map(np.asarray, run.state.params)
    summary = train(run)
  mp.undo()
  return run, workdir, summary, reads, params_at_init, batches


@pytest.mark.slow  # an RL run per objective; BGPO's mu 2 + KL run stays fast (below)
@pytest.mark.parametrize("objective", ["vrpo_ol", "diffu_grpo"])
def test_mu2_with_kl_runs_for_every_objective(objective, tmp_path, monkeypatch, record_rl_batches):
  c = tiny(objective, mu=2, kl=0.1)
  c.rl.reference_dtype = "float32"
  run = run_lib.build_run(c, str(tmp_path))
  _inject_stops(monkeypatch, run.tokenizer.eot_id)
  batches = record_rl_batches(monkeypatch)
  initial = jax.tree.map(np.asarray, run.state.params)
  train(run)
  _check_mu2_run(run, batches[-1]["batch"], str(tmp_path), initial)
  if objective == "diffu_grpo":
    # Fresh prompt masks per inner update and per row (identical prompts within a group).
    b = batches[-1]["batch"]
    seeds = [np.asarray(u["row_seeds"]) for u in batches[-1]["updates"]]
    masks = [np.asarray(elbo.one_step_masked_tokens(
        jnp.asarray(b["tokens"]), jnp.asarray(b["attention_mask"]), gen_length=c.rollout.gen_length,
        rng=step_lib._row_keys(jnp.asarray(s)), prompt_mask_prob=c.rl.prompt_mask_prob,
        mask_id=run.model_cfg.mask_token_id)) for s in seeds]
    assert len(masks) == 2 and (masks[0] != masks[1]).any()
    group0 = masks[0][: c.rl.group_size]  # G rows of one prompt
    assert len({r.tobytes() for r in group0}) > 1


@pytest.mark.slow  # an RL run per objective
@pytest.mark.parametrize("objective", ["espo", "spg", "coupled_grpo", "wd1"])
def test_peer_objectives_train_through_the_loop(objective, tmp_path, monkeypatch, record_rl_batches):
  """The peers' objectives as a user runs them: mu = 2 inner updates (and a KL where the objective
  has reference terms) through the real loop; finite metrics, two applied updates, moved weights."""
  from bgpo_jax import objectives
  kl = 0.1 if objectives.get(objective).ref_field is not None else 0.0
  c = tiny(objective, mu=2, kl=kl)
  if objective == "spg":
    c.rl.spg.block_length = 8  # 4 blocks of the 32-token responses, one per MC sample at most
  run = run_lib.build_run(c, str(tmp_path))
  _inject_stops(monkeypatch, run.tokenizer.eot_id)
  batches = record_rl_batches(monkeypatch)
  initial = jax.tree.map(np.asarray, run.state.params)
  train(run)
  rows = [r for r in read_metrics(str(tmp_path)) if "train/loss" in r]
  assert len(rows) == 1 and all(np.isfinite(rows[0][k]) for k in ("train/loss", "train/grad_norm", "train/kl"))
  assert int(run.state.step) == 2  # both inner updates applied (a skipped one does not count)
  if kl:
    assert rows[0]["train/kl"] > 0  # the second update's policy left the reference
  moved = max(float(np.abs(np.asarray(a, np.float32) - b).max())
              for a, b in zip(jax.tree.leaves(run.state.params), jax.tree.leaves(initial)))
  assert moved > 0
  updates = batches[-1]["updates"]
  assert len(updates) == 2 and set(updates[0]) >= {f.name for f in objectives.get(objective).fields}


def _check_mu2_run(trainer, b, workdir, initial):
  """b: the host batch the RL step trained on."""
  c = trainer.config
  rows = [r for r in read_metrics(workdir) if "train/loss" in r]
  assert len(rows) == 1
  m = rows[0]
  for k in ("train/loss", "train/grad_norm", "train/kl", "train/abs_d"):
    assert np.isfinite(m[k]), (k, m[k])
  # The metrics are the second update's: after one update the policy left the reference.
  assert m["train/kl"] > 0
  assert int(trainer.state.step) == trainer.phases.sft_steps + 2  # mu optimizer updates for one rollout batch
  moved = max(float(np.abs(np.asarray(a, np.float32) - b).max())
              for a, b in zip(jax.tree.leaves(trainer.state.params), jax.tree.leaves(initial)))
  assert moved > 0
  # The reference is frozen: it still holds the RL-start weights (in rl.reference_dtype).
  ref = jax.tree.leaves(trainer.reference.params)
  assert ref[0].dtype == jnp.dtype(c.rl.reference_dtype)
  for r, p in zip(ref, jax.tree.leaves(initial)):
    np.testing.assert_allclose(np.asarray(r, np.float32), np.asarray(p, np.float32).astype(r.dtype).astype(np.float32))
  # Rows after their first stop token are EOS in the trained batch (rows 0, 1 stopped at STOP_AT).
  P = b["tokens"].shape[1] - c.rollout.gen_length
  resp = b["tokens"][:, P:]
  eos, eot = trainer.tokenizer.eos_id, trainer.tokenizer.eot_id
  for i in range(2):
    assert resp[i, STOP_AT] == eot and (resp[i, STOP_AT + 1:] == eos).all(), resp[i]
  for row in resp:
    stops = np.flatnonzero(np.isin(row, [eos, eot]))
    if stops.size:
      assert (row[stops[0] + 1:] == eos).all(), row


def test_bgpo_mu2_with_kl_after_a_warm_up(bgpo_run):
  trainer, workdir, summary, _, params_at_init, batches = bgpo_run
  assert summary["step"] == 2 and "eval/accuracy" in summary
  # The reference is the policy at the SFT -> RL hand-over (not the random init), saved for resumes.
  assert Path(workdir, "reference").is_dir()
  from bgpo_jax.train.reference import ReferencePolicy
  restored = ReferencePolicy(workdir, trainer.config.rl.reference_dtype, trainer.shardings.params,
                             needed=True).restore(trainer.state.params)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(trainer.reference.params)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  init = jax.tree.leaves(params_at_init)
  assert any(not np.allclose(np.asarray(r, np.float32), np.asarray(p, np.float32).astype(r.dtype).astype(np.float32))
             for r, p in zip(jax.tree.leaves(trainer.reference.params), init)), "the reference must be the post-SFT policy"
  rows = [r for r in read_metrics(workdir) if "train/kl" in r and "train/reward_mean" in r]
  assert rows and rows[-1]["train/kl"] > 0 and np.isfinite(rows[-1]["train/kl"])
  assert int(trainer.state.step) == 1 + 2
  b = batches[-1]["batch"]
  P = b["tokens"].shape[1] - trainer.config.rollout.gen_length
  resp = b["tokens"][:, P:]
  for i in range(2):
    assert (resp[i, STOP_AT + 1:] == trainer.tokenizer.eos_id).all()


def test_resume_after_the_hand_over_reloads_the_reference(bgpo_run, tmp_path):
  trainer, workdir, *_ = bgpo_run
  again = run_lib.build_run(trainer.config, workdir)  # resumes at step 2 (> the warm-up's 1)
  assert again.start_step == 2 and again.reference.params is not None
  for a, b in zip(jax.tree.leaves(again.reference.params), jax.tree.leaves(trainer.reference.params)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_every_base_config_key_is_read(bgpo_run, tmp_path):
  """Each key is read by validation, the trainer (warm-up, RL with mu and KL, evaluation) or the
  data pipeline of a file-backed task; a key nothing reads is a key that does nothing."""
  _, _, _, reads, _, _ = bgpo_run
  reads = set(reads)
  # File-backed tasks read the keys the demo task skips (eval_tasks, tfds_dir, ...).
  src = tmp_path / "data"
  src.mkdir()
  row = lambda q, a: json.dumps({"data_source": "gsm8k", "prompt": [{"role": "user", "content": q}],
                                 "reward_model": {"ground_truth": a, "style": "rule"}, "extra_info": {}})
  (src / "train_gsm8k.jsonl").write_text("\n".join(row(f"{i} + 1?", str(i + 1)) for i in range(4)) + "\n")
  (src / "test_gsm8k.jsonl").write_text("\n".join(row(f"{i} * 2?", str(2 * i)) for i in range(3)) + "\n")
  files = config_lib.base_config()
  files.task.name = "gsm8k"
  files.task.data_dir = str(src)
  files.task.eval_tasks = "gsm8k"
  files.task.tfds_dir = str(tmp_path / "tfds")
  files.tokenizer.kind = "char"
  with tracked_reads(files) as more:
    config_lib.validate(files, data_parallel_size=1)
    task = tasks_lib.build_task(files, str(tmp_path))
    assert len(task.evals["gsm8k"]) == 3
    from bgpo_jax.train import optimizer as optim_lib
    for schedule in config_lib.SCHEDULES:  # final_lr_fraction is read by the decaying ones
      files.optim.schedule = schedule
      optim_lib.make_schedule(files.optim, 10)
    from bgpo_jax import objectives
    for name in objectives.names():  # each objective's step reads its own config.rl.<name> section
      files.rl.objective = name
      run_lib.step_config(files, "rl", 1)
    files.lora.rank = 4  # a LoRA run's step reads lora.alpha / targets / dropout (its LoraSpec)
    run_lib.step_config(files, "rl", 1)
  reads |= more
  keys = set(config_lib.flat_keys(config_lib.base_config()))
  unread = sorted(keys - reads - KNOWN_UNREAD)
  assert not unread, f"config keys nothing reads (wire them or remove them): {unread}"
  stale = sorted(KNOWN_UNREAD & reads)
  assert not stale, f"now read, remove from KNOWN_UNREAD: {stale}"


def test_clip_defaults_follow_spec_when_off_policy():
  rl = config_lib.base_config().rl
  assert config_lib.resolved_clip(rl) == (None, None)  # on-policy: nothing to clip
  rl.updates_per_batch = 2
  assert config_lib.resolved_clip(rl) == (0.2, 3.0)  # SPEC section 3
  rl.clip_eps, rl.dual_clip = 0.1, 0.0
  assert config_lib.resolved_clip(rl) == (0.1, None)  # set values win; 0 = off
  c = tiny("diffu_grpo", mu=3, kl=0.0)
  trainer_cfg = run_lib.step_config(c, "rl", data_parallel=1)
  assert (trainer_cfg.hparams.clip_eps, trainer_cfg.hparams.dual_clip, trainer_cfg.off_policy) == (0.2, 3.0, True)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: setattr(c.rl, "kl_beta", -0.1), "config.rl.kl_beta -0.1 must be >= 0"),
    (lambda c: setattr(c.rl, "reference_dtype", "float16"), "config.rl.reference_dtype 'float16' is unknown"),
    (lambda c: setattr(c.rl, "clip_eps", 1.5), "config.rl.clip_eps 1.5 must lie in (0, 1)"),
    (lambda c: setattr(c.rl, "dual_clip", 0.5), "config.rl.dual_clip 0.5 must be > 1"),
    (lambda c: setattr(c.rl, "prompt_mask_prob", 1.0), "config.rl.prompt_mask_prob 1.0 must lie in [0, 1)"),
])
def test_rl_validation(mutate, message):
  c = tiny()
  mutate(c)
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
    config_lib.validate(c, data_parallel_size=1)


def test_paper_run_lengths_and_d1_recipe(tmp_path):
  import importlib
  lengths = {"math": 700, "code": 560, "sudoku": 400, "countdown": 560}  # BGPO's released recipe
  for name, steps in lengths.items():
    c = importlib.import_module(f"configs.{name}").get_config()
    assert c.total_steps == steps and c.rl.objective == "bgpo"
    assert 0 < c.eval_every <= steps and steps % c.checkpoint_every == 0
  d1 = importlib.import_module("configs.countdown").get_config("diffu_grpo")
  assert (d1.rl.objective, d1.rl.kl_beta, d1.rl.updates_per_batch, d1.rl.clip_eps, d1.rl.prompt_mask_prob,
          d1.optim.learning_rate, d1.rl.group_size, d1.rl.advantage_std) == (
              "diffu_grpo", 0.04, 8, 0.5, 0.15, 3e-6, 6, False)
  assert config_lib.resolved_clip(d1.rl) == (0.5, None)  # d1: epsilon 0.5, no dual clip
  assert importlib.import_module("configs.math").get_config("diffu_grpo").rl.updates_per_batch == 12
  d1.task.data_dir = d1.tokenizer.path = str(tmp_path)
  config_lib.validate(d1, data_parallel_size=8)
  with pytest.raises(ValueError, match="variant 'ppo' is unknown"):
    importlib.import_module("configs.sudoku").get_config("ppo")


def test_fill_after_stop():
  tokens = np.array([[9, 9, 1, 5, 2, 3], [9, 9, 1, 2, 3, 4], [9, 9, 0, 7, 7, 7]])
  lengths = np.array([2, 4, 1])  # row 0 stops at its EOT (5), row 1 never, row 2 at EOS (0)
  out = rl_batch_lib.fill_after_stop(tokens, 2, lengths, eos_id=0)
  np.testing.assert_array_equal(out, [[9, 9, 1, 5, 0, 0], [9, 9, 1, 2, 3, 4], [9, 9, 0, 0, 0, 0]])
  assert tokens[0, 4] == 2  # the input is not modified


def test_sft_target_ends_with_eot_then_eos():
  c = tiny(sft_steps=1)
  task = tasks_lib.build_task(c)
  tok = task.tokenizer
  tokens, _ = task.sft_batch(0, c.sft.batch_size, 32)
  resp = tokens[:, -32:]
  for row in resp:
    eot = np.flatnonzero(row == tok.eot_id)
    assert eot.size == 1 and eot[0] == 16, row  # the 16-digit sudoku answer, then the turn's end
    assert (row[17:] == tok.eos_id).all() and not np.isin(row[:16], [tok.eos_id, tok.eot_id]).any()
  # A canvas the answer fills exactly keeps the answer (no room for the EOT).
  tokens, _ = task.sft_batch(0, c.sft.batch_size, 16)
  assert not np.isin(tokens[:, -16:], [tok.eos_id, tok.eot_id]).any()


@pytest.mark.parametrize("module", ["bgpo_jax.main", "bgpo_jax.evaluate"])
def test_unknown_cli_key_is_one_line_with_the_closest_keys(module, tmp_path):
  args = [sys.executable, "-m", module, "--config=configs/demo.py", "--config.rl.klbeta=1"]
  if module == "bgpo_jax.main":
    args.append(f"--workdir={tmp_path}")
  p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert "unknown config key --config.rl.klbeta" in lines[0]
  assert "closest valid keys: --config.rl.kl_beta" in lines[0]
