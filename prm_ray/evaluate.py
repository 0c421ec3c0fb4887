"""Evaluate an implicit PRM on held-out rollouts: score every response step by step with Ray Data,
then best-of-N, weighted majority voting, majority voting and pass@k (`prm_ray.metrics`).

Two Ray Data passes, both batched actor pools over the rollout Parquet:

1. ``reference_logprobs``: the reference model's log-prob of every response token, computed ONCE
   per held-out set and stored next to it; every PRM evaluated on that set reuses it (the paper's
   eval code caches reference log-probs the same way).
2. ``score``: the PRM's token log-probs; token rewards ``beta * (logp - ref_logp)`` (eq. 3),
   step rewards, q-values and every aggregation (``prm_ray.reward``), written as Parquet.

The per-response numbers equal ``ImplicitPRM.score`` on the same (prompt, response) (tested).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from prm_ray.config import ConfigError, save_config, to_dict
from prm_ray.metrics import PROTOCOLS, evaluate_problems
from prm_ray.reward import AGGREGATIONS

ROLLOUT_COLUMNS = ["instruction_id", "sample_index", "prompt", "response", "correct", "extracted_answer"]
REF_DONE = "_ref_logprobs.json"
SCORE_SCHEMA = pa.schema(
    [("instruction_id", pa.string()), ("sample_index", pa.int32()), ("correct", pa.bool_()),
     ("extracted_answer", pa.string()), ("step_rewards", pa.list_(pa.float64())),
     ("q_values", pa.list_(pa.float64())), ("num_tokens", pa.int32())]
    + [(f"score_{a}", pa.float64()) for a in AGGREGATIONS])
METRICS_FILE = "metrics.json"


@dataclass
class EvaluateConfig:
    """How held-out rollouts are scored and which metrics are computed."""

    aggregation: str = "min"  # the paper's best-of-N score: the minimum step reward
    ns: list[int] | None = None  # None: 1, 2, 4, ... up to M (samples per problem)
    protocol: str = "first"  # first: the first N of M (paper) | random: mean over random N-subsets
    random_subsets: int = 100
    seed: int = 0
    # Weighted majority voting weighs each answer by sigmoid(coef * score). The paper's eval code
    # uses 0.001, not the training beta (reference-conventions.md); recorded with the results.
    vote_coef: float = 0.001
    reference: bool = True  # False: score with beta * log pi_phi only (paper Table 4, "w/o ref")
    batch_size: int = 256  # rows per Ray Data batch; sorted by length into micro-batches
    micro_batch_size: int = 32
    # Actors must leave CPUs for Ray Data's read tasks: actors holding every CPU starve the read
    # and the pass waits forever. 2 x 0.5 fits a 2-core laptop; each actor runs `threads` torch threads.
    replicas: int = 2
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    accelerator_type: str | None = None  # e.g. "A10G": the autoscaler starts that GPU type
    threads: int = 1
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"eval.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"eval.protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.ns is not None and (not self.ns or min(self.ns) < 1):
            raise ConfigError(f"eval.ns must be positive integers, got {self.ns}")
        for name in ("batch_size", "micro_batch_size", "replicas", "random_subsets", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be >= 1, got {getattr(self, name)}")


class _Scorer:
    """Ray Data actor: per-token response log-probs of one model, then (for a PRM) step rewards.

    ``mode="ref"`` adds ``ref_token_logp`` (list<float32>) to each row; ``mode="prm"`` reads it (or
    uses zeros without a reference) and adds step rewards and one score column per aggregation.
    ``step_label_tokens`` (an explicit PRM, e.g. Math-Shepherd): step scores are
    ``sigmoid(logit(+) - logit(-))`` at each step's last token instead of log-ratio sums; the
    step-reward, q-value and aggregation code after that is the same.
    """

    def __init__(self, model: str, mode: str, beta: float = 0.05, dtype: str = "float32",
                 micro_batch_size: int = 32, use_ref: bool = True, threads: int = 1,
                 step_label_tokens: list[str] | None = None) -> None:
        import torch

        torch.set_num_threads(threads)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from prm_ray.prm import max_context, pad_token_id

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
        if torch.cuda.is_available():
            self.model = self.model.cuda()
        self.mode, self.beta, self.micro, self.use_ref = mode, beta, micro_batch_size, use_ref
        self.max_length = max_context(self.model)
        self.pad_id = pad_token_id(self.tokenizer)
        self.label_ids = None
        if step_label_tokens is not None:
            from prm_ray.train import step_label_token_ids

            self.label_ids = step_label_token_ids(self.tokenizer, step_label_tokens)

    def _explicit_token_rewards(self, items):
        import torch

        from prm_ray.prm import collate_items
        from prm_ray.reward import explicit_token_rewards, step_label_logits

        t = collate_items(items, self.pad_id)
        dev = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(input_ids=t["input_ids"].to(dev), attention_mask=t["attention_mask"].to(dev)).logits
            step_ids = t["step_ids"].to(dev)
            z, mask = step_label_logits(logits.float(), step_ids, *self.label_ids, max(len(it.steps) for it in items))
            return explicit_token_rewards(z, mask, step_ids).cpu().double(), t

    def _logprobs(self, items):
        import torch

        from prm_ray.prm import collate_items
        from prm_ray.reward import response_logprobs

        t = collate_items(items, self.pad_id)
        dev = next(self.model.parameters()).device
        with torch.inference_mode():
            lp = response_logprobs(self.model, t["input_ids"].to(dev), t["attention_mask"].to(dev),
                                   t["response_mask"].to(dev)).cpu()
        return lp, t

    @staticmethod
    def _step_outputs(out: dict, chunk: list[int], its: list, tok_r, t: dict) -> None:
        """Token rewards -> step rewards, q-values and every aggregation, into the output columns."""
        from prm_ray.reward import aggregate, q_values, step_rewards

        num_steps = max(len(it.steps) for it in its)
        step_r, step_mask = step_rewards(tok_r, t["step_ids"], num_steps)
        q = q_values(step_r, step_mask)
        aggs = {a: aggregate(step_r, step_mask, a) for a in AGGREGATIONS}
        for b, i in enumerate(chunk):
            k = len(its[b].steps)
            out["step_rewards"][i] = step_r[b, :k].tolist()
            out["q_values"][i] = q[b, :k].tolist()
            out["num_tokens"][i] = its[b].num_response_tokens
            for a, v in aggs.items():
                out[f"score_{a}"][i] = float(v[b])

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from prm_ray.prm import encode_pair
        from prm_ray.reward import token_rewards

        rows = batch.to_pydict()
        n = batch.num_rows
        items = []
        for i, (p, r) in enumerate(zip(rows["prompt"], rows["response"])):
            try:
                items.append(encode_pair(self.tokenizer, p, r, max_length=self.max_length))
            except ValueError as exc:  # name the response; a PRM cannot score what it cannot read
                raise ValueError(f"instruction {rows['instruction_id'][i]!r} sample "
                                 f"{rows['sample_index'][i]}: {exc}") from None
        out: dict[str, list] = defaultdict(lambda: [None] * n)
        order = sorted(range(n), key=lambda i: -len(items[i].input_ids))  # less padding
        for start in range(0, n, self.micro):
            chunk = order[start : start + self.micro]
            its = [items[i] for i in chunk]
            if self.label_ids is not None:
                tok_r, t = self._explicit_token_rewards(its)
                self._step_outputs(out, chunk, its, tok_r, t)
                continue
            lp, t = self._logprobs(its)
            if self.mode == "ref":
                for b, i in enumerate(chunk):
                    p, L = its[b].prompt_len, len(its[b].input_ids)
                    out["ref_token_logp"][i] = lp[b, p:L].tolist()
                continue
            mask = t["response_mask"]
            ref = torch.zeros_like(lp)
            if self.use_ref:
                for b, i in enumerate(chunk):
                    p, L = its[b].prompt_len, len(its[b].input_ids)
                    cached = rows["ref_token_logp"][i]
                    if len(cached) != L - p:
                        raise ValueError(f"instruction {rows['instruction_id'][i]!r} sample "
                                         f"{rows['sample_index'][i]}: cached reference log-probs cover "
                                         f"{len(cached)} tokens, the PRM tokenized {L - p}; "
                                         "PRM and reference tokenizers must match")
                    ref[b, p:L] = torch.tensor(cached, dtype=lp.dtype)
            tok_r = token_rewards(lp, ref if self.use_ref else None, mask, self.beta)
            self._step_outputs(out, chunk, its, tok_r, t)
        keep = ["instruction_id", "sample_index", "correct", "extracted_answer"]
        if self.mode == "ref":
            batch = batch.append_column("ref_token_logp", pa.array(out["ref_token_logp"], pa.list_(pa.float32())))
            return batch
        cols = {c: rows[c] for c in keep}
        cols.update(out)
        return pa.table(cols, schema=SCORE_SCHEMA)  # explicit: a batch of all-null answers stays string


def _check_cpus(cfg: EvaluateConfig) -> None:
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    if cfg.num_gpus == 0 and total and cfg.replicas * cfg.num_cpus >= total:
        raise ConfigError(
            f"eval.replicas x eval.num_cpus = {cfg.replicas * cfg.num_cpus:g} takes every CPU of the cluster "
            f"({total:g}); Ray Data then cannot schedule the read tasks and the pass never starts. "
            "Lower eval.num_cpus (torch threads are set by eval.threads)")


def _read(path: str | Path, columns: list[str], blocks: int):
    import pyarrow.dataset as pads
    import ray

    from prm_ray.datasets import _check_columns

    src = Path(path)
    src = src / "data" if (src / "data").is_dir() else src
    if not src.exists():
        raise FileNotFoundError(f"no scored-data directory at {src}")
    schema = pads.dataset(str(src), format="parquet").schema  # reads footers only
    _check_columns(schema.names, columns, str(src))  # fail early, naming any missing column
    # Several blocks per replica: a single file is read as one block, which would feed a single
    # actor and idle the others (a held-out set is small enough for this to be cheap).
    return ray.data.read_parquet(str(src), columns=columns, file_extensions=["parquet"]).repartition(blocks)


def reference_logprobs(rollouts: str | Path, ref_model: str, out: str | Path, cfg: EvaluateConfig) -> dict:
    """Write the rollouts plus per-token reference log-probs to ``out`` (reused when present)."""
    out = Path(out)
    done = out / REF_DONE
    key = {"rollouts": str(Path(rollouts).resolve()), "ref_model": str(ref_model), "dtype": cfg.dtype}
    if done.exists():
        info = json.loads(done.read_text())
        if info["key"] == key:
            return {**info, "reused": True}
    if out.exists():
        shutil.rmtree(out)
    from prm_ray.rollout import init_ray

    init_ray()
    _check_cpus(cfg)
    t0 = time.time()
    ds = _read(rollouts, ROLLOUT_COLUMNS, 4 * cfg.replicas)
    ds = ds.map_batches(_Scorer, batch_size=cfg.batch_size, batch_format="pyarrow", concurrency=cfg.replicas,
                        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, accelerator_type=cfg.accelerator_type,
                        fn_constructor_kwargs={"model": ref_model, "mode": "ref", "dtype": cfg.dtype,
                                               "micro_batch_size": cfg.micro_batch_size, "threads": cfg.threads})
    ds.write_parquet(str(out / "data"))
    rows = sum(pa.parquet.ParquetFile(f).metadata.num_rows for f in (out / "data").glob("*.parquet"))
    info = {"key": key, "rows": rows, "seconds": time.time() - t0}
    done.write_text(json.dumps(info, indent=2))
    return {**info, "reused": False}


def score(data: str | Path, prm: str, out: str | Path, cfg: EvaluateConfig, beta: float,
          step_label_tokens: list[str] | None = None) -> float:
    """Score every response of ``data`` (rollouts, with ``ref_token_logp`` when ``cfg.reference``).

    ``step_label_tokens``: ``prm`` is an explicit PRM reading these two tokens' logits.
    """
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    _check_cpus(cfg)
    cols = ROLLOUT_COLUMNS + (["ref_token_logp"] if cfg.reference else [])
    ds = _read(data, cols, 4 * cfg.replicas)
    ds = ds.map_batches(_Scorer, batch_size=cfg.batch_size, batch_format="pyarrow", concurrency=cfg.replicas,
                        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, accelerator_type=cfg.accelerator_type,
                        fn_constructor_kwargs={"model": prm, "mode": "prm", "beta": beta, "dtype": cfg.dtype,
                                               "micro_batch_size": cfg.micro_batch_size,
                                               "use_ref": cfg.reference, "threads": cfg.threads,
                                               "step_label_tokens": step_label_tokens})
    ds.write_parquet(str(out))
    return time.time() - t0


def problems_from_scores(scores: str | Path | pa.Table, aggregation: str = "min") -> list[dict]:
    """Group scored responses by instruction (sorted by sample_index) for `prm_ray.metrics`."""
    import pyarrow.dataset as pads

    table = scores if isinstance(scores, pa.Table) else pads.dataset(str(scores), format="parquet").to_table(
        columns=["instruction_id", "sample_index", "correct", "extracted_answer", f"score_{aggregation}"])
    cols = table.to_pydict()
    by: dict[str, list] = defaultdict(list)
    for iid, j, c, a, s in zip(cols["instruction_id"], cols["sample_index"], cols["correct"],
                               cols["extracted_answer"], cols[f"score_{aggregation}"]):
        by[iid].append((j, bool(c), a, float(s)))
    problems = []
    for iid in sorted(by):
        samples = sorted(by[iid])
        idx = [s[0] for s in samples]
        if len(set(idx)) != len(idx):
            raise ValueError(f"instruction {iid!r} has duplicate sample_index values")
        problems.append({"instruction_id": iid, "correct": [s[1] for s in samples],
                         "answers": [s[2] for s in samples], "scores": [s[3] for s in samples]})
    return problems


def metrics(problems: list[dict], cfg: EvaluateConfig) -> dict[str, float]:
    return evaluate_problems(problems, cfg.ns, protocol=cfg.protocol, subsets=cfg.random_subsets,
                             seed=cfg.seed, vote_coef=cfg.vote_coef)


def evaluate_prm(prm: str, data: str | Path, out: str | Path, cfg: EvaluateConfig, *,
                 beta: float | None = None) -> dict:
    """Score ``data`` with the PRM at ``prm`` and compute every metric; writes ``<out>/metrics.json``
    (reused when it exists with the same inputs and config) and ``<out>/scores/``.

    ``data``: rollouts with ``ref_token_logp`` (see :func:`reference_logprobs`) when
    ``cfg.reference``, plain rollouts otherwise. ``beta`` defaults to the PRM card's.
    """
    out = Path(out)
    card_path = Path(prm) / "prm_ray_prm.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    beta = float(beta if beta is not None else card.get("beta", 0.05))
    label_tokens = card.get("step_label_tokens", ["+", "-"]) if card.get("kind") == "explicit" else None
    if label_tokens is not None and cfg.reference:
        raise ConfigError(f"eval.reference is true but {prm} is an explicit PRM ({card.get('objective')}), "
                          "which has no reference model; set eval.reference false")
    key = {"prm": str(Path(prm).resolve()), "data": str(Path(data).resolve()), "beta": beta,
           "config": to_dict(cfg)}
    done = out / METRICS_FILE
    if done.exists():
        prev = json.loads(done.read_text())
        if prev.get("key") == key:
            return {**prev, "reused": True}
    out.mkdir(parents=True, exist_ok=True)
    from prm_ray.rollout import init_ray

    init_ray()
    seconds = score(data, prm, out / "scores", cfg, beta, label_tokens)
    problems = problems_from_scores(out / "scores", cfg.aggregation)
    result = {"key": key, "metrics": metrics(problems, cfg), "problems": len(problems),
              "samples_per_problem": len(problems[0]["correct"]), "score_seconds": seconds,
              "responses": sum(len(p["correct"]) for p in problems)}
    save_config(cfg, out / "eval_config.yaml")
    done.write_text(json.dumps(result, indent=2))
    return {**result, "reused": False}
