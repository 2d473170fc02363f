"""Stand-ins for tests: a tokenizer independent of the real kinds (for training and checkpoints),
small GPTs with random weights (for exports), tiny GPTs as initialised (for model options) and
perturbed ones of every kind (for decoding steps)."""

from pathlib import Path

import torch

from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.models import GPT
from gptlab.tokenizers.base import SPECIAL_TOKENS, Tokenizer

from data_files import write_toy_texts


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


TINY_VOCAB = 40


def tiny_gpt(seed: int = 0, **fields) -> GPT:
    """A 4 × 32 GPT over TINY_VOCAB ids with a context of 16, as initialised, in eval mode."""
    torch.manual_seed(seed)
    values = dict(embed_dim=32, n_heads=4, num_layers=4, seq_len=16, tgt_vocab_size=TINY_VOCAB, dropout=0.0)
    return GPT(ModelConfig(**(values | fields))).eval()


DECODE_VOCAB = 64  # even: the output head can take a split layout

DECODE_VARIANTS = {  # every kind of GPT a decoding step must compute
    "gpt2": dict(pos_encoding="learned", norm="layernorm", activation="gelu", bias=True, tie_embeddings=True),
    "llama-like": dict(pos_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False),
    "cpu-10min": dict(pos_encoding="rope", norm="rmsnorm", activation="relu2", bias=False, tie_embeddings=True),
    "sinusoidal": dict(
        pos_encoding="sinusoidal", norm="layernorm", activation="relu2", bias=False, tie_embeddings=True
    ),
    "qk-norm, rope": dict(
        pos_encoding="rope", norm="rmsnorm", activation="relu2", bias=False, tie_embeddings=False, qk_norm=True
    ),
    "qk-norm, learned": dict(pos_encoding="learned", norm="layernorm", activation="gelu", bias=True, qk_norm=True),
    "value embeddings, soft cap": dict(
        pos_encoding="rope", norm="rmsnorm", activation="relu2", qk_norm=True, value_embeddings=1, logit_softcap=2.0
    ),
    "u-net skips": dict(pos_encoding="rope", norm="rmsnorm", activation="relu2", qk_norm=True, unet_skips=True),
    "smear": dict(pos_encoding="rope", norm="rmsnorm", activation="relu2", qk_norm=True, smear=True),
}


def perturbed_gpt(seed: int = 0, **fields) -> GPT:
    """A 2 × 32 GPT over DECODE_VOCAB ids with a context of 40, its weights spread wider than at
    initialisation, in eval mode: for comparing ways of computing a decoding step."""
    model = tiny_gpt(seed, **(dict(num_layers=2, seq_len=40, tgt_vocab_size=DECODE_VOCAB) | fields))
    with torch.no_grad():  # a bigger spread than the small init, so that differences show
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def random_ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    """Token ids (B, T) below TINY_VOCAB, the same for the same seed."""
    return torch.randint(0, TINY_VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def full_and_cached_logits(model: GPT, idx: torch.Tensor, prefill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of ids idx (B, T) from one full forward, and from a KV cache fed the first
    `prefill` ids at once, then one id at a time."""
    with torch.no_grad():
        full = model(idx)[0]
        cache = model.new_kv_cache(idx.size(0))
        pieces = [model(idx[:, :prefill], kv_cache=cache)[0]]
        pieces += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(prefill, idx.size(1))]
    return full, torch.cat(pieces, dim=1)


def assert_causal_and_learning(model: GPT, idx: torch.Tensor, changed_at: int = 9) -> None:
    """Changing the id at `changed_at` leaves the logits before it alone, and one training step's
    backward pass gives every parameter a gradient (left on the parameters for further checks)."""
    changed = idx.clone()
    changed[:, changed_at] = (changed[:, changed_at] + 1) % model.config.tgt_vocab_size
    with torch.no_grad():
        before = model(idx)[0][:, :changed_at]
        torch.testing.assert_close(model(changed)[0][:, :changed_at], before, rtol=0, atol=1e-6)
    _, loss = model.train()(idx, torch.roll(idx, -1, dims=1))
    loss.backward()
    assert all(param.grad.abs().sum() > 0 for param in model.parameters())


def train_with_an_option(tmp_path: Path, flag: str) -> tuple[Path, dict]:
    """A 2 x 32 GPT with Llama's norm and activation and one option of ours (`flag`, e.g. --smear),
    trained for 4 steps from the command line: its checkpoint's path and saved contents."""
    workdir = write_toy_texts(tmp_path)
    tokenizer = Path(__file__).resolve().parents[1] / "toy_data" / "tiny_sp"
    train = ["train", "--tokenizer", str(tokenizer), "--train_data", str(workdir / "train.txt")]
    tiny = ["--embed_dim", "32", "--num_layers", "2", "--n_heads", "2", "--seq_len", "16", "--batch_size", "8"]
    where = ["--checkpoint_dir", str(tmp_path), "--log_dir", str(tmp_path / "runs"), "--experiment_name", "option"]
    options = ["--norm", "rmsnorm", "--activation", "swiglu", flag, "--max_steps", "4", "--no_progress"]
    assert main([*train, *tiny, *where, *options]) == 0
    checkpoint = tmp_path / "option_e1.pth"
    return checkpoint, torch.load(checkpoint, weights_only=True)


def assert_hf_export_refused(checkpoint: Path, tmp_path: Path, capsys, option: str) -> None:
    """`gptlab export --format hf` of `checkpoint` fails in one line that names `option`, writing nothing."""
    capsys.readouterr()
    out = tmp_path / "hf"
    assert main(["export", "--model_path", str(checkpoint), "--format", "hf", "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip().startswith(f"error: {option}=True")
    assert not out.exists()
