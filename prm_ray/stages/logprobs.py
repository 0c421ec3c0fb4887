"""The one batched model pass over (prompt, response) rows: a Ray Data actor pool.

Three uses, one actor (:class:`ModelPass`), one config (:class:`LogprobPassConfig`):

* ``token_logp``: the reference model's log-prob of every response token, as a list per row
  (``ref_token_logp``): computed once per rollout set and reused by every PRM evaluated or
  trained on it;
* ``sequence_logp``: their sum per row (``ref_logp``): the training examples' reference term;
* ``scores``: a trained PRM's step scores (:mod:`prm_ray.scoring`), every aggregation.

Rows carry their token columns (:data:`prm_ray.tokens.TOKEN_FIELDS`, made once per dataset by
:mod:`prm_ray.stages.tokenize`) or are tokenized here with :func:`prm_ray.tokens.encode_pair`; they
run longest first in micro-batches, so padding stays small.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

import pyarrow as pa
import torch

from prm_ray.artifacts import read_prm_card
from prm_ray.config import ConfigError, param
from prm_ray.core.reward import AGGREGATIONS, response_logprobs, token_rewards
from prm_ray.models import context_length, device_for, load_causal_lm, load_tokenizer
from prm_ray.resources import Resources, check_dtype, resolve_dtype
from prm_ray.scoring import ImplicitPRM, assemble, load_prm
from prm_ray.tokens import TOKEN_NAMES, TokenizedItem, collate_items, encode_pair, max_context, pad_token_id

__all__ = ["BACKENDS", "OUTPUTS", "SCORE_SCHEMA", "LogprobPassConfig", "ModelPass", "VLLMLogprobs", "check_backend"]

OUTPUTS = ("token_logp", "sequence_logp", "scores")
BACKENDS = ("hf", "vllm")

SCORE_SCHEMA = pa.schema(
    [("instruction_id", pa.string()), ("sample_index", pa.int32()), ("correct", pa.bool_()),
     ("extracted_answer", pa.string()), ("answer_group", pa.string()), ("step_rewards", pa.list_(pa.float64())),
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
    backend: str = param("hf", "hf: transformers in each actor | vllm: vLLM's prompt_logprobs, tensor parallel over "
                               "num_gpus GPUs (reference passes and implicit PRMs; docs/evaluation.md)")

    def __post_init__(self) -> None:
        for name in ("batch_size", "micro_batch_size", "replicas"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{self.section}{name} must be >= 1, got {getattr(self, name)}")
        check_dtype(self.dtype, f"{self.section}dtype")
        if self.backend not in BACKENDS:
            raise ConfigError(f"{self.section}backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "vllm" and self.num_gpus and self.num_gpus != int(self.num_gpus):
            raise ConfigError(f"{self.section}num_gpus must be a whole number with backend vllm (its tensor-parallel "
                              f"size), got {self.num_gpus}")
        super().__post_init__()

    def actor_options(self) -> dict:
        """Ray options of the pass's actors beyond resources: a vLLM engine on CPU runs in the actor's
        process with a small KV cache (only prompts run, one token is generated)."""
        if self.backend != "vllm" or self.num_gpus:
            return {}
        return {"runtime_env": {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                                             "OMP_NUM_THREADS": str(self.torch_threads)}}}

    def resolved(self) -> Self:
        """This config with ``dtype: auto`` replaced by what it means here (see
        :func:`prm_ray.resources.resolve_dtype`): what the pass runs in, keys its cache with and records."""
        return dataclasses.replace(self, dtype=resolve_dtype(self.dtype, self.num_gpus))

    def actor_kwargs(self, model: str, output: str, **extra) -> dict:
        """:class:`ModelPass`'s constructor arguments for a pass of ``model`` under this config."""
        return {"model": model, "output": output, "dtype": resolve_dtype(self.dtype, self.num_gpus),
                "micro_batch_size": self.micro_batch_size, "threads": self.torch_threads, "num_gpus": self.num_gpus,
                "backend": self.backend, **extra}


def check_backend(card: dict, prm: str, backend: str, section: str = "") -> None:
    """Refuse vLLM scoring of an explicit PRM (its scores are step logits, not log-probs), naming
    the field; ``card`` is the PRM's card (:func:`prm_ray.artifacts.read_prm_card`)."""
    if backend == "vllm" and card.get("kind") == "explicit":
        raise ConfigError(f"{section}backend vllm scores implicit PRMs; {prm} is an explicit PRM "
                          f"({card.get('objective')}): use {section}backend hf")


class VLLMLogprobs:
    """Per-token log-probs of whole sequences from a vLLM engine: each row runs as a prompt with
    ``prompt_logprobs=0`` (the log-prob of every prompt token itself) and one generated token.
    Same layout as :func:`prm_ray.core.reward.response_logprobs`; equal to the Hugging Face pass
    within float rounding (tested)."""

    def __init__(self, model: str, dtype: str, num_gpus: float, max_model_len: int | None) -> None:
        from vllm import LLM, SamplingParams

        gpus = int(num_gpus)
        # Prefix caching would skip the log-probs of cached prompt tokens; chunked prefill is off on
        # CPUs, as for the rollout engines.
        self.llm = LLM(model=model, dtype=dtype, tensor_parallel_size=max(1, gpus), enforce_eager=gpus == 0,
                       enable_prefix_caching=False, enable_chunked_prefill=gpus > 0, max_model_len=max_model_len,
                       seed=0)
        self.params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)

    def __call__(self, items: Sequence[TokenizedItem]) -> torch.Tensor:
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(it.input_ids)) for it in items], self.params,
                                 use_tqdm=False)
        logp = torch.zeros(len(items), max(len(it.input_ids) for it in items), dtype=torch.float32)
        for b, (it, out) in enumerate(zip(items, outs)):
            per_token = out.prompt_logprobs  # entry j: {token id: Logprob} for token j given tokens < j
            logp[b, it.prompt_len : len(it.input_ids)] = torch.tensor(
                [per_token[j][it.input_ids[j]].logprob for j in range(it.prompt_len, len(it.input_ids))])
        return logp


class ModelPass:
    """Ray Data actor: one model over a batch of rows with ``prompt`` and ``response`` columns.

    ``output="token_logp"`` adds ``ref_token_logp`` (list<float32>); ``"sequence_logp"`` adds
    ``ref_logp`` (float64, the sum over response tokens, EOS included); ``"scores"`` returns
    :data:`SCORE_SCHEMA` rows of the PRM at ``model`` (implicit or explicit, from its card).
    ``use_reference`` (scores): token rewards against the row's cached ``ref_token_logp``;
    otherwise "w/o ref" (``beta * log pi_phi``).
    """

    def __init__(self, model: str, output: str, *, dtype: str = "float32", micro_batch_size: int = 32,
                 threads: int = 1, num_gpus: float = 0.0, beta: float | None = None, use_reference: bool = False,
                 backend: str = "hf", step_split: str = "blank_line") -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        torch.set_num_threads(threads)
        self.output, self.micro, self.use_reference = output, micro_batch_size, use_reference
        device = device_for(num_gpus)
        self.prm, self.vllm = None, None
        if backend == "vllm":
            card = read_prm_card(model) if output == "scores" else {}
            check_backend(card, model, backend)
            self.beta = float(beta if beta is not None else card.get("beta", 0.05))
            self.tokenizer = load_tokenizer(model)
            self.max_length, self.pad_id = context_length(model), pad_token_id(self.tokenizer)
            self.encode = lambda p, r: encode_pair(self.tokenizer, p, r, max_length=self.max_length,
                                                   step_split=step_split)
            self.vllm = VLLMLogprobs(model, dtype, num_gpus, self.max_length)
        elif output == "scores":
            self.prm = load_prm(model, beta=beta, reference=False, dtype=dtype, device=device, step_split=step_split)
            self.encode = lambda p, r: self.prm.encode(p, r)
        else:
            self.tokenizer = load_tokenizer(model)
            self.model = load_causal_lm(model, dtype, device)
            self.max_length, self.pad_id = max_context(self.model), pad_token_id(self.tokenizer)
            self.encode = lambda p, r: encode_pair(self.tokenizer, p, r, max_length=self.max_length,
                                                   step_split=step_split)

    def _items(self, rows: dict) -> list[TokenizedItem]:
        if "input_ids" in rows:  # tokenized once per dataset (prm_ray.stages.tokenize)
            return self._token_items(rows)
        items = []
        for i, (p, r) in enumerate(zip(rows["prompt"], rows["response"])):
            try:
                items.append(self.encode(p, r))
            except ValueError as exc:  # name the response; a model cannot score what it cannot read
                where = (f"instruction {rows['instruction_id'][i]!r} sample {rows['sample_index'][i]}"
                         if "instruction_id" in rows else f"row {i}")
                raise ValueError(f"{where}: {exc}") from None
        return items

    def _token_items(self, rows: dict) -> list[TokenizedItem]:
        # Step texts are not part of any output column; only their count is used.
        items = [TokenizedItem(ids, p, steps, [""] * n) for ids, p, steps, n in
                 zip(rows["input_ids"], rows["prompt_len"], rows["step_ids"], rows["num_steps"])]
        limit = self.prm.max_length if self.prm is not None else self.max_length
        for i, it in enumerate(items):
            if limit is not None and len(it.input_ids) > limit:
                raise ValueError(f"instruction {rows['instruction_id'][i]!r} sample {rows['sample_index'][i]} is too "
                                 f"long: {len(it.input_ids)} tokens > max_position_embeddings {limit} (inputs are "
                                 "never truncated)")
        return items

    def _logprobs(self, items: Sequence[TokenizedItem]) -> torch.Tensor:
        if self.vllm is not None:
            return self.vllm(items)
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
        batch = prm.collate(items) if prm is not None else collate_items(items, self.pad_id)
        if prm is not None and not isinstance(prm, ImplicitPRM):  # explicit: step logits, no reference
            tok_r = prm.batch_token_rewards(batch, max(len(it.steps) for it in items))
        else:
            ref = self._reference(rows, chunk, items, batch["input_ids"].shape) if self.use_reference else None
            if self.vllm is not None:  # an implicit PRM's log-probs from vLLM, the same reward math
                tok_r = token_rewards(self.vllm(items), ref, batch["response_mask"], self.beta)
            else:
                tok_r = prm.token_rewards(batch["input_ids"], batch["attention_mask"], batch["response_mask"], ref)
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
        if self.output != "scores":  # the input's columns, less the token columns it may have read
            batch = batch.drop_columns([c for c in TOKEN_NAMES if c in batch.column_names])
        if self.output == "token_logp":
            return batch.append_column("ref_token_logp", pa.array(out, pa.list_(pa.float32())))
        if self.output == "sequence_logp":
            return batch.append_column("ref_logp", pa.array(out, pa.float64()))
        cols = {c: rows[c] for c in ("instruction_id", "sample_index", "correct", "extracted_answer")}
        cols["answer_group"] = rows.get("answer_group", [None] * n)  # absent in rollouts made before groups
        cols.update(step_rewards=[s.step_rewards for s in out], q_values=[s.q_values for s in out],
                    num_tokens=[s.num_tokens for s in out],
                    **{f"score_{a}": [s.scores[a] for s in out] for a in AGGREGATIONS})
        return pa.table(cols, schema=SCORE_SCHEMA)  # explicit: a batch of all-null answers stays string
