"""The public scoring API: an implicit PRM built from any Hugging Face causal LM.

Example::

    prm = ImplicitPRM.from_pretrained("path/to/prm", ref_path="path/to/ref", beta=0.05)
    [s.score for s in prm.score(["What is 1+1?"], ["1+1 = 2.\\n\\nThe answer is 2."])]

Per response: token rewards ``beta * log pi_phi / pi_ref`` (eq. 3 per token), summed into
reasoning steps (eq. 3), their running sums (q-values, eq. 2), and one aggregated score (the
paper's best-of-N score is the minimum step reward). Pure PyTorch; Ray stages wrap this class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prm_ray.policy import render_prompt
from prm_ray.reward import (
    AGGREGATIONS,
    aggregate,
    q_values,
    response_logprobs,
    step_ids_from_offsets,
    step_rewards,
    token_rewards,
)

__all__ = ["ExplicitPRM", "ImplicitPRM", "StepScores", "TokenizedItem", "collate_items", "encode_pair", "load_prm"]

PRM_CARD = "prm_ray_prm.json"  # written by prm_ray.train next to every trained PRM


@dataclass
class StepScores:
    """Implicit process rewards of one response.

    ``steps`` concatenate back to the response text. ``token_rewards`` covers every response
    token (``num_tokens`` of them, including the appended EOS). ``q_values[t]`` is the running sum
    of ``step_rewards`` up to step t, so ``q_values[-1]`` is the outcome reward r(y). ``score`` is
    ``step_rewards`` aggregated with ``aggregation``.
    """

    steps: list[str]
    step_rewards: list[float]
    q_values: list[float]
    token_rewards: list[float]
    num_tokens: int
    score: float
    aggregation: str


@dataclass
class TokenizedItem:
    """One prompt+response, tokenized the way :meth:`ImplicitPRM.encode` does it.

    ``input_ids`` = prompt ids + response ids (+ EOS); the response starts at ``prompt_len``.
    ``step_ids`` has one entry per response token.
    """

    input_ids: list[int]
    prompt_len: int
    step_ids: list[int]
    steps: list[str]

    @property
    def num_response_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_len


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def pad_token_id(tokenizer) -> int:
    """Padding ids never reach a reward (attention- and response-masked); any valid id works."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None else (tokenizer.eos_token_id or 0)


def encode_pair(
    tokenizer,
    prompt: str,
    response: str,
    *,
    chat_template: bool = True,
    append_eos: bool = True,
    separator: str = "\n\n",
    max_length: int | None = None,
    index: int | None = None,
) -> TokenizedItem:
    """Tokenize one prompt+response the way a sampler produced it.

    The prompt (rendered with the chat template if ``chat_template``) and the response are
    tokenized separately without special tokens and concatenated; EOS is appended if
    ``append_eos`` (the paper's last step includes the end-of-turn token). Raises ``ValueError``
    rather than truncating when the sequence exceeds ``max_length``. Scoring and training both use
    this, so a PRM is trained on exactly the token sequences it later scores.
    """
    tok = tokenizer
    where = f"item {index}" if index is not None else "item"
    text = render_prompt(tok, prompt) if chat_template else prompt
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise ValueError(f"{where}: the prompt is empty after rendering; the first response "
                         "token needs a context (use the chat template or include BOS)")
    enc = tok(response, add_special_tokens=False, return_offsets_mapping=True)
    response_ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    if append_eos:
        response_ids.append(tok.eos_token_id)
        offsets.append((len(response), len(response)))  # zero-width: joins the last step
    total = len(prompt_ids) + len(response_ids)
    if max_length is not None and total > max_length:
        raise ValueError(
            f"{where} is too long: {len(prompt_ids)} prompt + {len(response_ids)} response tokens "
            f"= {total} > max_position_embeddings {max_length} (inputs are never truncated)"
        )
    step_ids, steps = step_ids_from_offsets(response, offsets, separator)
    return TokenizedItem(list(prompt_ids) + response_ids, len(prompt_ids), step_ids, steps)


def collate_items(items: Sequence[TokenizedItem], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad items into ``input_ids``, ``attention_mask``, ``response_mask``, ``step_ids``."""
    B = len(items)
    L = max(len(it.input_ids) for it in items)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    response_mask = torch.zeros(B, L, dtype=torch.bool)
    step_ids = torch.full((B, L), -1, dtype=torch.long)
    for b, it in enumerate(items):
        n, p = len(it.input_ids), it.prompt_len
        input_ids[b, :n] = torch.tensor(it.input_ids, dtype=torch.long)
        attention_mask[b, :n] = 1
        response_mask[b, p:n] = True
        step_ids[b, p:n] = torch.tensor(it.step_ids, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "step_ids": step_ids,
    }


def max_context(*models: torch.nn.Module | None) -> int | None:
    limits = [getattr(m.config, "max_position_embeddings", None) for m in models if m is not None]
    limits = [x for x in limits if x]
    return min(limits) if limits else None


class ImplicitPRM:
    """An implicit PRM: ``r_phi(y) = beta * log pi_phi(y) / pi_ref(y)`` (Prop. 3.1).

    ``ref_model=None`` is the paper's "w/o ref" mode (Table 4): token reward ``beta * log pi_phi``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        ref_model: torch.nn.Module | None = None,
        *,
        beta: float = 0.05,
        step_separator: str = "\n\n",
        aggregation: str = "min",
        append_eos: bool = True,
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
        if not step_separator:
            raise ValueError("step_separator must be a non-empty string")
        if append_eos and tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True but the tokenizer has no eos_token_id")
        if ref_model is not None:
            v, rv = model.config.vocab_size, ref_model.config.vocab_size
            if v != rv:
                raise ValueError(
                    f"PRM and reference models have different vocab_size ({v} vs {rv}); "
                    "the log-ratio needs both models over the same tokenizer"
                )
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                f"{model.config.vocab_size}"
            )
        self.model = model.eval()
        self.ref_model = ref_model.eval() if ref_model is not None else None
        self.tokenizer = tokenizer
        self.beta = float(beta)
        self.step_separator = step_separator
        self.aggregation = aggregation
        self.append_eos = append_eos
        self.max_length: int | None = max_context(model, ref_model)
        self.pad_id: int = pad_token_id(tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        ref_path: str | None = None,
        beta: float = 0.05,
        *,
        step_separator: str = "\n\n",
        aggregation: str = "min",
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        append_eos: bool = True,
    ) -> "ImplicitPRM":
        """Load the PRM (and optionally the reference) as ``AutoModelForCausalLM`` + its tokenizer.

        The reference's tokenizer (if it ships one) must have exactly the PRM tokenizer's vocabulary.
        """
        dtype = _as_dtype(dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        ref_model = None
        if ref_path is not None:
            try:
                ref_tokenizer = AutoTokenizer.from_pretrained(ref_path)
            except (OSError, ValueError):  # a bare checkpoint without tokenizer files
                ref_tokenizer = None
            if ref_tokenizer is not None and ref_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise ValueError(
                    f"the tokenizers of {path!r} and {ref_path!r} differ "
                    f"({len(tokenizer)} vs {len(ref_tokenizer)} tokens); "
                    "the PRM and its reference must share one vocabulary"
                )
            ref_model = AutoModelForCausalLM.from_pretrained(ref_path, dtype=dtype).to(device)
        return cls(
            model,
            tokenizer,
            ref_model,
            beta=beta,
            step_separator=step_separator,
            aggregation=aggregation,
            append_eos=append_eos,
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- tokenization ---------------------------------------------------------------------------

    def encode(
        self, prompt: str, response: str, *, chat_template: bool = True, index: int | None = None
    ) -> TokenizedItem:
        """Tokenize one prompt+response the way a sampler produced it (see :func:`encode_pair`)."""
        return encode_pair(self.tokenizer, prompt, response, chat_template=chat_template,
                           append_eos=self.append_eos, separator=self.step_separator,
                           max_length=self.max_length, index=index)

    def collate(self, items: Sequence[TokenizedItem]) -> dict[str, torch.Tensor]:
        """Right-pad items into ``input_ids``, ``attention_mask``, ``response_mask``, ``step_ids``."""
        return collate_items(items, self.pad_id)

    # -- batched math ---------------------------------------------------------------------------

    @torch.inference_mode()
    def token_rewards(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """``[B, L]`` token rewards ``beta * (logp_phi - logp_ref)`` on response tokens, 0 elsewhere.

        The tensor-level entry point for pipeline stages with their own batching. Returned on CPU.
        """
        dev = self.device
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        response_mask = response_mask.to(dev).bool()
        logp = response_logprobs(self.model, input_ids, attention_mask, response_mask)
        ref_logp = None
        if self.ref_model is not None:
            ref_logp = response_logprobs(self.ref_model, input_ids, attention_mask, response_mask)
        return token_rewards(logp, ref_logp, response_mask, self.beta).cpu()

    def _batch_token_rewards(self, batch: dict[str, torch.Tensor], num_steps: int) -> torch.Tensor:
        return self.token_rewards(batch["input_ids"], batch["attention_mask"], batch["response_mask"])

    def score_tokenized(
        self, items: Sequence[TokenizedItem], *, aggregation: str | None = None
    ) -> list[StepScores]:
        """Score already-tokenized items as ONE batch (no sorting or splitting)."""
        method = aggregation or self.aggregation
        if method not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {method!r}; valid: {', '.join(AGGREGATIONS)}")
        if not items:
            return []
        batch = self.collate(items)
        num_steps = max(len(it.steps) for it in items)
        tok_r = self._batch_token_rewards(batch, num_steps)
        step_r, step_mask = step_rewards(tok_r, batch["step_ids"], num_steps)
        q = q_values(step_r, step_mask)
        scores = aggregate(step_r, step_mask, method)
        out = []
        for b, it in enumerate(items):
            n_steps = len(it.steps)
            p, n = it.prompt_len, len(it.input_ids)
            out.append(
                StepScores(
                    steps=list(it.steps),
                    step_rewards=step_r[b, :n_steps].tolist(),
                    q_values=q[b, :n_steps].tolist(),
                    token_rewards=tok_r[b, p:n].tolist(),
                    num_tokens=n - p,
                    score=float(scores[b]),
                    aggregation=method,
                )
            )
        return out

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        batch_size: int = 16,
        aggregation: str | None = None,
        chat_template: bool = True,
    ) -> list[StepScores]:
        """Score each (prompt, response) pair; results come back in input order.

        Items are sorted by length (longest first) into batches of ``batch_size`` to reduce
        padding; with right padding and causal attention the result does not depend on the batch.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        method = aggregation or self.aggregation
        if method not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {method!r}; valid: {', '.join(AGGREGATIONS)}")
        items = [
            self.encode(p, r, chat_template=chat_template, index=i)
            for i, (p, r) in enumerate(zip(prompts, responses))
        ]
        order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
        results: list[StepScores | None] = [None] * len(items)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, res in zip(chunk, self.score_tokenized([items[i] for i in chunk], aggregation=method)):
                results[i] = res
        return results  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"ImplicitPRM(beta={self.beta}, ref={'yes' if self.ref_model is not None else 'no'}, "
            f"aggregation={self.aggregation!r}, step_separator={self.step_separator!r}, "
            f"append_eos={self.append_eos})"
        )


class ExplicitPRM(ImplicitPRM):
    """A PRM trained on step labels (the Math-Shepherd baseline): step t scores
    ``sigmoid(logit(+) - logit(-))`` read at the step's last token, with no reference model.

    It shares :class:`ImplicitPRM`'s tokenization, batching, step splitting and aggregation: the
    step score is placed on the step's last token (:func:`prm_ray.reward.explicit_token_rewards`),
    so the step "sum" is the score itself. ``q_values`` are then running sums of probabilities,
    which carry no meaning of their own; use ``min`` (the paper's and Math-Shepherd's choice).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, positive_token: str = "+", negative_token: str = "-",
                 **kwargs) -> None:
        from prm_ray.train import step_label_token_ids

        super().__init__(model, tokenizer, None, **kwargs)
        self.positive_id, self.negative_id = step_label_token_ids(tokenizer, [positive_token, negative_token])

    @classmethod
    def from_pretrained(cls, path: str, *, positive_token: str = "+", negative_token: str = "-",
                        step_separator: str = "\n\n", aggregation: str = "min",
                        device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                        append_eos: bool = True, **_ignored) -> "ExplicitPRM":
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_as_dtype(dtype)).to(device)
        return cls(model, tokenizer, positive_token=positive_token, negative_token=negative_token,
                   step_separator=step_separator, aggregation=aggregation, append_eos=append_eos)

    @torch.inference_mode()
    def _batch_token_rewards(self, batch: dict[str, torch.Tensor], num_steps: int) -> torch.Tensor:
        from prm_ray.reward import explicit_token_rewards, step_label_logits

        dev = self.device
        logits = self.model(input_ids=batch["input_ids"].to(dev),
                            attention_mask=batch["attention_mask"].to(dev)).logits
        step_ids = batch["step_ids"].to(dev)
        z, mask = step_label_logits(logits.float(), step_ids, self.positive_id, self.negative_id, num_steps)
        return explicit_token_rewards(z, mask, step_ids).cpu()

    def __repr__(self) -> str:
        return f"ExplicitPRM(aggregation={self.aggregation!r}, step_separator={self.step_separator!r})"


def load_prm(path: str, ref_path: str | None = None, beta: float | None = None, **kwargs) -> ImplicitPRM:
    """Load a trained PRM as the kind its card (``prm_ray_prm.json``) says: implicit or explicit.

    For an implicit PRM, ``beta`` and ``ref_path`` default to the card's; an explicit one takes no
    reference and reads its step label tokens from the card.
    """
    import json
    from pathlib import Path

    card_path = Path(path) / PRM_CARD
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    if card.get("kind") == "explicit":
        if ref_path is not None:
            raise ValueError(f"{path} is an explicit PRM ({card.get('objective')}); it takes no reference model")
        pos, neg = card.get("step_label_tokens", ["+", "-"])
        return ExplicitPRM.from_pretrained(path, positive_token=pos, negative_token=neg, **kwargs)
    beta = float(beta if beta is not None else card.get("beta", 0.05))
    return ImplicitPRM.from_pretrained(path, ref_path if ref_path is not None else card.get("reference_model"),
                                       beta, **kwargs)
