"""HumanEval / MBPP rewards: the solution a completion holds, and the test it is judged by.

Solution code extraction (`extract_code`): with fenced blocks, the last Python (or unlabeled)
block that defines the function under test (`def <name>(`), else the longest block; without
fences, the text between MBPP's `[BEGIN]` / `[DONE]` markers when present (quotes around it
stripped), else the whole completion. A truncated final fence counts up to the end.

HumanEval: the function signature and docstring live in the user prompt ("Complete the
following python code:\\n<code>"), which the data rows keep in `prompt`, not in `extra_info`;
callers pass it as `extra["prompt"]` (a string or the chat-message list). The entry point is
`extra["entry_point"]` or the last top-level `def` of the prompt code. The solution source is
prompt code + completion code (a full re-definition overrides the stub; an indented body
continues it). The test is the ground truth (defines `check(candidate)`), called with the entry
point. MBPP: the solution is the completion code; the test is the ground truth's assert lines
(a JSON list) after the row's `test_setup_code`.

`code_case` returns (solution source, TrustedTest): the solution runs in the sandbox as module
`__solution__` (so `if __name__ == "__main__":` demo blocks do not run), the test in the grading
process (rewards.code_tests, rewards.judge).
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from bgpo_jax.rewards.code_tests import TrustedTest, humaneval_test, mbpp_test
from bgpo_jax.rewards.extract import code_blocks

_DEF_RE = r"^\s*(?:async\s+)?def\s+{name}\s*\("


def _defines(code: str, name: str | None) -> bool:
  return bool(name) and re.search(_DEF_RE.format(name=re.escape(name)), code, re.M) is not None


def extract_code(completion: str, func_name: str | None = None) -> str:
  """The solution code in a completion (see the module docstring for the rules)."""
  blocks = code_blocks(completion)
  if blocks:
    defining = [b for b in blocks if _defines(b, func_name)]
    return defining[-1] if defining else max(blocks, key=len)
  text = completion
  if "[BEGIN]" in text:
    text = text.split("[BEGIN]", 1)[1]
  if "[DONE]" in text:
    text = text.split("[DONE]", 1)[0]
  stripped = text.strip()
  if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
    text = stripped[1:-1]  # MBPP few-shot answers are quoted: [BEGIN] 'def f(...): ...' [DONE]
  return text.replace("\r\n", "\n")


def _prompt_text(prompt: Any) -> str:
  """The last user turn of a chat prompt (list of {role, content}) or the string itself."""
  if isinstance(prompt, str):
    return prompt
  msgs = list(prompt)
  users = [m for m in msgs if m.get("role") == "user"] or msgs
  return str(users[-1]["content"]) if users else ""


def humaneval_prompt_code(prompt: Any) -> str:
  """The Python code part of a HumanEval prompt (drops the instruction line before it)."""
  text = _prompt_text(prompt)
  blocks = code_blocks(text)
  if blocks:
    return blocks[-1]
  lines = text.splitlines(keepends=True)
  for i, line in enumerate(lines):
    if re.match(r"(from|import|def|class|async def)\b|@|#", line):
      code = "".join(lines[i:])
      # A rendered chat template may follow the code (<|eot_id|>...): cut it off.
      return code.split("<|", 1)[0]
  return text


def entry_point_of(code: str) -> str | None:
  """Name of the last top-level function defined in `code`."""
  try:
    names = [n.name for n in ast.parse(code).body
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
  except SyntaxError:
    names = re.findall(r"^(?:async\s+)?def\s+(\w+)\s*\(", code, re.M)
  return names[-1] if names else None


def humaneval_case(completion: str, tests: str, extra: dict | None = None) -> tuple[str, TrustedTest]:
  extra = extra or {}
  prompt_code = humaneval_prompt_code(extra["prompt"]) if extra.get("prompt") is not None else ""
  entry = extra.get("entry_point") or entry_point_of(prompt_code)
  code = extract_code(completion, entry)
  if entry is None:
    entry = entry_point_of(code)
  if entry is None:
    raise ValueError("humaneval needs the function name: pass extra['prompt'] (the prompt with "
                     "the signature) or extra['entry_point']")
  if _defines(code, entry) or not prompt_code:
    solution = prompt_code + "\n\n" + code if prompt_code else code
  else:
    solution = prompt_code.rstrip("\n") + "\n" + code  # body continuation of the stub
  return solution, humaneval_test(prompt_code, tests, entry)


def mbpp_asserts(ground_truth: Any) -> list[str]:
  if isinstance(ground_truth, str):
    try:
      parsed = json.loads(ground_truth)
    except json.JSONDecodeError:
      parsed = [l for l in ground_truth.splitlines() if l.strip()]
  else:
    parsed = list(ground_truth)
  if isinstance(parsed, str):
    parsed = [parsed]
  return [str(a) for a in parsed]


def mbpp_case(completion: str, ground_truth: Any, extra: dict | None = None) -> tuple[str, TrustedTest]:
  asserts = mbpp_asserts(ground_truth)
  m = re.search(r"assert\s+(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", " ".join(asserts))
  code = extract_code(completion, m.group(1) if m else None)
  setup = (extra or {}).get("test_setup_code") or ""
  return code, mbpp_test(tuple(asserts), str(setup))


def code_case(task: str, completion: str, ground_truth: Any,
              extra: dict | None = None) -> tuple[str, TrustedTest]:
  """(solution source, TrustedTest) of a code task row ("humaneval" or "mbpp"); raises
  rewards.code_tests.Unrewritable when the row's test cannot be judged safely."""
  if task == "humaneval":
    return humaneval_case(completion, str(ground_truth), extra)
  if task == "mbpp":
    return mbpp_case(completion, ground_truth, extra)
  raise ValueError(f"{task!r} is not a code task (humaneval, mbpp)")
