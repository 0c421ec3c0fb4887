"""Token sequences as every stage sees them: prompt rendering, prompt+response encoding with steps,
padding, the context limit, and the explicit PRM's label tokens.

Sampling, step labelling, training, evaluation and serving all tokenize through here, so a PRM is
trained on exactly the token sequences it later scores, and scores exactly what the policy sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from prm_ray.config import ConfigError
from prm_ray.core.reward import step_ids_from_offsets, steps_to_score

__all__ = ["TOKEN_FIELDS", "TOKEN_NAMES", "TokenizedItem", "collate_items", "collate_tokens", "encode_pair", "encode_table",
           "list_values", "max_context", "pad_token_id", "prompt_ids", "prompt_token_counts", "render_prompt",
           "splice_prompts", "step_label_token_ids"]

TOKEN_FIELDS = (
    ("input_ids", pa.list_(pa.int32())),  # prompt ids + response ids (+ EOS), as encode_pair makes them
    ("prompt_len", pa.int32()),  # the response starts here
    ("step_ids", pa.list_(pa.int32())),  # the step of each response token (len(input_ids) - prompt_len)
    ("num_steps", pa.int32()),
)
"""A tokenized prompt+response as Arrow columns: computed once per dataset (prm_ray.stages.tokenize),
read by training without any per-row Python (:func:`collate_tokens`), by the reference pass and by
evaluation."""
TOKEN_NAMES = tuple(name for name, _ in TOKEN_FIELDS)


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
    step_split: str = "blank_line",
) -> TokenizedItem:
    """Tokenize one prompt+response the way a sampler produced it.

    The prompt (rendered with the chat template if ``chat_template``) and the response are
    tokenized separately without special tokens and concatenated; EOS is appended if
    ``append_eos`` (the paper's last step includes the end-of-turn token). Raises ``ValueError``
    rather than truncating when the sequence exceeds ``max_length``. ``step_split="release"``
    tokenizes the response rewritten into the released eval's steps
    (:func:`prm_ray.core.reward.steps_to_score`).

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
    response, starts = steps_to_score(response, step_split, separator)
    enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    response_ids, step_ids, steps = _response_steps(tokenizer, response, enc["input_ids"], enc["offset_mapping"],
                                                    append_eos, separator, starts)
    total = len(p_ids) + len(response_ids)
    if max_length is not None and total > max_length:
        raise ValueError(
            f"{where} is too long: {len(p_ids)} prompt + {len(response_ids)} response tokens "
            f"= {total} > max_position_embeddings {max_length} (inputs are never truncated)"
        )
    return TokenizedItem(p_ids + response_ids, len(p_ids), step_ids, steps)


def _response_steps(tokenizer, response: str, ids, offsets, append_eos: bool, separator: str,
                    starts: list[int] | None = None) -> tuple[list[int], list[int], list[str]]:
    """A response's ids (+ EOS), the step of each and the step texts, from the tokenizer's output."""
    ids, offsets = list(ids), [tuple(o) for o in offsets]
    if append_eos:
        ids.append(tokenizer.eos_token_id)
        offsets.append((len(response), len(response)))  # zero-width: joins the last step
    step_ids, steps = step_ids_from_offsets(response, offsets, separator, starts)
    return ids, step_ids, steps


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


def encode_table(tokenizer, prompts: Sequence[str], responses: Sequence[str], *, chat_template: bool = True,
                 append_eos: bool = True, separator: str = "\n\n", names: Sequence[str] | None = None,
                 step_split: str = "blank_line") -> pa.Table:
    """:data:`TOKEN_FIELDS` columns of each prompt+response, exactly what :func:`encode_pair` gives
    (a test checks it), with the responses tokenized in one batched call and each distinct prompt once.
    ``names`` name the rows in errors (default: their index)."""
    p_cache = {p: prompt_ids(tokenizer, p, chat_template=chat_template) for p in set(prompts)}
    split = [steps_to_score(r, step_split, separator) for r in responses]
    responses = [text for text, _ in split]
    enc = tokenizer(list(responses), add_special_tokens=False, return_offsets_mapping=True)
    ids, plen, steps, nsteps = [], [], [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        p_ids = p_cache[p]
        if not p_ids:
            raise ValueError(f"{names[i] if names else f'row {i}'}: the prompt is empty after rendering; the first response token needs a "
                             "context (use the chat template or include BOS)")
        r_ids, step_ids, texts = _response_steps(tokenizer, r, enc["input_ids"][i], enc["offset_mapping"][i],
                                                 append_eos, separator, split[i][1])
        ids.append(p_ids + r_ids)
        plen.append(len(p_ids))
        steps.append(step_ids)
        nsteps.append(len(texts))
    return pa.Table.from_arrays([pa.array(col, typ) for col, (_, typ) in zip((ids, plen, steps, nsteps), TOKEN_FIELDS)],
                                names=list(TOKEN_NAMES))


def list_values(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, lengths) of a list column, slices and chunks included."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten().to_numpy(zero_copy_only=False), pc.list_value_length(arr).to_numpy(zero_copy_only=False)


def collate_tokens(batch: pa.Table, pad_id: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """:func:`collate_items` of a batch of :data:`TOKEN_FIELDS` columns (named ``prefix + field``),
    built with array operations from the Arrow buffers: no Python loop over rows."""
    ids, lens = list_values(batch.column(prefix + "input_ids"))
    steps, _ = list_values(batch.column(prefix + "step_ids"))
    plen = batch.column(prefix + "prompt_len").to_numpy().astype(np.int64)
    B, L = len(lens), int(lens.max()) if len(lens) else 0
    row, pos = _flat_positions(lens)
    input_ids = np.full((B, L), pad_id, dtype=np.int64)
    input_ids[row, pos] = ids
    positions = np.arange(L)[None, :]
    attention = positions < lens[:, None]
    response = attention & (positions >= plen[:, None])
    step_ids = np.full((B, L), -1, dtype=np.int64)
    step_ids[response] = steps  # row-major order of the response positions = the flat step list's order
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention.astype(np.int64)),
            "response_mask": torch.from_numpy(response), "step_ids": torch.from_numpy(step_ids)}


def _flat_positions(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, position in its row) of every element of a flattened list column."""
    row = np.repeat(np.arange(len(lengths)), lengths)
    return row, np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def splice_prompts(prompt_rows: pa.Table, response_rows: pa.Table) -> pa.Table:
    """:data:`TOKEN_FIELDS` of row i's prompt joined to row i's response of ``response_rows``
    (KTO's mismatched pairs: this instruction's prompt, another one's completion); exactly what
    encoding that prompt and that response together gives, since the two are tokenized apart."""
    p_vals, p_lens = list_values(prompt_rows.column("input_ids"))
    r_vals, r_lens = list_values(response_rows.column("input_ids"))
    p_plen = prompt_rows.column("prompt_len").to_numpy().astype(np.int64)
    r_plen = response_rows.column("prompt_len").to_numpy().astype(np.int64)
    p_row, p_pos = _flat_positions(p_lens)
    r_row, r_pos = _flat_positions(r_lens)
    keep_p, keep_r = p_pos < p_plen[p_row], r_pos >= r_plen[r_row]
    rows = np.concatenate([p_row[keep_p], r_row[keep_r]])
    part = np.concatenate([np.zeros(int(keep_p.sum()), np.int8), np.ones(int(keep_r.sum()), np.int8)])
    values = np.concatenate([p_vals[keep_p], r_vals[keep_r]])[np.lexsort((part, rows))]  # by row, prompt first
    lengths = p_plen + r_lens - r_plen
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    input_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int32)))
    return pa.table({"input_ids": input_ids, "prompt_len": prompt_rows.column("prompt_len"),
                     "step_ids": response_rows.column("step_ids"), "num_steps": response_rows.column("num_steps")},
                    schema=pa.schema(TOKEN_FIELDS))
