"""Tasks: what each task is, and from a config to the run's pieces.

  registry.py    TaskSpec, register / get / names: one record per task name, looked up by
                 data/, rewards/, config.py and the modules below
  builtin.py     the built-in specs (gsm8k, math, math500, countdown, sudoku, humaneval, mbpp,
                 code), registered on the first lookup
  setup.py       config -> tokenizer, model weights, rollout samplers, reward options,
                 compilation cache
  prompts.py     config -> Task: the run's RL / SFT prompt batches and eval sets; SFT targets
  evaluation.py  rollouts and their rewards for a train step; evaluation passes

A task of your own: one module with its spec (data check or generator, grader, ...) that calls
`bgpo_jax.tasks.register(TaskSpec(...))`, imported by your config file
(bgpo_jax/tasks/registry.py documents every field; builtin.py holds examples).

Everything is importable from here (`from bgpo_jax import tasks; tasks.build_task(...)`). The
run modules load on first use: they import jax, the models and data/, which themselves import
the registry from this package, so loading them here eagerly would be an import cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from bgpo_jax.tasks.registry import TaskSpec, find, get, names, register, specs

# name -> the module (of this package) that defines it
_LAZY = {
    "tokenizer_source": "setup", "build_tokenizer": "setup", "build_model": "setup", "model_knobs": "setup",
    "build_rollout_sampler": "setup", "enable_compilation_cache": "setup",
    "reward_kwargs": "setup",
    "Task": "prompts", "build_task": "prompts", "sft_target": "prompts",
    "rollout_and_score": "evaluation", "evaluate": "evaluation",
}

__all__ = ["TaskSpec", "find", "get", "names", "register", "specs", *_LAZY]

if TYPE_CHECKING:
  from bgpo_jax.tasks.evaluation import evaluate, rollout_and_score
  from bgpo_jax.tasks.prompts import Task, build_task, sft_target
  from bgpo_jax.tasks.setup import (build_model, model_knobs, build_rollout_sampler, build_tokenizer,
                                    enable_compilation_cache, reward_kwargs, tokenizer_source)


def __getattr__(name: str):
  module = _LAZY.get(name)
  if module is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
  globals()[name] = value  # later lookups (and monkeypatching) see a plain attribute
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))
