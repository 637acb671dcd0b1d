"""bgpo_jax.tools.tiny_checkpoint: a random LLaDA directory in the Hugging Face layout with a real
byte-level BPE tokenizer, LLaDA's special tokens and chat template, that the trainer accepts."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bgpo_jax.models import hf, llada
from bgpo_jax.tokenizer import HFTokenizer
from bgpo_jax.tools import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_llada")
  p = subprocess.run([sys.executable, "-m", "bgpo_jax.tools.tiny_checkpoint", str(path), "--n-layers", "1"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "wrote a random LLaDA checkpoint" in p.stdout
  return path


def test_layout_and_ids_agree(ckpt):
  names = {p.name for p in ckpt.iterdir()}
  assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= names
  cfg = json.loads((ckpt / "config.json").read_text())
  assert cfg["model_type"] == "llada" and cfg["torch_dtype"] == "bfloat16" and cfg["n_layers"] == 1
  tok = HFTokenizer(ckpt)
  # LLaDA's special tokens by content; config.json points at the same ids.
  assert (tok.mask_id, tok.eos_id, tok.pad_id) == (cfg["mask_token_id"], cfg["eos_token_id"], cfg["pad_token_id"])
  assert len(set(tok.special_ids.values())) == 6  # eos = pad; bos, mask, eot, both headers distinct
  assert tok.vocab_size == cfg["vocab_size"] == 512
  model_cfg, params = hf.load(ckpt, dtype=None)
  assert model_cfg.vocab_size == 512 and model_cfg.mask_token_id == tok.mask_id
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == model_cfg.num_params()


def test_tokenizer_is_a_real_bpe_and_roundtrips(ckpt):
  tok = HFTokenizer(ckpt)
  raw = json.loads((ckpt / "tokenizer.json").read_text())
  assert raw["model"]["type"] == "BPE" and len(raw["model"]["merges"]) > 100
  text = "Natalia sold 48 clips: \\boxed{72} ünïcödé ✓\n\tdef f(x): return x"
  ids = tok.encode(text)
  assert tok.decode(ids) == text  # byte-level: any text round-trips
  assert len(ids) < len(text.encode())  # merges: fewer tokens than bytes
  assert tok.encode("<|eot_id|>") == [tok.eot_id]  # special text is one special id


def test_chat_template_is_llada_s(ckpt):
  import jinja2
  tok = HFTokenizer(ckpt)
  cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
  ref = json.loads((ROOT.parent / "shared/reference/llada-8b-instruct/tokenizer_config.json").read_text()) \
      if (ROOT.parent / "shared/reference/llada-8b-instruct/tokenizer_config.json").is_file() else None
  if ref is not None:
    assert cfg["chat_template"] == ref["chat_template"]
  rendered = jinja2.Environment().from_string(cfg["chat_template"]).render(messages=CHAT, bos_token=cfg["bos_token"])
  assert rendered == tok.render_chat(CHAT)  # the file's template = the one the framework renders
  assert tok.apply_chat_template(CHAT)[0] == tok.bos_id


def test_the_trainer_builds_it(ckpt):
  from bgpo_jax import config as config_lib
  from bgpo_jax import tasks as tasks_lib
  from bgpo_jax.train import mesh as mesh_lib
  c = config_lib.base_config()
  c.init.checkpoint = str(ckpt)
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  tok = tasks_lib.build_tokenizer(c)
  model_cfg, params = tasks_lib.build_model(c, tok, mesh)  # checks mask / eos ids against the model
  assert model_cfg.n_layers == 1 and model_cfg.param_dtype == "float32" and params is not None
  logits = llada.forward(model_cfg, params, np.asarray([tok.apply_chat_template(CHAT)], np.int32))
  assert logits.shape[-1] == 512 and np.isfinite(np.asarray(logits)).all()


def test_a_run_records_its_tokenizer_and_architecture(ckpt, tmp_path):
  """The trainer's run.json + tokenizer/ copy: a config whose init.checkpoint is the workdir (or a
  step inside it) finds the tokenizer and the architecture there, not in the preset."""
  from bgpo_jax import checkpoint as ckpt_lib
  from bgpo_jax import config as config_lib
  from bgpo_jax import tasks as tasks_lib
  model_cfg = llada.LLaDAConfig.from_hf(ckpt)
  workdir = tmp_path / "run"
  c = config_lib.base_config()
  c.init.checkpoint = str(ckpt)
  kind, path = tasks_lib.tokenizer_source(c)
  assert (kind, path) == ("hf", str(ckpt))  # a Hugging Face directory: its own tokenizer
  ckpt_lib.write_run_record(str(workdir), model_hf=model_cfg.to_hf_dict(), tokenizer_kind=kind, tokenizer_path=path)
  assert {p.name for p in (workdir / "tokenizer").iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
  for where in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "7"):
    c.init.checkpoint = str(where)
    assert tasks_lib.tokenizer_source(c) == ("hf", str(workdir / "tokenizer"))
    record, root = ckpt_lib.find_run_record(str(where))
    assert root == str(workdir) and llada.LLaDAConfig.from_hf(record["model"]) == model_cfg
  tok = tasks_lib.build_tokenizer(c)
  assert tok.encode("What is 2+2?") == HFTokenizer(ckpt).encode("What is 2+2?")
  c.tokenizer.path = str(ckpt)  # an explicit tokenizer.path still wins
  assert tasks_lib.tokenizer_source(c) == ("hf", str(ckpt))
  assert ckpt_lib.find_run_record(str(ckpt)) is None
