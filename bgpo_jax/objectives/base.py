"""What an objective is to the trainer: the `Objective` interface, the RL batch layout and the
registry of objectives by name.

An objective says which arrays its batch carries (`fields`, plus the stored old / reference
terms), how to compute its terms inside the train step (`unit_terms`, one scan unit at a time),
its no-gradient old / reference terms (`old_terms`), and how the trainer fills its fields from a
rollout (`host_fields`). The train step, the trainer, the memory planner and config validation
only ask the registry (`get(name)`); none of them knows an objective by name.

A new objective is one module that subclasses `Objective` and calls `register(MyObjective())`;
importing that module (e.g. from a config file) makes `--config.rl.objective=<its name>` work.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class BatchField:
  """One array of the train step's batch. dims name its axes: "B" rows (the batch axis, split
  over devices and micro-batches), "S" prompt + response positions, "L" response positions,
  "n" MC samples."""
  name: str
  dims: tuple[str, ...]
  dtype: Any

  @property
  def batch_axis(self) -> int:
    return self.dims.index("B")

  def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(int(sizes[d]) for d in self.dims)


# Every objective's batch starts with these (advantages are zeros for SFT).
COMMON_FIELDS = (BatchField("tokens", ("B", "S"), jnp.int32),
                 BatchField("attention_mask", ("B", "S"), jnp.int32),
                 BatchField("advantages", ("B",), jnp.float32))
# The ELBO objectives' shared MC masks: the same masks for the current, old and reference policy.
MC_FIELDS = (BatchField("mc_masks", ("n", "B", "L"), jnp.bool_),
             BatchField("mc_weights", ("n", "B"), jnp.float32))


@dataclasses.dataclass(frozen=True)
class NoHparams:
  """Hyper-parameters of an objective that has none."""


@dataclasses.dataclass
class RolloutInputs:
  """What the trainer hands `Objective.host_fields` for one rollout batch (host arrays).

  masks(n, estimator) -> (mc_masks [n, rows, L] bool, mc_weights [n, rows]): one draw per step,
  the same on any topology. row_seeds(update) -> [rows] uint32: distinct per row, inner update
  and step.
  """
  step: int
  rows: int
  gen_length: int
  updates: int  # rl.updates_per_batch
  lengths: np.ndarray  # [rows] response tokens up to and including the first stop token
  rl: Any  # the config's rl section
  masks: Callable[[int, str], tuple[np.ndarray, np.ndarray]]
  row_seeds: Callable[[int], np.ndarray]
  # [rows] the advantages the step trains on, in group order: rows g*G .. g*G+G-1 answer prompt g
  # (wd1 weights each row by softmaxes over its group).
  advantages: np.ndarray | None = None

  def response_mask(self) -> np.ndarray:
    """[rows, gen_length] float32: 1 on each response's tokens up to and including its first stop
    token (`lengths`), 0 on the EOS fill after it: the tokens a token-level loss counts."""
    return (np.arange(self.gen_length)[None] < np.asarray(self.lengths)[:, None]).astype(np.float32)


class Objective:
  """An RL (or SFT) objective to MAXIMIZE; subclass it and `register` an instance.

  Attributes:
    name: the registry key (config.rl.objective).
    per_sample: the objective is a sum of per-MC-sample terms: the step scans the n samples one
      at a time (`unit_terms(..., u)` gets u = 0..n-1) and memory stays flat in n. Otherwise the
      step calls `unit_terms(..., 0)` once per micro-batch with the whole sequence's terms.
    remat_policy: the model.remat_policy that model.remat_policy="auto" resolves to.
    rl: False for the SFT loss (not a choice of config.rl.objective).
    exact_group_skipping: rows with A = 0 add nothing and a positive scale of A scales the
      update (without KL), so rl.skip_zero_advantage may drop all-equal-reward groups.
    Hparams: frozen dataclass of its hyper-parameters; `hparams` fills it by field name. Its
      `__post_init__` may raise ValueError for a bad value (config validation reports it).
    flat_hparams: the Hparams fields are keys of config.rl itself (the objectives that came
      first: bgpo, vrpo_ol, diffu_grpo); otherwise config.rl.<name> holds them, made from the
      dataclass defaults (`config_section`), so a new objective's knobs are config keys for free.
    fields: the batch arrays besides COMMON_FIELDS.
    old_field / ref_field: the stored old-policy (rl.updates_per_batch > 1) / reference
      (rl.kl_beta > 0) terms, computed by `old_terms` on the same batch.
  """
  name: str = ""
  per_sample: bool = False
  remat_policy: str = "full"
  rl: bool = True
  exact_group_skipping: bool = True
  Hparams: type = NoHparams
  flat_hparams: bool = False
  fields: tuple[BatchField, ...] = ()
  old_field: BatchField | None = None
  ref_field: BatchField | None = None

  # ---------------------------------------------------------------- configuration

  def hparams(self, values: Mapping[str, Any]) -> Any:
    """Hparams from `values` (e.g. config.rl as a dict), each field by its name; missing
    ones keep the dataclass default."""
    names = {f.name for f in dataclasses.fields(self.Hparams)}
    return self.Hparams(**{k: v for k, v in values.items() if k in names})

  def hparams_from_config(self, rl) -> Any:
    """Hparams from a config's rl section: config.rl.<name> (or the flat config.rl keys) by field
    name; raises ValueError (from the dataclass's own checks) for a bad value."""
    if self.flat_hparams:
      values = {f.name: rl[f.name] for f in dataclasses.fields(self.Hparams) if f.name in rl}
    else:
      values = dict(rl[self.name]) if self.name in rl else {}
    return self.hparams(values)

  def recipe(self, config):
    """Applies this objective's published recipe to a task config in place and returns it
    (`--config=configs/<task>.py:<name>`). Subclasses set their authors' settings, each sourced;
    this base only selects the objective."""
    config.rl.objective = self.name
    return config

  def remat_for(self, config) -> str:
    """What model.remat_policy="auto" resolves to for this config (`remat_policy`; an objective
    whose memory depends on its hyper-parameters, e.g. ESPO's per-sample bound, overrides it)."""
    return self.remat_policy

  def check_config(self, config) -> None:
    """Raises config.ConfigError for settings this objective cannot run (called by validate)."""

  def warnings(self, config) -> tuple[str, ...]:
    """Lines the trainer logs for settings that run but are probably not what was meant."""
    return ()

  # ---------------------------------------------------------------- batch layout

  def batch_fields(self, cfg) -> tuple[BatchField, ...]:
    """The step's batch for StepConfig `cfg`: common + own fields + stored old / ref terms."""
    out = COMMON_FIELDS + tuple(self.fields)
    if cfg.off_policy and self.old_field is not None:
      out += (self.old_field,)
    if cfg.kl_beta > 0 and self.ref_field is not None:
      out += (self.ref_field,)
    return out

  def units(self, cfg) -> int:
    """Scan iterations per micro-batch."""
    return cfg.num_mc_samples if self.per_sample else 1

  # ---------------------------------------------------------------- the step

  def unit_terms(self, model_cfg, cfg, params, mb: dict, u: jax.Array):
    """(objective summed over the micro-batch rows, aux) of scan unit u (a traced int).

    aux: {"elbo", "abs_d", "kl"} summed over rows (and over units); the step divides them by
    B * units. mb holds the micro-batch's slice of every `batch_fields` array.
    """
    raise NotImplementedError

  def old_terms(self, model_cfg, cfg, params, mb: dict) -> jax.Array:
    """No-gradient terms of `params` on one micro-batch, laid out as old_field with "B" = its
    rows (params are the old policy's or the frozen reference's, any dtype)."""
    raise NotImplementedError

  # ---------------------------------------------------------------- the trainer

  def host_fields(self, inputs: RolloutInputs) -> list[dict]:
    """`fields` as host arrays, one dict per inner update (the same dict object when the
    updates share them: the trainer then stores old / reference terms once)."""
    raise NotImplementedError


# ------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
  """Adds an objective under its name; returns it. A config file loaded twice (flag parsing reads
  it once more) re-registers its own class: that replaces the entry; another class under a taken
  name is refused."""
  if not objective.name or not isinstance(objective, Objective):
    raise ValueError(f"{objective!r} must be an Objective instance with a name")
  old = _REGISTRY.get(objective.name)
  if old is not None and type(old).__qualname__ != type(objective).__qualname__:
    raise ValueError(f"objective {objective.name!r} is already registered ({type(old).__qualname__})")
  _REGISTRY[objective.name] = objective
  return objective


def config_section(objective: Objective) -> dict | None:
  """config.rl.<name>'s keys and defaults for an objective whose Hparams are not flat config.rl
  keys: {field: default}, or None. A field whose default is None must be typed `float | None` (or
  int / str / bool): the config then holds a placeholder of that type."""
  if objective.flat_hparams or not dataclasses.fields(objective.Hparams):
    return None
  from ml_collections import config_dict
  import typing

  hints = typing.get_type_hints(objective.Hparams)
  out = {}
  for f in dataclasses.fields(objective.Hparams):
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if default is None:
      kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
      if len(kinds) != 1 or kinds[0] not in (bool, int, float, str):
        raise TypeError(f"{type(objective).__name__}.Hparams.{f.name} defaults to None: type it "
                        "`float | None` (or int / str / bool) so the config can hold it")
      default = config_dict.placeholder(kinds[0])
    out[f.name] = default
  return out


def names(rl_only: bool = True) -> tuple[str, ...]:
  """Registered objective names (by default those config.rl.objective may name)."""
  return tuple(k for k, v in _REGISTRY.items() if v.rl or not rl_only)


def get(name: str) -> Objective:
  if name not in _REGISTRY:
    raise ValueError(f"objective {name!r} is unknown; use one of {names(rl_only=False)} or register "
                     "one (bgpo_jax.objectives.register)")
  return _REGISTRY[name]


class _BatchAxes(Mapping):
  """field name -> batch axis for the arrays whose batch axis is not the first one (`.get(k, 0)`
  for any array), over every registered objective's fields; read at lookup, so an objective
  registered later is covered."""

  def _table(self) -> dict[str, int]:
    table = {f.name: f.batch_axis for f in COMMON_FIELDS + MC_FIELDS}
    for obj in _REGISTRY.values():
      for f in tuple(obj.fields) + tuple(x for x in (obj.old_field, obj.ref_field) if x is not None):
        table[f.name] = f.batch_axis
    return {k: v for k, v in table.items() if v}

  def __getitem__(self, key: str) -> int:
    return self._table()[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._table())

  def __len__(self) -> int:
    return len(self._table())


BATCH_AXIS = _BatchAxes()


# A LoRA step with dropout (StepConfig.lora.dropout > 0) also reads one mask seed per row.
LORA_DROPOUT_FIELD = BatchField("lora_dropout_seeds", ("B",), jnp.uint32)


def batch_layout(cfg) -> tuple[BatchField, ...]:
  """The batch the train step of StepConfig `cfg` reads (its objective's `batch_fields`, and a LoRA
  step's dropout seeds)."""
  fields = tuple(get(cfg.objective).batch_fields(cfg))
  lora = getattr(cfg, "lora", None)
  if lora is not None and lora.dropout > 0:
    fields += (LORA_DROPOUT_FIELD,)
  return fields


def abstract_batch(cfg, *, rows: int, prompt_len: int) -> dict:
  """ShapeDtypeStructs of `batch_layout(cfg)` for `rows` sequences of prompt_len + gen_length."""
  sizes = {"B": rows, "S": prompt_len + cfg.gen_length, "L": cfg.gen_length, "n": cfg.num_mc_samples}
  return {f.name: jax.ShapeDtypeStruct(f.shape(sizes), f.dtype) for f in batch_layout(cfg)}


class ElboObjective(Objective):
  """An objective of the MC ELBO terms l_j (diffusion/elbo.py) on masks shared by the current,
  old and reference policy: its batch carries MC_FIELDS, its old / reference terms are [n, B]."""
  fields = MC_FIELDS
  old_field = BatchField("old_elbo", ("n", "B"), jnp.float32)
  ref_field = BatchField("ref_elbo", ("n", "B"), jnp.float32)

  def old_terms(self, model_cfg, cfg, params, mb: dict) -> jax.Array:
    """ELBO terms [n, mb], one sample at a time (a scan: memory of one sample's forward)."""
    from bgpo_jax.diffusion import elbo

    def unit(_, j):
      return None, elbo.elbo_term(model_cfg, params, mb["tokens"], mb["attention_mask"],
                                  mb["mc_masks"][j], mb["mc_weights"][j])

    _, l = jax.lax.scan(unit, None, jnp.arange(cfg.num_mc_samples))
    return l

  def host_fields(self, inputs: RolloutInputs) -> list[dict]:
    # One draw of masks per rollout batch, shared by every inner update.
    m, w = inputs.masks(inputs.rl.num_mc_samples, inputs.rl.mc_estimator)
    return [{"mc_masks": m, "mc_weights": w}] * inputs.updates


def describe_layout() -> str:
  """The batch layout of every registered objective, one line per array and the objectives that
  carry it (the train step's docstring shows it)."""
  users: dict[tuple, list[str]] = {(f, ""): ["every objective"] for f in COMMON_FIELDS}
  for obj in _REGISTRY.values():
    pairs = [(f, "") for f in obj.fields] + [(obj.old_field, "off-policy: rl.updates_per_batch > 1"),
                                             (obj.ref_field, "rl.kl_beta > 0")]
    for f, when in pairs:
      if f is not None:
        users.setdefault((f, when), []).append(obj.name)
  return "".join(f"  {f.name} [{', '.join(f.dims)}] {jnp.dtype(f.dtype).name}  ({', '.join(names)}"
                 f"{'; ' + when if when else ''})\n" for (f, when), names in users.items())
