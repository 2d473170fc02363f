"""Export and import never touch files that are not theirs: `export --force` replaces an earlier
export only, and a safetensors index cannot name shards outside its folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.interop import export_hf, export_safetensors
from gptlab.interop.hf_import import read_hf_weights
from gptlab.models import GPT
from gptlab.tokenizers import BPETokenizer

pytest.importorskip("safetensors")
TEXT = (Path(__file__).resolve().parents[1] / "toy_data" / "tiny_sp_train.txt").read_text(encoding="utf-8")[:5_000]


@pytest.fixture(scope="module")
def model_and_tokenizer() -> tuple[GPT, BPETokenizer]:
    tokenizer = BPETokenizer.train([TEXT], 280, progress=False)
    torch.manual_seed(0)
    config = ModelConfig(
        embed_dim=32,
        n_heads=2,
        num_layers=1,
        seq_len=16,
        tgt_vocab_size=tokenizer.vocab_size,
        dropout=0.0,
        pos_encoding="learned",
        norm="layernorm",
        activation="gelu",
    )
    return GPT(config).eval(), tokenizer


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_force_refuses_a_folder_of_user_files_by_name(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "sub" / "data.csv").write_text("1,2")
    before = tree(out)
    args = ["export", "--model_path", str(tmp_path / "any.pth"), "--out", str(out), "--force"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds notes.txt, sub/, which no gptlab export wrote" in err
    assert tree(out) == before


@pytest.mark.parametrize("first", ["hf", "safetensors"])
@pytest.mark.parametrize("second", ["hf", "safetensors"])
def test_force_replaces_an_earlier_export_but_not_one_with_user_files(
    model_and_tokenizer, tmp_path, first, second
) -> None:
    model, tokenizer = model_and_tokenizer
    export = {"hf": export_hf, "safetensors": export_safetensors}
    out = tmp_path / "out"
    export[first](model, tokenizer, out)
    (out / "README.md").write_text("about my model")
    before = tree(out)
    with pytest.raises(GptlabError, match="holds README.md, which no gptlab export wrote"):
        export[second](model, tokenizer, out, force=True)
    assert tree(out) == before
    (out / "README.md").unlink()
    export[second](model, tokenizer, out, force=True)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer").is_dir() == (second == "safetensors")


def test_force_refuses_a_folder_beside_an_export_config_it_does_not_list(model_and_tokenizer, tmp_path) -> None:
    model, tokenizer = model_and_tokenizer
    out = tmp_path / "out"
    export_safetensors(model, tokenizer, out)
    (out / "tokenizer" / "extra.txt").write_text("mine")
    with pytest.raises(GptlabError, match="holds tokenizer/extra.txt, which no gptlab export wrote"):
        export_safetensors(model, tokenizer, out, force=True)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/x.safetensors", ".."])
def test_an_index_naming_shards_outside_its_folder_is_refused(tmp_path: Path, shard: str) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({"w": torch.zeros(2)}, tmp_path / "outside.safetensors")
    model = tmp_path / "model"
    model.mkdir()
    index = {"metadata": {}, "weight_map": {"w": shard.replace("/tmp/", f"{tmp_path}/")}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(GptlabError, match="names shard .* which is not a file in"):
        read_hf_weights(model)
