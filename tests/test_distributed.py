"""Data-parallel training under torchrun on CPU (two gloo processes): DDP and FSDP2 give the loss
curve of one process with the same global batch, and their checkpoints load in one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptlab.cli import main
from gptlab.config import SampleConfig
from gptlab.errors import GptlabError
from gptlab.generation import generate
from gptlab.training import load_model
from gptlab.training.batching import RankMicroBatches, check_divides
from gptlab.training.run_files import read_step_log

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "toy_data" / "tiny_sp"
TRAIN_TEXT = ROOT / "toy_data" / "tiny_sp_train.txt"


# fp32, named: these runs are replayed in processes of their own (see conftest.cpu_bf16_measured_slow).
def train_args(tmp: Path, name: str, *extra: str) -> list[str]:
    return [
        "train", "--tokenizer", str(TOKENIZER), "--train_data", str(tmp / "train.txt"),
        "--embed_dim", "32", "--num_layers", "2", "--n_heads", "2", "--seq_len", "16", "--batch_size", "4",
        "--grad_accum_steps", "2", "--dropout", "0", "--max_steps", "5", "--eval_interval", "1000",
        "--device", "cpu", "--experiment_name", name, "--checkpoint_dir", str(tmp / "ckpt"),
        "--log_dir", str(tmp / "runs"), "--no_progress", "--dtype", "fp32", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> tuple[Path, list[float]]:
    tmp = tmp_path_factory.mktemp("dist")
    (tmp / "train.txt").write_text(TRAIN_TEXT.read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    assert main(train_args(tmp, "single")) == 0
    return tmp, [entry["loss"] for entry in read_step_log(tmp / "runs" / "single" / "metrics.jsonl")]


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="needs torchrun",
)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(single_run, mode: str) -> None:
    tmp, single = single_run
    torchrun = str(Path(sys.executable).parent / "torchrun")
    flags = ["--fsdp"] if mode == "fsdp" else []
    command = [torchrun, "--nproc_per_node=2", "--standalone", "-m", "gptlab", *train_args(tmp, mode, *flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 alone logs: one "saved checkpoint" line per save, not two.
    assert done.stdout.count(f"saved checkpoint {tmp / 'ckpt' / mode}_e1.pth") == 1
    assert done.stdout.count("max_steps: 5 steps") == 1  # the summary at the end too

    losses = [entry["loss"] for entry in read_step_log(tmp / "runs" / mode / "metrics.jsonl")]
    assert len(losses) == len(single) == 5
    for a, b in zip(single, losses):
        assert b == pytest.approx(a, abs=1e-5)

    # The checkpoint is a plain one: a single process loads it and generates.
    model, tokenizer, checkpoint = load_model(tmp / "ckpt" / f"{mode}_e1.pth")
    reference, _, _ = load_model(tmp / "ckpt" / "single_e1.pth")
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=1e-4, msg=name)
    text = generate(model, tokenizer, "The", SampleConfig(max_new_tokens=3, greedy=True))
    assert len(text) == 1 and isinstance(text[0], str)
    assert set(checkpoint.optimizer_state["optimizers"]["adamw"]["state"]) == set(range(len(list(model.parameters()))))


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "gptlab",
        *args,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.skipif(not (Path(sys.executable).parent / "torchrun").exists(), reason="needs torchrun")
def test_an_fsdp_run_resumed_from_its_gathered_checkpoint_continues_the_same_curve(single_run) -> None:
    tmp, _ = single_run
    # A constant learning rate, so that stopping early (--max_steps 3) leaves the schedule unchanged;
    # dropout, so that each rank must get its own random generator back.
    flags = ["--fsdp", "--warmup_steps", "0", "--min_lr_ratio", "1", "--save_every_steps", "3", "--dropout", "0.1"]
    torchrun(*train_args(tmp, "fsdp_whole", *flags, "--max_steps", "6"))
    torchrun(*train_args(tmp, "fsdp_parts", *flags, "--max_steps", "3"))
    torchrun(*train_args(tmp, "fsdp_parts", *flags, "--max_steps", "6", "--resume", "auto"))

    whole = read_step_log(tmp / "runs" / "fsdp_whole" / "metrics.jsonl")
    parts = read_step_log(tmp / "runs" / "fsdp_parts" / "metrics.jsonl")
    assert [e["step"] for e in parts] == [e["step"] for e in whole] == list(range(1, 7))
    for a, b in zip(whole, parts):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), b["step"]
    saved = torch.load(tmp / "ckpt" / "fsdp_parts_s3.pth", weights_only=True)
    ranks = saved["extra"]["rank_rng"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # seeded apart


def test_fsdp_without_torchrun_is_a_clear_error(single_run, capsys) -> None:
    tmp, _ = single_run
    assert main(train_args(tmp, "nofsdp", "--fsdp")) != 0
    assert "--fsdp shards a model across processes started by torchrun" in capsys.readouterr().err


def test_batch_not_divisible_by_world_size_is_a_clear_error() -> None:
    with pytest.raises(GptlabError, match="batch_size 6 is not divisible by the 4 processes"):
        check_divides(6, 4)
    check_divides(8, 4)


def test_ranks_take_interleaved_rows_of_each_micro_batch() -> None:
    class Rows:
        def __len__(self):
            return 100

        def batch(self, indices):
            return list(indices)

    step = list(range(10, 20))  # a step batch of 10 windows: micro-batches of 4, 4 and 2
    views = [RankMicroBatches(Rows(), 4, rank, 3, count_targets=len) for rank in range(3)]
    shares = [[(mb.batch, mb.targets) for mb in view.batch(step)] for view in views]
    assert shares[0] == [([10, 13], 2), ([14, 17], 2), ([18], 1)]
    assert shares[1] == [([11], 1), ([15], 1), ([19], 1)]
    assert shares[2] == [([12], 1), ([16], 1), ([18], 0)]  # nothing left: a stand-in row that weighs 0
