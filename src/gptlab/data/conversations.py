"""Conversation data for supervised fine-tuning: JSONL lines `{"messages": [...]}` (OpenAI's
fine-tuning format) -> token ids with the chat template -> padded rows with a loss mask.

Each conversation is one row of at most seq_len + 1 ids (x is its first seq_len, y the same
shifted by one), right-padded with <PAD>. A label is the next id where that id is an assistant
token (tokenizers/chat.py: the assistant's content and its <|end|>) and IGNORE_INDEX everywhere
else: on the system prompt, the user's turns, the role markers and the padding. One
conversation per row, so no token ever attends to another conversation. A batch is cut to its
longest row, so short conversations cost what they hold, not seq_len.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.models.fused_loss import IGNORE_INDEX
from gptlab.tokenizers.base import Tokenizer
from gptlab.tokenizers.chat import check_message, encode_chat_for_training

Messages = list[dict]


def read_conversations(path: str | Path, skip_bad_lines: bool = False) -> list[Messages]:
    """The conversations of a JSONL file, one `{"messages": [{"role", "content"}, ...]}` a line.

    Empty lines are ignored. A line that is not JSON, has a message with a missing or unknown
    role or with empty content, or does not end with an assistant message raises GptlabError
    naming the file and line, or with `skip_bad_lines` is skipped and counted in one warning.
    """
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f'conversation file {path} not found; pass a .jsonl file of {{"messages": [...]}} lines')
    conversations: list[Messages] = []
    bad: list[tuple[int, str]] = []  # (line number, problem)
    try:
        with path.open(encoding="utf-8-sig") as lines:  # -sig: a leading byte-order mark is dropped
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                messages, problem = parse_conversation(line)
                if problem is None:
                    conversations.append(messages)
                elif skip_bad_lines:
                    bad.append((number, problem))
                else:
                    raise GptlabError(f"{path} line {number}: {problem}; fix it or pass --skip_bad_lines")
    except UnicodeDecodeError as err:
        raise GptlabError(f"{path} is not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    if bad:
        numbers = ", ".join(str(number) for number, _ in bad[:10]) + (" ..." if len(bad) > 10 else "")
        warnings.warn(f"{path}: skipped {len(bad)} bad line(s) (line {numbers}; first: {bad[0][1]})", stacklevel=2)
    if not conversations:
        raise GptlabError(f'{path} holds no conversations; write one {{"messages": [...]}} object per line')
    return conversations


def parse_conversation(line: str) -> tuple[Messages, str | None]:
    """(messages, None) for a good line, ([], the problem) for a bad one."""
    try:
        record = json.loads(line)
    except ValueError:
        return [], "not valid JSON"
    except RecursionError:  # json recurses once per level of nesting
        return [], "JSON nested too deeply"
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        return [], 'not a {"messages": [...]} object with at least one message'
    for number, message in enumerate(messages, start=1):
        try:
            role, content = check_message(message, number)
        except GptlabError as error:
            return [], str(error)
        if not content.strip():
            return [], f"message {number} ({role}) has empty content"
    if messages[-1]["role"] != "assistant":
        return [], f"the conversation ends with a {messages[-1]['role']} message, not an assistant one"
    return messages, None


class ChatDataset:
    """Tokenized conversations as padded rows, batched on demand. Offers the same `len()`,
    `batch(indices) -> (x, y)`, `num_tokens` and `bytes_per_token` as TokenDataset, so the
    trainer's batching, evaluation and resume serve it unchanged."""

    def __init__(self, conversations: list[Messages], tokenizer: Tokenizer, seq_len: int, name: str = "data"):
        width = seq_len + 1
        self.pad_id = tokenizer.pad_id
        self.rows: list[np.ndarray] = []  # ids of each conversation, cut to seq_len + 1
        self.learn: list[np.ndarray] = []  # per id: whether the loss learns it
        cut = dropped = 0
        learnt_bytes = 0
        for messages in conversations:
            ids, learn = encode_chat_for_training(tokenizer, messages)
            cut += len(ids) > width
            ids, learn = ids[:width], learn[:width]
            if not any(learn[1:]):  # nothing of the assistant's left to learn (a target is never ids[0])
                dropped += 1
                continue
            self.rows.append(np.asarray(ids, dtype=np.int64))
            self.learn.append(np.asarray(learn, dtype=bool))
            learnt_bytes += sum(len(m["content"].encode()) for m in messages if m["role"] == "assistant")
        if cut:
            warnings.warn(
                f"{name}: {cut} conversation(s) longer than seq_len + 1 = {width} tokens were cut"
                + (f", {dropped} of them leaving no assistant token, so left out" if dropped else "")
                + "; raise --seq_len to keep them whole",
                stacklevel=2,
            )
        if not self.rows:
            raise GptlabError(f"{name}: no conversation has an assistant token within seq_len={seq_len}; raise it")
        self.num_tokens = sum(len(row) for row in self.rows)
        self.num_targets = sum(int(learn[1:].sum()) for learn in self.learn)
        # Bytes of assistant text per learnt token (each <|end|> counted as a token of no bytes).
        self.bytes_per_token = max(learnt_bytes, 1) / self.num_targets

    @classmethod
    def from_file(
        cls, path: str | Path, tokenizer: Tokenizer, seq_len: int, skip_bad_lines: bool = False
    ) -> ChatDataset:
        """The conversations of a JSONL file (see read_conversations), tokenized."""
        return cls(read_conversations(path, skip_bad_lines), tokenizer, seq_len, name=str(path))

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y of shape (B, T) int64 for the conversations `indices`, T = the longest row - 1."""
        indices = np.asarray(indices, dtype=np.int64)
        width = max(len(self.rows[i]) for i in indices)
        ids = np.full((len(indices), width), self.pad_id, dtype=np.int64)
        learn = np.zeros((len(indices), width), dtype=bool)
        for row, i in enumerate(indices):
            ids[row, : len(self.rows[i])] = self.rows[i]
            learn[row, : len(self.learn[i])] = self.learn[i]
        ids_t = torch.from_numpy(ids)
        labels = torch.where(torch.from_numpy(learn[:, 1:]), ids_t[:, 1:], IGNORE_INDEX)
        return ids_t[:, :-1], labels  # (B, T), (B, T)
