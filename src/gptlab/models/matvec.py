"""Linear layers laid out for decoding one token at a time on a CPU, in float32.

At batch 1, each decoding step multiplies one vector by every weight matrix of the model, so its
speed is that of a matrix-vector product that reads each weight once. On this project's CPU,
PyTorch's kernel for it (MKL's sgemv) ran no faster with two threads than with one, read memory
at well under what one core can (about 15 GB/s where a plain sum reads 35), and was faster in one
layout than the other depending on the matrix's shape. A MatVecLinear fixes both, with PyTorch's
own operations:

- its weight is stored in the faster layout for its shape (the tensor keeps its shape and values);
- with several threads, it cuts the product into one independent slice per thread and runs the
  slices as one torch.bmm, which works on the batch of slices in parallel.

On this project's 2-core CPU, the six-layer, 384-wide model's matrix products take about 2.1 ms a
token this way, against 3.6 ms with every weight stored (in, out) and 5.3 ms as plain nn.Linear
(benchmarks/generate_bench.py, BENCHMARKS.md). Any other input, e.g. a prompt of many tokens,
goes through the plain nn.Linear product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Below this many weights (512 KiB in float32) handing slices to threads costs more than it saves.
MIN_WEIGHTS_TO_SPLIT = 1 << 17


class MatVecLinear(nn.Linear):
    """nn.Linear with a faster product for a single input row (see the module docstring).

    A wide matrix (out_features >= in_features) is stored (in, out) in memory and split along its
    inputs: each thread multiplies a slice of x by a block of rows, and the partial outputs are
    summed. A tall one keeps the usual (out, in) and is split along its outputs: each thread
    computes a contiguous block of y. The results equal F.linear's up to float rounding.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.wide = out_features >= in_features
        self.large = in_features * out_features >= MIN_WEIGHTS_TO_SPLIT

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> MatVecLinear:
        """A MatVecLinear holding `linear`'s own parameters (a tied weight stays tied), relaid."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        if new.wide:
            with torch.no_grad():
                new.weight.data = new.weight.data.t().contiguous().t()  # (in, out) in memory
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decoding step runs this some 25 times a token: few lookups before the common case.
        splits = torch.get_num_threads()
        w, bias = self.weight, self.bias
        if splits == 1 or not self.large or x.numel() != self.in_features:
            return F.linear(x, w, bias)
        n_in, n_out = self.in_features, self.out_features
        if self.wide and n_in % splits == 0 and w.t().is_contiguous():
            blocks = w.t().view(splits, n_in // splits, n_out)  # (splits, in/splits, out)
            y = torch.bmm(x.reshape(splits, 1, n_in // splits), blocks).sum(0)  # (1, out)
        elif not self.wide and n_out % splits == 0 and w.is_contiguous():
            blocks = w.view(splits, n_out // splits, n_in).transpose(1, 2)  # (splits, in, out/splits)
            y = torch.bmm(x.reshape(1, 1, n_in).expand(splits, 1, n_in), blocks).view(1, n_out)
        else:
            return F.linear(x, w, bias)
        if bias is not None:
            y += bias
        return y.view(x.shape[:-1] + (n_out,))


def use_matvec_linears(model: nn.Module) -> None:
    """Replace every nn.Linear in `model` by a MatVecLinear on the same parameters, in place."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, MatVecLinear.from_linear(child))
