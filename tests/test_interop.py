"""Hugging Face interop: exports that transformers loads with the same logits and ids, gptlab's
safetensors directory, importing a GPT-2 directory, and one clear error for each bad input."""

import argparse
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab.cli.export import add_export_parser
from gptlab.config import DatasetConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.interop import export_hf, export_safetensors, init_model_from_hf, load_safetensors_dir
from gptlab.models import GPT
from gptlab.tokenizers import BPETokenizer, CharTokenizer, TiktokenTokenizer
from gptlab.tokenizers.bpe import GPT2_PATTERN
from gptlab.tokenizers.tiktoken_adapter import KNOWN_ENCODINGS
from gptlab.training.checkpoint import save_checkpoint

from data_files import SHAKESPEARE_VAL, read_text
from gpt2_dirs import gpt2_ordered_ranks, save_random_gpt2
from helpers import random_gpt

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

VARIED_TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "Hello  world!\n\n  trailing spaces   ",
    "naïve café, ÆØÅ, 日本語のテキスト, emoji 😀👍🏽 and numbers 1234567 3.14159",
    "don't WE'LL they've I'm it's you'd",
    "\t\r\n  tabs\tand\r\nwindows lines\n\n\n",
    "   ",
    "",
    "specials inside: x<EOS>y <PAD><BOS> <UNK>!",
]
GPT2_LAYOUT = dict(pos_encoding="learned", norm="layernorm", activation="gelu")
LLAMA_LAYOUT = dict(pos_encoding="rope", norm="rmsnorm", activation="swiglu")


@pytest.fixture(scope="module")
def corpus() -> str:
    return read_text(SHAKESPEARE_VAL, 20_000)


@pytest.fixture(scope="module", params=["gpt4", "gpt2"])
def bpe(request, corpus) -> BPETokenizer:
    """Our BPE with each split pattern (for the tests where the pattern matters)."""
    return BPETokenizer.train([corpus], 400, pattern=request.param, progress=False)


@pytest.fixture(scope="module")
def small_bpe(corpus) -> BPETokenizer:
    return BPETokenizer.train([corpus], 300, progress=False)


def assert_same_logits(ours: GPT, theirs, ids: list[int]) -> None:
    x = torch.tensor([ids[: ours.config.seq_len]])
    with torch.no_grad():
        expected, _ = ours(x)
        got = theirs(x).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def load_hf_model(directory: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


# ---- export to transformers ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, architecture",
    [
        (GPT2_LAYOUT | dict(bias=True, tie_embeddings=True), "GPT2LMHeadModel"),
        (GPT2_LAYOUT | dict(bias=False, tie_embeddings=False, norm_eps=1e-6), "GPT2LMHeadModel"),
        (LLAMA_LAYOUT | dict(bias=False, tie_embeddings=True, rope_theta=500.0), "LlamaForCausalLM"),
        (LLAMA_LAYOUT | dict(bias=True, tie_embeddings=False, expansion_factor=3), "LlamaForCausalLM"),
    ],
)
def test_hf_export_loads_in_transformers_with_the_same_logits_and_ids(bpe, corpus, tmp_path, fields, architecture):
    model = random_gpt(bpe.vocab_size + 3, **fields)  # a rounded-up table exports too
    assert export_hf(model, bpe, tmp_path / "hf") == architecture

    theirs = load_hf_model(tmp_path / "hf")
    assert type(theirs).__name__ == architecture
    assert theirs.config.tie_word_embeddings == model.config.tie_embeddings
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = bpe.encode(corpus[:400])
    assert hf_tokenizer(corpus[:400])["input_ids"] == ids
    assert_same_logits(model, theirs, ids)
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (bpe.eos_id, bpe.pad_id)
    assert theirs.config.eos_token_id == bpe.eos_id


@pytest.fixture(scope="module")
def exported_tokenizer(bpe, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    export_hf(random_gpt(bpe.vocab_size, **GPT2_LAYOUT), bpe, directory / "hf")
    return transformers.AutoTokenizer.from_pretrained(directory / "hf")


def test_exported_tokenizer_gives_our_ids_on_varied_text(bpe, exported_tokenizer, corpus):
    for text in [*VARIED_TEXTS, corpus[5000:9000]]:
        # HF always reads special tokens in the text as special: our allowed_special="all".
        ids = bpe.encode(text, allowed_special="all")
        assert exported_tokenizer(text)["input_ids"] == ids, text
        assert exported_tokenizer.decode(ids) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_exported_tokenizer_gives_our_ids_on_random_unicode(bpe, exported_tokenizer, text):
    assert exported_tokenizer(text)["input_ids"] == bpe.encode(text, allowed_special="all")


def test_tiktoken_kind_exports_with_its_own_ids(corpus, tmp_path):
    bpe = BPETokenizer.train([corpus], 400, pattern="gpt2", progress=False)
    ranks = gpt2_ordered_ranks(bpe)
    tokenizer = TiktokenTokenizer("small", ranks, KNOWN_ENCODINGS["gpt2"][0], {"<|endoftext|>": len(ranks)})
    model = random_gpt(tokenizer.vocab_size, **GPT2_LAYOUT)
    export_hf(model, tokenizer, tmp_path / "hf")

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in [*VARIED_TEXTS, "one<|endoftext|>two", corpus[:3000]]:
        assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text, allowed_special="all"), text
    assert_same_logits(model, load_hf_model(tmp_path / "hf"), tokenizer.encode(corpus[:300]))


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(pos_encoding="sinusoidal"), "pos_encoding"),
        (GPT2_LAYOUT | dict(norm="rmsnorm"), "norm"),
        (GPT2_LAYOUT | dict(activation="relu2"), "activation"),
        (LLAMA_LAYOUT | dict(activation="gelu"), "activation"),
        (LLAMA_LAYOUT | dict(norm="layernorm"), "norm"),
        (LLAMA_LAYOUT | dict(qk_norm=True), "qk_norm"),
        (GPT2_LAYOUT | dict(qk_norm=True), "qk_norm"),
        (LLAMA_LAYOUT | dict(logit_softcap=30.0), "logit_softcap"),
        (GPT2_LAYOUT | dict(value_embeddings=1), "value_embeddings"),
        (LLAMA_LAYOUT | dict(unet_skips=True), "unet_skips"),
        (GPT2_LAYOUT | dict(smear=True), "smear"),
    ],
)
def test_a_model_without_transformers_equivalent_names_the_field_and_safetensors_works(
    small_bpe, tmp_path, fields, named
):
    model = random_gpt(small_bpe.vocab_size, **fields)
    with pytest.raises(GptlabError, match=f"^{named}=.*--format safetensors"):
        export_hf(model, small_bpe, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export_safetensors(model, small_bpe, tmp_path / "st")
    loaded, _, _ = load_safetensors_dir(tmp_path / "st")
    x = torch.tensor([small_bpe.encode("Now is the winter")])
    assert torch.equal(loaded(x)[0], model(x)[0])


def test_a_tokenizer_without_hf_equivalent_is_refused_and_safetensors_still_works(corpus, tmp_path):
    tokenizer = CharTokenizer.train([corpus])
    model = random_gpt(tokenizer.vocab_size, **GPT2_LAYOUT)
    with pytest.raises(GptlabError, match="char tokenizer has no faithful Hugging Face equivalent.*safetensors"):
        export_hf(model, tokenizer, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export_safetensors(model, tokenizer, tmp_path / "st")
    assert load_safetensors_dir(tmp_path / "st")[1].fingerprint() == tokenizer.fingerprint()


def test_a_non_empty_output_directory_is_refused_unless_forced(small_bpe, tmp_path):
    model = random_gpt(small_bpe.vocab_size, **GPT2_LAYOUT)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(GptlabError, match="not empty.*--force"):
        export_hf(model, small_bpe, out)
    with pytest.raises(GptlabError, match="not empty.*--force"):
        export_safetensors(model, small_bpe, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    # --force replaces an earlier export only, never a user's files.
    with pytest.raises(GptlabError, match="holds notes.txt, which no gptlab export wrote"):
        export_hf(model, small_bpe, out, force=True)
    (out / "notes.txt").unlink()
    export_safetensors(model, small_bpe, out)
    # A failing forced export leaves the old directory as it was; a successful one replaces it.
    with pytest.raises(GptlabError, match="pos_encoding"):
        export_hf(random_gpt(small_bpe.vocab_size, pos_encoding="sinusoidal"), small_bpe, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    export_hf(model, small_bpe, out, force=True)
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind


# ---- gptlab's safetensors directory -------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_safetensors_round_trip_is_the_identity(small_bpe, tmp_path, tie):
    model = random_gpt(small_bpe.vocab_size, **LLAMA_LAYOUT, tie_embeddings=tie)
    export_safetensors(model, small_bpe, tmp_path / "st", DatasetConfig(batch_size=3), TrainConfig(epochs=2))
    loaded, tokenizer, config = load_safetensors_dir(tmp_path / "st")
    assert config == model.config
    assert tokenizer.fingerprint() == small_bpe.fingerprint()
    assert (loaded.lm_head.weight is loaded.wte.weight) == tie
    theirs = loaded.state_dict()
    assert all(torch.equal(value, theirs[name]) for name, value in model.state_dict().items())
    saved = json.loads((tmp_path / "st" / "config.json").read_text())
    assert saved["data_config"]["batch_size"] == 3 and saved["train_config"]["epochs"] == 2


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "not a readable safetensors file"),
        (lambda d: (d / "tokenizer" / "vocab.json").unlink(), "vocab.json is missing"),
        (lambda d: (d / "config.json").write_text("{"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"model_type": "gpt2"}'), "not a gptlab safetensors directory"),
    ],
)
def test_a_damaged_safetensors_directory_is_named(small_bpe, tmp_path, damage, message):
    export_safetensors(random_gpt(small_bpe.vocab_size), small_bpe, tmp_path / "st")
    damage(tmp_path / "st")
    with pytest.raises(GptlabError, match=message):
        load_safetensors_dir(tmp_path / "st")


def test_safetensors_weights_that_disagree_with_the_config_are_named(small_bpe, tmp_path):
    export_safetensors(random_gpt(small_bpe.vocab_size), small_bpe, tmp_path / "st")
    config_file = tmp_path / "st" / "config.json"
    config = json.loads(config_file.read_text())
    config["model_config"]["num_layers"] = 3
    config_file.write_text(json.dumps(config))
    with pytest.raises(GptlabError, match="missing blocks.2"):
        load_safetensors_dir(tmp_path / "st")


# ---- import of a Hugging Face GPT-2 directory ---------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_dir(corpus, tmp_path_factory):
    """A small random GPT-2 directory (see gpt2_dirs.py) and its model."""
    directory = tmp_path_factory.mktemp("gpt2")
    bpe = BPETokenizer.train([corpus], 400, pattern="gpt2", progress=False)
    return directory, save_random_gpt2(directory, bpe, n_embd=64, n_head=4, noise=0.05)


def copy_of(gpt2_dir, tmp_path) -> Path:
    return Path(shutil.copytree(gpt2_dir[0], tmp_path / "gpt2"))


def test_imported_gpt2_keeps_its_ids_and_logits(gpt2_dir, corpus):
    directory, theirs = gpt2_dir
    model, tokenizer, config = init_model_from_hf(directory)
    hf_tokenizer = transformers.GPT2Tokenizer.from_pretrained(directory)
    for text in [*VARIED_TEXTS, corpus[:3000]]:
        assert tokenizer.encode(text) == hf_tokenizer(text)["input_ids"], text
    assert tokenizer.encode("a<|endoftext|>", allowed_special="all")[-1] == hf_tokenizer.eos_token_id

    ids = tokenizer.encode(corpus[:300])[:32]
    rows = theirs.config.vocab_size
    with torch.no_grad():
        ours = model.eval()(torch.tensor([ids]))[0]
        expected = theirs(torch.tensor([ids])).logits
    assert (ours[..., :rows] - expected).abs().max().item() < 1e-4

    # Our four special tokens follow GPT-2's ids; <EOS> starts as <|endoftext|>.
    specials = tokenizer.special_tokens
    assert [specials[t] for t in ("<PAD>", "<UNK>", "<BOS>", "<EOS>")] == list(range(rows, rows + 4))
    assert config.tgt_vocab_size == tokenizer.vocab_size == rows + 4
    assert torch.equal(model.wte.weight[specials["<EOS>"]], model.wte.weight[specials["<|endoftext|>"]])
    assert model.lm_head.weight is model.wte.weight


def test_a_padded_gpt2_table_gives_its_spare_rows_to_our_special_tokens(gpt2_dir, tmp_path):
    directory, theirs = gpt2_dir
    rows = theirs.config.vocab_size
    padded_dir = copy_of(gpt2_dir, tmp_path)
    padded = copy.deepcopy(theirs)
    padded.resize_token_embeddings(rows + 8)  # as configs that round the table up to a multiple
    padded.save_pretrained(padded_dir)
    model, tokenizer, config = init_model_from_hf(padded_dir)
    specials = tokenizer.special_tokens
    assert config.tgt_vocab_size == rows + 8 and specials["<EOS>"] < rows + 8
    table = model.wte.weight.detach()
    assert torch.equal(table[specials["<EOS>"]], table[specials["<|endoftext|>"]])
    torch.testing.assert_close(table[specials["<PAD>"]], table[:rows].mean(dim=0))
    torch.testing.assert_close(table[:rows], theirs.transformer.wte.weight.detach())


def test_imported_gpt2_from_pytorch_model_bin(gpt2_dir, tmp_path):
    directory = copy_of(gpt2_dir, tmp_path)
    state = gpt2_dir[1].state_dict()
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    model, _, _ = init_model_from_hf(directory)
    assert torch.equal(model.blocks[1].mlp.fc.weight, state["transformer.h.1.mlp.c_fc.weight"].t())


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_with_code_is_never_executed(gpt2_dir, tmp_path, capsys):
    directory = copy_of(gpt2_dir, tmp_path)
    (directory / "model.safetensors").unlink()
    torch.save({"weights": _Payload()}, directory / "pytorch_model.bin")
    with pytest.raises(GptlabError, match="pytorch_model.bin is not a plain tensor file"):
        init_model_from_hf(directory)
    assert "must never run" not in capsys.readouterr().out


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors or pytorch_model.bin"),
        (lambda d: (d / "merges.txt").unlink(), "has no merges.txt"),
        (lambda d: (d / "vocab.json").unlink(), "has no vocab.json"),
        (lambda d: (d / "config.json").unlink(), "has no config.json"),
        (lambda d: _edit_config(d, n_embd=32, n_head=2), r"wte.weight has shape \(397, 64\) but .* says \(397, 32\)"),
        (lambda d: _edit_config(d, n_layer=3), "hold 2 layers but config.json says n_layer = 3"),
        (lambda d: _edit_config(d, n_positions=64), "wpe.weight"),
        (lambda d: _edit_config(d, activation_function="relu"), "activation_function = 'relu'"),
        (
            lambda d: _edit_config(d, model_type="mistral", architectures=["MistralForCausalLM"]),
            "holds a 'mistral' model .*MistralForCausalLM.*only GPT-2",
        ),
        (lambda d: (d / "model.safetensors").write_bytes(b"\0" * 16), "not a readable safetensors file"),
    ],
)
def test_a_bad_hf_directory_is_named(gpt2_dir, tmp_path, damage, message):
    directory = copy_of(gpt2_dir, tmp_path)
    damage(directory)
    with pytest.raises(GptlabError, match=message):
        init_model_from_hf(directory)


def test_our_llama_export_is_refused_as_gpt2_import(small_bpe, tmp_path):
    export_hf(random_gpt(small_bpe.vocab_size, **LLAMA_LAYOUT), small_bpe, tmp_path / "llama")
    with pytest.raises(GptlabError, match="holds a 'llama' model .*LlamaForCausalLM"):
        init_model_from_hf(tmp_path / "llama")


def test_exported_gpt2_imports_back_with_the_same_logits(bpe, tmp_path):
    model = random_gpt(bpe.vocab_size, **GPT2_LAYOUT, bias=True)
    export_hf(model, bpe, tmp_path / "hf")
    imported, tokenizer, _ = init_model_from_hf(tmp_path / "hf")
    text = "Now is the winter of our discontent, 1234"
    if bpe.pattern == GPT2_PATTERN:  # the import always splits with GPT-2's pattern
        assert tokenizer.encode(text) == bpe.encode(text)
    x = torch.tensor([bpe.encode(text)])
    with torch.no_grad():
        assert (imported.eval()(x)[0][..., : bpe.vocab_size] - model(x)[0]).abs().max().item() < 1e-4


# ---- the export command -------------------------------------------------------------------------
def run_export(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", *argv])
    args.handler(args)


def test_export_command_from_a_checkpoint(small_bpe, tmp_path, capsys):
    model = random_gpt(small_bpe.vocab_size, **LLAMA_LAYOUT)
    checkpoint = save_checkpoint(
        tmp_path / "run_e1.pth", model, small_bpe, model.config, DatasetConfig(), TrainConfig(), step=1, epoch=1
    )
    run_export("--model_path", str(checkpoint), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert "LlamaForCausalLM" in capsys.readouterr().out
    ids = small_bpe.encode("To be, or not to be")
    assert_same_logits(model, load_hf_model(tmp_path / "hf"), ids)

    run_export("--model_path", str(checkpoint), "--format", "safetensors", "--out", str(tmp_path / "st"))
    run_export("--model_path", str(tmp_path / "st"), "--out", str(tmp_path / "hf2"))  # safetensors -> hf
    assert_same_logits(model, load_hf_model(tmp_path / "hf2"), ids)
    with pytest.raises(GptlabError, match="not empty"):
        run_export("--model_path", str(checkpoint), "--out", str(tmp_path / "hf"))


def test_export_command_refuses_a_file_that_is_not_our_checkpoint(tmp_path):
    torch.save({"state_dict": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(GptlabError, match="not a gptlab checkpoint"):
        run_export("--model_path", str(tmp_path / "other.pth"), "--out", str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


# ---- fine-tuning through the command line -----------------------------------------------------
def test_train_init_from_gpt2_fine_tunes_and_generates(gpt2_dir, corpus, tmp_path, capsys):
    from gptlab.cli import main
    from gptlab.training import load_model

    directory, theirs = gpt2_dir
    (tmp_path / "train.txt").write_text(corpus[:6000], encoding="utf-8")
    common = ["train", "--init_from", str(directory), "--train_data", str(tmp_path / "train.txt"),
              "--seq_len", "16", "--batch_size", "4", "--checkpoint_dir", str(tmp_path),
              "--log_dir", str(tmp_path / "runs"), "--no_progress", "--dropout", "0"]  # fmt: skip
    # A step with a vanishing learning rate keeps GPT-2's weights: the start really is GPT-2.
    assert main([*common, "--experiment_name", "still", "--max_steps", "1", "--learning_rate", "1e-30"]) == 0
    model, tokenizer, _ = load_model(tmp_path / "still_e1.pth")
    ids = tokenizer.encode(corpus[:300])[:16]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][..., : theirs.config.vocab_size]
        expected = theirs(torch.tensor([ids])).logits
    assert (ours - expected).abs().max().item() < 1e-4
    assert model.config.seq_len == 16 and model.wpe.weight.shape[0] == 16  # the position table was cut

    assert main([*common, "--experiment_name", "tuned", "--max_steps", "2", "--learning_rate", "1e-3"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model_path", str(tmp_path / "tuned_e1.pth"), "--prompt", "the", "--length", "5"]) == 0
    assert capsys.readouterr().out.startswith("the")


@pytest.mark.parametrize(
    "flags, message",
    [(["--embed_dim", "96"], "--embed_dim 96 contradicts"), (["--tokenizer", "toy_data/tiny_sp"], "drop --tokenizer"),
     (["--seq_len", "64"], "exceeds the context of the pretrained model")],
)  # fmt: skip
def test_train_init_from_refuses_contradicting_flags(gpt2_dir, corpus, tmp_path, capsys, flags, message):
    from gptlab.cli import main

    (tmp_path / "train.txt").write_text(corpus[:2000], encoding="utf-8")
    argv = ["train", "--init_from", str(gpt2_dir[0]), "--train_data", str(tmp_path / "train.txt"), *flags]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
