"""Token sequences as every stage sees them: prompt rendering, prompt+response encoding with steps,
padding, the context limit, and the explicit PRM's label tokens.

Sampling, step labelling, training, evaluation and serving all tokenize through here, so a PRM is
trained on exactly the token sequences it later scores, and scores exactly what the policy sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prm_ray.config import ConfigError
from prm_ray.core.reward import step_ids_from_offsets

__all__ = ["TokenizedItem", "collate_items", "encode_pair", "max_context", "pad_token_id", "prompt_ids", "prompt_token_counts",
           "render_prompt", "step_label_token_ids"]


def render_prompt(tokenizer, user_text: str) -> str:
    """The prompt string a model sees for one user turn: its chat template if it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    return user_text


def prompt_ids(tokenizer, user_text: str, *, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt as the policy saw it: rendered, tokenized without special tokens (the
    template adds them)."""
    text = render_prompt(tokenizer, user_text) if chat_template else user_text
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class TokenizedItem:
    """One prompt+response, tokenized the way :func:`encode_pair` does it.

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


def pad_token_id(tokenizer) -> int:
    """Padding ids never reach a reward (attention- and response-masked); any valid id works."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None else (tokenizer.eos_token_id or 0)


def max_context(*models: torch.nn.Module | None) -> int | None:
    """The longest sequence every given model accepts (``max_position_embeddings``)."""
    limits = [getattr(m.config, "max_position_embeddings", None) for m in models if m is not None]
    limits = [x for x in limits if x]
    return min(limits) if limits else None


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
    rather than truncating when the sequence exceeds ``max_length``.

    Example (the shipped policy's character tokenizer, whose template is ``<s>Q: {prompt}\\n``)::

        >>> item = encode_pair(tok, "1+2", "Step 1: 1+2 = 3\\n\\nThe answer is \\\\boxed{3}")
        >>> item.prompt_len, item.steps
        (7, ['Step 1: 1+2 = 3\\n\\n', 'The answer is \\\\boxed{3}'])
        >>> item.step_ids[-1]   # the appended EOS closes the last step
        1
    """
    where = f"item {index}" if index is not None else "item"
    p_ids = prompt_ids(tokenizer, prompt, chat_template=chat_template)
    if not p_ids:
        raise ValueError(f"{where}: the prompt is empty after rendering; the first response "
                         "token needs a context (use the chat template or include BOS)")
    enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    response_ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    if append_eos:
        response_ids.append(tokenizer.eos_token_id)
        offsets.append((len(response), len(response)))  # zero-width: joins the last step
    total = len(p_ids) + len(response_ids)
    if max_length is not None and total > max_length:
        raise ValueError(
            f"{where} is too long: {len(p_ids)} prompt + {len(response_ids)} response tokens "
            f"= {total} > max_position_embeddings {max_length} (inputs are never truncated)"
        )
    step_ids, steps = step_ids_from_offsets(response, offsets, separator)
    return TokenizedItem(p_ids + response_ids, len(p_ids), step_ids, steps)


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


def step_label_token_ids(tokenizer, tokens: Sequence[str]) -> tuple[int, int]:
    """The ids of the explicit PRM's (positive, negative) tokens; each must be a single token."""
    ids = []
    for name, text in zip(("positive", "negative"), tokens):
        enc = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ConfigError(f"step_label_tokens: the {name} token {text!r} is {len(enc)} tokens for this "
                              "tokenizer; choose a string that is exactly one token")
        ids.append(enc[0])
    return ids[0], ids[1]


def prompt_token_counts(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Tokens of each prompt as the policy sees it (chat template rendered), tokenized once per
    distinct prompt."""
    cache = {p: len(prompt_ids(tokenizer, p)) for p in set(prompts)}
    return [cache[p] for p in prompts]
