"""Linear layers with int8 weights for decoding on a CPU (`gptlab generate --dtype int8`).

At batch 1 a decoding step reads every weight once, so on a CPU its speed is set by the bytes
per weight: int8 reads a quarter of float32's. The products run in PyTorch's fbgemm kernels for
dynamic quantization (the x86 engine of torch.ao's `quantize_dynamic`): weights int8 with one
scale per output channel, and each input quantized to 8 bits when it arrives, with integer
products summed in int32. On a 2-core CPU these read a 768 x 50,304 matrix in about 0.75 ms
against 3.5 to 9 ms in float32 (and torch's weight-only `_weight_int8pack_mm` took 10.7 ms in
float32, so it is not used).

fbgemm quantizes a whole input matrix with one scale, so one row's result would depend on the
other rows of its batch, and a prompt read in one pass would not give what decoding it token by
token gives. Int8Linear makes the quantization per row: each row is divided by its largest
magnitude, and two extra inputs with the values +1 and -1 (whose weights are 0) pin every
row's range to exactly [-1, 1]. The product is then scaled back row by row. A row's result is
the same alone or in any batch. Decoding with the KV cache gives a full forward's logits while
every input rounds the same way in both; but each input is rounded to 7 bits, and a step computes
its norms and attention in other shapes than a full forward, so a last-bit difference can move a
value across a rounding boundary and the logits by up to ~0.4 from there on. Over 255-token
windows of a trained 4 x 256 model, a third (the C step) to a half (DecodeStep) of the steps
differed so from the full forward, with the same bits per byte (BENCHMARKS.md, int8 in the C step).

Decoding one row, the C step (native_step.c) computes these products itself, from a plain int8
copy of the weights (a quarter of float32's memory more), rounding each input exactly as fbgemm
does (tests/test_native_step.py): its products equal Int8Linear's to float rounding for the same
input; 2 to 8 times the speed of fbgemm in DecodeStep at batch 1 on our Xeon (BENCHMARKS.md).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from gptlab.errors import GptlabError

# fbgemm's x86 kernels may overflow 16-bit sums with full 8-bit inputs; 7 bits avoid it (torch's default on x86).
REDUCE_RANGE = True


def int8_supported() -> bool:
    """Whether this PyTorch has the fbgemm/x86 kernels Int8Linear runs on."""
    engines = torch.backends.quantized.supported_engines
    return hasattr(torch.ops.quantized, "linear_dynamic") and ("x86" in engines or "fbgemm" in engines)


class Int8Linear(nn.Module):
    """A float32 nn.Linear's product with int8 weights (one scale per output) and inputs
    quantized per row; float32 in and out. For inference only: it has no trainable weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            weight = linear.weight.detach().to(device="cpu", dtype=torch.float32)  # (out, in)
            # Two more inputs, weight 0, carry the +1 / -1 that fix each row's range (module docstring).
            weight = torch.cat([weight, weight.new_zeros(self.out_features, 2)], dim=1)  # (out, in + 2)
            scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()  # (out,)
            zero_points = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # torch marks its quantized tensors deprecated in favour of torchao
                warnings.simplefilter("ignore")
                qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
                self._packed = torch.ops.quantized.linear_prepack(qweight, None)
            # The same weights for the decoding step in C (native_step.c), which cannot read fbgemm's
            # packed form: int8 (out, in), each output's sum of them, and its scale times the input's
            # step (2/127). Plain tensors, not buffers: an Int8Linear is never saved or moved.
            self.qweight = qweight.int_repr()[:, : self.in_features].contiguous()
            self.qweight_sums = self.qweight.sum(dim=1, dtype=torch.int32)
            self.multipliers = torch.tensor(2 / 127, dtype=torch.float32) * qweight.q_per_channel_scales().float()
        bias = None if linear.bias is None else linear.bias.detach().to(device="cpu", dtype=torch.float32).clone()
        self.register_buffer("bias", bias)
        self.register_buffer("markers", torch.tensor([1.0, -1.0]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, in)
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)  # (M, 1)
        pinned = torch.cat([rows / scale, self.markers.expand(rows.size(0), 2)], dim=1)  # (M, in + 2) in [-1, 1]
        y = torch.ops.quantized.linear_dynamic(pinned, self._packed, REDUCE_RANGE)  # (M, out)
        y = y.mul_(scale) if self.bias is None else torch.addcmul(self.bias, y, scale)
        return y.view(x.shape[:-1] + (self.out_features,))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def use_int8_linears(model: nn.Module) -> None:
    """Replace every nn.Linear in `model` (on the CPU) by an Int8Linear of its weights, in place.
    A tied output head gets its own int8 copy; the embedding keeps the float32 table."""
    if not int8_supported():
        raise GptlabError(
            f"--dtype int8 needs PyTorch's fbgemm kernels, which this torch {torch.__version__} lacks; use --dtype fp32"
        )
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
