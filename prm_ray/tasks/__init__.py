"""Tasks: instruction sources, answer extraction and verification (arith, math)."""

from prm_ray.tasks.arith import ArithTask
from prm_ray.tasks.base import LABELLED, UNVERIFIABLE, Instruction, StepCheck, Task, Verdict, VerifyStatus, last_boxed
from prm_ray.tasks.math import MathTask


def get_task(name: str, **kwargs) -> Task:
    """Build a task by name: `arith` (synthetic, embedded default) or `math` (MATH-style files)."""
    if name == "arith":
        return ArithTask(**kwargs)
    if name == "math":
        return MathTask(**kwargs)
    raise ValueError(f"unknown task {name!r}: expected 'arith' or 'math'")


__all__ = ["LABELLED", "UNVERIFIABLE", "Instruction", "StepCheck", "Task", "Verdict", "VerifyStatus", "get_task", "last_boxed"]
