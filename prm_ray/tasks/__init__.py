"""Tasks: instruction sources, answer extraction and verification (arith, math)."""

from prm_ray.tasks.base import Instruction, Task, Verdict, VerifyStatus, last_boxed


def get_task(name: str, **kwargs) -> Task:
    """Build a task by name: `arith` (synthetic, embedded default) or `math` (MATH-style files)."""
    if name == "arith":
        from prm_ray.tasks.arith import ArithTask

        return ArithTask(**kwargs)
    if name == "math":
        from prm_ray.tasks.math import MathTask

        return MathTask(**kwargs)
    raise ValueError(f"unknown task {name!r}: expected 'arith' or 'math'")


__all__ = ["Instruction", "Task", "Verdict", "VerifyStatus", "get_task", "last_boxed"]
