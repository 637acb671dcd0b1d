"""Prompt data: task rows -> uniform examples -> step-indexed prompt batches.

What differs per task (file stems, row checks, generators, instructions) is the task's spec in
bgpo_jax.tasks.registry; the modules here look it up by the row's task name.

records     local parquet / JSONL rows -> uniform examples, bad-row stats
procedural  generated countdown and 4x4 sudoku (seeded, unique, train/test disjoint)
order       batch_indices(num_examples, batch_size, seed, step, ...): pure input order;
            eval_batches: same-size padded evaluation batches for any split size
dataset     sources (list, TFDS, concat), instructions, chat template, truncation, TaskDataset
tfds_builder  TFDS array_record builder (imported on demand: `from bgpo_jax.data import
            tfds_builder`; the in-memory path never imports tensorflow_datasets)
"""

from bgpo_jax.data.dataset import (ConcatSource, ListSource, PromptBatch, TaskDataset,
                                   TfdsSource, apply_instruction, as_source,
                                   default_instruction, encode_prompt, reward_inputs)
from bgpo_jax.data.order import batch_indices, epoch_permutation, eval_batches
from bgpo_jax.data.procedural import (COUNTDOWN_PRESETS, SUDOKU4_PRESETS, SUDOKU_PRESETS, demo_examples,
                                      generate, generate_countdown, generate_sudoku4, generate_sudoku,
                                      solve_countdown, solve_sudoku, sudoku_solutions)
from bgpo_jax.data.records import DataFileError, RowStats, decode_example, load_examples

__all__ = [
    "ConcatSource", "ListSource", "PromptBatch", "TaskDataset", "TfdsSource",
    "apply_instruction", "as_source", "default_instruction", "encode_prompt", "reward_inputs",
    "batch_indices", "epoch_permutation", "eval_batches", "COUNTDOWN_PRESETS", "SUDOKU_PRESETS",
    "SUDOKU4_PRESETS", "demo_examples", "generate", "generate_countdown", "generate_sudoku4", "generate_sudoku",
    "solve_countdown",
    "solve_sudoku", "sudoku_solutions", "DataFileError", "RowStats", "decode_example",
    "load_examples",
]
