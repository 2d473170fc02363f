"""The encoder-decoder Transformer: masking and caching equivalences, decoding, paired data,
bad input, checkpoints, and a tiny reversal task learned end to end through the trainer."""

from __future__ import annotations

import json
import random

import pytest
import torch

from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.data.pairs import PairDataset, read_pairs
from gptlab.errors import GptlabError
from gptlab.generation import beam_search, greedy_decode, translate
from gptlab.models.transformer import Transformer
from gptlab.tokenizers import CharTokenizer
from gptlab.training import load_transformer, train

POSITIONS = ["sinusoidal", "rope", "learned"]
LETTERS = "abcdefgh"


def tiny_config(**overrides) -> ModelConfig:
    settings = dict(
        model="transformer",
        embed_dim=32,
        n_heads=4,
        num_layers=2,
        seq_len=12,
        max_source_len=16,
        tgt_vocab_size=20,
        dropout=0.0,
    )
    return ModelConfig(**{**settings, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides)).eval()


@pytest.fixture
def tokenizer() -> CharTokenizer:
    return CharTokenizer(LETTERS)


# ---- the model ---------------------------------------------------------------------------------


def test_transformer_config_defaults_to_sinusoidal_positions():
    assert ModelConfig(model="transformer").pos_encoding == "sinusoidal"
    assert ModelConfig().pos_encoding == "rope"
    assert ModelConfig(model="transformer", pos_encoding="rope").pos_encoding == "rope"
    cfg = tiny_config(num_encoder_layers=3, num_decoder_layers=1)
    model = Transformer(cfg)
    assert (len(model.encoder), len(model.decoder)) == (3, 1)


@pytest.mark.parametrize("pos_encoding", POSITIONS)
def test_padding_never_changes_the_logits(pos_encoding):
    model = tiny_model(pos_encoding=pos_encoding, shared_embeddings=False)
    src = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 0, 0, 0, 0]])  # second row: 3 tokens + padding
    src_mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    tgt = torch.tensor([[2, 5, 6, 7, 8], [2, 9, 3, 0, 0]])  # second row: <BOS> + 2 tokens + padding
    batched, _ = model(src, tgt, src_mask)
    alone, _ = model(src[1:, :3], tgt[1:, :3])
    torch.testing.assert_close(batched[1, :3], alone[0], atol=1e-5, rtol=0)
    # Whatever the padded positions hold, the real ones do not notice.
    noisy_src = src.clone()
    noisy_src[1, 3:] = torch.tensor([15, 16, 17, 18])
    torch.testing.assert_close(model(noisy_src, tgt, src_mask)[0][1, :3], batched[1, :3], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pos_encoding", POSITIONS)
def test_decoder_is_causal(pos_encoding):
    model = tiny_model(pos_encoding=pos_encoding)
    src = torch.randint(4, 20, (2, 9))
    tgt = torch.randint(4, 20, (2, 8))
    changed = tgt.clone()
    changed[:, 5] = (tgt[:, 5] - 4 + 1) % 16 + 4  # a different token at position 5
    before, _ = model(src, tgt)
    after, _ = model(src, changed)
    torch.testing.assert_close(after[:, :5], before[:, :5], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, 5:], before[:, 5:])


@pytest.mark.parametrize("pos_encoding", POSITIONS)
def test_kv_cache_decoding_equals_full_decoding(pos_encoding):
    model = tiny_model(pos_encoding=pos_encoding)
    src = torch.randint(4, 20, (3, 10))
    src_mask = torch.ones_like(src, dtype=torch.bool)
    src_mask[2, 6:] = False
    tgt = torch.randint(4, 20, (3, 9))
    full, _ = model(src, tgt, src_mask)  # (B, T, V)
    state = model.start_decoding(model.encode(src, src_mask), src_mask)
    one_by_one = torch.cat([model.decode(tgt[:, t : t + 1], state) for t in range(tgt.size(1))], dim=1)
    torch.testing.assert_close(one_by_one, full, atol=1e-5, rtol=0)
    state = model.start_decoding(model.encode(src, src_mask), src_mask)
    in_chunks = torch.cat([model.decode(tgt[:, :4], state), model.decode(tgt[:, 4:], state)], dim=1)
    torch.testing.assert_close(in_chunks, full, atol=1e-5, rtol=0)


def test_decoding_past_seq_len_is_refused():
    model = tiny_model()
    src = torch.randint(4, 20, (1, 5))
    with pytest.raises(GptlabError, match="exceed the model's seq_len=12"):
        model(src, torch.randint(4, 20, (1, 13)))
    with pytest.raises(GptlabError, match="max_source_len=16"):
        model(torch.randint(4, 20, (1, 17)), torch.randint(4, 20, (1, 3)))


def test_shared_embeddings_are_one_table():
    shared, separate = tiny_model(shared_embeddings=True), tiny_model(shared_embeddings=False)
    assert shared.src_embed.weight is shared.tgt_embed.weight is shared.lm_head.weight
    assert separate.src_embed.weight is not separate.tgt_embed.weight
    assert separate.num_params() - shared.num_params() == 20 * 32


# ---- decoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_beam_search_with_one_beam_is_greedy(tokenizer, seed):
    model = tiny_model(seed, tgt_vocab_size=tokenizer.vocab_size)
    rng = random.Random(seed)
    sources = [[rng.randrange(4, tokenizer.vocab_size) for _ in range(rng.randrange(2, 9))] for _ in range(3)]
    for source in sources:
        src = torch.tensor([source])
        [greedy] = greedy_decode(model, src, torch.ones_like(src, dtype=torch.bool), tokenizer)
        assert beam_search(model, source, tokenizer, beam_size=1) == greedy


def reference_beam_search(model, source, tokenizer, K, length_penalty, max_len):
    """The same search as beam_search, but every step re-runs the whole model on every prefix
    (no cache, no reordering of cached keys): what the cached search must reproduce."""
    src = torch.tensor([source])
    banned = torch.zeros(model.config.tgt_vocab_size, dtype=torch.bool)
    banned[[tokenizer.pad_id, tokenizer.bos_id]] = True
    alive, finished = [(0.0, [])], []
    for step in range(1, max_len + 1):
        candidates = []
        for score, prefix in alive:
            logits, _ = model(src, torch.tensor([[tokenizer.bos_id, *prefix]]))
            logprobs = logits[0, -1].masked_fill(banned, float("-inf")).log_softmax(-1)
            candidates += [(score + lp, prefix, token) for token, lp in enumerate(logprobs.tolist())]
        candidates.sort(key=lambda c: -c[0])
        alive = []
        for rank, (score, prefix, token) in enumerate(candidates[: 2 * K]):
            if token == tokenizer.eos_id:
                if rank < K:
                    finished.append((score / step**length_penalty, prefix))
            elif len(alive) < K:
                alive.append((score, prefix + [token]))
        if len(finished) >= K:
            break
    return max(finished)[1] if finished else max(alive)[1]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_with_cache_matches_a_search_without_it(tokenizer, seed, length_penalty):
    model = tiny_model(seed, tgt_vocab_size=tokenizer.vocab_size, seq_len=6)
    source = [4 + (seed * 3 + i) % 8 for i in range(5)]
    expected = reference_beam_search(model, source, tokenizer, 3, length_penalty, 6)
    assert beam_search(model, source, tokenizer, beam_size=3, length_penalty=length_penalty) == expected


# ---- paired data -------------------------------------------------------------------------------


@pytest.mark.parametrize("bom", ["", "\ufeff"], ids=["plain", "byte-order-mark"])
def test_tsv_and_jsonl_give_the_same_pairs(tmp_path, bom):
    pairs = [("abc", "cba"), ("hello world", "a\tb"), ("x", "y")]
    (tmp_path / "p.tsv").write_text(bom + "".join(f"{s}\t{t}\n" for s, t in pairs) + "\n")  # a blank line is ignored
    (tmp_path / "p.jsonl").write_text(bom + "".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs))
    assert read_pairs(tmp_path / "p.tsv") == read_pairs(tmp_path / "p.jsonl") == pairs


def test_targets_are_wrapped_in_bos_eos_and_batches_are_padded(tokenizer):
    data = PairDataset([("abcd", "dc"), ("a", "hgfe")], tokenizer, max_source_len=8, seq_len=8)
    batch = data.batch([0, 1])
    a, b, c, d = (tokenizer.encode(ch)[0] for ch in "abcd")
    pad, bos, eos = tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id
    assert batch.src.tolist() == [[a, b, c, d], [a, pad, pad, pad]]
    assert batch.src_mask.tolist() == [[True] * 4, [True, False, False, False]]
    assert batch.tgt[0].tolist() == [bos, d, c, pad, pad]
    assert batch.labels[0].tolist() == [d, c, eos, -100, -100]
    assert batch.tgt[1, 0].item() == bos and batch.labels[1, -1].item() == eos
    assert data.reference(0) == [d, c]


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("p.tsv", "ab\tba\nno tab here\n", "line 2: no tab between source and target"),
        ("p.tsv", "ab\tba\ncd\tdc\n\t  \n", "line 3: empty source and target"),
        ("p.tsv", "ab\t\n", "line 1: empty target"),
        ("p.jsonl", '{"source": "ab", "target": "ba"}\n{"source": "ab"\n', "line 2: not valid JSON"),
        ("p.jsonl", '{"source": "ab", "tgt": "ba"}\n', 'line 1: not a {"source"'),
    ],
)
def test_bad_lines_are_refused_with_their_line_number(tmp_path, name, text, problem):
    (tmp_path / name).write_text(text)
    with pytest.raises(GptlabError, match=f"{name} {problem}.*--skip_bad_lines"):
        read_pairs(tmp_path / name)


def test_bad_lines_can_be_skipped_with_a_warning(tmp_path):
    (tmp_path / "p.tsv").write_text("ab\tba\nno tab\ncd\tdc\n\tempty source\n")
    with pytest.warns(UserWarning, match=r"skipped 2 bad line\(s\) \(line 2, 4; first: no tab"):
        assert read_pairs(tmp_path / "p.tsv", skip_bad_lines=True) == [("ab", "ba"), ("cd", "dc")]


def test_missing_or_empty_files_are_refused(tmp_path):
    with pytest.raises(GptlabError, match="not found"):
        read_pairs(tmp_path / "nope.tsv")
    (tmp_path / "empty.tsv").write_text("\n\n")
    with pytest.raises(GptlabError, match="holds no source/target pairs"):
        read_pairs(tmp_path / "empty.tsv")


def test_long_sources_and_targets_are_truncated_with_a_warning(tokenizer):
    with pytest.warns(UserWarning) as caught:
        data = PairDataset([("abcdefgh", "ab"), ("ab", "abcdefgh")], tokenizer, max_source_len=4, seq_len=5)
    messages = sorted(str(w.message) for w in caught)
    assert "1 source(s) longer than max_source_len=4 tokens were truncated" in messages[0]
    assert "1 target(s) longer than seq_len=5 tokens (with <EOS>) were truncated" in messages[1]
    assert data.sources[0] == tokenizer.encode("abcd")
    assert len(data.decoder_inputs[1]) == len(data.labels[1]) == 5
    assert tokenizer.eos_id not in data.labels[1]  # a cut target never teaches a false ending
    model = tiny_model(tgt_vocab_size=tokenizer.vocab_size, max_source_len=4)
    with pytest.warns(UserWarning, match="1 source.* longer than max_source_len=4"):
        translate(model, tokenizer, ["abcdefgh"])


# ---- checkpoints and training ------------------------------------------------------------------


def reversal_pairs(count: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """`count` different strings of 2..5 letters, each paired with its reverse."""
    pairs: dict[str, str] = {}
    while len(pairs) < count:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 5)))
        if word not in exclude:
            pairs[word] = word[::-1]
    return list(pairs.items())


@pytest.fixture
def reversal_files(tmp_path):
    rng = random.Random(0)
    train_pairs = reversal_pairs(1500, rng)
    eval_pairs = reversal_pairs(128, rng, exclude={source for source, _ in train_pairs})  # held out
    for name, pairs in (("train.tsv", train_pairs), ("eval.tsv", eval_pairs)):
        (tmp_path / name).write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    return tmp_path / "train.tsv", tmp_path / "eval.tsv"


def reversal_configs(tmp_path, **train_settings):
    model = ModelConfig(
        model="transformer", embed_dim=64, n_heads=4, num_layers=2, seq_len=6, max_source_len=5, dropout=0.0
    )
    settings = dict(
        epochs=12,
        learning_rate=3e-3,
        warmup_steps=30,
        eval_interval=1000,
        eval_batches=4,
        checkpoint_every=100,
        experiment_name="reverse",
        checkpoint_dir=str(tmp_path / "ckpt"),
        log_dir=str(tmp_path / "runs"),
        device="cpu",
        seed=0,
    )
    return model, DatasetConfig(batch_size=32), TrainConfig(**{**settings, **train_settings})


def test_a_tiny_reversal_task_is_learned(tmp_path, tokenizer, reversal_files, one_thread):
    result = train(*reversal_configs(tmp_path), tokenizer, *reversal_files, progress=False)
    assert result.eval.exact_match >= 0.95, result.eval
    model, loaded_tokenizer, checkpoint = load_transformer(result.final_checkpoint)
    assert checkpoint.model_type == "transformer" and checkpoint.raw["model_type"] == "transformer"
    # The checkpoint decodes the held-out sources as well as the evaluation said, through the text API.
    held_out = read_pairs(reversal_files[1])
    decoded = translate(model, loaded_tokenizer, [source for source, _ in held_out])
    exact = sum(output == target for output, (_, target) in zip(decoded, held_out)) / len(held_out)
    assert exact == pytest.approx(result.eval.exact_match)


def test_qk_norm_makes_self_and_cross_attention_blind_to_the_scale_of_queries_and_keys():
    src = torch.randint(1, 20, (2, 9), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(1, 20, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(src, dtype=torch.bool)
    for qk_norm in (True, False):
        model = tiny_model(qk_norm=qk_norm, norm_eps=1e-10)
        with torch.no_grad():
            reference = model(src, tgt, mask)[0]
            for name, param in model.named_parameters():
                if name.endswith("query.weight"):
                    param.mul_(6.0)
                elif name.endswith("key_value.weight"):
                    param[: param.size(0) // 2].mul_(4.0)  # the keys' half
            same = torch.allclose(model(src, tgt, mask)[0], reference, rtol=0, atol=1e-5)
        assert same == qk_norm


def test_zero_initialised_projections_reach_the_encoder_and_the_decoder():
    model = tiny_model(zero_init_projections=True)
    projections = [param for name, param in model.named_parameters() if name.endswith("proj.weight")]
    expected = 2 * 2 + 3 * 2  # 2 encoder layers of self-attention and MLP, 2 decoder layers with cross-attention too
    assert len(projections) == expected
    assert all(torch.equal(param, torch.zeros_like(param)) for param in projections)
