"""Chat data for supervised fine-tuning: conversations -> token ids + assistant-only labels ->
padded batches.

Input is TRL's conversational JSONL, one conversation per line::

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...], "tools": [...]}

(``tools``, optional, is a list of function schemas; it is rendered into the system message, see
:func:`with_tools`). Conversations may also come from the verifiable tasks' train split
(:func:`task_conversations`: the task's dialog plus its reference answer as the assistant turn).

Ids come from Llama 4's chat format (``llama4.tokenizer.chat_format.encode_dialog``), whose mask
marks the tokens the assistant writes: its content, tool calls and the closing ``<|eot|>`` /
``<|eom|>``. A training example is ``inputs = ids[:-1]``, ``labels = ids[1:]`` with every label
that is not an assistant token set to :data:`IGNORE_INDEX`, so the loss counts exactly the
predictions of assistant tokens (headers, BOS, system/user/tool turns and padding count nothing).

Batches are padded, not packed: the model has no document mask, so two conversations packed
into one row would attend to each other. Each row holds one conversation, right-padded to the
longest in its global batch (padding sits after every real token, so causal attention never lets a
real token see it; its labels are ignored). :class:`SFTLoader` walks a seeded permutation per
epoch and checkpoints its position, so ``--resume`` continues bit-identically.

Errors name the file and line (and the field) of the bad conversation; nothing here writes files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from llama4.tokenizer import Tokenizer
from llama4.tokenizer.chat_format import encode_dialog
from llama4.tokenizer.tool_calls import with_tools

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index, as TRL / HF use
ROLES = ("system", "user", "assistant", "tool", "ipython")


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]
    where: str  # "FILE:LINE" or "task NAME #i": what an error about this conversation names
    tools: tuple[dict, ...] | None = None


# ---------------------------------------------------------------------------------------------
# reading and checking


def check_conversation(obj, where: str) -> Conversation:
    """One decoded JSONL record -> :class:`Conversation`; a ValueError names ``where`` and the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with a 'messages' field, got {type(obj).__name__}")
    if "messages" not in obj:
        keys = ", ".join(sorted(obj)) or "none"
        raise ValueError(f"{where}: missing field 'messages' (fields: {keys}); expected TRL's conversational "
                         'format {"messages": [{"role": ..., "content": ...}, ...]}')
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: field 'messages' must be a non-empty list of messages, got {msgs!r:.80}")
    for i, m in enumerate(msgs):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where}: field '{field}' must be an object with 'role' and 'content', got {m!r:.80}")
        if "role" not in m:
            raise ValueError(f"{where}: field '{field}.role' is missing")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: field '{field}.role' is {m['role']!r}, not one of {', '.join(ROLES)}")
        content = m.get("content")
        if "content" not in m and not m.get("tool_calls"):
            raise ValueError(f"{where}: field '{field}.content' is missing")
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"{where}: field '{field}.content' must be a string or a list of parts, "
                             f"got {type(content).__name__}")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, str) or (isinstance(part, dict) and part.get("type") == "text"
                                                  and isinstance(part.get("text"), str))):
                    raise ValueError(f"{where}: field '{field}.content[{j}]' must be a text part "
                                     '{"type": "text", "text": ...} (SFT here is text-only)')
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError(f"{where}: the conversation has no assistant turn (field 'messages' has roles "
                         f"{', '.join(m['role'] for m in msgs)}): nothing to learn from it")
    tools = obj.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"{where}: field 'tools' must be a list of function schemas (objects), got {tools!r:.80}")
    return Conversation(tuple(msgs), where, tuple(tools) if tools else None)


def read_jsonl(path, check, what: str, missing: str = "data file") -> list:
    """``check(obj, "FILE:LINE")`` of every line of a JSONL file, in order; blank lines are skipped.
    Errors name the file and line; an empty file is an error (``what`` names its records)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{missing} not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            out.append(check(obj, where))
    if not out:
        raise ValueError(f"{path}: no {what} (the file is empty)")
    return out


def load_messages_jsonl(path) -> list[Conversation]:
    """Every conversation of a TRL conversational JSONL file, checked; blank lines are skipped."""
    return read_jsonl(path, check_conversation, "conversations")


def task_conversations(names: Sequence[str], n_per_task: int, seed: int = 0, difficulty: int = 1) -> list[Conversation]:
    """``n_per_task`` train-split examples of each task, the reference answer as the assistant turn."""
    from llama4.tasks import get_task

    out = []
    for name in names:
        for i, ex in enumerate(get_task(name).examples("train", n_per_task, seed=seed, difficulty=difficulty)):
            msgs = (*ex.messages, {"role": "assistant", "content": ex.answer})
            out.append(Conversation(msgs, f"task {name} #{i}"))
    return out


# ---------------------------------------------------------------------------------------------
# tokenizing


def tokenize_conversation(tok: Tokenizer, conv: Conversation | Sequence[dict],
                          tools: Sequence[dict] | None = None) -> tuple[list[int], list[bool]]:
    """``(ids, mask)``: the chat format's ids of the whole conversation and, per id, whether the
    assistant wrote it (the SFT loss counts those)."""
    if isinstance(conv, Conversation):
        messages, tools, where = conv.messages, conv.tools, conv.where
    else:
        messages, where = conv, "conversation"
    try:
        return encode_dialog(tok, with_tools(messages, tools))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{where}: {e}") from None


def labelled_example(ids: Sequence[int], mask: Sequence[bool]) -> tuple[list[int], list[int]]:
    """``(inputs, labels)``: next-token pairs with every non-assistant label set to IGNORE_INDEX."""
    inputs = list(ids[:-1])
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    return inputs, labels


def build_examples(tok: Tokenizer, convs: Sequence[Conversation], seq_len: int,
                   truncate: bool = False) -> list[tuple[list[int], list[int]]]:
    """Labelled examples of at most ``seq_len`` inputs each. A longer conversation is an error
    naming it, unless ``truncate`` (then it is cut at ``seq_len``; one left without an assistant
    token is still an error)."""
    out = []
    for conv in convs:
        inputs, labels = labelled_example(*tokenize_conversation(tok, conv))
        if len(inputs) > seq_len:
            if not truncate:
                raise ValueError(f"{conv.where}: the conversation is {len(inputs) + 1} tokens, longer than "
                                 f"--seq-len {seq_len} + 1; raise --seq-len, shorten it, or pass --truncate")
            inputs, labels = inputs[:seq_len], labels[:seq_len]
        if all(t == IGNORE_INDEX for t in labels):
            raise ValueError(f"{conv.where}: no assistant token within the first {seq_len} tokens "
                             "(truncated away); raise --seq-len")
        out.append((inputs, labels))
    return out


# ---------------------------------------------------------------------------------------------
# batches


@dataclass
class SFTBatch:
    inputs: torch.Tensor  # (B, L) token ids, right-padded
    labels: torch.Tensor  # (B, L) next-token targets; IGNORE_INDEX off the assistant's tokens and on padding


def pad_batch(rows: Sequence[tuple[list[int], list[int]]], pad_id: int, length: int | None = None) -> SFTBatch:
    """Right-pad ``rows`` to ``length`` (default: the longest row)."""
    L = max(len(x) for x, _ in rows) if length is None else length
    inputs = torch.full((len(rows), L), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        inputs[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        labels[i, :len(y)] = torch.tensor(y, dtype=torch.long)
    return SFTBatch(inputs, labels)


def pad_id_of(tok: Tokenizer) -> int:
    """Llama 4's ``<|finetune_right_pad|>`` when the tokenizer has it, else end-of-text (padding
    is never attended to by a real token nor trained on, so the choice does not change the loss)."""
    return tok.special_tokens.get("<|finetune_right_pad|>", tok.eos_id)


def fingerprint(examples: Sequence[tuple[list[int], list[int]]]) -> str:
    h = hashlib.sha1()
    for x, y in examples:
        h.update(json.dumps([x, y]).encode())
    return h.hexdigest()[:16]


class SFTLoader:
    """Micro-batches of ``batch_size`` examples per rank from a seeded permutation of the examples,
    a new one per epoch. One global batch is ``batch_size * world_size`` consecutive examples of
    that stream; rank r reads its r-th share. The position (epoch, offset) is checkpointed.

    ``group_by_length`` (transformers' option of that name): the permutation is cut into groups of
    50 global batches, each group is sorted by length and cut into global batches, and the batches
    are shuffled; a batch then pads to a length near its rows' own, instead of to the longest
    conversation of a random draw (several times less compute when lengths vary)."""

    MEGA = 50  # global batches per length-sorted group, as transformers' LengthGroupedSampler

    def __init__(self, examples: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, group_by_length: bool = False):
        if not examples:
            raise ValueError("no SFT examples")
        self.examples, self.batch_size, self.pad_id, self.seed = list(examples), batch_size, pad_id, seed
        self.rank, self.world_size, self.group_by_length = rank, world_size, group_by_length
        self.fingerprint = fingerprint(self.examples)
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()
        if not self.group_by_length:
            return order
        b = self.batch_size * self.world_size
        batches = []
        for lo in range(0, len(order), self.MEGA * b):
            group = sorted(order[lo:lo + self.MEGA * b], key=lambda i: len(self.examples[i][0]), reverse=True)
            batches += [group[j:j + b] for j in range(0, len(group), b)]
        return [i for k in torch.randperm(len(batches), generator=g).tolist() for i in batches[k]]

    def _take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.offset == len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            n = min(k - len(out), len(self._order) - self.offset)
            out += self._order[self.offset:self.offset + n]
            self.offset += n
        return out

    def next_batch(self) -> SFTBatch:
        idx = self._take(self.batch_size * self.world_size)
        mine = idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        # every rank pads to the global batch's longest row: the same shapes, and the same padded
        # positions through the MoE router, as one process reading the whole global batch
        length = max(len(self.examples[i][0]) for i in idx)
        return pad_batch([self.examples[i] for i in mine], self.pad_id, length)

    def state_dict(self) -> dict:
        # batch_size / world_size: the distributed checkpoint checks the global batch with them
        return {"epoch": self.epoch, "offset": self.offset, "fingerprint": self.fingerprint,
                "n_examples": len(self.examples), "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "group_by_length": self.group_by_length}

    def load_state_dict(self, s: dict) -> None:
        if s["fingerprint"] != self.fingerprint or s["n_examples"] != len(self.examples):
            raise ValueError(f"--resume with different data: the checkpoint was trained on {s['n_examples']} "
                             f"examples (fingerprint {s['fingerprint']}), these are {len(self.examples)} "
                             f"({self.fingerprint}); resume with the original data")
        if s.get("group_by_length", False) != self.group_by_length:
            raise ValueError(f"--resume with group_by_length {self.group_by_length}, the checkpoint was trained with "
                             f"{s.get('group_by_length', False)}: the batches would differ")
        self.seed, self.epoch, self.offset = s["seed"], s["epoch"], s["offset"]
        self._order = self._permutation(self.epoch)


__all__ = ["IGNORE_INDEX", "ROLES", "Conversation", "check_conversation", "load_messages_jsonl",
           "task_conversations", "with_tools", "tokenize_conversation", "labelled_example", "build_examples",
           "SFTBatch", "pad_batch", "pad_id_of", "SFTLoader"]
