"""Stand-ins for tests: a tokenizer independent of the real kinds (for training and checkpoints),
and small GPTs with random weights (for exports)."""

import torch

from gptlab.config import ModelConfig
from gptlab.models import GPT
from gptlab.tokenizers.base import SPECIAL_TOKENS, Tokenizer


class ByteTokenizer(Tokenizer):
    """id = 4 + UTF-8 byte value; ids 0..3 are the special tokens."""

    kind = "test-bytes"

    @property
    def vocab_size(self) -> int:
        return 4 + 256

    @property
    def special_tokens(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(SPECIAL_TOKENS)}

    def encode(self, text, allowed_special=()):
        return [4 + b for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 4 for i in ids if i >= 4).decode("utf-8", errors="replace")

    def to_files(self):
        # A binary file too: checkpoints must carry any bytes, not only text.
        return {"bytes.txt": b"offset 4\n", "note.bin": bytes(range(256))}

    @classmethod
    def from_files(cls, files):
        assert files["bytes.txt"] == b"offset 4\n"
        return cls()


def random_gpt(vocab_size: int, seed: int = 0, **fields) -> GPT:
    """A small GPT whose every weight (norm gains and biases included) is far from its init."""
    torch.manual_seed(seed)
    values = dict(embed_dim=64, n_heads=4, num_layers=2, seq_len=128, tgt_vocab_size=vocab_size, dropout=0.0)
    model = GPT(ModelConfig(**(values | fields))).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model
