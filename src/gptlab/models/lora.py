"""LoRA (Hu et al. 2021, "Low-Rank Adaptation of Large Language Models"): fine-tune a frozen
linear layer W by learning a low-rank update, y = x W^T + (alpha / r) * x A^T B^T, where
A (r, in) and B (out, r) are the only trained weights.

B starts at zero, so an adapted model computes exactly what its base computes until the first
step; A starts as a random Gaussian (the paper's choice), so that B's first gradient is not zero.
After training, merge() folds the update into W: the merged layer is a plain nn.Linear, and
generation or export never see an adapter.

A LoRALinear *is* an nn.Linear holding the base's own weight and bias, so the base keys of a
state dict are unchanged (`blocks.0.attn.qkv.weight`) and the adapters add `...qkv.lora_A` and
`...qkv.lora_B` beside them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.models.blocks import MLP, CausalSelfAttention
from gptlab.models.transformer import Attention

# Which modules' linear layers each --lora_targets value adapts (every nn.Linear child of them):
# attention: the GPT's attn.qkv and attn.proj; the Transformer's query, key_value and proj of
# self- and cross-attention. mlp: fc and proj of every MLP. Embeddings and the output head stay frozen.
TARGETS: dict[str, tuple[type[nn.Module], ...]] = {
    "attention": (CausalSelfAttention, Attention),
    "mlp": (MLP,),
    "both": (CausalSelfAttention, Attention, MLP),
}
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight we do not use
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the base's own parameters: a state dict keeps its keys
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        options = {"device": base.weight.device, "dtype": base.weight.dtype}
        # std 1/sqrt(in): x A^T then has the scale of x, whatever the layer's width.
        self.lora_A = nn.Parameter(torch.randn(rank, self.in_features, **options) * self.in_features**-0.5)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **options))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out): the base's output plus the scaled low-rank update."""
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., r) then (..., out)
        # In place: no backward needs the base's output, and two fewer (..., out) temporaries
        # keep the peak memory of a LoRA step below full fine-tuning's.
        return F.linear(x, self.weight, self.bias).add_(update, alpha=self.scaling)

    def merge(self) -> nn.Linear:
        """A plain nn.Linear computing what this layer computes: W + (alpha / r) B A (summed in
        float32, stored in W's dtype), with the bias."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())  # (out, in)
            merged.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype))
        if self.bias is not None:
            merged.bias = nn.Parameter(self.bias.detach().clone())
        return merged

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: str) -> list[str]:
    """Freeze every parameter of `model` and replace the linear layers `targets` names (see
    TARGETS) by LoRALinears, in place. Returns the adapted layers' names. The new A matrices are
    drawn from torch's global generator (seed it for reproducible runs)."""
    if targets not in TARGETS:
        raise ValueError(f"unknown LoRA targets {targets!r}; use one of {', '.join(TARGETS)}")
    for param in model.parameters():
        param.requires_grad_(False)
    adapted = []
    for parent_name, parent in list(model.named_modules()):
        if not isinstance(parent, TARGETS[targets]):
            continue
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, LoRALinear(child, rank, alpha))
                adapted.append(f"{parent_name}.{name}")
    return adapted


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear of `model` by its merged nn.Linear, in place; returns `model`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merge())
    return model


def is_adapter_key(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def adapter_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter entries (`*.lora_A`, `*.lora_B`) of a state dict."""
    return {name: tensor for name, tensor in state.items() if is_adapter_key(name)}


def merged_state(state: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A plain state dict from one holding base weights and adapters: each adapted `X.weight`
    becomes W + scaling * B A (in float32, then W's dtype) and the adapter entries are dropped.
    Raises KeyError naming an adapter without its partner or its base weight."""
    merged = {name: tensor for name, tensor in state.items() if not is_adapter_key(name)}
    for name in state:
        if not name.endswith(".lora_A"):
            continue
        layer = name.removesuffix(".lora_A")
        A, B, W = state[name], state[f"{layer}.lora_B"], merged[f"{layer}.weight"]
        merged[f"{layer}.weight"] = (W.float() + scaling * (B.float() @ A.float())).to(W.dtype)
    orphans = [n for n in state if n.endswith(".lora_B") and n.removesuffix(".lora_B") + ".lora_A" not in state]
    if orphans:
        raise KeyError(orphans[0])
    return merged
