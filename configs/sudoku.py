"""4x4 Sudoku: LLaDA-8B-Instruct with the BGPO paper's settings (SPEC section 3).

python -m bgpo_jax.main --config=configs/sudoku.py --workdir=DIR \
    --config.init.checkpoint=/path/LLaDA-8B-Instruct --config.task.data_dir=/path/datasets
`--config=configs/sudoku.py:<objective>`: that objective's published recipe instead (`diffu_grpo` d1's,
`espo`, `spg`, `coupled_grpo`, `wd1` their authors'; docs/objectives.md).
"""

from bgpo_jax.config import paper_config, task_config


def get_config(variant: str = ""):
  # Rollouts with Fast-dLLM's dual KV cache, exact greedy evaluation (set in paper_config:
  # rollout.cache="dual", eval.cache="none"; README "Fast rollouts").
  # BGPO's released recipe: 400 steps; evaluation and checkpoint every 50.
  c = paper_config("sudoku", gen_length=256, train_steps=128, eval_steps=256, num_mc_samples=32,
                   total_steps=400, eval_every=50, checkpoint_every=50)
  return task_config(c, variant)
