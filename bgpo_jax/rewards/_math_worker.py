"""math-verify worker process: reads JSON requests from stdin, writes JSON answers to stdout.

Run as a script by `bgpo_jax.rewards.math_reward` (never imported by the package). math-verify
bounds its work with signal.alarm, which only works in a process's main thread; this worker
runs each comparison in its own main thread, so those timeouts apply, while the parent adds a
hard wall-clock limit (kill + restart) for hangs that signals cannot interrupt (C code).

Request: {"gold": latex, "pred": latex, "timeout": int seconds}. Answer: {"ok": bool}
or {"ok": false, "error": "..."}. Both answers are parsed with the LaTeX extractor only
(`\\boxed{...}` wrapping is done by the caller): no sympy `parse_expr` (an eval-based parser)
ever sees model output.
"""

import json
import logging
import resource
import sys


def main() -> None:
  # Big symbolic expressions must not eat the machine: cap this process's address space.
  mem = int(sys.argv[1]) * 1024 * 1024 if len(sys.argv) > 1 else 4 << 30
  resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  logging.disable(logging.CRITICAL)  # math-verify warns on stderr about parse failures
  from math_verify import LatexExtractionConfig, parse, verify

  config = [LatexExtractionConfig(boxed_match_priority=0)]
  out = sys.stdout
  out.write(json.dumps({"ready": True}) + "\n")
  out.flush()
  for line in sys.stdin:
    try:
      req = json.loads(line)
      t = max(1, int(req.get("timeout", 5)))
      gold = parse(req["gold"], extraction_config=config, parsing_timeout=t)
      pred = parse(req["pred"], extraction_config=config, parsing_timeout=t)
      ok = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=t))
      ans = {"ok": ok}
    except BaseException as e:  # noqa: BLE001 - a bad answer must not kill the worker
      if isinstance(e, KeyboardInterrupt):
        raise
      ans = {"ok": False, "error": repr(e)[:200]}
    out.write(json.dumps(ans) + "\n")
    out.flush()


if __name__ == "__main__":
  main()
