"""Exports a trainer workdir's latest checkpoint for other tools.

  python -m bgpo_jax.tools.export WORKDIR OUT --format=peft   # a LoRA run's adapters, PEFT's files
  python -m bgpo_jax.tools.export WORKDIR OUT --format=hf     # the weights as a Hugging Face checkpoint

peft: `models.lora.save_peft` of the adapters (adapter_config.json + adapter_model.safetensors),
which `PeftModel.from_pretrained(base, OUT)` loads onto the base it was trained on (run.json's
"lora" records it). hf: `models.hf.save` of the params; for a LoRA run the base re-made as the
trainer made it (init.checkpoint re-loaded, or the seed's init) and the adapters merged into it
(`models.lora.merge`, in the base's dtype). A full fine-tuning run has no adapters: peft is refused.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import jax
from etils import epath

from bgpo_jax import checkpoint as ckpt_lib
from bgpo_jax.models import family, lora

FORMATS = ("peft", "hf")


class ExportError(ValueError):
  """A workdir that cannot be exported in the asked format (one line: why and what to do)."""


def read_run(workdir: str) -> tuple[dict, Any, dict]:
  """(run.json's record, the model config, run_config.json's config dict) of a trainer workdir."""
  found = ckpt_lib.find_run_record(workdir)
  config = ckpt_lib.read_run_config(workdir)
  if found is None or config is None or not ckpt_lib.has_checkpoints(workdir):
    raise ExportError(f"{workdir} is not a trainer workdir with checkpoints (run.json, run_config.json, "
                      f"checkpoints/); give the --workdir of a run that saved at least once")
  return found[0], family.config_from_hf(found[0]["model"]), config


def lora_spec(record: dict) -> lora.LoraSpec | None:
  """The LoraSpec run.json records for a LoRA run, None for full fine-tuning."""
  r = record.get("lora")
  return None if r is None else lora.LoraSpec(r=r["r"], alpha=r["alpha"], targets=tuple(r["targets"]),
                                              dropout=r["dropout"])


def _on_device(shapes: Any) -> Any:
  # Restored onto one device (Orbax would otherwise read the saved topology's sharding).
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), shapes)


def latest_adapters(workdir: str, model_cfg, spec: lora.LoraSpec, config: dict) -> Any:
  """The adapters of the latest checkpoint of a LoRA run, in model.param_dtype."""
  dtype = jax.numpy.dtype(config["model"]["param_dtype"])
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), lora.adapter_shapes(model_cfg, spec),
                        is_leaf=lambda s: isinstance(s, tuple))
  return ckpt_lib.restore_params(workdir, _on_device(shapes))


def lora_base(record: dict, model_cfg, config: dict) -> Any:
  """A LoRA run's frozen base, made as train.run made it: init.checkpoint re-loaded (a Hugging
  Face directory or a full fine-tuning trainer checkpoint), or the seed's random init, cast to
  lora.base_dtype; refused when its fingerprint differs from the one the run recorded."""
  from bgpo_jax.models import hf
  from bgpo_jax.train import run as run_lib
  from bgpo_jax.train.rng import RngStreams

  info = record["lora"]
  dtype = jax.numpy.dtype(info["dtype"])
  param_dtype = jax.numpy.dtype(config["model"]["param_dtype"])
  module = family.module_for(model_cfg)
  if "init.checkpoint" in info["source"]:
    path = info["source"]["init.checkpoint"]
    if (epath.Path(path) / "config.json").exists():
      _, params = hf.load(path, dtype=None)
      params = jax.tree.map(lambda p: p.astype(param_dtype), params)
    else:
      shapes = jax.eval_shape(lambda: module.init_params(model_cfg, jax.random.key(0)))
      params = ckpt_lib.restore_params(path, _on_device(shapes))
    base = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p))(params)
  else:
    rng = RngStreams(int(info["source"]["seed"])).key("init")
    base = jax.jit(lambda r: jax.tree.map(lambda x: x.astype(dtype), module.init_params(model_cfg, r)))(rng)
  got = run_lib.base_fingerprint(base)
  if got != info["fingerprint"]:
    raise ExportError(f"the base {info['source']} re-made now has fingerprint {got}, not the run's "
                      f"{info['fingerprint']}: its files changed since training; restore them, or export "
                      f"--format=peft and apply the adapters to the base you have")
  return base


def export(workdir: str, out: str, fmt: str) -> str:
  """Writes the latest checkpoint of `workdir` to `out` in `fmt` ("peft" / "hf"); returns a line
  saying what was written."""
  if fmt not in FORMATS:
    raise ExportError(f"--format={fmt!r} is unknown; use one of {FORMATS}")
  record, model_cfg, config = read_run(workdir)
  spec = lora_spec(record)
  step = ckpt_lib.checkpoint_step(workdir)
  if spec is None:
    if fmt == "peft":
      raise ExportError(f"{workdir} is a full fine-tuning run (config.lora.rank 0): it has no adapters; "
                        f"use --format=hf")
    shapes = jax.eval_shape(lambda: family.module_for(model_cfg).init_params(model_cfg, jax.random.key(0)))
    dtype = jax.numpy.dtype(config["model"]["param_dtype"])
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)
    params = ckpt_lib.restore_params(workdir, _on_device(shapes))
    from bgpo_jax.models import hf
    hf.save(model_cfg, params, out)
    return f"wrote the step {step} weights of {workdir} as a Hugging Face checkpoint to {out}"
  adapters = latest_adapters(workdir, model_cfg, spec, config)
  if fmt == "peft":
    src = record["lora"]["source"].get("init.checkpoint")
    lora.save_peft(adapters, model_cfg, spec, out, base_model_name_or_path=src)
    return f"wrote the step {step} LoRA adapters (r={spec.r}) of {workdir} as a PEFT adapter to {out}"
  from bgpo_jax.models import hf
  merged = lora.merge(model_cfg, lora_base(record, model_cfg, config), adapters, spec)
  hf.save(model_cfg, merged, out)
  return f"wrote the step {step} base + merged LoRA adapters of {workdir} as a Hugging Face checkpoint to {out}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m bgpo_jax.tools.export", description=__doc__.split("\n\n")[0])
  p.add_argument("workdir", help="the trainer's --workdir")
  p.add_argument("out", help="the directory to write")
  p.add_argument("--format", choices=FORMATS, default="hf", help="peft: a LoRA run's adapters; hf: the weights")
  args = p.parse_args(argv)
  try:
    print(export(args.workdir, args.out, args.format))
  except (ExportError, lora.PeftFileError) as e:
    print(f"export: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
