"""Linear layers laid out for decoding one token at a time on a CPU, in float32.

At batch 1, each decoding step multiplies one vector by every weight matrix of the model, so its
speed is that of a matrix-vector product that reads each weight once. How fast PyTorch's kernel
for it (MKL's sgemv on x86) runs depends on the matrix's shape, on which of the two layouts it is
stored in, and on the machine: on one 2-core CPU it ran no faster with two threads than with one
and was faster in one layout than the other; on another of the same family the plain layout won.
A MatVecLinear therefore offers four ways to compute the product, with PyTorch's own operations:

- "plain": the weight stored (out, in), as nn.Linear stores it, and F.linear;
- "transposed": the weight stored (in, out) in memory (same shape and values), and F.linear;
- "plain_split" / "transposed_split": the same two layouts, with the product cut into one
  independent slice per thread, run as one torch.bmm that works on the slices in parallel: along
  the outputs for (out, in), along the inputs (partial outputs summed) for (in, out).

`gptlab.models.layout_choice` times them on the machine at hand and keeps the fastest for each
shape; `default_layout` is the rule used before any measurement. Any input other than one row,
e.g. a prompt of many tokens, goes through the plain F.linear product.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Layout = Literal["plain", "transposed", "plain_split", "transposed_split"]
LAYOUTS: tuple[Layout, ...] = ("plain", "transposed", "plain_split", "transposed_split")

# Below this many weights (512 KiB in float32) handing slices to threads usually costs more than it saves.
MIN_WEIGHTS_TO_SPLIT = 1 << 17


def layouts_for(n_in: int, n_out: int, splits: int) -> list[Layout]:
    """The layouts a (n_in -> n_out) matrix can take with `splits` slices: a split needs at least
    two slices and a dimension they divide (the outputs for plain, the inputs for transposed)."""
    layouts: list[Layout] = ["plain", "transposed"]
    if splits > 1 and n_out % splits == 0:
        layouts.append("plain_split")
    if splits > 1 and n_in % splits == 0:
        layouts.append("transposed_split")
    return layouts


def default_layout(n_in: int, n_out: int, splits: int) -> Layout:
    """The layout before any measurement: (in, out) for a wide matrix, (out, in) for a tall one,
    split across threads when it is large enough (what was fastest on this project's first CPU)."""
    wide = n_out >= n_in
    layout: Layout = "transposed" if wide else "plain"
    split: Layout = "transposed_split" if wide else "plain_split"
    if n_in * n_out >= MIN_WEIGHTS_TO_SPLIT and split in layouts_for(n_in, n_out, splits):
        return split
    return layout


class MatVecLinear(nn.Linear):
    """nn.Linear that computes a single input row in one of LAYOUTS (see the module docstring).

    The results equal F.linear's up to float rounding, in every layout; the parameters stay the
    same tensors (a tied weight stays tied), only the weight's memory order may change.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.layout: Layout = "plain"
        self.splits = 1  # slices of a split layout
        self._blocks: torch.Tensor | None = None  # the weight viewed as the split's slices

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: Layout | None = None) -> MatVecLinear:
        """A MatVecLinear holding `linear`'s own parameters, in `layout` (default: default_layout)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        splits = torch.get_num_threads()
        new.set_layout(layout or default_layout(new.in_features, new.out_features, splits), splits)
        return new

    @torch.no_grad()
    def set_layout(self, layout: Layout, splits: int | None = None) -> None:
        """Store the weight in `layout`'s memory order and compute one row that way, with `splits`
        slices (default: torch's thread count) for a split layout."""
        splits = splits or torch.get_num_threads()
        if layout not in layouts_for(self.in_features, self.out_features, splits):
            raise ValueError(f"layout {layout!r} does not fit a {self.in_features} x {self.out_features} matrix")
        w = self.weight.data
        if layout.startswith("transposed"):
            if not w.t().is_contiguous():
                self.weight.data = w.t().contiguous().t()  # (in, out) in memory
        elif not w.is_contiguous():
            self.weight.data = w.contiguous()
        self.layout, self.splits, self._blocks = layout, splits if layout.endswith("split") else 1, None

    def _split_blocks(self) -> torch.Tensor:
        """The weight as `splits` slices for torch.bmm, (splits, in, out/splits) or (splits, in/splits, out).

        Without autograd the view is kept between calls (made again if the weight was replaced,
        e.g. moved or cast); with it, made each call so that gradients reach the weight.
        """
        w, blocks = self.weight, self._blocks
        keep = not (torch.is_grad_enabled() and w.requires_grad)
        if keep and blocks is not None and blocks.data_ptr() == w.data_ptr() and blocks.dtype == w.dtype:
            return blocks
        n_in, n_out, s = self.in_features, self.out_features, self.splits
        if self.layout == "plain_split":
            blocks = w.contiguous().view(s, n_out // s, n_in).transpose(1, 2)
        else:
            blocks = w.t().contiguous().view(s, n_in // s, n_out)
        self._blocks = blocks if keep else None
        return blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # models/decode_step.py calls this for a split layout only (an unsplit product is one addmm there).
        if self.splits == 1 or x.numel() != self.in_features:
            return F.linear(x, self.weight, self.bias)
        blocks, bias, s = self._split_blocks(), self.bias, self.splits
        n_in, n_out = self.in_features, self.out_features
        if self.layout == "plain_split":  # each slice computes a block of the outputs
            rows = x.reshape(1, 1, n_in).expand(s, 1, n_in)
            if bias is None:
                y = torch.bmm(rows, blocks)  # (s, 1, out/s)
            else:
                y = torch.baddbmm(bias.view(s, 1, n_out // s), rows, blocks)
        else:  # each slice multiplies a slice of x; the partial outputs are summed
            y = torch.bmm(x.reshape(s, 1, n_in // s), blocks).sum(0)  # (1, out)
            if bias is not None:
                y += bias
        return y.view(x.shape[:-1] + (n_out,))


def use_matvec_linears(model: nn.Module) -> None:
    """Replace every nn.Linear in `model` by a MatVecLinear on the same parameters, in place."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, MatVecLinear.from_linear(child))
