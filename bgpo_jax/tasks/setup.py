"""Run setup from a config: the tokenizer, the model weights, the rollout samplers, the reward
options and JAX's compilation cache.

Shared by the trainer (main.py) and the evaluation command (evaluate.py), so both read a config
the same way.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from etils import epath

from bgpo_jax import config as config_lib
from bgpo_jax import rewards as rewards_lib
from bgpo_jax import rollout as rollout_lib
from bgpo_jax.models import family, llada
from bgpo_jax.tokenizer import CharTokenizer, load_tokenizer

# ------------------------------------------------------------------------------------ tokenizer


def _run_record(config):
  """(run.json record, workdir) when config.init.checkpoint is a run of this trainer, else None."""
  from bgpo_jax import checkpoint as ckpt_lib
  path = config.init.checkpoint
  if not path or (epath.Path(path) / "config.json").exists():
    return None  # a Hugging Face directory holds its own tokenizer and config
  return ckpt_lib.find_run_record(path)


def tokenizer_source(config) -> tuple[str, str]:
  """(kind, directory) of the run's tokenizer: config.tokenizer.path, else the tokenizer a
  trainer workdir recorded (WORKDIR/tokenizer, when init.checkpoint is a run), else
  init.checkpoint itself (a Hugging Face directory)."""
  if config.tokenizer.kind == "char":
    return "char", ""
  if config.tokenizer.path:
    return "hf", config.tokenizer.path
  found = _run_record(config)
  if found is not None:
    record, workdir = found
    tok = record.get("tokenizer", {})
    if tok.get("kind") == "char":
      return "char", ""
    if tok.get("path"):
      return "hf", str(epath.Path(workdir) / tok["path"])
  return "hf", config.init.checkpoint


def build_tokenizer(config):
  kind, path = tokenizer_source(config)
  if kind == "char":
    return CharTokenizer()
  if "://" in path:  # HF tokenizers reads local files: copy the small files down
    import tempfile
    local = epath.Path(tempfile.mkdtemp(prefix="bgpo_tok_"))
    for f in epath.Path(path).iterdir():
      if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt")):
        (local / f.name).write_bytes(f.read_bytes())
    path = str(local)
  return load_tokenizer(path)


# ------------------------------------------------------------------------------------ model


def model_knobs(config) -> dict:
  """The model config's precision and memory settings from config.model (the architecture comes
  from the preset or the checkpoint)."""
  m = config.model
  return dict(param_dtype=m.param_dtype, compute_dtype=m.compute_dtype,
              remat_policy=config_lib.resolved_remat_policy(config),
              scan_unroll=m.scan_unroll, attention_impl=m.attention_impl, logits_chunk=m.logits_chunk)


def build_model(config, tokenizer, mesh) -> tuple[llada.LLaDAConfig, Any]:
  """(model config, params or None for a random init) from config.init / config.model.

  A Hugging Face directory is imported tensor by tensor onto the mesh; an Orbax checkpoint of
  this trainer gives params only (its optimizer state is not carried over).
  """
  from bgpo_jax import checkpoint as ckpt_lib
  from bgpo_jax.models import hf
  from bgpo_jax.train import state as state_lib

  m = config.model
  knobs = model_knobs(config)
  path = config.init.checkpoint
  if path and (epath.Path(path) / "config.json").exists():  # epath: gs:// too
    model_cfg, params = hf.load(path, dtype=None, mesh=mesh)
    if family.family_of(model_cfg) != m.family:
      raise ValueError(f"{path} holds a {family.family_of(model_cfg)} checkpoint (config.json model_type) but "
                       f"config.model.family is {m.family!r}; set --config.model.family={family.family_of(model_cfg)}")
    model_cfg = dataclasses.replace(model_cfg, **knobs)
    params = jax.tree.map(lambda p: p.astype(model_cfg.param_jnp_dtype), params)
  else:
    arch = {k: m[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size")
            if m[k] is not None}
    if "n_heads" in arch and "n_kv_heads" not in arch:
      arch["n_kv_heads"] = arch["n_heads"]
    found = _run_record(config) if path else None
    if found is not None and found[0].get("lora"):
      raise ValueError(f"{path} is a LoRA run (its checkpoints hold adapters, not weights); write its weights "
                       f"with `python -m bgpo_jax.tools.export {found[1]} OUT --format=hf` and use OUT")
    if found is not None and found[0].get("model"):
      # A run of this trainer: its architecture as recorded (e.g. trained from an HF checkpoint).
      model_cfg = dataclasses.replace(family.config_from_hf(found[0]["model"]), **knobs)
    else:
      model_cfg = family.preset(m.family, m.preset, **arch, **knobs)
    params = None
    if path:
      abstract = state_lib.param_shardings(model_cfg, mesh)
      shapes = jax.eval_shape(lambda: family.module_for(model_cfg).init_params(model_cfg, jax.random.key(0)))
      abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, abstract)
      params = ckpt_lib.restore_params(path, abstract)
  if tokenizer.mask_id != model_cfg.mask_token_id or tokenizer.eos_id != model_cfg.eos_token_id:
    raise ValueError(
        f"the tokenizer's mask/eos ids ({tokenizer.mask_id}, {tokenizer.eos_id}) differ from the model's "
        f"({model_cfg.mask_token_id}, {model_cfg.eos_token_id}); use the checkpoint's own tokenizer "
        "(config.tokenizer) or a preset made for it (tiny/small use the char tokenizer)")
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"tokenizer vocabulary {tokenizer.vocab_size} > model vocab_size {model_cfg.vocab_size}")
  return model_cfg, params


# ------------------------------------------------------------------------------------ rewards


def reward_kwargs(config) -> dict:
  """Keyword arguments of rewards.grade_batch from config.rewards / rl.format_reward: the recipe
  of each task that offers several is config.rewards.<task> (countdown, sudoku). The code
  rewards' SandboxPool (rewards.code_workers programs at once) starts its threads and its
  self-test only when the first code row is graded, so tasks without code pay nothing."""
  r = config.rewards
  return dict(format_reward=config.rl.format_reward, code_timeout_s=r.code_timeout_s,
              code_memory_mb=r.code_memory_mb,
              recipes={task: r[task] for task in rewards_lib.recipe_names() if task in r},
              pool=rewards_lib.SandboxPool(max_workers=r.code_workers or None))


# ------------------------------------------------------------------------------------ sampling


def build_rollout_sampler(config, model_cfg, tokenizer, mesh, section: str) -> rollout_lib.RolloutSampler:
  """The training ("rollout") or evaluation ("eval") sampler; eval draws one response per prompt."""
  s, r = config[section], config.rollout
  settings = rollout_lib.SamplerSettings(
      gen_length=s.gen_length, steps=s.steps, block_length=s.block_length, temperature=s.temperature,
      remasking=r.remasking, cfg_scale=r.cfg_scale, suppress_eos=r.suppress_eos,
      suppress_eos_confidence=r.suppress_eos_confidence, cache=s.cache, threshold=s.threshold)
  group = config.rl.group_size if section == "rollout" else 1
  return rollout_lib.RolloutSampler(tokenizer, model_cfg, settings, group_size=group,
                                    prompt_buckets=tuple(r.prompt_buckets), mesh=mesh,
                                    truncate_long_prompts=config.task.truncation == "left",
                                    gather_weights=r.gather_weights)


def enable_compilation_cache(config, workdir: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache per config.compilation_cache_dir (config.py);
  returns the directory (None when off). Process-wide: the first call of a process decides."""
  d = config.compilation_cache_dir
  if d == "off":
    return None
  if not d:
    # Under the workdir when JAX can write there (local or gs://, through epath); else the user cache.
    remote = workdir and "://" in str(workdir) and not str(workdir).startswith("gs://")
    d = str(epath.Path(workdir) / "jax_cache") if workdir and not remote else os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bgpo_jax", "jax_cache")
  epath.Path(d).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", d)
  # Every program of a run is worth keeping (the sampler's and train step's take seconds; the
  # many small ones are cheap to store).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return d
