"""Every key with its default and meaning: see bgpo_jax/config.py (base_config)."""

from bgpo_jax.config import base_config


def get_config():
  return base_config()
