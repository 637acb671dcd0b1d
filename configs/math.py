"""Math: GSM8K + MATH train, evaluated on GSM8K and MATH500: LLaDA-8B-Instruct with the BGPO paper's settings (SPEC section 3).

python -m bgpo_jax.main --config=configs/math.py --workdir=DIR \
    --config.init.checkpoint=/path/LLaDA-8B-Instruct --config.task.data_dir=/path/datasets
`--config=configs/math.py:<objective>`: that objective's published recipe instead (`diffu_grpo` d1's,
`espo`, `spg`, `coupled_grpo`, `wd1` their authors'; docs/objectives.md).
"""

from bgpo_jax.config import paper_config, task_config


def get_config(variant: str = ""):
  # Rollouts with Fast-dLLM's dual KV cache, exact greedy evaluation (set in paper_config:
  # rollout.cache="dual", eval.cache="none"; README "Fast rollouts").
  # BGPO's released recipe: 700 steps. An evaluation (GSM8K 1319 + MATH500 500 prompts, 512
  # greedy diffusion steps each) costs about as much as 30 RL steps: every 100 steps.
  c = paper_config("math", gen_length=512, train_steps=256, eval_steps=512, num_mc_samples=16,
                   eval_tasks="gsm8k,math500", total_steps=700, eval_every=100, checkpoint_every=50)
  return task_config(c, variant)
