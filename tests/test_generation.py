"""Sampling and text out: the logits processors, greedy and seeded decoding, stop strings,
<EOS>, whole-character streaming, batched samples and long prompts."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gptlab.config import ModelConfig, SampleConfig
from gptlab.generation import banned_ids, generate, generate_token_ids, stream_batch, stream_text
from gptlab.generation.sampling import apply_repetition_penalty, keep_min_p, keep_top_k, keep_top_p, sample_next
from gptlab.generation.text_stream import TextStream
from gptlab.models import GPT, KVCache
from gptlab.tokenizers import BPETokenizer

BYTES = BPETokenizer([])  # a byte-level tokenizer: ids 0..255 are the bytes, then the specials
NEG_INF = float("-inf")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny_gpt(seq_len: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(
        embed_dim=32, n_heads=4, num_layers=2, seq_len=seq_len, tgt_vocab_size=BYTES.vocab_size, dropout=0.0
    )
    model = GPT(config).eval()
    with torch.no_grad():  # spread the logits, so that samples differ visibly
        model.lm_head.weight.mul_(20)
    return model


class ScriptedModel(nn.Module):
    """A stand-in for a trained model: whatever the prompt, its k-th forward pass puts all the
    probability on script[k] (then on <EOS>), in every row of the batch."""

    def __init__(self, script: list[int], vocab_size: int = BYTES.vocab_size):
        super().__init__()
        self.config = ModelConfig(
            embed_dim=4, n_heads=1, num_layers=1, seq_len=256, tgt_vocab_size=vocab_size, dropout=0.0
        )
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the engine a device to read
        self.script, self.calls, self.batch_sizes = script, 0, []

    def new_kv_cache(self, batch: int, max_len: int | None = None, pad: torch.Tensor | None = None) -> KVCache:
        return KVCache(batch, 1, 1, self.config.seq_len, 1, pad=pad)

    def forward(self, idx: torch.Tensor, kv_cache: KVCache, last_only: bool = False) -> tuple[torch.Tensor, None]:
        B, T = idx.shape
        kv_cache.advance(T)
        token = self.script[self.calls] if self.calls < len(self.script) else BYTES.eos_id
        self.calls += 1
        self.batch_sizes.append(B)
        logits = torch.full((B, T, self.config.tgt_vocab_size), -10.0)
        logits[:, -1, token] = 10.0
        return logits, None


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# ---- logits processors on hand-made logits ---------------------------------------------------


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 2.0, 1.0, -2.0]])
    kept = keep_top_k(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True, False], [False, False, True, True, False]]
    assert torch.equal(kept[0, [1, 3]], logits[0, [1, 3]])  # survivors unchanged
    assert torch.equal(keep_top_k(logits, 5), logits)


@pytest.mark.parametrize(
    "p, kept_ranks", [(0.3, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (0.99, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])]
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept_ranks):
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    rank_to_id = [1, 3, 0, 2]
    result = keep_top_p(probs.log()[None], p)
    assert sorted(torch.isfinite(result[0]).nonzero().flatten().tolist()) == sorted(rank_to_id[i] for i in kept_ranks)


def test_min_p_drops_tokens_far_below_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    kept = torch.isfinite(keep_min_p(probs.log(), 0.5))
    assert kept.tolist() == [[True, True, False, False], [True, True, True, True]]  # cut at 0.25, then 0.125


def test_greedy_takes_the_first_of_equal_best_logits_as_argmax_does():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, -1.0, 5.0, 5.0]])
    picked = sample_next(logits, SampleConfig(greedy=True))
    assert picked.tolist() == logits.argmax(dim=-1).tolist() == [1, 0, 2]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_repetition_penalty_stops_greedy_decoding_from_looping():
    model = tiny_gpt()
    prompt = byte_ids("ab")

    def greedy_ids(penalty: float) -> list[int]:
        cfg = SampleConfig(greedy=True, max_new_tokens=40, repetition_penalty=penalty)
        return [step[0] for step in generate_token_ids(model, [prompt], cfg, BYTES.pad_id)]

    assert len(set(greedy_ids(1.0))) < 40  # this random model repeats itself
    penalized = greedy_ids(1e6)
    assert len(set(penalized + prompt)) == 42  # no token twice, none from the prompt


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[0.0, math.log(3.0), -1e9, -1e9]]).repeat(4000, 1)  # p = 1/4, 3/4
    generator = torch.Generator().manual_seed(0)
    draws = sample_next(logits, SampleConfig(), generator=generator)
    assert set(draws.tolist()) == {0, 1}
    assert draws.float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert sample_next(logits[:3], SampleConfig(top_k=1), generator=generator).tolist() == [1, 1, 1]


# ---- decoding -------------------------------------------------------------------------------


def test_greedy_equals_a_manual_argmax_loop_without_cache():
    model = tiny_gpt()
    prompt = byte_ids("To be")
    banned = banned_ids(model.config.tgt_vocab_size, BYTES, torch.device("cpu"))
    ids, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(30):
            logits = model(torch.tensor([ids]))[0][0, -1].masked_fill(banned, NEG_INF)
            expected.append(int(logits.argmax()))
            ids.append(expected[-1])
    cfg = SampleConfig(greedy=True, max_new_tokens=30)

    got = [step[0] for step in generate_token_ids(model, [prompt], cfg, BYTES.pad_id, banned)]

    assert got == expected
    eos = expected.index(BYTES.eos_id) if BYTES.eos_id in expected else 30
    assert generate(model, BYTES, "To be", cfg) == [BYTES.decode(expected[:eos])]


def test_a_seed_reproduces_the_samples_and_samples_of_a_batch_differ():
    model = tiny_gpt()
    cfg = SampleConfig(max_new_tokens=30, num_samples=4, seed=7, temperature=3.0)
    first = generate(model, BYTES, "Hi", cfg)
    assert generate(model, BYTES, "Hi", cfg) == first
    assert generate(model, BYTES, "Hi", cfg.model_copy(update={"seed": 8})) != first
    assert len(first) == 4 and len(set(first)) == 4


def test_num_samples_run_as_one_batch():
    model = ScriptedModel(byte_ids("abc"))
    texts = generate(model, BYTES, "x", SampleConfig(num_samples=5, max_new_tokens=10))
    assert texts == ["abc"] * 5
    assert set(model.batch_sizes) == {5}
    assert model.calls == 4  # prefill + 2 steps, then the <EOS> step ends every row


def test_eos_ends_the_sample():
    model = ScriptedModel(byte_ids("abc") + [BYTES.eos_id] + byte_ids("def"))
    assert generate(model, BYTES, "x", SampleConfig(max_new_tokens=50)) == ["abc"]


@pytest.mark.parametrize(
    "stop, expected",
    [
        (["STOP"], "Hello, world! "),  # spans four tokens
        (["orld", "llo"], "He"),  # the earliest match wins
        (["!"], "Hello, world"),
        (["STOPS"], "Hello, world! STOP more"),  # a start that never completes is released
    ],
)
def test_stop_strings_end_the_sample_and_are_not_returned(stop, expected):
    cfg = SampleConfig(max_new_tokens=50, stop=stop)
    model = ScriptedModel(byte_ids("Hello, world! STOP more"))
    assert generate(model, BYTES, "x", cfg) == [expected]
    model = ScriptedModel(byte_ids("Hello, world! STOP more"))
    assert "".join(stream_text(model, BYTES, "x", cfg)) == expected


def test_one_stop_string_as_the_command_line_gives_it_is_a_list():
    assert SampleConfig(stop="\n\n").stop == ["\n\n"]
    with pytest.raises(ValueError, match="empty"):
        SampleConfig(stop=["a", ""])


def test_stop_strings_are_never_streamed_not_even_in_part():
    model = ScriptedModel(byte_ids("one\ntwo\n\nthree"))
    pieces = list(stream_text(model, BYTES, "x", SampleConfig(max_new_tokens=50, stop=["\n\n"])))
    # Each "\n" is held back until the next character shows it does not start "\n\n".
    assert pieces == ["o", "n", "e", "\nt", "w", "o"]


def test_streaming_never_yields_a_partial_character():
    text = "€ uro €€"  # '€' is three bytes, so three byte tokens
    model = ScriptedModel(byte_ids(text))
    pieces = list(stream_text(model, BYTES, "x", SampleConfig(max_new_tokens=50)))
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert pieces == list(text)  # one piece per whole character


def streamed(tokenizer, ids, stop=()) -> tuple[list[str], bool]:
    stream = TextStream(tokenizer, stop=stop)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.finish())
    return [p for p in pieces if p], stream.stopped


def test_real_replacement_characters_do_not_cut_what_follows_nor_wait_for_it():
    text = "\ufffd\ufffd😀 ok \ufffd中文"
    pieces, _ = streamed(BYTES, byte_ids(text))
    assert "".join(pieces) == text
    pieces, stopped = streamed(BYTES, byte_ids(text), stop=["😀"])
    assert ("".join(pieces), stopped) == ("\ufffd\ufffd", True)
    # Only the last 3 characters can be an unfinished one: the others show before more tokens come.
    stream = TextStream(BYTES)
    assert "".join(stream.push(i) for i in byte_ids("\ufffd" * 5)) == "\ufffd" * 2


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("a \ufffd€中😀\n"), max_size=30), st.binary(max_size=12))
def test_streamed_text_is_the_decoded_text(text, junk):
    ids = byte_ids(text) + list(junk)  # junk: bytes that need not be valid UTF-8
    pieces, _ = streamed(BYTES, ids)
    assert "".join(pieces) == BYTES.decode(ids)


def test_stream_batch_labels_each_row():
    model = ScriptedModel(byte_ids("ok"))
    pieces = list(stream_batch(model, BYTES, ["a", "bcd"], SampleConfig(num_samples=2, max_new_tokens=5)))
    rows = {row: "" for row in range(4)}
    for row, piece in pieces:
        rows[row] += piece
    assert rows == {0: "ok", 1: "ok", 2: "ok", 3: "ok"}
    assert model.batch_sizes[0] == 4


def test_a_prompt_longer_than_the_context_keeps_its_tail_with_a_notice():
    model = tiny_gpt(seq_len=16)
    seen_prompts = []
    forward = model.forward
    model.forward = lambda idx, **kw: (seen_prompts.append(idx.clone()), forward(idx, **kw))[1]
    notices = []
    prompt = "The quick brown fox jumps over the lazy dog"  # 43 byte tokens

    texts = generate(model, BYTES, prompt, SampleConfig(max_new_tokens=5, seed=0), notice=notices.append)

    assert notices == ["prompt is 43 tokens; keeping its last 16 (the model's context length)"]
    assert seen_prompts[0].tolist() == [byte_ids(prompt)[-16:]]
    assert len(texts) == 1


def test_a_model_left_in_training_mode_with_dropout_is_warned_about():
    config = ModelConfig(
        embed_dim=32, n_heads=4, num_layers=2, seq_len=16, tgt_vocab_size=BYTES.vocab_size, dropout=0.1
    )
    model = GPT(config)  # a new module is in training mode
    cfg = SampleConfig(greedy=True, max_new_tokens=2)
    with pytest.warns(UserWarning, match=r"training mode, so dropout changes what it generates; call model.eval\(\)"):
        list(generate_token_ids(model, [byte_ids("ab")], cfg, BYTES.pad_id))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(generate_token_ids(model.eval(), [byte_ids("ab")], cfg, BYTES.pad_id))
