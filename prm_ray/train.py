"""Training an implicit PRM on Ray Train: one loop for every objective (the loss is an argument).

    rollouts (Parquet) --build_examples--> rows or pairs --Ray Data ref pass--> + reference log-probs
        --> TorchTrainer (N workers, DDP/FSDP, gloo on CPU, NCCL on GPU) --> HF checkpoint in <out>/

Departures from the paper's code (OpenRLHF fork, one ~460-line trainer per loss):
- one loop; the objective comes from `prm_ray.losses.OBJECTIVES`;
- the reference model's sequence log-probs are computed ONCE in a batched Ray Data pass and
  stored with the examples, so training runs only the trained model (the paper's code re-runs the
  reference on every step: about twice the forward compute);
- KTO's KL reference point uses the same precomputed reference log-probs for the mismatched
  completions and is averaged across workers before clamping.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from prm_ray.config import ConfigError, from_dict, save_config, to_dict
from prm_ray.datasets import DatasetConfig, build_examples
from prm_ray.losses import get_objective

STATE_FILE = "training_state.pt"
REPORT_FILE = "train_report.json"
PRM_CARD = "prm_ray_prm.json"  # = prm_ray.prm.PRM_CARD (not imported: it would load transformers here)


@dataclass
class RefPassConfig:
    """The batched reference log-prob pass (a Ray Data actor pool)."""

    # Leave CPUs for Ray Data's own tasks (actors holding every CPU starve them): 2 x 0.5 here,
    # each actor running `threads` torch threads.
    replicas: int = 2
    batch_size: int = 256
    micro_batch_size: int = 16
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    accelerator_type: str | None = None  # e.g. "A10G": the autoscaler starts that GPU type
    threads: int = 1


@dataclass
class TrainConfig:
    """Train an implicit PRM from rollouts with Ray Train."""

    data: str = "runs/rollouts/train"
    model: str = "artifacts/policy"  # the PRM starts from this model
    ref_model: str | None = None  # None: the same as `model` (the policy is the reference)
    out: str = "runs/prm"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)  # objective lives here
    reference: bool = True  # False: the paper's "w/o ref" training (Table 4)
    beta: float = 0.05
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: int = 1
    global_batch_size: int = 64
    micro_batch_size: int = 16
    max_grad_norm: float = 1.0
    bf16: bool = True
    max_steps: int | None = None  # stop early (smoke tests)
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    num_workers: int = 2
    use_gpu: bool = False
    # Training workers must leave CPUs for Ray Data's ingest tasks: if they reserve every CPU,
    # the dataset can never be read and the run hangs. 2 workers x 0.5 fit a 2-core laptop
    # (threads_per_worker sets the actual torch threads).
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 1.0  # only with use_gpu
    accelerator_type: str | None = None
    strategy: str = "ddp"  # ddp | fsdp (big models on GPUs)
    threads_per_worker: int = 1
    checkpoint_every: int = 50  # optimizer steps
    max_failures: int = 2
    storage_path: str | None = None  # Ray Train storage; must be shared (e.g. s3://) on multi-node
    ref_pass: RefPassConfig = field(default_factory=RefPassConfig)
    # Explicit PRMs (math-shepherd-* objectives): the two tokens whose logits at a step's last
    # token give the step score, logit(+) - logit(-). Each must be one token of the tokenizer.
    step_label_tokens: list[str] = field(default_factory=lambda: ["+", "-"])
    # Per-token reference log-probs of the rollouts, computed once per rollout set by
    # `prm_ray.evaluate.reference_logprobs`; responses found there skip the reference pass, so runs
    # on subsets of one rollout set (k responses, a fraction of instructions, pairs) share one pass.
    ref_cache: str | None = None
    seed: int = 0
    ray_address: str | None = None
    # Test hook: SIGKILL the worker of this rank at this step on the first attempt.
    debug_kill_rank: int | None = None
    debug_kill_at_step: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        if self.num_workers < 1:
            raise ConfigError(f"num_workers must be >= 1, got {self.num_workers}")
        per_step = self.micro_batch_size * self.num_workers
        if self.micro_batch_size < 1 or self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size x num_workers ({per_step})"
            )
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if len(self.step_label_tokens) != 2 or len(set(self.step_label_tokens)) != 2:
            raise ConfigError(f"step_label_tokens must be two different tokens [positive, negative], "
                              f"got {self.step_label_tokens!r}")

    @property
    def reference_path(self) -> str:
        return self.ref_model or self.model


# ------------------------------------------------------------------------------------------
# Reference log-probs: one batched pass, stored with the examples
# ------------------------------------------------------------------------------------------

# (prompt column, response column, output column) per example layout.
UNPAIRED_REF = [("prompt", "response", "ref_logp")]
PAIRED_REF = [("prompt", "chosen", "ref_logp_chosen"), ("prompt", "rejected", "ref_logp_rejected")]
KTO_REF = UNPAIRED_REF + [("prompt", "kl_response", "ref_logp_kl")]


# The training reference pass runs in this dtype; a `ref_cache` must have been computed in it too.
TRAIN_REF_DTYPE = "float32"


def ref_columns(objective: str) -> list[tuple[str, str, str]]:
    if get_objective(objective).explicit:
        return []  # an explicit PRM has no reference model
    if objective == "kto":
        return KTO_REF
    return PAIRED_REF if get_objective(objective).paired else UNPAIRED_REF


class SequenceLogprobs:
    """Ray Data actor: sum of log pi(response | prompt) over response tokens (EOS included)."""

    def __init__(self, model: str, columns: list, dtype: str = "float32", micro_batch_size: int = 16,
                 threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self.micro = micro_batch_size
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from prm_ray.prm import max_context, pad_token_id

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
        if torch.cuda.is_available():
            self.model = self.model.cuda()
        self.columns = columns
        self.max_length = max_context(self.model)
        self.pad_id = pad_token_id(self.tokenizer)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from prm_ray.prm import collate_items, encode_pair
        from prm_ray.reward import response_logprobs

        rows = batch.to_pydict()
        dev = next(self.model.parameters()).device
        for prompt_col, resp_col, out_col in self.columns:
            items = [encode_pair(self.tokenizer, p, r, max_length=self.max_length)
                     for p, r in zip(rows[prompt_col], rows[resp_col])]
            sums = [0.0] * len(items)
            # Length-sorted micro-batches: far less padding than the batch in arrival order.
            order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
            for start in range(0, len(order), self.micro):
                chunk = order[start : start + self.micro]
                t = collate_items([items[i] for i in chunk], self.pad_id)
                with torch.inference_mode():
                    lp = response_logprobs(self.model, t["input_ids"].to(dev), t["attention_mask"].to(dev),
                                           t["response_mask"].to(dev))
                for i, v in zip(chunk, lp.sum(-1).double().cpu().tolist()):
                    sums[i] = v
            batch = batch.append_column(out_col, pa.array(sums, pa.float64()))
        return batch


def load_ref_cache(path: str | Path, ref_model: str) -> dict[tuple[str, str], float]:
    """``(prompt, response) -> sum of reference log-probs`` from a ``reference_logprobs`` output."""
    import pyarrow.dataset as pads

    from prm_ray.evaluate import REF_DONE

    path = Path(path)
    done = path / REF_DONE
    if not done.exists():
        raise ConfigError(f"ref_cache: {path} is not a finished reference log-prob pass (no {REF_DONE})")
    key = json.loads(done.read_text())["key"]
    if key["ref_model"] != ref_model:
        raise ConfigError(f"ref_cache: {path} holds log-probs of {key['ref_model']!r}, but the reference "
                          f"model is {ref_model!r}")
    if key["dtype"] != TRAIN_REF_DTYPE:
        raise ConfigError(f"ref_cache: {path} was computed in {key['dtype']}; training uses "
                          f"{TRAIN_REF_DTYPE} reference log-probs")
    t = pads.dataset(str(path / "data"), format="parquet").to_table(columns=["prompt", "response", "ref_token_logp"])
    return {(p, r): float(sum(lp)) for p, r, lp in zip(t.column("prompt").to_pylist(), t.column("response").to_pylist(),
                                                        t.column("ref_token_logp").to_pylist())}


def add_reference_logprobs(examples: pa.Table, cfg: TrainConfig, out_dir: Path) -> tuple[str, float, dict]:
    """Write the examples with reference log-prob columns to Parquet; returns (path, seconds, counts).

    Each distinct (prompt, response) is scored once: DPO pairs share responses, and responses found
    in ``cfg.ref_cache`` are not scored at all. The examples keep their order.
    """
    import ray

    objective = cfg.dataset.objective
    path = out_dir / "examples"
    t0 = time.time()
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    cols = {c: examples.column(c).to_pylist() for c in {"prompt"} | {r for _, r, _ in ref_columns(objective)}}
    wanted = {(p, r) for _, rc, _ in ref_columns(objective) for p, r in zip(cols["prompt"], cols[rc])}
    known: dict[tuple[str, str], float] = {}
    if not cfg.reference:
        known = dict.fromkeys(wanted, 0.0)  # "w/o ref": log pi_ref := 0, the reward is beta * log pi_phi
    elif cfg.ref_cache:
        cache = load_ref_cache(cfg.ref_cache, cfg.reference_path)
        known = {k: cache[k] for k in wanted if k in cache}
    missing = sorted(wanted - known.keys())
    if missing:
        rp = cfg.ref_pass
        todo = pa.table({"prompt": [p for p, _ in missing], "response": [r for _, r in missing]})
        ds = ray.data.from_arrow(todo).repartition(4 * rp.replicas)  # several blocks per replica
        ds = ds.map_batches(
            SequenceLogprobs, batch_size=rp.batch_size, batch_format="pyarrow", concurrency=rp.replicas,
            num_cpus=rp.num_cpus, num_gpus=rp.num_gpus, accelerator_type=rp.accelerator_type,
            fn_constructor_kwargs={"model": cfg.reference_path, "columns": UNPAIRED_REF, "dtype": TRAIN_REF_DTYPE,
                                   "micro_batch_size": rp.micro_batch_size, "threads": rp.threads},
        )
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            known.update(zip(zip(batch.column("prompt").to_pylist(), batch.column("response").to_pylist()),
                             batch.column("ref_logp").to_pylist()))
    for _, rc, out_col in ref_columns(objective):
        examples = examples.append_column(
            out_col, pa.array([known[(p, r)] for p, r in zip(cols["prompt"], cols[rc])], pa.float64()))
    # Several files, so Ray Train's split hands every worker blocks of its own.
    n_files = max(1, min(4 * cfg.num_workers, examples.num_rows))
    step = -(-examples.num_rows // n_files)
    for i in range(0, examples.num_rows, step):
        pq.write_table(examples.slice(i, step), path / f"part-{i // step:05d}.parquet")
    counts = {"distinct_sequences": len(wanted), "from_cache": len(wanted) - len(missing) if cfg.reference else 0,
              "scored": len(missing)}
    return str(path), time.time() - t0, counts


# ------------------------------------------------------------------------------------------
# The training loop (runs on every Ray Train worker)
# ------------------------------------------------------------------------------------------


def _lr_lambda(total_steps: int, warmup_ratio: float, min_ratio: float):
    warmup = max(1, math.ceil(warmup_ratio * total_steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _sequence_logp(model, tokenizer, prompts, responses, max_length, pad_id, device, autocast):
    import torch

    from prm_ray.prm import collate_items, encode_pair
    from prm_ray.reward import response_logprobs

    items = [encode_pair(tokenizer, p, r, max_length=max_length) for p, r in zip(prompts, responses)]
    t = collate_items(items, pad_id)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        lp = response_logprobs(model, t["input_ids"].to(device), t["attention_mask"].to(device),
                               t["response_mask"].to(device))
    ntok = int(t["attention_mask"].sum())
    return lp.sum(-1).float(), ntok


def step_label_token_ids(tokenizer, tokens: list[str]) -> tuple[int, int]:
    """The ids of the explicit PRM's (positive, negative) tokens; each must be a single token."""
    ids = []
    for name, text in zip(("positive", "negative"), tokens):
        enc = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ConfigError(f"step_label_tokens: the {name} token {text!r} is {len(enc)} tokens for this "
                              "tokenizer; choose a string that is exactly one token")
        ids.append(enc[0])
    return ids[0], ids[1]


def _step_label_loss(model, tok, rows, cfg: TrainConfig, max_length, pad_id, device, autocast, token_ids):
    """An explicit PRM's micro-batch: step logits at each step's last token against step labels."""
    import torch

    from prm_ray.losses import step_label_loss
    from prm_ray.prm import collate_items, encode_pair
    from prm_ray.reward import step_label_logits

    items = [encode_pair(tok, p, r, max_length=max_length) for p, r in zip(rows["prompt"], rows["response"])]
    for it, labels, iid, j in zip(items, rows["step_labels"], rows["instruction_id"], rows["sample_index"]):
        if len(it.steps) != len(labels):
            raise ValueError(f"instruction {iid!r} sample {j}: {len(labels)} step labels but the response has "
                             f"{len(it.steps)} steps for this tokenizer; label with the model being trained")
    t = collate_items(items, pad_id)
    num_steps = max(len(it.steps) for it in items)
    labels = torch.zeros(len(items), num_steps, device=device)
    for b, row in enumerate(rows["step_labels"]):
        labels[b, : len(row)] = torch.tensor(row, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=t["input_ids"].to(device), attention_mask=t["attention_mask"].to(device)).logits
    z, mask = step_label_logits(logits.float(), t["step_ids"].to(device), *token_ids, num_steps)
    loss = step_label_loss(z, labels, mask)
    pos, neg = mask & (labels > 0.5), mask & (labels <= 0.5)
    stats = {"acc": ((z > 0) == (labels > 0.5))[mask].float().mean().item(),
             "reward_correct": z[pos].sum().item(), "reward_incorrect": z[neg].sum().item(),
             "n_correct": int(pos.sum()), "n_incorrect": int(neg.sum()), "sums": True,
             "tokens": int(t["attention_mask"].sum())}
    return loss, stats


def _micro_batch_loss(model, tok, rows, cfg: TrainConfig, max_length, pad_id, device, autocast, token_ids=None):
    """Loss and statistics of one micro-batch, for any objective."""
    import torch
    import torch.distributed as dist

    objective = get_objective(cfg.dataset.objective)
    if objective.explicit:
        return _step_label_loss(model, tok, rows, cfg, max_length, pad_id, device, autocast, token_ids)
    beta = cfg.beta

    def ref(col):
        return torch.tensor(rows[col], dtype=torch.float32, device=device)

    stats: dict[str, Any] = {}
    if objective.paired:
        n = len(rows["chosen"])
        logp, ntok = _sequence_logp(model, tok, rows["prompt"] * 2, rows["chosen"] + rows["rejected"],
                                    max_length, pad_id, device, autocast)
        r_c = beta * (logp[:n] - ref("ref_logp_chosen"))
        r_r = beta * (logp[n:] - ref("ref_logp_rejected"))
        loss = objective.loss(r_c, r_r)
        stats.update(acc=(r_c > r_r).float().mean().item(), reward_correct=r_c.mean().item(),
                     reward_incorrect=r_r.mean().item(), n_correct=n, n_incorrect=n)
    else:
        logp, ntok = _sequence_logp(model, tok, rows["prompt"], rows["response"], max_length, pad_id,
                                    device, autocast)
        r = beta * (logp - ref("ref_logp"))
        labels = torch.tensor(rows["label"], dtype=torch.float32, device=device)
        if cfg.dataset.objective == "kto":
            from prm_ray.losses import kto_reference_point

            with torch.no_grad():
                kl_logp, kl_tok = _sequence_logp(model, tok, rows["prompt"], rows["kl_response"],
                                                 max_length, pad_id, device, autocast)
                ntok += kl_tok
                kl_r = beta * (kl_logp - ref("ref_logp_kl"))
                # Mean over the GLOBAL batch before the clamp, as KTO defines it.
                total = torch.stack([kl_r.sum(), torch.tensor(float(kl_r.numel()), device=device)])
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(total)
                z_ref = kto_reference_point(torch.full((1,), float(total[0] / total[1]), device=device))
            loss = objective.loss(r, labels, z_ref, desirable_weight=cfg.kto_desirable_weight,
                                  undesirable_weight=cfg.kto_undesirable_weight)
        else:
            loss = objective.loss(r, labels)
        pos, neg = labels > 0.5, labels <= 0.5
        stats.update(acc=((r > 0) == pos).float().mean().item(),
                     reward_correct=r[pos].sum().item(), reward_incorrect=r[neg].sum().item(),
                     n_correct=int(pos.sum()), n_incorrect=int(neg.sum()))
        # Means are formed after summing over micro-batches (classes vary in size).
        stats["sums"] = True
    stats["tokens"] = ntok
    return loss, stats


def train_loop_per_worker(config: dict) -> None:
    import signal

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prm_ray.prm import max_context, pad_token_id

    cfg = from_dict(TrainConfig, config["cfg"])
    total_steps, rows_total = config["total_steps"], config["rows"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed + rank)

    device = ray.train.torch.get_device()
    tok = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    model.config.use_cache = False
    max_length, pad_id = max_context(model), pad_token_id(tok)
    token_ids = step_label_token_ids(tok, cfg.step_label_tokens) if get_objective(cfg.dataset.objective).explicit else None
    autocast = cfg.bf16 and (device.type == "cuda" or device.type == "cpu")

    start_step = 0
    ckpt = ray.train.get_checkpoint()
    state = None
    if ckpt:
        with ckpt.as_directory() as d:
            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
            model.config.use_cache = False
            state = torch.load(Path(d) / STATE_FILE, weights_only=False)
            start_step = state["step"]
    model = ray.train.torch.prepare_model(model, parallel_strategy=cfg.strategy)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total_steps, cfg.warmup_ratio, cfg.min_lr_ratio))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])

    accum = cfg.global_batch_size // (cfg.micro_batch_size * world)
    shard = ray.train.get_dataset_shard("train")
    steps_per_epoch = config["steps_per_epoch"]
    step = start_step
    metrics_path = Path(config["out"]) / "metrics.jsonl"

    def save_and_report(metrics: dict) -> None:
        state_dict = _full_state_dict(model, cfg.strategy)  # collective under FSDP: every rank
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                unwrapped = model.module if hasattr(model, "module") else model
                unwrapped.save_pretrained(tmp, state_dict=state_dict)
                tok.save_pretrained(tmp)
                torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                           Path(tmp) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    if rank == 0:
        with open(Path(config["out"]) / "attempts.jsonl", "a") as f:
            f.write(json.dumps({"start_step": start_step, "time": time.time()}) + "\n")
    model.train()
    epoch = start_step // max(1, steps_per_epoch)
    skip = (start_step - epoch * steps_per_epoch) * accum  # micro-batches already trained this epoch
    t_last = time.time()
    per_epoch_micro = steps_per_epoch * accum
    while step < total_steps:
        acc_stats: list[dict] = []
        micro = 0
        opt.zero_grad(set_to_none=True)
        for batch in shard.iter_batches(batch_size=cfg.micro_batch_size, batch_format="pyarrow",
                                        drop_last=True):
            if micro + skip >= per_epoch_micro:
                break  # a tail shorter than one global batch is not trained on (no stale grads)
            if skip:
                skip -= 1
                continue
            rows = batch.to_pydict()
            last = (micro + 1) % accum == 0
            sync = model.no_sync() if (hasattr(model, "no_sync") and not last) else _null()
            with sync:
                loss, stats = _micro_batch_loss(model, tok, rows, cfg, max_length, pad_id, device, autocast,
                                                token_ids)
                (loss / accum).backward()
            stats["loss"] = loss.item()
            acc_stats.append(stats)
            micro += 1
            if not last:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if cfg.debug_kill_rank == rank and cfg.debug_kill_at_step == step:
                marker = Path(config["out"]) / ".debug_killed"
                if not marker.exists():  # once per run, whatever checkpoint the restart finds
                    marker.touch()
                    os.kill(os.getpid(), signal.SIGKILL)  # a real worker death
            now = time.time()
            metrics = _reduce_stats(acc_stats, world, dist)
            metrics.update(step=step, epoch=epoch, lr=sched.get_last_lr()[0], grad_norm=float(grad_norm),
                           tokens=metrics["tokens"],  # this step's tokens, all workers
                           tokens_per_s=metrics["tokens"] / max(now - t_last, 1e-9), time=now,
                           peak_rss_mb_max_worker=_peak_rss_mb(world, dist))
            t_last = now
            acc_stats = []
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            done = step >= total_steps
            if done or step % cfg.checkpoint_every == 0:
                save_and_report(metrics)
            if done:
                break
        epoch += 1
        skip = 0
        if step < total_steps and micro == 0:
            raise RuntimeError(f"worker {rank} got no batches: {rows_total} rows are too few for "
                               f"micro_batch_size {cfg.micro_batch_size} x {world} workers")


def _peak_rss_mb(world: int, dist) -> float:
    """The largest peak resident memory of any worker process so far, in MB."""
    import resource

    import torch

    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    if world > 1 and dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak)


def _full_state_dict(model, strategy: str) -> dict | None:
    """The unsharded state dict (gathered to rank 0 under FSDP); None means 'the module's own'."""
    if strategy != "fsdp":
        return None
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        return model.state_dict()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _reduce_stats(stats: list[dict], world: int, dist) -> dict:
    """Average a step's micro-batch statistics over micro-batches and workers."""
    import torch

    keys = ["loss", "acc", "reward_correct", "reward_incorrect", "n_correct", "n_incorrect", "tokens"]
    vec = torch.tensor([[s[k] for k in keys] for s in stats], dtype=torch.float64).sum(0)
    vec = torch.cat([vec, torch.tensor([len(stats)], dtype=torch.float64)])
    if world > 1 and dist.is_initialized():
        dist.all_reduce(vec)
    d = dict(zip(keys + ["micro"], vec.tolist()))
    sums = bool(stats[0].get("sums"))
    out = {"loss": d["loss"] / d["micro"], "acc": d["acc"] / d["micro"], "tokens": d["tokens"]}
    if sums:
        out["reward_correct"] = d["reward_correct"] / d["n_correct"] if d["n_correct"] else None
        out["reward_incorrect"] = d["reward_incorrect"] / d["n_incorrect"] if d["n_incorrect"] else None
    else:
        out["reward_correct"] = d["reward_correct"] / d["micro"]
        out["reward_incorrect"] = d["reward_incorrect"] / d["micro"]
    return out


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------


def _finished(out: Path, cfg: TrainConfig) -> dict | None:
    path = out / REPORT_FILE
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    if report.get("status") == "finished" and report.get("config") == to_dict(cfg):
        return report
    return None


def train_prm(cfg: TrainConfig, progress: bool = True) -> dict:
    """Build examples, add reference log-probs, train with Ray Train, export the HF checkpoint."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from prm_ray.rollout import init_ray
    from prm_ray.storage import run_exists, train_run_location

    cfg = _absolute_paths(cfg)
    out = Path(cfg.out).resolve()
    done = _finished(out, cfg)
    if done:
        done["reused"] = True
        return done
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    timings: dict[str, float] = {}

    t0 = time.time()
    examples, data_report = build_examples(cfg.data, cfg.dataset)
    timings["build_examples_s"] = time.time() - t0
    (out / "dataset_report.json").write_text(json.dumps(data_report, indent=2, default=str))
    if examples.num_rows == 0:
        raise ValueError(f"no training examples for objective {cfg.dataset.objective!r}: "
                         f"{json.dumps(data_report.get('instructions_dropped', {}))} "
                         "(e.g. DPO needs a correct and an incorrect response per instruction)")
    init_ray(cfg.ray_address)
    examples = examples.take(_permutation(examples.num_rows, cfg.seed))
    path, timings["reference_pass_s"], ref_counts = add_reference_logprobs(examples, cfg, out)

    per_step = cfg.global_batch_size
    steps_per_epoch = examples.num_rows // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{examples.num_rows} training examples are fewer than one global batch "
                         f"({per_step}); lower global_batch_size")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    metrics_path = out / "metrics.jsonl"
    storage, run_name = train_run_location(cfg.storage_path, out)
    for stale in (metrics_path, out / "attempts.jsonl", out / ".debug_killed"):
        if stale.exists() and not run_exists(storage, run_name):
            stale.unlink()

    _warn_if_ingest_starves(cfg)
    scaling = ScalingConfig(
        num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, accelerator_type=cfg.accelerator_type,
        resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})},
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "total_steps": total_steps, "rows": examples.num_rows,
                           "steps_per_epoch": steps_per_epoch, "out": str(out)},
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets={"train": ray.data.read_parquet(path)},
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    t0 = time.time()
    result = trainer.fit()
    timings["train_s"] = time.time() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as d:
        for f in Path(d).iterdir():
            if f.name != STATE_FILE:
                shutil.copy2(f, out / f.name)
    history = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    explicit = get_objective(cfg.dataset.objective).explicit
    card = {"kind": "explicit" if explicit else "implicit",
            "reference_model": cfg.reference_path if cfg.reference and not explicit else None,
            "beta": cfg.beta, "objective": cfg.dataset.objective, "trained_from": cfg.model}
    if explicit:
        card["step_label_tokens"] = list(cfg.step_label_tokens)
    (out / PRM_CARD).write_text(json.dumps(card, indent=2))
    plot_metrics(history, out / "training_curves.png",
                 title=cfg.dataset.objective if explicit else f"{cfg.dataset.objective} (beta {cfg.beta})",
                 explicit=explicit)
    from prm_ray.compute import count_parameters, train_flops

    params = count_parameters(cfg.model)
    tokens = trained_tokens(history)
    report = {
        "status": "finished", "config": to_dict(cfg), "steps": total_steps, "examples": examples.num_rows,
        "compute": {"params": params, "trained_tokens": tokens, "flops": train_flops(params, tokens),
                    "reference_sequences_scored": ref_counts["scored"]},
        "dataset": data_report, "timings": timings, "reference_pass": ref_counts, "final_metrics": history[-1] if history else None,
        "restarts": _restarts(history),
        "attempts": [json.loads(x) for x in (out / "attempts.jsonl").read_text().splitlines()],
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    report["reused"] = False
    return report


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Ray Train workers do not run in the driver's directory: a relative local path would be
    looked up on the Hugging Face hub there. Hub ids (no such local path) are left as they are."""
    cfg = copy.deepcopy(cfg)
    for name in ("data", "model", "ref_model", "ref_cache", "out"):
        value = getattr(cfg, name)
        if value and "://" not in value and (name == "out" or Path(value).exists()):
            setattr(cfg, name, str(Path(value).resolve()))
    return cfg


def _warn_if_ingest_starves(cfg: TrainConfig) -> None:
    """Training workers holding every CPU leave none for reading the dataset: a silent hang."""
    import logging

    import ray

    total = ray.cluster_resources().get("CPU", 0)
    wanted = cfg.num_workers * cfg.cpus_per_worker
    if total and wanted >= total:
        logging.getLogger(__name__).warning(
            "num_workers x cpus_per_worker = %s reserves all %s CPUs of the cluster; Ray Data needs "
            "some to read the training set and the run will wait until the autoscaler adds a node. "
            "Lower cpus_per_worker (threads_per_worker sets torch threads independently).", wanted, total)


def _permutation(n: int, seed: int) -> list[int]:
    import random

    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return idx


def trained_tokens(history: list[dict]) -> float:
    """Tokens trained on, summed over optimizer steps (a restart logs its redone steps twice: the
    last record of a step counts)."""
    return float(sum(h["tokens"] for h in {h["step"]: h for h in history if "tokens" in h}.values()))


def _restarts(history: list[dict]) -> int:
    """Steps logged twice mean the group restarted from a checkpoint and redid them."""
    steps = [h["step"] for h in history]
    return sum(1 for a, b in zip(steps, steps[1:]) if b <= a)


def plot_metrics(history: list[dict], path: Path, title: str = "", explicit: bool = False) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    axes[0].plot(steps, [h["loss"] for h in history])
    axes[0].set_title("loss")
    axes[1].plot(steps, [h["acc"] for h in history])
    axes[1].set_title("step label accuracy" if explicit else "sign / pair accuracy")
    axes[2].plot(steps, [h["reward_correct"] for h in history], label="correct")
    axes[2].plot(steps, [h["reward_incorrect"] for h in history], label="incorrect")
    axes[2].set_title("mean step logit by label" if explicit else "mean implicit reward")
    axes[2].legend()
    axes[3].plot(steps, [h["lr"] for h in history])
    axes[3].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
