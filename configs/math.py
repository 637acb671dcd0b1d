"""Math: GSM8K + MATH train, evaluated on GSM8K and MATH500: LLaDA-8B-Instruct with the BGPO paper's settings (SPEC section 3).

python -m bgpo_jax.main --config=configs/math.py --workdir=DIR \
    --config.init.checkpoint=/path/LLaDA-8B-Instruct --config.task.data_dir=/path/datasets
"""

from bgpo_jax.config import base_config


def get_config():
  c = base_config()
  c.task.name = "math"
  c.task.eval_tasks = "gsm8k,math500"
  c.rollout.gen_length = 512
  c.rollout.steps = 256
  c.rollout.block_length = 32
  c.rollout.temperature = 0.6
  c.eval.gen_length = 512
  c.eval.steps = 512
  c.eval.block_length = 32
  c.rl.objective = "bgpo"
  c.rl.num_mc_samples = 16
  c.rl.group_size = 8
  c.rl.prompts_per_step = 16
  c.rl.micro_batch_per_device = 1  # memory-lean for 8B; raise it when memory allows
  c.optim.learning_rate = 5e-7
  return c
