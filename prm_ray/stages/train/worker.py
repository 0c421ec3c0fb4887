"""The training loop that runs on every Ray Train worker: one loop for every objective.

Each optimizer step reads its ``global_batch_size / workers`` rows as one batch, splits them into
``micro_batch_size`` micro-batches (grouped by length unless ``group_by_length`` is off) and
accumulates their gradients (:func:`prm_ray.stages.train.step.micro_batch_loss`), clips, steps AdamW and the warmup-cosine
schedule; rank 0 writes the step's metrics to ``metrics.jsonl`` and the loggers, and every
``checkpoint_every`` steps the workers report a checkpoint through ``ray.train.report`` (Hugging
Face files plus the optimizer state). A restarted worker group
resumes from the last checkpoint and skips the optimizer steps already trained in that epoch.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from prm_ray.artifacts import ATTEMPTS_FILE, STATE_FILE, TRAIN_METRICS
from prm_ray.config import from_dict
from prm_ray.core.reward import ResponseLogprobs
from prm_ray.core.schedule import warmup_cosine
from prm_ray.models import load_causal_lm, load_tokenizer
from prm_ray.stages.train.config import TrainConfig
from prm_ray.stages.train.loggers import MetricLoggers
from prm_ray.stages.train.parallel import full_state, gradient_sync, load_optimizer_state, parallelize
from prm_ray.stages.train.step import StepContext, micro_batch_loss, micro_batches, reduce_stats
from prm_ray.tokens import pad_token_id, step_label_token_ids

__all__ = ["train_loop_per_worker"]


def _peak_rss_mb(world: int) -> float:
    """The largest peak resident memory of any worker process so far, in MB."""
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    if world > 1 and dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak)


def _load(path: str) -> torch.nn.Module:
    model = load_causal_lm(path, torch.float32).train()
    model.config.use_cache = False
    return model


def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(TrainConfig, config["cfg"])
    total_steps, rows_total, out = config["total_steps"], config["rows"], Path(config["out"])
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.set_num_threads(cfg.workers.torch_threads)
    torch.manual_seed(cfg.seed + rank)

    device = ray.train.torch.get_device()
    tok = load_tokenizer(cfg.model)
    lm = _load(cfg.model)
    start_step, state = 0, None
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            lm = _load(d)
            state = torch.load(Path(d) / STATE_FILE, weights_only=False)
            start_step = state["step"]
    model = parallelize(ResponseLogprobs(lm, cfg.logprob_chunk), cfg.strategy, device, bf16=cfg.bf16,
                        compile=cfg.compile, prepare_ddp=ray.train.torch.prepare_model)
    ctx = StepContext(model, cfg, pad_token_id(tok), device, autocast=cfg.autocast,
                      label_token_ids=step_label_token_ids(tok, cfg.step_label_tokens) if cfg.explicit else None)
    # One fused kernel per step on GPUs (the multi-tensor loop on CPUs, where the fused kernel
    # would change the numbers the CPU tests and benchmarks compare against).
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    warmup = max(1, math.ceil(cfg.warmup_ratio * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, total_steps, warmup, cfg.min_lr_ratio))
    if state is not None:
        load_optimizer_state(model, opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])

    accum = cfg.global_batch_size // (cfg.micro_batch_size * world)
    shard = ray.train.get_dataset_shard("train")
    steps_per_epoch = config["steps_per_epoch"]
    step = start_step

    def save_and_report(metrics: dict) -> None:
        state_dict, opt_state = full_state(model, opt)  # a collective under FSDP: every rank
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                lm.save_pretrained(tmp, state_dict=state_dict)
                tok.save_pretrained(tmp)
                torch.save({"step": step, "optimizer": opt_state, "scheduler": sched.state_dict()},
                           Path(tmp) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    loggers = None
    if rank == 0:
        with open(out / ATTEMPTS_FILE, "a") as f:
            f.write(json.dumps({"start_step": start_step, "time": time.time()}) + "\n")
        loggers = MetricLoggers(cfg.loggers, str(out), out.name, config["cfg"])
    model.train()
    epoch = start_step // max(1, steps_per_epoch)
    skip = start_step - epoch * steps_per_epoch  # optimizer steps already trained this epoch
    t_last = time.time()
    while step < total_steps:
        trained = 0  # optimizer steps this epoch
        # One Ray Data batch per optimizer step on this worker, split into its micro-batches.
        for rows in shard.iter_batches(batch_size=cfg.micro_batch_size * accum, batch_format="pyarrow",
                                       drop_last=True):
            if trained + skip >= steps_per_epoch:
                break  # a tail shorter than one global batch is not trained on (no stale grads)
            if skip:
                skip -= 1
                continue
            trained += 1
            acc_stats: list[dict] = []
            opt.zero_grad(set_to_none=True)
            for k, batch in enumerate(micro_batches(rows, cfg.micro_batch_size, cfg.group_by_length)):
                with gradient_sync(model, k == accum - 1):
                    loss, stats = micro_batch_loss(ctx, batch)
                    (loss / accum).backward()
                stats["loss"] = loss.item()
                acc_stats.append(stats)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if cfg.debug_kill_rank == rank and cfg.debug_kill_at_step == step:
                marker = out / ".debug_killed"
                if not marker.exists():  # once per run, whatever checkpoint the restart finds
                    marker.touch()
                    os.kill(os.getpid(), signal.SIGKILL)  # a real worker death
            now = time.time()
            metrics = reduce_stats(acc_stats, world)
            metrics.update(step=step, epoch=epoch, lr=sched.get_last_lr()[0], grad_norm=float(grad_norm),
                           tokens_per_s=metrics["tokens"] / max(now - t_last, 1e-9), time=now,
                           peak_rss_mb_max_worker=_peak_rss_mb(world))
            t_last = now
            if rank == 0:
                with open(out / TRAIN_METRICS, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                loggers.log(step, metrics)
            done = step >= total_steps
            if done or step % cfg.checkpoint_every == 0:
                save_and_report(metrics)
            if done:
                break
        epoch += 1
        skip = 0
        if step < total_steps and trained == 0:
            raise RuntimeError(f"worker {rank} got no batches: {rows_total} rows are too few for "
                               f"micro_batch_size {cfg.micro_batch_size} x {world} workers")
    if loggers is not None:
        loggers.close()
