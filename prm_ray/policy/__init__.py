"""The embedded default policy: a character-level tokenizer and a small Llama (``model``), trained
from scratch on the arith world and measured on held-out problems (``bootstrap``)."""

from prm_ray.policy.model import ModelShape, build_char_tokenizer

__all__ = ["ModelShape", "build_char_tokenizer"]
