"""LoRA adapters against Hugging Face PEFT on the official LLaDA / Dream modeling code: (a) PEFT
loads an adapter we wrote (lora.save_peft) and gives our logits; (b) we load an adapter PEFT
wrote (get_peft_model, random non-zero lora_B, save_pretrained) and give PEFT's logits.

  python -m bgpo_jax.benchmarks.peft_interop --torch-python /tmp/torchvenv/bin/python \\
      --llada-code DIR --dream-code DIR [--json out.json]

DIR holds a family's remote code as released with its checkpoint (modeling_llada.py +
configuration_llada.py; modeling_dream.py + configuration_dream.py + generation_utils*.py); the
driver copies it next to a tiny random checkpoint (float32, our export `hf.save`) whose
config.json's auto_map points at it, and loads that with AutoModel(trust_remote_code=True).

Two interpreters: the driver (this venv: JAX, bgpo_jax) writes the checkpoint, our adapter and
our logits, and runs this same file as a script under --torch-python (torch, transformers, peft;
torch is never a dependency of bgpo_jax), whose side imports nothing of bgpo_jax or JAX. Neither
side's imports are at module level.

What the torch side works around in the remote code (nothing of the math): modeling_llada.py
reads `block.flash_attn_with_kvcache`, which it sets only when flash_attention is on (it is set
to None here); modeling_dream.py imports `flash_attn` unconditionally although its SDPA path
(used here) never calls it (an empty stand-in module is registered), and loading Dream needs a
generation_config.json (a minimal one is written). The remote code predates transformers 5:
run it with transformers 4.x (4.57 checked).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

# Per case: family, LoRA targets (HF module names), rank, alpha. d1's list selects only q / k / v /
# up on LLaDA; LLaDA's own names for all seven include "ff_out", which PEFT's suffix rule would also
# put on the head: our export writes a regular expression instead.
D1_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
CASES = [
  ("llada", D1_TARGETS, 8, 16.0),
  ("llada", ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"], 8, 16.0),
  ("dream", D1_TARGETS, 8, 16.0),
]
B_STD = 0.05  # random lora_B (non-zero, so the adapters change the logits)


# -----------------------------------------------------------------------------------------------
# Torch side (run under --torch-python; imports torch / transformers / peft only)


def _load_official(model_dir: str, family: str):
  import importlib.machinery
  import importlib.util
  import types

  import torch
  from transformers import AutoModel

  if family == "dream" and importlib.util.find_spec("flash_attn") is None:
    stub = types.ModuleType("flash_attn")
    stub.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)  # transformers probes it
    stub.flash_attn_func = stub.flash_attn_varlen_func = stub.flash_attn_with_kvcache = None
    sys.modules["flash_attn"] = stub
  kwargs = {"attn_implementation": "sdpa"} if family == "dream" else {}
  model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32, **kwargs)
  if family == "llada":
    for blk in model.model.transformer.blocks:
      if not hasattr(blk, "flash_attn_with_kvcache"):
        blk.flash_attn_with_kvcache = None
  return model.eval()


def _logits(model, tokens):
  import torch
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def torch_side(job: dict) -> dict:
  """The official model: base logits; with our adapter (PeftModel.from_pretrained); with a PEFT
  adapter of the same config and random non-zero lora_B, saved to job["peft_dir"]."""
  import numpy as np
  import peft
  import torch
  import transformers

  family, tokens = job["family"], job["tokens"]
  base_model = _load_official(job["model_dir"], family)
  base = _logits(base_model, tokens)
  ours = peft.PeftModel.from_pretrained(base_model, job["ours_dir"]).eval()
  n_ours = sum(1 for n, _ in ours.named_modules() if n.endswith(".lora_A"))
  with_ours = _logits(ours, tokens)

  with open(os.path.join(job["ours_dir"], "adapter_config.json")) as f:
    written = json.load(f)
  cfg = peft.LoraConfig(r=written["r"], lora_alpha=written["lora_alpha"], lora_dropout=written["lora_dropout"],
                        target_modules=written["target_modules"], task_type="CAUSAL_LM")
  torch.manual_seed(job["seed"])
  theirs = peft.get_peft_model(_load_official(job["model_dir"], family), cfg).eval()
  n_theirs = 0
  for name, module in theirs.named_modules():
    if name.endswith(".lora_B"):
      torch.nn.init.normal_(module["default"].weight, std=B_STD)
      n_theirs += 1
  peft_logits = _logits(theirs, tokens)
  theirs.save_pretrained(job["peft_dir"])
  np.savez(job["out"], base=base, with_ours=with_ours, peft=peft_logits)
  return {"lora_modules_ours": n_ours, "lora_modules_peft": n_theirs, "torch": torch.__version__,
          "transformers": transformers.__version__, "peft": peft.__version__}


# -----------------------------------------------------------------------------------------------
# Driver (this venv: JAX, bgpo_jax)


def _write_checkpoint(family: str, code_dir: str, out_dir: str):
  """A tiny random float32 checkpoint of `family` in the HF layout plus its remote code."""
  import jax
  import numpy as np

  from bgpo_jax.models import dream, hf, llada, transformer

  if family == "llada":  # n_kv_heads = n_heads as in LLaDA-8B
    cfg = llada.LLaDAConfig.preset("tiny", n_layers=2, n_kv_heads=4)
  else:
    cfg = dream.DreamConfig.preset("tiny", n_layers=2)
  params = transformer.init_params(cfg, jax.random.key(0))
  hf.save(cfg, params, out_dir, dtype=np.float32)
  for name in os.listdir(code_dir):
    if name.endswith(".py"):
      shutil.copy(os.path.join(code_dir, name), out_dir)
  if family == "dream" and not os.path.exists(os.path.join(out_dir, "generation_config.json")):
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump({"_from_model_config": True}, f)
  return cfg, params


def _shift(logits):
  """HF Dream's logits[:, i] score token i + 1; ours (a shifted family) score token i."""
  import numpy as np
  return np.concatenate([logits[:, :1], logits[:, :-1]], axis=1)


def run_case(family: str, targets: list, r: int, alpha: float, code_dir: str, torch_python: str, work: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bgpo_jax.models import lora, transformer

  case_dir = tempfile.mkdtemp(prefix=f"{family}_", dir=work)
  model_dir, ours_dir, peft_dir = (os.path.join(case_dir, d) for d in ("model", "ours", "peft"))
  cfg, params = _write_checkpoint(family, code_dir, model_dir)
  spec = lora.LoraSpec(r=r, alpha=alpha, targets=tuple(targets), dropout=0.05)
  adapters = lora.init_adapters(cfg, spec, jax.random.key(1))
  rng = np.random.default_rng(2)
  adapters = {k: {"a": ab["a"], "b": jnp.asarray(B_STD * rng.standard_normal(ab["b"].shape), jnp.float32)}
              for k, ab in adapters.items()}
  lora.save_peft(adapters, cfg, spec, ours_dir)
  tokens = rng.integers(3, cfg.vocab_size, (2, 16)).tolist()

  def ours(p, a=None, s=None):
    return np.asarray(jax.jit(lambda p, a: transformer.forward(cfg, p, jnp.asarray(tokens), adapters=a,
                                                               lora_scale=s))(p, a))

  job = {"family": family, "model_dir": model_dir, "ours_dir": ours_dir, "peft_dir": peft_dir, "tokens": tokens,
         "seed": 3, "out": os.path.join(case_dir, "torch.npz")}
  p = subprocess.run([torch_python, os.path.abspath(__file__), "torch", json.dumps(job)], capture_output=True,
                     text=True, timeout=600)
  if p.returncode:
    raise RuntimeError(f"torch side failed for {family}:\n{p.stderr[-4000:]}")
  info = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
  t = dict(np.load(job["out"]))
  if family == "dream":
    t = {k: _shift(v) for k, v in t.items()}
  base = ours(params)
  with_ours = ours(params, adapters, spec.scale)
  peft_adapters, peft_spec = lora.load_peft(peft_dir, cfg)
  with_peft = ours(params, peft_adapters, peft_spec.scale)
  merged_peft = ours(lora.merge(cfg, params, peft_adapters, peft_spec))
  diff = lambda x, y: float(np.abs(x - y).max())  # noqa: E731
  return {
    "family": family, "targets": ",".join(targets), "adapted": ",".join(lora.targets_of(cfg, spec.targets)),
    "lora_modules": f"{info['lora_modules_ours']}/{info['lora_modules_peft']}",
    "base_diff": diff(base, t["base"]),
    "a_peft_loads_ours": diff(with_ours, t["with_ours"]),
    "b_ours_loads_peft": diff(with_peft, t["peft"]),
    "b_merged": diff(merged_peft, t["peft"]),
    "adapter_effect": min(diff(with_ours, base), diff(t["peft"], t["base"])),
    "max_abs_logit": float(np.abs(t["peft"]).max()),
    "versions": {k: info[k] for k in ("torch", "transformers", "peft")},
  }


def main(argv=None) -> list:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--torch-python", required=True, help="python with torch, transformers 4.x and peft")
  ap.add_argument("--llada-code", help="dir with modeling_llada.py and configuration_llada.py")
  ap.add_argument("--dream-code", help="dir with modeling_dream.py, configuration_dream.py, generation_utils*.py")
  ap.add_argument("--json", help="write the rows here")
  a = ap.parse_args(argv)
  from bgpo_jax.benchmarks.common import print_table, write_json

  code = {"llada": a.llada_code, "dream": a.dream_code}
  rows = []
  with tempfile.TemporaryDirectory(prefix="peft_interop_") as work:
    for family, targets, r, alpha in CASES:
      if code[family]:
        rows.append(run_case(family, targets, r, alpha, code[family], a.torch_python, work))
  print_table(rows, ["family", "targets", "adapted", "lora_modules", "base_diff", "a_peft_loads_ours",
                     "b_ours_loads_peft", "b_merged", "adapter_effect", "max_abs_logit"],
              title="LoRA adapters vs PEFT on the official modeling code (max |logit difference|, float32)")
  if rows:
    print("versions:", rows[0]["versions"])
  write_json(a.json, rows)
  return rows


if __name__ == "__main__":
  if len(sys.argv) > 2 and sys.argv[1] == "torch":
    print("RESULT " + json.dumps(torch_side(json.loads(sys.argv[2]))), flush=True)
  else:
    main()
