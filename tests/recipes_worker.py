"""Worker for test_recipes.py (run as one subprocess with 8 forced CPU devices; not collected).

argv[1]: JSON {"entries": [{"name", "config", "overrides": ["--config.k=v", ...]}], "out": FILE,
"root": DIR, "eval_workdir_of": [NAME, ...]}. Each entry's config file and overrides are parsed by
ml_collections' config_flags exactly as `python -m bgpo_jax.main --config=FILE --config.k=v`
parses them (one flag per entry: --config_<i>), then trained with the trainer in its own
workdir. For each entry named in eval_workdir_of, `bgpo_jax.evaluate.run_eval` then evaluates the
run's WORKDIR (as the README's command does) and the worker compares its per-example completions
with an evaluation of the trainer's final params in memory. Writes one JSON result per entry.
"""

import json
import os
import sys
import time
import traceback

from absl import flags
from ml_collections import config_flags


def main() -> None:
  spec = json.loads(sys.argv[1])
  entries = spec["entries"]
  argv = ["recipes_worker"]
  for i, e in enumerate(entries):
    config_flags.DEFINE_config_file(f"config_{i}", None, "config file", lock_config=True)
    argv.append(f"--config_{i}={e['config']}")
    for o in e["overrides"]:
      if not o.startswith("--config."):
        raise ValueError(f"override {o!r} must start with --config.")
      argv.append(f"--config_{i}." + o[len("--config."):])
  sys.argv = argv  # config_flags reads the overrides from sys.argv, as under app.run
  flags.FLAGS(argv)

  import jax
  # The entries share their shapes (same tiny model, shrunk lengths): programs identical across
  # entries (the samplers, the BGPO step) compile once and come from the cache afterwards.
  jax.config.update("jax_compilation_cache_dir", os.path.join(spec["root"], "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  from bgpo_jax import tasks as tasks_lib
  from bgpo_jax.evaluate import run_eval
  from bgpo_jax.metrics import read_metrics
  from bgpo_jax.train.loop import train
  from bgpo_jax.train.run import build_run

  results = []
  for i, e in enumerate(entries):
    config = getattr(flags.FLAGS, f"config_{i}")
    workdir = os.path.join(spec["root"], e["name"])
    r = {"name": e["name"], "devices": jax.device_count(), "mesh": list(config.mesh.shape)}
    t0 = time.time()
    try:
      trainer = build_run(config, workdir)
      r["mesh_resolved"] = [int(v) for v in trainer.mesh.devices.shape]
      if trainer.lora is not None:
        r["lora"] = {"r": trainer.lora.spec.r, "dropout": trainer.lora.spec.dropout,
                     "sampler_weights": config.lora.sampler_weights}
      summary = train(trainer)
      r.update(ok=True, summary={k: v for k, v in summary.items() if isinstance(v, (int, float))},
               metrics=read_metrics(workdir), eval_sizes={n: len(ds) for n, ds in trainer.task.evals.items()})
      if e["name"] in spec.get("eval_workdir_of", ()):
        mine: list = []
        tasks_lib.evaluate(trainer.eval_sampler, trainer.task, trainer.sampling_params(), rng=jax.random.key(0),
                           num_examples=config.eval.num_examples, batch_size=config.eval.batch_size,
                           records=mine)
        ev_cfg = config.copy_and_resolve_references()
        with ev_cfg.unlocked():
          ev_cfg.init.checkpoint = ""
        out = os.path.join(spec["root"], f"eval_of_{e['name']}.jsonl")
        res = run_eval(ev_cfg, workdir, out, progress=False)
        theirs = [json.loads(line) for line in open(out)]
        r["eval_workdir"] = {
            "accuracy": res["eval/accuracy"], "trainer_accuracy": summary.get("eval/accuracy"),
            "records": len(theirs), "same_completions": [a["completion"] for a in mine] == [b["completion"] for b in theirs],
            "same_indices": [a["index"] for a in mine] == [b["index"] for b in theirs],
            "run_json": sorted(os.listdir(workdir))}
    except Exception as ex:  # noqa: BLE001 -- reported per entry, the test asserts on it
      r.update(ok=False, error=f"{type(ex).__name__}: {ex}", traceback=traceback.format_exc()[-3000:])
    r["wall_s"] = time.time() - t0
    results.append(r)
    print(f"recipe {e['name']}: {'ok' if r['ok'] else r['error'][:300]} ({r['wall_s']:.1f} s)", flush=True)
  with open(spec["out"], "w") as f:
    json.dump(results, f, default=float)


if __name__ == "__main__":
  main()
