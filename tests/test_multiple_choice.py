"""Multiple-choice evaluation: reading HellaSwag's and the generic JSONL format, scoring choices by
log-likelihood as lm-evaluation-harness does (batched == unbatched == a direct computation ==
transformers on a GPT-2), `gptlab eval --task multiple_choice`, and one line for each bad file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gptlab.config import ModelConfig
from gptlab.data.choice_files import ChoiceItem, hellaswag_clean, read_choice_file
from gptlab.errors import GptlabError
from gptlab.models import GPT
from gptlab.training.multiple_choice import ChoiceTask, choice_metrics, encode_pair

from helpers import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "toy_data" / "tiny_sp"
TEXT = (ROOT / "toy_data" / "tiny_sp_train.txt").read_text(encoding="utf-8")[:20_000]

HELLASWAG = {  # the first line of hellaswag_val.jsonl, as published
    "ind": 24, "activity_label": "Roof shingle removal",
    "ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "ctx": "A man is sitting on a roof. he",
    "split": "val", "split_type": "indomain", "label": 3,
    "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
    "source_id": "activitynet~v_-JhWjGDPHMY",
}  # fmt: skip
WIKIHOW = {  # a WikiHow-style line: bracketed markers, a string label (as in the Hugging Face copy)
    "activity_label": "Home and Garden", "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny SPOT.",
    "ctx_b": "tomatoes NEED light", "label": "1",
    "endings": ["[step] Water them daily. [title] Use mulch.", "Plant them  in shade.", "Sing to them.", "Wait."],
}  # fmt: skip
GENERIC = {
    "context": "KING HENRY: Once more unto the",
    "choices": ["breach", "sea", "castle walls, my friends"],
    "answer": 0,
}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


# ---- reading the two formats --------------------------------------------------------------------
def test_hellaswag_lines_are_prepared_as_lm_eval_prepares_them(tmp_path):
    items = read_choice_file(write_jsonl(tmp_path / "hs.jsonl", [HELLASWAG, WIKIHOW]))
    assert items[0] == ChoiceItem(
        context="Roof shingle removal: A man is sitting on a roof. He",  # ctx_b capitalized
        choices=tuple(HELLASWAG["endings"]),
        answer=3,
        line=1,
    )
    # capitalize() lowers the rest; " [title]" becomes ". ", other [..] go, double spaces shrink.
    assert items[1].context == "Home and Garden: How to grow tomatoes. Pick a sunny SPOT. Tomatoes need light"
    assert items[1].choices == (" Water them daily.. Use mulch.", "Plant them in shade.", "Sing to them.", "Wait.")
    assert items[1].answer == 1 and items[1].line == 2
    assert hellaswag_clean("  a [title] b [x y] c  ") == "a. b c"


def test_hellaswag_without_ctx_a_uses_ctx_and_generic_lines_are_kept_as_written(tmp_path):
    plain = {"ctx": "A dog runs.", "endings": ["It barks.", "It flies."], "label": 0}
    items = read_choice_file(write_jsonl(tmp_path / "mixed.jsonl", [plain, "", GENERIC]))
    assert items[0] == ChoiceItem("A dog runs.", ("It barks.", "It flies."), 0, 1)
    assert items[1] == ChoiceItem(GENERIC["context"], tuple(GENERIC["choices"]), 0, 3)  # blank line 2 skipped


BAD_LINES = [
    ('{"context": "a", "choices": ["x", "y"]}', "missing field 'answer'"),
    ('{"choices": ["x", "y"], "answer": 0}', "missing field 'context'"),
    ('{"ctx": "a", "endings": ["x", "y"]}', "missing field 'label'"),
    ('{"endings": ["x", "y"], "label": 0}', "missing field 'ctx'"),
    ('{"ctx": "a", "endings": ["x", "y", "z", "w"], "label": 4}', "label 4 is out of range for 4 choices (0..3)"),
    ('{"context": "a", "choices": ["x", "y"], "answer": -1}', "answer -1 is out of range"),
    ('{"context": "a", "choices": ["x", "y"], "answer": "0"}', "'answer' must be an integer"),
    ('{"context": "a", "choices": ["x", ""], "answer": 0}', "choice 1 of 'choices' is empty"),
    ('{"ctx": "a", "endings": ["x", "[step]"], "label": 0}', "ending 1 is empty once cleaned"),
    ('{"context": "a", "choices": ["x"], "answer": 0}', "at least 2"),
    ('{"context": "a", "choices": "xy", "answer": 0}', "must be a list of strings"),
    ('{"ctx": "a", "endings": ["x", "y"], "label": ""}', "no label"),
    ('{"context": "a", "choices": ["x", "y"], ', "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_a_bad_line_is_named_by_file_and_line_number(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GENERIC, "", line, GENERIC])
    with pytest.raises(GptlabError, match=f"^{path}:3: .*") as error:
        read_choice_file(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bytes_that_are_not_utf8_an_empty_file_and_a_missing_one(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GENERIC).encode() + b'\n{"context": "caf\xe9"}\n')
    with pytest.raises(GptlabError, match=r"latin1.jsonl:2: not UTF-8"):
        read_choice_file(tmp_path / "latin1.jsonl")
    with pytest.raises(GptlabError, match="holds no items"):
        read_choice_file(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(GptlabError, match="not found"):
        read_choice_file(tmp_path / "nowhere.jsonl")


# ---- tokens as lm-eval forms them ---------------------------------------------------------------
def test_trailing_space_moves_to_the_continuation_and_an_empty_context_is_the_separator():
    tok = ByteTokenizer()
    ids = lambda text: tok.encode(text)  # noqa: E731 - one id per byte, 4 + byte
    assert encode_pair(tok, "ab ", " c", prefix_id=3) == (ids("ab"), ids("  c"))
    assert encode_pair(tok, "", " c", prefix_id=3) == ([3], ids(" c"))
    assert encode_pair(tok, "  ", " c", prefix_id=3) == ([3], ids("   c"))


def test_a_long_context_is_truncated_on_the_left():
    tok = ByteTokenizer()
    task = ChoiceTask([ChoiceItem("abcdef", ("g", "hi"), 0, 1)], tok, seq_len=4)
    assert [r.ids for r in task.requests] == [tok.encode("def g"), tok.encode("ef hi")]  # seq_len + 1 ids
    assert [r.continuation for r in task.requests] == [2, 3]
    with pytest.raises(GptlabError, match=r"src.jsonl:7: choice 1 is 6 tokens, longer than the model's context"):
        ChoiceTask([ChoiceItem("a", ("b", "world"), 0, 7)], tok, seq_len=4, source="src.jsonl")


# ---- scores ---------------------------------------------------------------------------------------
def random_model(vocab_size: int, seq_len: int = 32, **fields) -> GPT:
    torch.manual_seed(0)
    config = dict(embed_dim=32, n_heads=2, num_layers=2, seq_len=seq_len, tgt_vocab_size=vocab_size, dropout=0.0)
    model = GPT(ModelConfig(**(config | fields))).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


def varied_items(n: int = 9) -> list[ChoiceItem]:
    """Contexts from empty to longer than the context window, choices of 1 to ~20 characters."""
    words = TEXT.split()
    items = []
    for i in range(n):
        context = " ".join(words[i * 7 : i * 8])  # 0 to 8 words
        choices = tuple(" ".join(words[200 + i * 5 + j : 200 + i * 5 + j + 1 + (i + j) % 3]) for j in range(2 + i % 3))
        items.append(ChoiceItem(context, choices, i % len(choices), i + 1))
    return items


def direct_loglikelihood(model: GPT, ids: list[int], continuation: int) -> float:
    """One row alone, no padding: the log-probabilities of its last `continuation` ids."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    logp = logits[0].double().log_softmax(-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - continuation, len(ids)))


def test_batched_scores_equal_unbatched_and_a_direct_computation(one_thread):
    tok = ByteTokenizer()
    model = random_model(tok.vocab_size)
    task = ChoiceTask(varied_items(), tok, model.config.seq_len)
    assert any(len(r.ids) == model.config.seq_len + 1 for r in task.requests)  # some were truncated
    assert len({len(r.ids) for r in task.requests}) > 5  # rows of many lengths share a batch
    one = task.loglikelihoods(model, batch_size=1)
    expected = [[] for _ in task.items]
    for request in task.requests:
        expected[request.item].append(direct_loglikelihood(model, request.ids, request.continuation))
    for batch_size in (1, 4, 64):
        got = task.loglikelihoods(model, batch_size=batch_size)
        assert [len(lls) for lls in got] == [len(item.choices) for item in task.items]
        for mine, theirs in zip(got, expected):
            assert mine == pytest.approx(theirs, abs=1e-5)
        for mine, single in zip(got, one):
            assert mine == pytest.approx(single, abs=1e-5)
    assert not model.training


def test_acc_ranks_by_loglikelihood_and_acc_norm_by_loglikelihood_per_character():
    items = [
        ChoiceItem("", ("a", "bbbbbbbb"), 1, 1),  # acc picks "a" (-10 > -12); per character -10 < -1.5
        ChoiceItem("", ("cc", "d"), 0, 2),  # both pick "cc"
        ChoiceItem("", ("e", "f"), 1, 3),  # a tie goes to the first, as numpy.argmax
    ]
    result = choice_metrics(items, [[-10.0, -12.0], [-1.0, -3.0], [-2.0, -2.0]])
    assert result.predictions == [0, 0, 0] and result.predictions_norm == [1, 0, 0]
    assert result.acc == pytest.approx(1 / 3) and result.acc_norm == pytest.approx(2 / 3)
    assert result.acc_stderr == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))


def test_excluded_ids_leave_the_softmax():
    tok = ByteTokenizer()
    model = random_model(tok.vocab_size)
    task = ChoiceTask([ChoiceItem("to be or", ("not", "to"), 0, 1)], tok, model.config.seq_len)
    full = task.loglikelihoods(model, batch_size=2)[0]
    without = task.loglikelihoods(model, batch_size=2, exclude_ids=[0, 1, 2, 3])[0]
    assert all(b > a for a, b in zip(full, without))  # less competition, higher probabilities
