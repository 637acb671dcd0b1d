"""benchmarks.official through forward --llada-modeling and sampler --fast-dllm: their rows and JSON
on the tiny model, with a stand-in for the torch server (no torch here)."""
import json

import numpy as np
import pytest

from bgpo_jax.benchmarks import forward, official, sampler


class FakePeer:
  """Answers like torch_official.py's server: fixed seconds; the sampler rows' tokens are the
  prompt followed by zeros (so they differ from ours), checked against the job's lengths."""

  jobs = []

  def __init__(self, python, job):
    self.job = job
    FakePeer.jobs.append(job)
    self.info = {"torch": "fake", "threads": 1}
    self.prompt = np.load(job["inputs"])["prompt"]

  def run(self, name):
    out = {"seconds": 0.5}
    if name in ("generate", "prefix", "dual"):
      gen = self.job["gen_length"] if name == "generate" else self.job["cache_gen_length"]
      prompt = self.prompt[:1] if name == "generate" else self.prompt  # Fast-dLLM: every row
      out["tokens"] = np.concatenate([prompt, np.zeros((len(prompt), gen), np.int32)], 1).tolist()
      if name != "generate":
        out["nfe"] = self.job["cache_steps"] * len(prompt)
    return out

  def peak(self):
    return 1e11

  def close(self):
    pass


@pytest.fixture
def fake_peer(monkeypatch):
  FakePeer.jobs = []
  monkeypatch.setattr(official, "TorchPeer", FakePeer)
  return FakePeer


def test_forward_official_rows_and_json(tmp_path, fake_peer):
  out = tmp_path / "fwd.json"
  rows = forward.main(["--preset", "tiny", "--batch", "1", "--seq", "32", "--resp", "8", "--pad", "2",
                       "--repeats", "1", "--torch-python", "python", "--llada-modeling", "DIR",
                       "--llada-generate", "FILE", "--gen-official", "16,16,8", "--out", str(out)])
  assert [r["row"] for r in rows] == ["fwd", "fwd+bwd elbo", "fwd+bwd plain",
                                      "generate 16 tok / 16 steps / block 8"]
  for r in rows:
    assert r["ours_s"] > 0 and r["theirs_s"] == 0.5 and r["speedup"] == pytest.approx(0.5 / r["ours_s"])
    assert r["theirs"] == "official LLaDA"
  assert rows[0]["MFU_ours"] > 0 and rows[0]["MFU_theirs"] > 0
  assert rows[-1]["tokens_equal"] is False  # the stand-in's zeros
  job = fake_peer.jobs[0]
  assert (job["llada_modeling"], job["llada_generate"], job["mask_id"]) == ("DIR", "FILE", 2)
  assert [r["row"] for r in json.loads(out.read_text())] == [r["row"] for r in rows]
  # The checkpoint the torch side loads is the official layout.
  with pytest.raises(SystemExit):
    forward.main(["--preset", "tiny", "--llada-modeling", "DIR"])  # no --torch-python


def test_sampler_official_rows_and_json(tmp_path, fake_peer):
  out = tmp_path / "s.json"
  rows = sampler.main(["--models", "tiny", "--gen-lengths", "16", "--block-length", "8", "--prompt-len", "8",
                       "--repeats", "1", "--torch-python", "python", "--fast-dllm", "DIR", "--out", str(out)])
  assert [r["row"] for r in rows] == ["prefix 16 tok / 8 steps / block 8", "dual 16 tok / 8 steps / block 8"]
  for r in rows:
    assert r["theirs"] == "Fast-dLLM" and r["nfe_theirs"] == 8 and r["tokens_equal"] is False
  assert len(json.loads(out.read_text())) == 2
  # Several prompt rows: ours in one call, the stand-in (as Fast-dLLM) one call per row.
  rows = sampler.main(["--models", "tiny", "--gen-lengths", "16", "--block-length", "8", "--prompt-len", "8",
                       "--repeats", "1", "--torch-python", "python", "--fast-dllm", "DIR", "--cache-batch", "2"])
  assert [r["row"] for r in rows] == ["prefix 16 tok / 8 steps / block 8, 2 rows", "dual 16 tok / 8 steps / block 8, 2 rows"]
  assert all(r["nfe_theirs"] == 16 and r["tokens_equal"] is False for r in rows)


def test_peer_checkpoint_is_the_official_layout(tmp_path):
  from bgpo_jax.models import llada
  import jax
  c = llada.LLaDAConfig.preset("tiny", n_layers=1)
  p = llada.init_params(c, jax.random.key(0))
  z = np.zeros((1, 4), np.int32)
  ckpt, inputs = official.write_peer_inputs(c, p, str(tmp_path), z, z, z, np.ones(1), z)
  index = json.loads((tmp_path / "checkpoint" / "model.safetensors.index.json").read_text())
  assert "model.transformer.blocks.0.q_proj.weight" in index["weight_map"]
  assert set(np.load(inputs).files) == {"tokens", "attn", "masked", "weight", "prompt"}
