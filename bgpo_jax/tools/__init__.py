"""Command-line tools: `python -m bgpo_jax.tools.<name>` (tiny_checkpoint)."""
