"""How a training worker's model is spread over the workers: DDP (a full replica each) or FSDP2
(``torch.distributed.fsdp.fully_shard``: parameters, gradients and optimizer state sharded).

Both wrap a :class:`prm_ray.core.reward.ResponseLogprobs`, so the forward that DDP or FSDP
instruments computes the response log-probs, LM head included. Under FSDP2 with
``precision: bfloat16`` the sharded parameters stay float32 (the master weights AdamW updates) and
each block computes with bf16 copies gathered for its forward and backward; gradients are reduced
in float32 (``MixedPrecisionPolicy``). Each transformer block (the model's ``_no_split_modules``)
is its own FSDP unit, so only one block's full parameters exist at a time, and each is
``torch.compile``-d first when ``compile`` is on.

Checkpoints hold full (unsharded) weights and optimizer state under either strategy, so a run
resumes, and a PRM loads, with any number of workers.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from prm_ray.core.reward import ResponseLogprobs

__all__ = ["STRATEGIES", "blocks", "full_state", "gradient_sync", "load_optimizer_state", "parallelize"]

STRATEGIES = ("ddp", "fsdp")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def blocks(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated transformer blocks: the module classes Hugging Face says must not be
    split across devices (``_no_split_modules``); empty when the model names none."""
    names = set(getattr(lm, "_no_split_modules", None) or ())
    return [m for m in lm.modules() if type(m).__name__ in names]


def parallelize(model: ResponseLogprobs, strategy: str, device: torch.device, *, bf16: bool,
                compile: bool, prepare_ddp=None) -> torch.nn.Module:
    """``model`` on ``device``, compiled per block if asked, wrapped for ``strategy``.

    ``prepare_ddp``: how DDP is applied (the Ray Train worker passes ``ray.train.torch.prepare_model``,
    which moves the model and wraps it when there are several workers); FSDP2 is applied here.
    """
    if compile:
        for block in blocks(model.lm):
            block.compile()
    if strategy == "ddp":
        return prepare_ddp(model) if prepare_ddp is not None else model.to(device)
    if strategy != "fsdp":
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not dist.is_initialized():
        raise RuntimeError("strategy fsdp needs an initialized process group (a Ray Train worker has one)")
    model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32)
    for block in blocks(model.lm):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the rest: embeddings, final norm, LM head
    return model


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """A context in which backward does (``enabled``) or does not reduce gradients over the workers:
    only the last micro-batch of an optimizer step needs to."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if not enabled and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def _lm_state(state: dict) -> dict:
    prefix = "lm."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict]:
    """The language model's full state dict (keys as ``save_pretrained`` writes them; None: the
    module's own, unsharded) and the optimizer's. A collective under FSDP: every rank calls it,
    rank 0 gets the tensors, on CPU."""
    if isinstance(model, FSDPModule):
        return (_lm_state(get_model_state_dict(model, options=_FULL)),
                get_optimizer_state_dict(model, optimizer, options=_FULL))
    return None, optimizer.state_dict()


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore what :func:`full_state` saved (every rank has read the full state)."""
    if isinstance(model, FSDPModule):
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
