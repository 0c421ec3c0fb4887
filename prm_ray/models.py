"""Where models come from: a local Hugging Face directory or a hub id, loaded the same way everywhere.

A path that looks local (absolute, ``./``, ``~``, two or more ``/``, or under a directory that
exists here; any path with ``HF_HUB_OFFLINE=1``) and is missing raises ``FileNotFoundError`` at once; transformers would otherwise
take it for a hub id and end, after its retries, in an error about huggingface.co.
:func:`matmul_rates` measures a device's matmul rate, what the benchmarks compare models against.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

__all__ = ["as_dtype", "context_length", "count_parameters", "device_for", "load_causal_lm", "load_tokenizer",
           "looks_local", "matmul_rates", "model_config", "resolve_model"]


def looks_local(path: str) -> bool:
    """False for what can only be a hub id: "name" or "org/name" where no local "org" exists."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return True
    p = str(path)
    if os.path.isabs(p) or p.startswith((".", "~")) or p.count("/") > 1 or (os.sep != "/" and os.sep in p):
        return True
    return "/" in p and Path(p.split("/", 1)[0]).exists()


def resolve_model(path: str | os.PathLike, what: str = "model") -> str:
    """``path`` as given (a hub id) or, when it looks local, checked to exist; the error names it."""
    p = os.path.expanduser(str(path))
    if looks_local(p) and not os.path.exists(p):
        raise FileNotFoundError(f"{what} not found: {os.path.abspath(p)} does not exist (a local path; "
                                "hub ids look like 'org/name')")
    return p


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def device_for(num_gpus: float) -> str:
    """Where a replica puts its models: CUDA when it holds a GPU (and one is visible), else CPU."""
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def load_tokenizer(path: str, what: str = "model"):
    return AutoTokenizer.from_pretrained(resolve_model(path, what))


def load_causal_lm(path: str, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                   what: str = "model") -> torch.nn.Module:
    """An ``AutoModelForCausalLM`` in ``dtype`` on ``device``, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model(path, what), dtype=as_dtype(dtype))
    return model.to(device).eval()


def model_config(path: str, what: str = "model"):
    return AutoConfig.from_pretrained(resolve_model(path, what))


def context_length(path: str, max_model_len: int | None = None) -> int | None:
    """The tighter of an engine's ``max_model_len`` and the model's ``max_position_embeddings``:
    what the PRM trainer and scorer accept (they never truncate)."""
    limits = [max_model_len, getattr(model_config(path), "max_position_embeddings", None)]
    limits = [x for x in limits if x]
    return min(limits) if limits else None


def count_parameters(path: str) -> int:
    """Parameters of a causal LM, counted on the meta device (no weights loaded)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(path))
    return sum(p.numel() for p in model.parameters())


def matmul_rates(size: int, dtype: torch.dtype, reps: int = 10, device: torch.device | str = "cpu",
                 warmup: int = 2) -> dict[str, float]:
    """FLOP/s of a ``size`` x ``size`` matmul in ``dtype`` on ``device``: the best and the median
    of ``reps`` timed runs after ``warmup`` untimed ones (a shared machine's neighbours slow some)."""
    device = torch.device(device)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    times = []
    for i in range(warmup + reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    flop = 2 * size**3
    return {"best": flop / min(times), "median": flop / statistics.median(times)}
