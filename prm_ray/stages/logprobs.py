"""The one batched model pass over (prompt, response) rows: a Ray Data actor pool.

Three uses, one actor (:class:`ModelPass`), one config (:class:`LogprobPassConfig`):

* ``token_logp``: the reference model's log-prob of every response token, as a list per row
  (``ref_token_logp``): computed once per rollout set and reused by every PRM evaluated or
  trained on it;
* ``sequence_logp``: their sum per row (``ref_logp``): the training examples' reference term;
* ``scores``: a trained PRM's step scores (:mod:`prm_ray.scoring`), every aggregation.

Rows are tokenized with :func:`prm_ray.tokens.encode_pair` and run longest first in
micro-batches, so padding stays small.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

import pyarrow as pa
import torch

from prm_ray.config import ConfigError, param
from prm_ray.core.reward import AGGREGATIONS, response_logprobs
from prm_ray.models import device_for, load_causal_lm, load_tokenizer
from prm_ray.resources import Resources, check_dtype, resolve_dtype
from prm_ray.scoring import ImplicitPRM, assemble, load_prm
from prm_ray.tokens import TokenizedItem, collate_items, encode_pair, max_context, pad_token_id

__all__ = ["OUTPUTS", "SCORE_SCHEMA", "LogprobPassConfig", "ModelPass"]

OUTPUTS = ("token_logp", "sequence_logp", "scores")

SCORE_SCHEMA = pa.schema(
    [("instruction_id", pa.string()), ("sample_index", pa.int32()), ("correct", pa.bool_()),
     ("extracted_answer", pa.string()), ("step_rewards", pa.list_(pa.float64())),
     ("q_values", pa.list_(pa.float64())), ("num_tokens", pa.int32())]
    + [(f"score_{a}", pa.float64()) for a in AGGREGATIONS])
"""One row per scored response (docs/evaluation.md)."""


@dataclass
class LogprobPassConfig(Resources):
    """A batched model pass over rollout rows: a Ray Data pool of actors (resources per actor).

    The defaults leave CPUs for Ray Data's own read tasks on a 2-core laptop (2 x 0.5): actors
    holding every CPU starve the read and the pass waits forever.
    """

    section: ClassVar[str] = ""  # how error messages name this section

    replicas: int = 2
    num_cpus: float = 0.5
    batch_size: int = param(256, "rows per Ray Data batch (sorted by length into micro-batches)")
    micro_batch_size: int = param(32, "sequences per forward pass")
    dtype: str = param("auto", "the model's dtype in this pass: auto (bfloat16 on GPUs and on CPUs with native "
                               "bf16, else float32), bfloat16, float32, float16 or float64")

    def __post_init__(self) -> None:
        for name in ("batch_size", "micro_batch_size", "replicas"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{self.section}{name} must be >= 1, got {getattr(self, name)}")
        check_dtype(self.dtype, f"{self.section}dtype")
        super().__post_init__()

    def resolved(self) -> Self:
        """This config with ``dtype: auto`` replaced by what it means here (see
        :func:`prm_ray.resources.resolve_dtype`): what the pass runs in, keys its cache with and records."""
        return dataclasses.replace(self, dtype=resolve_dtype(self.dtype, self.num_gpus))

    def actor_kwargs(self, model: str, output: str, **extra) -> dict:
        """:class:`ModelPass`'s constructor arguments for a pass of ``model`` under this config."""
        return {"model": model, "output": output, "dtype": resolve_dtype(self.dtype, self.num_gpus), "micro_batch_size": self.micro_batch_size,
                "threads": self.torch_threads, "num_gpus": self.num_gpus, **extra}


class ModelPass:
    """Ray Data actor: one model over a batch of rows with ``prompt`` and ``response`` columns.

    ``output="token_logp"`` adds ``ref_token_logp`` (list<float32>); ``"sequence_logp"`` adds
    ``ref_logp`` (float64, the sum over response tokens, EOS included); ``"scores"`` returns
    :data:`SCORE_SCHEMA` rows of the PRM at ``model`` (implicit or explicit, from its card).
    ``use_reference`` (scores): token rewards against the row's cached ``ref_token_logp``;
    otherwise "w/o ref" (``beta * log pi_phi``).
    """

    def __init__(self, model: str, output: str, *, dtype: str = "float32", micro_batch_size: int = 32,
                 threads: int = 1, num_gpus: float = 0.0, beta: float | None = None, use_reference: bool = False) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        torch.set_num_threads(threads)
        self.output, self.micro, self.use_reference = output, micro_batch_size, use_reference
        device = device_for(num_gpus)
        self.prm = None
        if output == "scores":
            self.prm = load_prm(model, beta=beta, reference=False, dtype=dtype, device=device)
            self.encode = lambda p, r: self.prm.encode(p, r)
        else:
            self.tokenizer = load_tokenizer(model)
            self.model = load_causal_lm(model, dtype, device)
            self.max_length, self.pad_id = max_context(self.model), pad_token_id(self.tokenizer)
            self.encode = lambda p, r: encode_pair(self.tokenizer, p, r, max_length=self.max_length)

    def _items(self, rows: dict) -> list[TokenizedItem]:
        items = []
        for i, (p, r) in enumerate(zip(rows["prompt"], rows["response"])):
            try:
                items.append(self.encode(p, r))
            except ValueError as exc:  # name the response; a model cannot score what it cannot read
                where = (f"instruction {rows['instruction_id'][i]!r} sample {rows['sample_index'][i]}"
                         if "instruction_id" in rows else f"row {i}")
                raise ValueError(f"{where}: {exc}") from None
        return items

    def _logprobs(self, items: Sequence[TokenizedItem]) -> torch.Tensor:
        t = collate_items(items, self.pad_id)
        dev = next(self.model.parameters()).device
        with torch.inference_mode():
            return response_logprobs(self.model, t["input_ids"].to(dev), t["attention_mask"].to(dev),
                                     t["response_mask"].to(dev)).cpu()

    def _reference(self, rows: dict, chunk: list[int], items: Sequence[TokenizedItem], shape) -> torch.Tensor:
        """The rows' cached reference log-probs, laid out like a collated batch."""
        ref = torch.zeros(shape, dtype=torch.float32)
        for b, i in enumerate(chunk):
            p, n = items[b].prompt_len, len(items[b].input_ids)
            cached = rows["ref_token_logp"][i]
            if len(cached) != n - p:
                raise ValueError(f"instruction {rows['instruction_id'][i]!r} sample {rows['sample_index'][i]}: "
                                 f"cached reference log-probs cover {len(cached)} tokens, the PRM tokenized "
                                 f"{n - p}; PRM and reference tokenizers must match")
            ref[b, p:n] = torch.tensor(cached, dtype=torch.float32)
        return ref

    def _scores(self, rows: dict, chunk: list[int], items: Sequence[TokenizedItem]):
        prm = self.prm
        batch = prm.collate(items)
        if isinstance(prm, ImplicitPRM):
            ref = self._reference(rows, chunk, items, batch["input_ids"].shape) if self.use_reference else None
            tok_r = prm.token_rewards(batch["input_ids"], batch["attention_mask"], batch["response_mask"], ref)
        else:
            tok_r = prm.batch_token_rewards(batch, max(len(it.steps) for it in items))
        return assemble(tok_r, batch["step_ids"], items, "min")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pydict()
        n = batch.num_rows
        items = self._items(rows)
        out: list = [None] * n
        order = sorted(range(n), key=lambda i: -len(items[i].input_ids))  # less padding
        for start in range(0, n, self.micro):
            chunk = order[start : start + self.micro]
            its = [items[i] for i in chunk]
            if self.output == "scores":
                for i, s in zip(chunk, self._scores(rows, chunk, its)):
                    out[i] = s
                continue
            lp = self._logprobs(its)
            sums = lp.sum(-1).double().tolist()
            for b, i in enumerate(chunk):
                out[i] = sums[b] if self.output == "sequence_logp" else \
                    lp[b, its[b].prompt_len : len(its[b].input_ids)].tolist()
        if self.output == "token_logp":
            return batch.append_column("ref_token_logp", pa.array(out, pa.list_(pa.float32())))
        if self.output == "sequence_logp":
            return batch.append_column("ref_logp", pa.array(out, pa.float64()))
        cols = {c: rows[c] for c in ("instruction_id", "sample_index", "correct", "extracted_answer")}
        cols.update(step_rewards=[s.step_rewards for s in out], q_values=[s.q_values for s in out],
                    num_tokens=[s.num_tokens for s in out],
                    **{f"score_{a}": [s.scores[a] for s in out] for a in AGGREGATIONS})
        return pa.table(cols, schema=SCORE_SCHEMA)  # explicit: a batch of all-null answers stays string
