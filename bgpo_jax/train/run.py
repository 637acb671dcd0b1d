"""The run builder: from a config and a workdir to every piece the training loop uses.

`build_run` sets up, in order: the mesh (and the distributed runtime), the config check, the
workdir (refusing a resume with other settings), the task's data and tokenizer, the model, the
optimizer and its schedule, the sharded train state (restored from the latest checkpoint when
there is one), the KL reference, the metrics writer and the rollout / evaluation samplers. The
loop (train/loop.py) only reads and updates the `Run` it returns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import optax
from etils import epath

from bgpo_jax import checkpoint as ckpt_lib
from bgpo_jax import config as config_lib
from bgpo_jax import metrics as metrics_lib
from bgpo_jax import objectives
from bgpo_jax import tasks as tasks_lib
from bgpo_jax.models import family as family_lib
from bgpo_jax.models import lora as lora_lib
from bgpo_jax.train import compiled as compiled_lib
from bgpo_jax.train import mesh as mesh_lib
from bgpo_jax.train import nonfinite as nonfinite_lib
from bgpo_jax.train import optimizer as optim_lib
from bgpo_jax.train import state as state_lib
from bgpo_jax.train import step as step_lib
from bgpo_jax.train.reference import ReferencePolicy
from bgpo_jax.train.rng import RngStreams


@dataclasses.dataclass(frozen=True)
class Phases:
  """Steps of the SFT warm-up (or of mode=sft) and of RL; they share one step counter and one
  optimizer. rl_updates = optimizer updates of the RL phase (rl.updates_per_batch per step)."""
  sft_steps: int
  rl_steps: int
  rl_updates: int

  @property
  def total(self) -> int:
    return self.sft_steps + self.rl_steps

  @classmethod
  def of(cls, config) -> "Phases":
    sft = config.total_steps if config.mode == "sft" else config.sft.steps
    rl = 0 if config.mode == "sft" else config.total_steps
    return cls(sft_steps=sft, rl_steps=rl, rl_updates=rl * config.rl.updates_per_batch)

  def phase(self, step: int) -> str:
    return "sft" if step < self.sft_steps else "rl"


def micro_rows(config, phase: str, data_parallel: int) -> int:
  """Global rows per micro-batch of the `phase` step (0 = the whole batch at once)."""
  if phase == "sft":
    return config_lib.micro_batch_rows(config.sft.micro_batch_per_device, config.sft.batch_size, data_parallel)
  rl = config.rl
  return config_lib.micro_batch_rows(rl.micro_batch_per_device, rl.prompts_per_step * rl.group_size, data_parallel)


def step_config(config, phase: str, data_parallel: int) -> step_lib.StepConfig:
  """The static settings of the `phase` ("sft" / "rl") train step."""
  if phase == "sft":
    return step_lib.StepConfig(objective="sft", num_mc_samples=config.sft.num_mc_samples,
                               micro_batch_size=micro_rows(config, "sft", data_parallel),
                               gen_length=config.rollout.gen_length, lora=config_lib.lora_spec(config))
  rl = config.rl
  clip_eps, dual_clip = config_lib.resolved_clip(rl)
  # The objective's hyper-parameters: config.rl.<objective> (or, for the first objectives, the flat
  # config.rl keys its Hparams names, with the clip resolved for off-policy runs).
  obj = objectives.get(rl.objective)
  hparams = obj.hparams_from_config(rl)
  if obj.flat_hparams:
    names = {f.name for f in dataclasses.fields(obj.Hparams)}
    hparams = dataclasses.replace(hparams, **{k: v for k, v in (("clip_eps", clip_eps), ("dual_clip", dual_clip))
                                              if k in names})
  return step_lib.StepConfig(
      objective=rl.objective, num_mc_samples=rl.num_mc_samples,
      micro_batch_size=micro_rows(config, "rl", data_parallel), gen_length=config.rollout.gen_length,
      off_policy=rl.updates_per_batch > 1, kl_beta=float(rl.kl_beta), hparams=hparams,
      lora=config_lib.lora_spec(config))


def make_optimizer(config, phases: Phases) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (config.optim) with one schedule over the run: SFT at the sft.* learning rate, warmup
  and schedule, then RL at optim.* over the RL phase's updates."""
  sft_optim = config.optim.copy_and_resolve_references()
  with sft_optim.unlocked():
    sft_optim.learning_rate = config.sft.learning_rate
    sft_optim.schedule = config.sft.schedule
    sft_optim.final_lr_fraction = config.sft.final_lr_fraction
    sft_optim.warmup_steps = config.sft.warmup_steps
  if config.mode == "sft":
    schedule = optim_lib.make_schedule(sft_optim, phases.total)
    return optim_lib.make_optimizer(sft_optim, phases.total, schedule), schedule
  optim = config.optim
  if phases.sft_steps and phases.rl_steps:
    sft_lr = optim_lib.make_schedule(sft_optim, phases.sft_steps)
    rl_lr = optim_lib.make_schedule(optim, phases.rl_updates)
    schedule = optax.join_schedules([sft_lr, rl_lr], [phases.sft_steps])
    return optim_lib.make_optimizer(optim, phases.sft_steps + phases.rl_updates, schedule), schedule
  schedule = optim_lib.make_schedule(optim, phases.rl_updates)
  return optim_lib.make_optimizer(optim, phases.rl_updates, schedule), schedule


@dataclasses.dataclass
class LoraBase:
  """A LoRA run's frozen base (config.lora.rank > 0): the state's params are the adapters.

  params: the base weights in lora.base_dtype on `shardings` (the full fine-tuning layout);
  spec: models.lora.LoraSpec; source: where the base comes from ({"init.checkpoint": path} or
  {"seed": seed}) and fingerprint: its bits' checksum, both recorded in every checkpoint so that a
  resume whose base would differ is refused."""
  model_cfg: Any
  spec: Any
  params: Any
  shardings: Any
  source: dict
  fingerprint: int
  _merge: Any = None

  def policy(self, adapters: Any) -> Any:
    """The model the objectives run: base + adapters, unmerged (transformer.Adapted)."""
    return lora_lib.adapted(self.params, adapters, self.spec)

  def merged(self, adapters: Any) -> Any:
    """base + scale * A @ B folded into the weights, in the compute dtype on the base's
    shardings: the sampler's weights, made once per RL step / eval pass."""
    if self._merge is None:
      cdt = self.model_cfg.compute_jnp_dtype
      merge = lambda b, a: jax.tree.map(lambda x: x.astype(cdt), lora_lib.merge(self.model_cfg, b, a, self.spec))
      self._merge = jax.jit(merge, out_shardings=self.shardings)
    return self._merge(self.params, adapters)

  def record(self) -> dict:
    """What the run's metadata (run.json, each checkpoint's host data) says about the base."""
    s = self.spec
    return {"source": self.source, "fingerprint": self.fingerprint, "dtype": str(jax.tree.leaves(self.params)[0].dtype),
            "r": s.r, "alpha": s.alpha, "targets": list(s.targets), "dropout": s.dropout}

  def check_resume(self, host: dict, where: str) -> None:
    """Refuses a resume whose base differs from the one the checkpoint's adapters were trained on."""
    saved = host.get("lora_base")
    if saved is None:
      raise ckpt_lib.RunError(f"{where} holds a full fine-tuning checkpoint but config.lora.rank is "
                              f"{self.spec.r}: resume it with --config.lora.rank=0")
    now = self.record()
    if saved["source"] != now["source"] or saved["fingerprint"] != now["fingerprint"] or saved["dtype"] != now["dtype"]:
      raise ckpt_lib.RunError(
          f"{where}: its adapters were trained on the base {saved['source']} ({saved['dtype']}, fingerprint "
          f"{saved['fingerprint']}), but this run's base is {now['source']} ({now['dtype']}, fingerprint "
          f"{now['fingerprint']}); resume with the same init.checkpoint (unchanged files), seed and lora.base_dtype")


def base_fingerprint(params: Any) -> int:
  """One uint32 checksum of every bit of `params` (checkpoint._state_summary's per-leaf sums,
  combined with odd weights): the same on any sharding or topology."""
  prints, _ = jax.device_get(ckpt_lib._state_summary(params))
  total = 0
  for i, p in enumerate(prints):
    total = (total + (2 * i + 1) * int(p)) % 2**32
  return total


def _lora_base(config, model_cfg, mesh, rng: RngStreams, init_params) -> LoraBase:
  spec = config_lib.lora_spec(config)
  try:
    lora_lib.targets_of(model_cfg, spec.targets)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.lora.targets {config.lora.targets!r}: {e}") from None
  base, shardings = state_lib.frozen_base(model_cfg, mesh, config.lora.base_dtype, rng=rng.key("init"),
                                          params=init_params)
  source = {"init.checkpoint": config.init.checkpoint} if config.init.checkpoint else {"seed": int(config.seed)}
  return LoraBase(model_cfg=model_cfg, spec=spec, params=base, shardings=shardings, source=source,
                  fingerprint=base_fingerprint(base))


def _initial_adapters(config, model_cfg, spec) -> Any:
  """init.adapter's adapters (PEFT directory), checked against config.lora; None = fresh ones."""
  if not config.init.adapter:
    return None
  adapters, file_spec = lora_lib.load_peft(config.init.adapter, model_cfg)
  want = (spec.r, float(spec.alpha), lora_lib.targets_of(model_cfg, spec.targets))
  got = (file_spec.r, float(file_spec.alpha), lora_lib.targets_of(model_cfg, file_spec.targets))
  if want != got:
    raise config_lib.ConfigError(
        f"config.init.adapter {config.init.adapter!r} holds r={got[0]}, alpha={got[1]}, weights {list(got[2])}, but "
        f"config.lora gives r={want[0]}, alpha={want[1]}, weights {list(want[2])}; set --config.lora.rank={got[0]} "
        f"--config.lora.alpha={got[1]} --config.lora.targets={','.join(file_spec.targets)}")
  return adapters


@dataclasses.dataclass
class Run:
  """The pieces of one training run; the loop updates `state`, `start_step` and `last_eval`."""
  config: Any
  workdir: str
  mesh: Any
  data_parallel: int
  is_main: bool
  phases: Phases
  rng: RngStreams
  task: Any  # tasks.Task: prompts, SFT batches, evaluation sets, tokenizer
  model_cfg: Any
  state: state_lib.TrainState
  shardings: state_lib.TrainState
  steps: compiled_lib.CompiledSteps
  reference: ReferencePolicy
  nonfinite: nonfinite_lib.NonFiniteCounter
  ckpt: ckpt_lib.Checkpointer
  writer: metrics_lib.MetricsWriter
  sampler: Any  # rollout.RolloutSampler of the RL rollouts (config.rollout)
  eval_sampler: Any  # ... of the evaluation (config.eval), one response per prompt
  start_step: int = 0
  last_eval: dict = dataclasses.field(default_factory=dict)
  lora: LoraBase | None = None  # a LoRA run's frozen base (state.params are the adapters)

  @property
  def tokenizer(self):
    return self.task.tokenizer

  def policy(self) -> Any:
    """The current policy as the objectives' model calls take it (old-policy terms): the params,
    or a LoRA run's base + adapters view."""
    return self.state.params if self.lora is None else self.lora.policy(self.state.params)

  def sampling_params(self) -> Any:
    """The weights the samplers run (rollouts, evaluation): the params, or a LoRA run's merged
    base + adapters in the compute dtype (made once per call: once per RL step / eval pass), or
    with lora.sampler_weights="unmerged" the base + adapters view (no second copy of the base)."""
    if self.lora is None:
      return self.state.params
    if self.config.lora.sampler_weights == "unmerged":
      return self.lora.policy(self.state.params)
    return self.lora.merged(self.state.params)


def _prepare_workdir(config, workdir: str, is_main: bool) -> None:
  ckpt_lib.ensure_workdir(workdir)  # one line when it is a file
  # A resume with other settings (seed, lr, ...) would silently continue the old run: refused.
  # Then WORKDIR/run_config.json (re)records the whole config: `bgpo_jax.evaluate --checkpoint=WORKDIR`
  # reads it, and a user sees what the run used after every override.
  ckpt_lib.check_run_config(workdir, json.loads(config.to_json_best_effort()),
                            resuming=ckpt_lib.has_checkpoints(workdir), write=is_main)
  tasks_lib.enable_compilation_cache(config, workdir)


def build_run(config, workdir: str) -> Run:
  """Every piece of the run of `config` in `workdir`, resumed from its latest checkpoint."""
  mesh_lib.maybe_initialize_distributed(config.distributed)
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  dp = mesh_lib.data_parallel_size(mesh)
  config_lib.validate(config, data_parallel_size=dp)
  is_main = jax.process_index() == 0
  _prepare_workdir(config, workdir, is_main)
  task = tasks_lib.build_task(config, workdir)
  model_cfg, init_params = tasks_lib.build_model(config, task.tokenizer, mesh)
  rng = RngStreams(int(config.seed))
  phases = Phases.of(config)
  optimizer, schedule = make_optimizer(config, phases)
  kl_needed = config.mode == "rl" and config.rl.kl_beta > 0
  lora = None
  if config.lora.rank:
    lora = _lora_base(config, model_cfg, mesh, rng, init_params)
    init_params = None  # donated to the base's cast
    adapters = _initial_adapters(config, model_cfg, lora.spec)
    state, shardings = state_lib.create_lora_state(model_cfg, lora.spec, optimizer, mesh, rng=rng.key("lora"),
                                                   adapters=adapters)
    reference = ReferencePolicy(workdir, config.rl.reference_dtype, shardings.params, needed=kl_needed,
                                base=lora.params, spec=lora.spec, fresh_adapters=adapters is None)
  else:
    state, shardings = state_lib.create_train_state(model_cfg, optimizer, mesh, rng=rng.key("init"),
                                                    params=init_params)
    reference = ReferencePolicy(workdir, config.rl.reference_dtype, shardings.params, needed=kl_needed)
  if is_main:  # what `bgpo_jax.evaluate --checkpoint=WORKDIR` and the exporter need besides the weights
    kind, tok_path = tasks_lib.tokenizer_source(config)
    ckpt_lib.write_run_record(workdir, model_hf=model_cfg.to_hf_dict(), tokenizer_kind=kind, tokenizer_path=tok_path,
                              lora=lora.record() if lora else None)
  if not phases.sft_steps:
    reference.start(state.params)  # the initial weights, before a checkpoint is restored over them
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  nonfinite = nonfinite_lib.NonFiniteCounter(int(config.optim.get("max_nonfinite_steps", 0) or 0), workdir)
  start_step, restored = 0, ckpt.restore_latest(state)  # damaged newer steps are moved aside
  if restored is not None:
    state, host = restored
    if lora is not None:
      lora.check_resume(host, f"{ckpt.directory}/{host['step']}")
    elif "lora_base" in host:
      raise ckpt_lib.RunError(f"{ckpt.directory}/{host['step']} holds LoRA adapters (r={host['lora_base']['r']}) "
                              f"but config.lora.rank is 0: resume it with --config.lora.rank={host['lora_base']['r']}")
    start_step = int(host["step"])
    nonfinite.total = int(host.get("nonfinite_steps", 0))
    logging.info("resumed from %s at step %d", ckpt.directory, start_step)
  if reference.needed and reference.params is None and start_step > phases.sft_steps:
    reference.restore(state.params)
  for line in objectives.get(config.rl.objective).warnings(config):
    logging.warning("%s", line)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main,
                                     resume_step=start_step if restored is not None else None)
  samplers = [tasks_lib.build_rollout_sampler(config, model_cfg, task.tokenizer, mesh, s) for s in ("rollout", "eval")]
  steps = compiled_lib.CompiledSteps(model_cfg, mesh, optimizer, schedule, shardings,
                                     lambda phase: step_config(config, phase, dp),
                                     base=lora and lora.params, base_shardings=lora and lora.shardings)
  return Run(config=config, workdir=workdir, mesh=mesh, data_parallel=dp, is_main=is_main, phases=phases, rng=rng,
             task=task, model_cfg=model_cfg, state=state, shardings=shardings, steps=steps, reference=reference,
             nonfinite=nonfinite, ckpt=ckpt, writer=writer, sampler=samplers[0], eval_sampler=samplers[1],
             start_step=start_step, lora=lora)


def _count(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def startup_summary(run: Run) -> list[str]:
  """A few lines printed before the first step: where it runs, what it trains, how much, and where
  the results go; enough to catch a wrong override before an hour of compute."""
  c, p = run.config, run.phases
  devices = jax.devices()
  mesh = " ".join(f"{k}={v}" for k, v in run.mesh.shape.items())
  procs = jax.process_count()
  trainable = sum(int(x.size) for x in jax.tree.leaves(run.state.params))  # what the optimizer updates
  # A LoRA run trains its adapters only; the frozen base counts in the total.
  total = trainable + (sum(int(x.size) for x in jax.tree.leaves(run.lora.params)) if run.lora else 0)
  m = run.model_cfg
  lines = [
      f"devices: {len(devices)} x {devices[0].device_kind} ({procs} process{'es' if procs > 1 else ''}); "
      f"mesh {mesh} (data-parallel {run.data_parallel})",
      f"model: {family_lib.family_of(m)}, {m.n_layers} layer{'s' if m.n_layers > 1 else ''}, d_model {m.d_model}, "
      f"vocab {m.vocab_size}; parameters {_count(total)} total, {_count(trainable)} trainable "
      f"({m.param_dtype} weights, {m.compute_dtype} compute)",
  ]
  if p.rl_steps:
    rl = c.rl
    rows = rl.prompts_per_step * rl.group_size
    lines.append(f"objective: {rl.objective}, n={rl.num_mc_samples} MC samples per response, G={rl.group_size} "
                 f"responses x {rl.prompts_per_step} prompts = {rows} rows per RL step"
                 + (f", {rl.updates_per_batch} updates each" if rl.updates_per_batch > 1 else "")
                 + (f"; SFT warm-up {c.sft.batch_size} rows per step" if p.sft_steps else ""))
  else:
    lines.append(f"objective: masked-diffusion SFT, {c.sft.batch_size} rows per step, n={c.sft.num_mc_samples} "
                 "MC samples per row")
  buckets = ", ".join(str(b) for b in c.rollout.prompt_buckets)
  buckets = f"one of {buckets}" if len(c.rollout.prompt_buckets) > 1 else buckets
  lines.append(f"lengths: prompts up to {c.task.max_prompt_tokens} tokens (padded to {buckets}), "
               f"responses {c.rollout.gen_length} tokens (eval {c.eval.gen_length})")
  start = f"resuming at step {run.start_step}" if run.start_step else "from step 0"
  sft_every = c.sft.eval_every or c.eval_every  # as the loop reads them: eval_every 0 turns both off
  if not c.eval_every:
    evals = "no periodic eval"
  elif p.sft_steps and p.rl_steps and sft_every != c.eval_every:
    evals = f"eval every {sft_every} SFT / {c.eval_every} RL steps"
  else:
    evals = f"eval every {c.eval_every if p.rl_steps else sft_every} steps"
  lines.append(f"steps: {p.sft_steps} SFT + {p.rl_steps} RL = {p.total}, {start}; {evals}, checkpoint every "
               f"{c.checkpoint_every} steps")
  wd = epath.Path(run.workdir)
  curves = f"{wd / 'curves.png'} (at the end)" if c.plot_at_end else f"python -m bgpo_jax.plot {wd}"
  lines.append(f"workdir: {wd} (config: {ckpt_lib.RUN_CONFIG}); metrics: {wd / 'metrics.jsonl'}; "
               f"curves: {curves}")
  return lines
