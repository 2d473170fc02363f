"""GGUF export: the file's contents, checked by llama.cpp itself (same ids, same greedy text),
and one clear error, with nothing written, for each bad input."""

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.cli import main
from gptlab.cli.export import add_export_parser
from gptlab.config import DatasetConfig, SampleConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.generation import generate_token_ids
from gptlab.interop.gguf_export import export_gguf
from gptlab.models import GPT
from gptlab.tokenizers import BPETokenizer, CharTokenizer, TiktokenTokenizer
from gptlab.tokenizers.bpe import GPT2_PATTERN, GPT4_PATTERN
from gptlab.tokenizers.byte_level import token_to_text
from gptlab.training.checkpoint import save_checkpoint

from data_files import SHAKESPEARE_VAL, cl100k_file, read_text
from helpers import random_gpt

gguf = pytest.importorskip("gguf")
try:
    import llama_cpp
except ImportError:
    llama_cpp = None
# Checks against llama.cpp itself: `pytest -m llama_cpp` runs only them.
needs_llama_cpp = pytest.mark.skipif(
    llama_cpp is None,
    reason="llama_cpp is not importable: pip install llama-cpp-python (it builds llama.cpp, several minutes)",
)

GPT2_LAYOUT = dict(pos_encoding="learned", norm="layernorm", activation="gelu")
LLAMA_LAYOUT = dict(pos_encoding="rope", norm="rmsnorm", activation="swiglu")
VARIED_TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "Hello  world!\n\n  trailing spaces   ",
    "naïve café, ÆØÅ, 日本語のテキスト, emoji 😀👍🏽 and numbers 1234567 3.14159",
    "don't WE'LL they've I'm it's you'd",
    "\t\r\n  tabs\tand\r\nwindows lines\n\n\n",
    "   ",
    "specials inside: x<EOS>y <PAD><BOS> <UNK>!",
]


@pytest.fixture(scope="module")
def corpus() -> str:
    return read_text(SHAKESPEARE_VAL, 20_000)


@pytest.fixture(scope="module", params=["gpt4", "gpt2"])
def bpe(request, corpus) -> BPETokenizer:
    """Our BPE with each split pattern (for the tests where the pattern matters). Numbers in its
    training text give it multi-digit tokens, which GPT-2's and GPT-4's patterns cut differently."""
    numbers = " ".join(str(i * 7919 % 100_000) for i in range(1500))
    return BPETokenizer.train([corpus, numbers], 400, pattern=request.param, progress=False)


@pytest.fixture(scope="module")
def small_bpe(corpus) -> BPETokenizer:
    return BPETokenizer.train([corpus], 300, progress=False)


def read_fields(path: Path) -> tuple[dict, object]:
    """The GGUF file's key-value pairs as Python values, and its reader (for the tensors)."""
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}, reader


# ---- the file's contents ------------------------------------------------------------------------
@pytest.mark.parametrize("layout, architecture", [(GPT2_LAYOUT, "gpt2"), (LLAMA_LAYOUT, "llama")])
def test_gguf_holds_the_architecture_the_weights_and_the_tokenizer(bpe, tmp_path, layout, architecture):
    model = random_gpt(bpe.vocab_size + 3, **layout, tie_embeddings=False)  # a rounded-up table exports too
    assert export_gguf(model, bpe, tmp_path / "m.gguf") == architecture
    fields, reader = read_fields(tmp_path / "m.gguf")
    assert fields["general.architecture"] == architecture
    assert fields[f"{architecture}.block_count"] == 2 and fields[f"{architecture}.embedding_length"] == 64
    assert fields["tokenizer.ggml.pre"] == {GPT4_PATTERN: "llama-bpe", GPT2_PATTERN: "gpt-2"}[bpe.pattern]

    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == bpe.vocab_size + 3
    for i in range(256):  # our default BPE: byte b is id b
        assert tokens[i] == token_to_text(bytes([i])) and types[i] == gguf.TokenType.NORMAL
    for name, i in bpe.special_tokens.items():
        assert tokens[i] == name and types[i] == gguf.TokenType.CONTROL
    assert types[-3:] == [gguf.TokenType.UNUSED] * 3
    assert fields["tokenizer.ggml.eos_token_id"] == bpe.eos_id
    assert fields["tokenizer.ggml.add_bos_token"] is False

    tensors = {t.name: t for t in reader.tensors}
    embedding = tensors["token_embd.weight"]
    assert embedding.tensor_type == gguf.GGMLQuantizationType.F32
    assert np.array_equal(embedding.data, model.wte.weight.detach().numpy())
    assert np.array_equal(tensors["output.weight"].data, model.lm_head.weight.detach().numpy())


def test_q8_0_and_f16_store_matrices_compactly_and_norms_as_f32(bpe, tmp_path):
    model = random_gpt(bpe.vocab_size, embed_dim=128, **LLAMA_LAYOUT)
    sizes = {}
    for outtype in ("f32", "f16", "q8_0"):
        export_gguf(model, bpe, tmp_path / f"{outtype}.gguf", outtype)
        sizes[outtype] = (tmp_path / f"{outtype}.gguf").stat().st_size
    assert 0.45 < sizes["f16"] / sizes["f32"] < 0.55
    assert 0.22 < sizes["q8_0"] / sizes["f32"] < 0.32
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "q8_0.gguf").tensors}
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def small_tiktoken(bpe: BPETokenizer) -> TiktokenTokenizer:
    """A tiktoken-kind tokenizer with our BPE's ranks and pattern (and its own special ids)."""
    ranks = {bpe.token_bytes(i): i for i in range(bpe.vocab_size - len(bpe.special_tokens))}
    return TiktokenTokenizer("small", ranks, bpe.pattern, {"<|endoftext|>": len(ranks)})


def test_a_tiktoken_tokenizer_exports_with_its_merges_and_specials(bpe, tmp_path):
    tokenizer = small_tiktoken(bpe)
    export_gguf(random_gpt(tokenizer.vocab_size, **GPT2_LAYOUT), tokenizer, tmp_path / "m.gguf")
    fields, _ = read_fields(tmp_path / "m.gguf")
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    normal = sum(kind == gguf.TokenType.NORMAL for kind in types)
    assert normal == bpe.vocab_size - len(bpe.special_tokens)
    assert len(fields["tokenizer.ggml.merges"]) == normal - 256  # every token past the bytes is one merge
    assert fields["tokenizer.ggml.merges"][0] == " ".join(token_to_text(part) for part in _first_merge(bpe))
    for name, i in tokenizer.special_tokens.items():
        assert tokens[i] == name and types[i] == gguf.TokenType.CONTROL


def _first_merge(bpe: BPETokenizer) -> tuple[bytes, bytes]:
    left, right = bpe.merges[0]
    return bpe.token_bytes(left), bpe.token_bytes(right)


# ---- bad input: one line, nothing written ---------------------------------------------------------
def run_export(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", *argv])
    args.handler(args)


@pytest.fixture()
def checkpoint(small_bpe, tmp_path) -> Path:
    model = random_gpt(small_bpe.vocab_size, **LLAMA_LAYOUT)
    return save_checkpoint(
        tmp_path / "run_e1.pth", model, small_bpe, model.config, DatasetConfig(), TrainConfig(), step=1, epoch=1
    )


def test_export_command_writes_gguf_and_replaces_only_a_gguf_file(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    run_export("--model_path", str(checkpoint), "--format", "gguf", "--out", str(out), "--outtype", "q8_0")
    assert "GGUF llama, q8_0" in capsys.readouterr().out
    first = out.read_bytes()
    assert first.startswith(b"GGUF")
    with pytest.raises(GptlabError, match="already exists; choose another --out or pass --force"):
        run_export("--model_path", str(checkpoint), "--format", "gguf", "--out", str(out))
    run_export("--model_path", str(checkpoint), "--format", "gguf", "--out", str(out), "--force")  # f32 now
    assert out.read_bytes() != first and out.stat().st_size > 2 * len(first)

    other = tmp_path / "notes.txt"
    other.write_text("precious")
    with pytest.raises(GptlabError, match="is not a GGUF file, so --force will not replace it"):
        run_export("--model_path", str(checkpoint), "--format", "gguf", "--out", str(other), "--force")
    assert other.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "notes.txt", "run_e1.pth"]


@pytest.mark.parametrize(
    "out, message",
    [("", "is a directory; --format gguf writes one file"), ("missing/m.gguf", "does not exist; create it first")],
)
def test_export_command_refuses_a_bad_out_before_loading(tmp_path, out, message, capsys):
    argv = ["export", "--model_path", str(tmp_path / "absent.pth"), "--format", "gguf", "--out", str(tmp_path / out)]
    assert main(argv) == 1  # the absent checkpoint is never reached
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_outtype_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "export",
                "--model_path",
                "x.pth",
                "--format",
                "gguf",
                "--out",
                str(tmp_path / "m.gguf"),
                "--outtype",
                "q4_0",
            ]
        )
    assert "argument --outtype: invalid choice: 'q4_0'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_outtype_belongs_to_gguf_only(checkpoint, tmp_path):
    with pytest.raises(GptlabError, match="--outtype applies to --format gguf only"):
        run_export("--model_path", str(checkpoint), "--format", "hf", "--out", str(tmp_path / "hf"), "--outtype", "f16")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(pos_encoding="sinusoidal"), "pos_encoding='sinusoidal' has no llama.cpp (GGUF) equivalent"),
        (GPT2_LAYOUT | dict(activation="relu2"), "activation='relu2' has no llama.cpp (GGUF) equivalent"),
        (LLAMA_LAYOUT | dict(norm="layernorm"), "norm='layernorm' has no llama.cpp (GGUF) equivalent"),
        (LLAMA_LAYOUT | dict(qk_norm=True), "qk_norm=True has no llama.cpp (GGUF) equivalent"),
        (LLAMA_LAYOUT | dict(logit_softcap=30.0), "logit_softcap=30.0 has no llama.cpp (GGUF) equivalent"),
        (GPT2_LAYOUT | dict(value_embeddings=1), "value_embeddings=1 has no llama.cpp (GGUF) equivalent"),
        (LLAMA_LAYOUT | dict(unet_skips=True), "unet_skips=True has no llama.cpp (GGUF) equivalent"),
        (GPT2_LAYOUT | dict(smear=True), "smear=True has no llama.cpp (GGUF) equivalent"),
    ],
)
def test_a_layout_llama_cpp_lacks_is_refused_and_nothing_written(small_bpe, tmp_path, fields, message):
    with pytest.raises(GptlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_gguf(random_gpt(small_bpe.vocab_size, **fields), small_bpe, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_tokenizers_llama_cpp_would_encode_differently_are_refused(small_bpe, corpus, tmp_path):
    chars = CharTokenizer.train([corpus])
    with pytest.raises(GptlabError, match="a char tokenizer cannot go into a GGUF file"):
        export_gguf(random_gpt(chars.vocab_size, **GPT2_LAYOUT), chars, tmp_path / "m.gguf")
    own_pattern = BPETokenizer.train([corpus], 300, pattern=r"\p{L}+|\s+|[^\s\p{L}]+", progress=False)
    with pytest.raises(GptlabError, match="llama.cpp knows no pre-tokenizer for this tokenizer's split regex"):
        export_gguf(random_gpt(own_pattern.vocab_size, **GPT2_LAYOUT), own_pattern, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_missing_gguf_package_is_one_line_naming_pip_install(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    out = tmp_path / "m.gguf"
    assert main(["export", "--model_path", str(checkpoint), "--format", "gguf", "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == "error: the gguf package is not installed; run pip install gguf"
    assert not out.exists()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(small_bpe, tmp_path, monkeypatch):
    model = random_gpt(small_bpe.vocab_size, **GPT2_LAYOUT)
    out = tmp_path / "m.gguf"
    export_gguf(model, small_bpe, out)
    before = out.read_bytes()

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(random_gpt(small_bpe.vocab_size, seed=1, **GPT2_LAYOUT), small_bpe, out, force=True)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# ---- checked by llama.cpp ---------------------------------------------------------------------
@pytest.fixture()
def llama_model(monkeypatch):
    """Load a GGUF file in llama.cpp, keeping every logit. Its weight repacking for special CPU
    units is off: on CPUs with AMX (Intel Sapphire Rapids) that path crashes on q8_0 matrices in
    some virtual machines, and it changes only how llama.cpp lays the weights out."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", without_repacking)

    def load(path: Path, n_ctx: int = 128):
        return llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, logits_all=True, verbose=False
        )

    return load


def llama_greedy(llm, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's argmax continuation of `prompt`, and its logits after the prompt."""
    llm.reset()
    llm.eval(prompt)
    first = np.array(llm.scores[llm.n_tokens - 1])
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out, first


def our_greedy(model: GPT, prompt: list[int], steps: int, pad_id: int) -> list[int]:
    cfg = SampleConfig(max_new_tokens=steps, greedy=True)
    return [ids[0] for ids in generate_token_ids(model, [prompt], cfg, pad_id)]


@pytest.mark.llama_cpp
@needs_llama_cpp
def test_llama_cpp_tokenizes_like_gptlab(bpe, corpus, tmp_path, llama_model):
    export_gguf(random_gpt(bpe.vocab_size, **GPT2_LAYOUT), bpe, tmp_path / "m.gguf")
    llm = llama_model(tmp_path / "m.gguf", 128)
    for text in [*VARIED_TEXTS, corpus[5000:9000]]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == bpe.encode(text, allowed_special="all"), text
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == bpe.encode(text), text
    ids = bpe.encode(corpus[:300])
    assert llm.detokenize(ids).decode() == corpus[:300]


@pytest.mark.llama_cpp
@needs_llama_cpp
def test_llama_cpp_tokenizes_like_a_tiktoken_tokenizer(bpe, corpus, tmp_path, llama_model):
    tokenizer = small_tiktoken(bpe)
    export_gguf(random_gpt(tokenizer.vocab_size, **LLAMA_LAYOUT), tokenizer, tmp_path / "m.gguf")
    llm = llama_model(tmp_path / "m.gguf", 128)
    for text in [*VARIED_TEXTS, "<|endoftext|>x<EOS>", corpus[5000:9000]]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text, allowed_special="all")


@pytest.mark.llama_cpp
@needs_llama_cpp
def test_llama_cpp_tokenizes_like_cl100k(corpus, tmp_path, llama_model):
    tokenizer = TiktokenTokenizer.from_file(cl100k_file())
    model = random_gpt(tokenizer.vocab_size, embed_dim=32, n_heads=2, num_layers=1, **GPT2_LAYOUT)
    export_gguf(model, tokenizer, tmp_path / "m.gguf")
    llm = llama_model(tmp_path / "m.gguf", 128)
    for text in [*VARIED_TEXTS, "<|endoftext|>x<|fim_prefix|>", corpus[:20_000]]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text, allowed_special="all")


@pytest.mark.llama_cpp
@needs_llama_cpp
@pytest.mark.parametrize(
    "fields",
    [
        GPT2_LAYOUT | dict(bias=True, tie_embeddings=True),
        GPT2_LAYOUT | dict(bias=False, tie_embeddings=False, norm_eps=1e-6),
        LLAMA_LAYOUT | dict(bias=False, tie_embeddings=True, rope_theta=500.0),
        LLAMA_LAYOUT | dict(bias=True, tie_embeddings=False, expansion_factor=3),
    ],
    ids=["gpt2", "gpt2-no-bias-untied", "llama", "llama-bias-untied"],
)
def test_llama_cpp_continues_an_f32_export_as_gptlab_does(small_bpe, corpus, tmp_path, fields, llama_model):
    model = random_gpt(small_bpe.vocab_size + 3, **fields)
    export_gguf(model, small_bpe, tmp_path / "m.gguf")
    prompt = small_bpe.encode(corpus[:200])[:20]
    theirs, their_logits = llama_greedy(llama_model(tmp_path / "m.gguf", 128), prompt, 60)
    with torch.no_grad():
        our_logits = model(torch.tensor([prompt]))[0][0, -1].numpy()
    assert np.abs(their_logits - our_logits).max() < 1e-3 * np.abs(our_logits).max()
    assert theirs == our_greedy(model, prompt, 60, small_bpe.pad_id)


@pytest.mark.llama_cpp
@needs_llama_cpp
@pytest.mark.parametrize("layout", [GPT2_LAYOUT, LLAMA_LAYOUT], ids=["gpt2", "llama"])
def test_llama_cpp_runs_a_q8_0_export_a_quarter_of_the_size(small_bpe, corpus, tmp_path, layout, llama_model):
    model = random_gpt(small_bpe.vocab_size, embed_dim=128, **layout)
    export_gguf(model, small_bpe, tmp_path / "f32.gguf")
    export_gguf(model, small_bpe, tmp_path / "q8.gguf", "q8_0")
    ratio = (tmp_path / "q8.gguf").stat().st_size / (tmp_path / "f32.gguf").stat().st_size
    assert 0.22 < ratio < 0.32, ratio
    prompt = small_bpe.encode(corpus[:200])[:20]
    theirs, their_logits = llama_greedy(llama_model(tmp_path / "q8.gguf", 128), prompt, 5)
    with torch.no_grad():
        our_logits = model(torch.tensor([prompt]))[0][0, -1].numpy()
    assert np.corrcoef(their_logits, our_logits)[0, 1] > 0.99  # close, not equal: 8-bit weights
    assert theirs == our_greedy(model, prompt, 5, small_bpe.pad_id)
