"""Data: JSONL files, the embedded task's data as token ids, batching and padding.

JSONL formats (one JSON object per line):

* demonstrations (sft): ``{"prompt": str, "completion": str}``
* preferences (rm, dpo): ``{"prompt": str, "chosen": str, "rejected": str}``
* prompts (ppo, bon): ``{"prompt": str}``

Prompts are used as they are, or as a user message in the tokenizer's chat template with
``data.chat_template = true`` (instruction-tuned models). Completions end with the
tokenizer's eos token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from fastrlhf.pipeline.errors import PipelineError


def read_jsonl(path: str | None, keys: tuple[str, ...], what: str, flag: str) -> list[dict]:
    """Records of a JSONL file, each with string values for ``keys``; clear errors otherwise."""
    if path is None:
        raise PipelineError(f"no {what} file: pass {flag} FILE.jsonl")
    if not os.path.isfile(path):
        raise PipelineError(f"{what} file {path!r} does not exist")
    records = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PipelineError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                    "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise PipelineError(f"{path}:{n}: expected a JSON object with keys {list(keys)}")
            for k in keys:
                if not isinstance(rec.get(k), str):
                    got = "missing" if k not in rec else f"a {type(rec[k]).__name__}"
                    raise PipelineError(f"{path}:{n}: key {k!r} must be a string, got {got}")
            rec["_line"] = n
            records.append(rec)
    if not records:
        raise PipelineError(f"{what} file {path!r} holds no records")
    return records


def check_prompt_lengths(prompts: list[list[int]], *, max_prompt_len: int, max_new_tokens: int,
                         context: int | None, source: str, lines: list[int] | None = None) -> None:
    """Raise when a prompt is empty, longer than ``max_prompt_len``, or leaves no room in the context."""
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        where = f"{source}:{lines[empty[0]]}" if lines else source
        raise PipelineError(f"{len(empty)} prompt(s) in {source} encode to no tokens (the first: {where})")
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    n = len(prompts[longest])
    where = f"{source}:{lines[longest]}" if lines else source
    too_long = sum(len(p) > max_prompt_len for p in prompts)
    if too_long:
        raise PipelineError(f"{too_long} prompt(s) in {source} are longer than model.max_prompt_len="
                            f"{max_prompt_len} tokens (the longest, {where}, has {n}); raise "
                            "--set model.max_prompt_len=N or shorten them")
    if context is not None and n + max_new_tokens > context:
        raise PipelineError(f"the longest prompt ({where}, {n} tokens) plus model.max_new_tokens="
                            f"{max_new_tokens} exceeds the model's context of {context} tokens")


# ---------------------------------------------------------------------------- padding
def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(max(len(s) for s in seqs), 1)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@dataclass
class Batch:
    """``[left-padded prompt | right-padded completion]`` rows; column ``n_prompt`` starts the
    completions; ``completion_mask`` ``[B, N]`` marks completion tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    n_prompt: int
    completion_mask: torch.Tensor

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.n_prompt,
                     self.completion_mask.to(device))

    def rows(self, idx) -> Batch:
        return Batch(self.input_ids[idx], self.attention_mask[idx], self.n_prompt, self.completion_mask[idx])

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def join(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
         completion_mask: torch.Tensor) -> Batch:
    return Batch(torch.cat([prompt_ids, completion_ids], -1), torch.cat([prompt_mask, completion_mask], -1),
                 prompt_ids.shape[1], completion_mask)


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Batch:
    return join(*pad_left(prompts, pad_id), *pad_right(completions, pad_id))


# -------------------------------------------------------------------------- batching
class IndexStream:
    """The item indices of each step's global batch: epochs of seeded permutations, so step
    ``s`` always gets the same items (a resumed run sees what the original saw)."""

    def __init__(self, n: int, batch_size: int, seed_fn):
        self.n, self.batch_size, self.seed_fn = n, batch_size, seed_fn
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed_fn(epoch))
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._perm(pos // self.n)[pos % self.n]))
        return out


def micro_batches(n: int, micro: int) -> list[slice]:
    """Slices of ``range(n)`` of at most ``micro`` items (``micro <= 0``: one slice)."""
    if micro <= 0 or micro >= n:
        return [slice(0, n)]
    return [slice(i, min(i + micro, n)) for i in range(0, n, micro)]
