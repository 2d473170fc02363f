"""Fixtures shared by several test files."""

import signal

import pytest
import torch

from gptlab.models import native_step


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_reaches_the_tests():
    """A shell starts background jobs with SIGINT ignored, and gptlab (like nohup) leaves an
    ignored SIGINT ignored; the Ctrl-C tests need it delivered, here and in the processes they
    start, however the suite was launched."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(autouse=True)
def cpu_bf16_measured_slow(monkeypatch):
    """`--dtype auto` on a CPU picks bf16 where its matmuls are measured faster (gptlab.device):
    in-process tests compute in float32 on every machine unless they ask for bf16, so their
    tolerances never depend on which CPU runs them. The pin holds in this process only: a process
    a test starts measures for itself (bf16 on a Zen 4 EPYC, 5.7e-5 from fp32 at the first step), so
    tests that compare runs across processes name their dtype."""
    from gptlab import device
    from gptlab.training import precision

    for module in (device, precision):
        monkeypatch.setattr(module, "cpu_bf16_speedup", lambda: 0.5)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run many small steps: on shared cores, intra-op thread hand-offs cost more
    than the arithmetic (measured: 0.6 ms per decode step on 1 thread, 15-35 ms on 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def knows_test_tokenizer(monkeypatch):
    """Let checkpoints rebuild the stand-in tokenizer kind of tests/helpers.py."""
    from gptlab.training import checkpoint as checkpoint_module

    from helpers import ByteTokenizer

    real = checkpoint_module.tokenizer_from_files

    def from_files(kind, files):
        return ByteTokenizer.from_files(files) if kind == ByteTokenizer.kind else real(kind, files)

    monkeypatch.setattr(checkpoint_module, "tokenizer_from_files", from_files)


@pytest.fixture
def eager_decoding(monkeypatch):
    """Decode as on a machine without a C compiler: DecodeStep, and the layouts measured for
    PyTorch's products (ready_for_generation keeps nn.Linear's where the native step decodes)."""
    monkeypatch.setattr(native_step, "native_library", lambda: None)
