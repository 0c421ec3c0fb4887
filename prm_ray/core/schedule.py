"""The learning-rate schedule of every training loop here: linear warmup, then cosine decay."""

from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float, peak: float = 1.0) -> float:
    """The learning rate at optimizer step ``step`` (0-based); ``peak=1`` gives the multiplier.

    1. warmup: ``peak * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps;
    2. cosine decay from ``peak`` to ``peak * min_ratio`` over the remaining steps;
    3. ``peak * min_ratio`` after ``total_steps`` (a schedule never goes below its floor).
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
