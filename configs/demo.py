"""The embedded default: a ~1M-parameter LLaDA-architecture model learns a generated countdown task
on a laptop CPU in minutes. A short masked-diffusion SFT warm-up, then BGPO RL.

python -m bgpo_jax.main --config=configs/demo.py --workdir=/tmp/bgpo_demo
"""

from bgpo_jax.config import base_config


def get_config():
  c = base_config()
  c.seed = 0
  c.model.preset = "tiny"
  c.model.param_dtype = "float32"
  c.model.compute_dtype = "float32"  # CPU: float32 is fastest and exact
  c.model.remat_policy = "none"
  c.tokenizer.kind = "char"
  c.task.name = "demo"
  c.task.demo_task = "countdown"
  c.task.demo_train_size = 4000
  c.task.demo_test_size = 200
  c.task.max_prompt_tokens = 64

  # Warm-up SFT on reference solutions, then RL.
  c.sft.steps = 300
  c.sft.batch_size = 64
  c.sft.learning_rate = 1e-3
  c.sft.num_mc_samples = 1

  c.total_steps = 60  # RL steps
  c.rl.objective = "bgpo"
  c.rl.num_mc_samples = 8
  c.rl.group_size = 8
  c.rl.prompts_per_step = 16
  c.optim.learning_rate = 5e-5
  c.optim.warmup_steps = 0
  c.optim.grad_clip_norm = 1.0

  c.rollout.gen_length = 16
  c.rollout.block_length = 16
  c.rollout.steps = 16
  c.rollout.temperature = 1.0
  c.rollout.prompt_buckets = (64,)
  c.eval.gen_length = 16
  c.eval.block_length = 16
  c.eval.steps = 16
  c.eval.temperature = 0.0
  c.eval.num_examples = 200
  c.eval.batch_size = 200

  c.eval_every = 20
  c.checkpoint_every = 50
  c.log_every = 5
  return c
