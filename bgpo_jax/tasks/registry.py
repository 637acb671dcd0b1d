"""What a task is: one `TaskSpec` per task name, in one registry every module looks up.

    from bgpo_jax.tasks import registry
    registry.get("countdown").instruction      # a spec, or ValueError naming the known tasks
    registry.names()                           # every registered name, in registration order
    registry.register(TaskSpec(name="mytask", ...))   # from your own module (config file)

A name plays one or more roles, read off its spec:
- data task (`is_data_task`): rows read from files (`data.records`) or generated, with the name
  in their `task` field (gsm8k, math, countdown, sudoku, humaneval, mbpp, code);
- grader (`is_grader`): a reward function rewards.grade_batch dispatches to by name; the
  graders are also the eval sets `config.task.eval_tasks` may name (every data task but
  "code", whose rows grade as humaneval or mbpp, plus math500, which reads the math task's
  test split);
- train task (`is_train_task`): a value of `config.task.name`, with the data it trains on and
  the eval sets it is evaluated on by default.

The built-in specs (tasks/builtin.py) register on the first lookup, so this module imports
nothing of bgpo_jax and data/, rewards/ and config.py can use it without an import cycle.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
from typing import Any, Callable, Mapping

# "{prompt}" stands for the row's last user message (data.dataset.apply_instruction).
PROMPT = "{prompt}"
# d1's diffu-GRPO inner updates (mu) for a task its run.sh does not list (config.d1_diffu_grpo).
D1_DEFAULT_INNER_UPDATES = 12


# eq=False: a spec is one task's record, compared (and hashed) by identity; its mappings
# (stems, presets) would make a field-wise hash fail.
@dataclasses.dataclass(frozen=True, eq=False)
class TaskSpec:
  """Everything the framework knows about one task name (module docstring for the roles).

  Data (data.records, data.procedural, data.dataset):
    stems: split -> file-name stems searched in order (<split>_<stem>[-*].parquet / .jsonl);
      a split not listed searches the name itself.
    check_row: (ground truth str, extra dict) -> extra: validates one row of an answer task
      (raise data.records.BadRow with the reason) and returns the extra to store (countdown
      parses its numbers). None: any non-empty answer is accepted.
    code: the ground truth is test code (check(candidate) or an assert list), not an answer;
      rows may use the {prompt, tests[, entry_point]} layout (data.records).
    data_task: the data task whose test split this eval set reads ("" = its own name; math500
      reads "math", whose test stems are test_math500*).
    generate: (n, *, seed, split, **knobs) -> uniform examples, for generated tasks.
    presets: named knob sets of `generate` ("demo": the embedded demo's, "d1": d1-like).
    instruction: the default prompt template, "{prompt}" = the row's last user message.
  Rewards (rewards/):
    grade: (completion, ground truth, extra, *, recipe, verifier) -> (correct, score, reward)
      for an answer grader; `recipe` is the run's choice of `recipes` ("" without any),
      `verifier` the MATH equivalence checker (or None); a grader ignores what it does not
      need. None for a code grader or a data task that grades as others.
    code_case: (completion, ground truth, extra) -> (solution source, rewards.code_tests
      TrustedTest) for a code grader, judged in the sandbox.
    format_score: completion (cut at its end of response) -> well-formedness in [0, 1];
      None = d1's <reasoning>/<answer> layout (rewards.answer_format_score).
    recipes: the training reward recipes this grader offers, its default first.
    grade_as: extra -> the grader of a row of this data task (the "code" task's rows grade as
      humaneval or mbpp by their test format); None = this task's own grader.
    partial_score: the published score can be fractional (sudoku's share of empty cells), so
      rescoring compares scores, not correctness, with another grader's labels.
    d1_names: names d1's evaluation files use for this set ("gsm", "math" for MATH500).
    recover_extra: (ground truth, question text, extra) -> (ground truth, extra): what a saved
      generation without extra_info lacks, from its question (d1's files; bgpo_jax.rescore).
  Training (bgpo_jax.tasks):
    train_on: the data tasks a run of this task trains on (concatenated); () = not a train task.
    eval_sets: the eval sets a run of this task is evaluated on by default.
    train_file: non-empty: the run trains on config.task.train_file, this text saying what the
      file holds (e.g. "a JSONL of {prompt, tests}"); "" = the train split in task.data_dir.
    sft_target: example -> the reference answer SFT trains on; None = no SFT for this task.
    d1_inner_updates: d1's diffu-GRPO mu for this task (config.d1_diffu_grpo).
  """
  name: str
  stems: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  check_row: Callable[[str, dict], dict] | None = None
  code: bool = False
  data_task: str = ""
  generate: Callable[..., list] | None = None
  presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  instruction: str = PROMPT
  grade: Callable[..., tuple[bool, float, float]] | None = None
  code_case: Callable[[str, Any, dict], tuple] | None = None
  format_score: Callable[[str], float] | None = None
  recipes: tuple[str, ...] = ()
  grade_as: Callable[[dict], str] | None = None
  partial_score: bool = False
  d1_names: tuple[str, ...] = ()
  recover_extra: Callable[[Any, str, dict], tuple[Any, dict]] | None = None
  train_on: tuple[str, ...] = ()
  eval_sets: tuple[str, ...] = ()
  train_file: str = ""
  sft_target: Callable[[dict], str] | None = None
  d1_inner_updates: int = D1_DEFAULT_INNER_UPDATES

  @property
  def is_data_task(self) -> bool:
    return not self.data_task

  @property
  def is_grader(self) -> bool:
    return self.grade is not None or self.code_case is not None

  @property
  def is_train_task(self) -> bool:
    return bool(self.train_on)

  @property
  def source(self) -> str:
    """The data task whose rows this name reads (itself, or data_task)."""
    return self.data_task or self.name

  def file_stems(self, split: str) -> tuple[str, ...]:
    return tuple(self.stems.get(split, (self.name,)))

  def grader_of(self, extra: dict) -> str:
    """The grader name of one of this data task's rows (its extra says, for "code")."""
    return self.grade_as(extra) if self.grade_as is not None else self.name


_SPECS: dict[str, TaskSpec] = {}
_BUILTINS = "bgpo_jax.tasks.builtin"
_state = ""  # "" -> "loading" -> "loaded": the built-in specs
# Reentrant: the built-in module's register() calls come back here on the loading thread;
# another thread (the reward grader's) waits until every built-in spec is in.
_LOCK = threading.RLock()


def _load_builtins() -> None:
  global _state
  if _state == "loaded":
    return
  with _LOCK:
    if _state:
      return  # loaded meanwhile, or this thread is loading them
    _state = "loading"
    try:
      importlib.import_module(_BUILTINS)
    except BaseException:
      _state = ""
      raise
    _state = "loaded"


def _check(spec: TaskSpec) -> None:
  if not isinstance(spec, TaskSpec):
    raise TypeError(f"register() takes a TaskSpec, got {type(spec).__name__}")
  if not spec.name or not isinstance(spec.name, str) or "," in spec.name:
    raise ValueError(f"task name {spec.name!r} must be a non-empty string without commas")
  if spec.grade is not None and spec.code_case is not None:
    raise ValueError(f"task {spec.name!r}: give grade (an answer grader) or code_case (a code "
                     "grader), not both")
  if PROMPT not in spec.instruction:
    raise ValueError(f"task {spec.name!r}: instruction {spec.instruction[:60]!r} lacks the "
                     f"'{PROMPT}' placeholder for the question")
  if spec.eval_sets and not spec.train_on:
    raise ValueError(f"task {spec.name!r} has eval_sets but trains on nothing (train_on)")


def register(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
  """Adds `spec` under spec.name (returns it); a name already registered is an error unless
  `replace` (to change a built-in task, register a dataclasses.replace of it)."""
  _check(spec)
  _load_builtins()
  with _LOCK:
    if spec.name in _SPECS and not replace:
      raise ValueError(f"task {spec.name!r} is already registered; pass replace=True to "
                       "replace it")
    _SPECS[spec.name] = spec
  return spec


def find(name: str) -> TaskSpec | None:
  """The spec registered under `name`, or None."""
  _load_builtins()
  return _SPECS.get(name)


def get(name: str) -> TaskSpec:
  """The spec registered under `name`; ValueError naming the known tasks otherwise."""
  spec = find(name)
  if spec is None:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(names())}")
  return spec


def specs() -> tuple[TaskSpec, ...]:
  """Every registered spec, in registration order."""
  _load_builtins()
  return tuple(_SPECS.values())


def names(role: str = "") -> tuple[str, ...]:
  """Registered names in registration order; `role` keeps one kind: "data" (data tasks),
  "grader" (graders = eval sets), "train" (train tasks), "sft" (with an SFT target) or
  "demo" (with a demo preset)."""
  if role not in _ROLES:
    raise ValueError(f"role {role!r} is unknown; use one of {tuple(_ROLES)}")
  return tuple(s.name for s in specs() if _ROLES[role](s))


_ROLES: dict[str, Callable[[TaskSpec], bool]] = {
    "": lambda s: True,
    "data": lambda s: s.is_data_task,
    "grader": lambda s: s.is_grader,
    "train": lambda s: s.is_train_task,
    "sft": lambda s: s.sft_target is not None,
    "demo": lambda s: "demo" in s.presets and s.generate is not None,
}
