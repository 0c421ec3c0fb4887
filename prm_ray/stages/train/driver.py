"""Training an implicit PRM on Ray Train: the driver.

    rollouts (Parquet) --build_examples--> rows or pairs --+ token columns (once per dataset, Ray Data)
        --Ray Data reference pass--> + reference log-probs
        --> TorchTrainer (N workers, DDP/FSDP, gloo on CPU, NCCL on GPU) --> HF checkpoint in <out>/

Departures from the paper's code (OpenRLHF fork, one ~460-line trainer per loss):
- one loop (:mod:`prm_ray.stages.train.worker`); the objective comes from the registry;
- the reference model's sequence log-probs are computed ONCE in a batched Ray Data pass and
  stored with the examples, so training runs only the trained model (the paper's code re-runs the
  reference on every step: about twice the forward compute);
- the examples arrive tokenized: token columns made once per dataset (:mod:`prm_ray.stages.tokenize`),
  where the paper's code tokenizes in its Dataset, per run;
- KTO's KL reference point uses the same precomputed reference log-probs for the mismatched
  completions and is averaged across workers before clamping.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import ray.data
from matplotlib.figure import Figure
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from prm_ray.artifacts import (
    ATTEMPTS_FILE,
    PRM_CARD,
    REF_DONE,
    STATE_FILE,
    TRAIN_METRICS,
    TRAIN_REPORT,
    check_settings,
    data_dir,
    delete_run,
    read_json,
    read_jsonl,
    run_exists,
    train_run_location,
    write_json,
)
from prm_ray.config import ConfigError, save_config, to_dict
from prm_ray.core.flops import train_flops
from prm_ray.core.objectives import get_objective
from prm_ray.models import context_length, count_parameters
from prm_ray.resources import check_cpus_left
from prm_ray.stages.logprobs import ModelPass
from prm_ray.stages.runtime import cluster_cpus, init_ray, map_actors
from prm_ray.stages.tokenize import read_tokens, tokenize_dataset
from prm_ray.stages.train.config import TrainConfig, absolute_paths
from prm_ray.stages.train.examples import attach_tokens, build_examples
from prm_ray.stages.train.loggers import check_loggers
from prm_ray.stages.train.worker import train_loop_per_worker

__all__ = ["add_reference_logprobs", "load_ref_cache", "plot_metrics", "train_dataset", "train_prm", "trained_tokens"]

OPERATIONAL = ("out", "overwrite", "ray_address", "ref_cache", "storage_path", "loggers", "checkpoint_every",
               "max_failures", "debug_kill_rank", "debug_kill_at_step")
"""Fields that do not change the trained PRM: a run with other values reuses (or resumes) one."""


def settings(cfg: TrainConfig) -> dict:
    """What decides the trained PRM; an output directory trained with other settings is refused."""
    d = to_dict(cfg)
    for name in OPERATIONAL:
        d.pop(name)
    return d


# ------------------------------------------------------------------------------------------
# Reference log-probs: one batched pass, stored with the examples
# ------------------------------------------------------------------------------------------


def load_ref_cache(path: str | Path, ref_model: str, dtype: str) -> dict[tuple[str, str], float]:
    """``(prompt, response) -> sum of reference log-probs`` from a ``reference_logprobs`` output."""
    path = Path(path)
    done = read_json(path / REF_DONE)
    if done is None:
        raise ConfigError(f"ref_cache: {path} is not a finished reference log-prob pass (no {REF_DONE})")
    key = done["key"]
    if key["ref_model"] != ref_model:
        raise ConfigError(f"ref_cache: {path} holds log-probs of {key['ref_model']!r}, but the reference "
                          f"model is {ref_model!r}")
    if key["dtype"] != dtype:
        raise ConfigError(f"ref_cache: {path} was computed in {key['dtype']}; this training's reference pass "
                          f"runs in {dtype} (ref_pass.dtype)")
    t = pads.dataset(str(data_dir(path)), format="parquet").to_table(columns=["prompt", "response", "ref_token_logp"])
    return {(p, r): float(sum(lp)) for p, r, lp in zip(t.column("prompt").to_pylist(), t.column("response").to_pylist(),
                                                        t.column("ref_token_logp").to_pylist())}


def add_reference_logprobs(examples: pa.Table, cfg: TrainConfig, out_dir: Path) -> tuple[str, float, dict]:
    """Write the examples with reference log-prob columns to Parquet; returns (path, seconds, counts).

    Each distinct (prompt, response) is scored once: DPO pairs share responses, and responses found
    in ``cfg.ref_cache`` are not scored at all. The examples keep their order.
    """
    columns = get_objective(cfg.dataset.objective).reference_columns
    path = out_dir / "examples"
    t0 = time.time()
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    cols = {c: examples.column(c).to_pylist() for c in {"prompt"} | {r for r, _ in columns}}
    wanted = {(p, r) for rc, _ in columns for p, r in zip(cols["prompt"], cols[rc])}
    known: dict[tuple[str, str], float] = {}
    if not cfg.use_reference:
        known = dict.fromkeys(wanted, 0.0)  # "w/o ref": log pi_ref := 0, the reward is beta * log pi_phi
    elif cfg.ref_cache:
        cache = load_ref_cache(cfg.ref_cache, cfg.reference_path, cfg.ref_pass.resolved().dtype)
        known = {k: cache[k] for k in wanted if k in cache}
    missing = sorted(wanted - known.keys())
    if missing:
        rp = cfg.ref_pass
        todo = pa.table({"prompt": [p for p, _ in missing], "response": [r for _, r in missing]})
        ds = ray.data.from_arrow(todo).repartition(4 * rp.replicas)  # several blocks per replica
        ds = map_actors(ds, ModelPass, rp, stage="ref_pass", batch_size=rp.batch_size,
                        constructor_kwargs=rp.actor_kwargs(cfg.reference_path, "sequence_logp"), **rp.actor_options())
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            known.update(zip(zip(batch.column("prompt").to_pylist(), batch.column("response").to_pylist()),
                             batch.column("ref_logp").to_pylist()))
    for rc, out_col in columns:
        examples = examples.append_column(
            out_col, pa.array([known[(p, r)] for p, r in zip(cols["prompt"], cols[rc])], pa.float64()))
    # Several files, so Ray Train's split hands every worker blocks of its own.
    n_files = max(1, min(4 * cfg.workers.replicas, examples.num_rows))
    step = -(-examples.num_rows // n_files)
    for i in range(0, examples.num_rows, step):
        pq.write_table(examples.slice(i, step), path / f"part-{i // step:05d}.parquet")
    counts = {"distinct_sequences": len(wanted), "from_cache": len(wanted) - len(missing) if cfg.use_reference else 0,
              "scored": len(missing)}
    return str(path), time.time() - t0, counts


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------


def train_dataset(path: str, materialize: bool) -> ray.data.Dataset:
    """The examples as Ray Train reads them: in file order, held in the object store when read
    more than once.

    A lazy dataset is read again every epoch (~6 s an epoch on 2 CPUs even for a few hundred rows);
    materialized, it is read once (Ray Data's advice for data that fits; it spills to disk when it
    does not). In file order, so the blocks, and each worker's rows, are those of the streamed read.
    """
    ds = ray.data.read_parquet(path)
    if materialize:
        ds.context.execution_options.preserve_order = True
        ds = ds.materialize()
    return ds


def _permutation(n: int, seed: int) -> list[int]:
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


def _check_output(out: Path, cfg: TrainConfig) -> dict | None:
    """The finished report in ``out`` when it was trained with ``cfg``'s settings; None when there
    is nothing (or an unfinished run of the same settings, which resumes); refused otherwise, or
    with ``overwrite`` cleared, Ray Train's run included (it would resume from its checkpoints)."""
    recorded = read_json(out / "settings.json")
    if not check_settings(out, recorded, settings(cfg), what="a PRM", overwrite=cfg.overwrite):
        delete_run(*train_run_location(cfg.storage_path, out))
        return None
    report = read_json(out / TRAIN_REPORT)
    if recorded is not None and report is not None and report.get("status") == "finished":
        return report
    return None


def train_prm(cfg: TrainConfig) -> dict:
    """Build examples, add reference log-probs, train with Ray Train, export the HF checkpoint.

    An output directory trained with the same settings is reused (a finished run) or resumed (an
    unfinished one); one trained with other settings is refused unless ``cfg.overwrite``.
    """
    cfg = absolute_paths(cfg).resolved()
    out = Path(cfg.out)
    done = _check_output(out, cfg)
    if done:
        done["reused"] = True
        return done
    check_loggers(cfg.loggers)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "settings.json", settings(cfg))
    save_config(cfg, out / "config.yaml")
    timings: dict[str, float] = {}

    t0 = time.time()
    examples, data_report = build_examples(cfg.data, cfg.dataset)
    timings["build_examples_s"] = time.time() - t0
    write_json(out / "dataset_report.json", data_report)
    if examples.num_rows == 0:
        raise ValueError(f"no training examples for objective {cfg.dataset.objective!r}: "
                         f"{json.dumps(data_report.get('instructions_dropped', {}))} "
                         "(e.g. DPO needs a correct and an incorrect response per instruction)")
    steps_per_epoch = examples.num_rows // cfg.global_batch_size
    if steps_per_epoch == 0:  # before the reference pass, which is the expensive part
        raise ConfigError(f"global_batch_size: {examples.num_rows} training examples are fewer than one global "
                          f"batch ({cfg.global_batch_size}); lower global_batch_size (dataset_report.json "
                          "in the output directory says where the rows went)")
    init_ray(cfg.ray_address)
    check_cpus_left(cfg.workers, "workers", cluster_cpus())
    examples = examples.take(_permutation(examples.num_rows, cfg.seed))
    t0 = time.time()
    tokens_path, tokens_info = tokenize_dataset(cfg.data, cfg.model)
    examples = attach_tokens(examples, read_tokens(tokens_path), context_length(cfg.model))
    timings["tokenize_s"] = time.time() - t0
    path, timings["reference_pass_s"], ref_counts = add_reference_logprobs(examples, cfg, out)

    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_optimizer_steps is not None:
        total_steps = min(total_steps, cfg.max_optimizer_steps)
    storage, run_name = train_run_location(cfg.storage_path, out)
    for stale in (out / TRAIN_METRICS, out / ATTEMPTS_FILE, out / ".debug_killed"):
        if stale.exists() and not run_exists(storage, run_name):
            stale.unlink()

    w = cfg.workers
    scaling = ScalingConfig(num_workers=w.replicas, use_gpu=w.num_gpus > 0, accelerator_type=w.accelerator_type,
                            resources_per_worker={"CPU": w.num_cpus, **({"GPU": w.num_gpus} if w.num_gpus else {})})
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "total_steps": total_steps, "rows": examples.num_rows,
                           "steps_per_epoch": steps_per_epoch, "out": str(out)},
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if w.num_gpus > 0 else "gloo"),
        datasets={"train": train_dataset(path, materialize=total_steps > steps_per_epoch)},
        # Each worker gets the same rows in the same order on every run: without preserve_order,
        # Ray Data hands blocks to whichever worker asks first, so a run's batches (and its loss
        # curve) depend on timing. With it, blocks go out in file order to the worker with the
        # fewest rows so far.
        dataset_config=DataConfig(execution_options=ingest),
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
    history = read_jsonl(out / TRAIN_METRICS)
    explicit = cfg.explicit
    card = {"kind": "explicit" if explicit else "implicit",
            "reference_model": cfg.reference_path if cfg.use_reference and not explicit else None,
            "beta": cfg.beta, "objective": cfg.dataset.objective, "trained_from": cfg.model}
    if explicit:
        card["step_label_tokens"] = list(cfg.step_label_tokens)
    write_json(out / PRM_CARD, card)
    plot_metrics(history, out / "training_curves.png",
                 title=cfg.dataset.objective if explicit else f"{cfg.dataset.objective} (beta {cfg.beta})",
                 explicit=explicit)
    params = count_parameters(cfg.model)
    tokens = trained_tokens(history)
    report = {
        "status": "finished", "config": to_dict(cfg), "steps": total_steps, "examples": examples.num_rows,
        "compute": {"params": params, "trained_tokens": tokens, "flops": train_flops(params, tokens),
                    "reference_sequences_scored": ref_counts["scored"]},
        "dataset": data_report, "timings": timings, "reference_pass": ref_counts,
        "precision": {"train": cfg.precision, "reference_pass": cfg.ref_pass.dtype},
        "tokens": {**tokens_info, "path": str(tokens_path)},
        "final_metrics": history[-1] if history else None, "restarts": _restarts(history),
        "attempts": read_jsonl(out / ATTEMPTS_FILE),
    }
    write_json(out / TRAIN_REPORT, report)
    report["reused"] = False
    return report


def plot_metrics(history: list[dict], path: Path, title: str = "", explicit: bool = False) -> None:
    if not history:
        return
    steps = [h["step"] for h in history]
    fig = Figure(figsize=(16, 3.2))
    axes = fig.subplots(1, 4)
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
