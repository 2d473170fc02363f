"""How often a chat model answers held-out questions exactly (`gptlab eval --task chat`).

Each conversation's last message is the reference answer; the model reads the messages before
it (with the chat template and `<|assistant|>`) and answers greedily. "Exactly" means the text
it writes before `<|end|>` equals the reference character for character, and it does write
`<|end|>` (an answer that runs on is wrong, even if it starts right).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptlab.config import SampleConfig
from gptlab.data.conversations import Messages
from gptlab.errors import GptlabError
from gptlab.generation import generate_token_ids
from gptlab.generation.sampling import banned_ids
from gptlab.models import GPT
from gptlab.tokenizers.base import Tokenizer
from gptlab.tokenizers.chat import encode_chat, end_of_turn_id

# Tokens an answer may take beyond its reference's length before it counts as running on.
SLACK_TOKENS = 8


@dataclass(frozen=True)
class ChatAnswer:
    """One held-out conversation: what the model was asked, the reference and its answer."""

    prompt: Messages  # every message but the last
    reference: str
    answer: str
    ended: bool  # whether the model closed its answer with <|end|>

    @property
    def exact(self) -> bool:
        return self.ended and self.answer == self.reference


@torch.inference_mode()
def answer_conversations(
    model: GPT, tokenizer: Tokenizer, conversations: list[Messages], batch_size: int = 32
) -> list[ChatAnswer]:
    """The model's greedy answer to the last assistant message of each conversation."""
    end_id = end_of_turn_id(tokenizer)
    seq_len = model.config.seq_len
    device = next(model.parameters()).device
    banned = banned_ids(model.config.tgt_vocab_size, tokenizer, device)
    answers: list[ChatAnswer] = []
    for first in range(0, len(conversations), batch_size):
        group = conversations[first : first + batch_size]
        prompts = [encode_chat(tokenizer, messages[:-1], add_generation_prompt=True) for messages in group]
        too_long = next((i for i, ids in enumerate(prompts) if len(ids) >= seq_len), None)
        if too_long is not None:
            raise GptlabError(
                f"conversation {first + too_long + 1} needs {len(prompts[too_long])} tokens before its answer, "
                f"more than the model's context (seq_len={seq_len}) leaves room for"
            )
        references = [messages[-1]["content"] for messages in group]
        longest = max(len(tokenizer.encode(text)) for text in references) + SLACK_TOKENS
        cfg = SampleConfig(greedy=True, max_new_tokens=longest)
        generated: list[list[int]] = [[] for _ in group]
        done = [False] * len(group)
        steps = generate_token_ids(model, prompts, cfg, tokenizer.pad_id, banned)
        for next_ids in steps:
            for row, token in enumerate(next_ids):
                if not done[row]:
                    done[row] = token == end_id
                    if not done[row]:
                        generated[row].append(token)
            if all(done):
                steps.close()
                break
        for messages, reference, ids, ended in zip(group, references, generated, done):
            answers.append(ChatAnswer(messages[:-1], reference, tokenizer.decode(ids), ended))
    return answers
