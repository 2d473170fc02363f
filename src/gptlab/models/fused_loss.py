"""The output head and the cross-entropy loss in one step, a slice of rows at a time.

A language model's logits are the largest tensor of a training step: (tokens, vocabulary). For
16 x 256 tokens and GPT-2's 50,257-token vocabulary that is 823 MB in float32, and the plain path
(head, log-softmax, loss, and their backward) writes and reads several tensors of that size.
linear_cross_entropy never holds more than `chunk_rows` rows of logits: for each slice of rows it
computes the logits, their share of the loss, and at once their gradient (softmax - one-hot),
which it turns into the gradients of the hidden states and of the head's weight before moving on.
Backward then only scales those gradients. The result equals
F.cross_entropy(F.linear(hidden, weight), targets) up to float rounding (with a soft cap, of the
capped logits, cap_logits).

Measured on this project's 2-core CPU (benchmarks/train_bench.py, BENCHMARKS.md): for 16,384
tokens and a 50,304-token vocabulary, the head and loss peak at 1.3 GB above their inputs instead
of 9.4 GB; for 4,096 tokens and 8,192 ids, forward and backward take 521 ms instead of 584 ms
(of which the matrix products are 456 ms).
"""

from __future__ import annotations

import torch

# The label of positions the loss skips (F.cross_entropy's default ignore_index); gptlab's one definition.
IGNORE_INDEX = -100

# Enough rows for each slice's matrix products to run at full speed (fewer slow them down).
ROWS_PER_SLICE = 2048


def cap_logits(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Logits squashed smoothly into (-cap, cap): cap * tanh(logits / cap), about the identity
    well inside the cap (Gemma 2, modded-nanogpt). A model cannot then push a few logits far
    past the rest; None leaves the logits as they are."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the logits cap_logits(hidden @ weight.T, softcap) against targets,
    never materialised.

    hidden (N, C), weight (V, C), targets (N,) with IGNORE_INDEX for positions without a target.
    Under autocast the products run in its dtype, and the cap, the softmax and the loss in float32.
    """
    rows = chunk_rows or ROWS_PER_SLICE
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, rows, softcap)
    loss, _, _ = _loss_and_gradients(hidden, weight, targets, rows, softcap, with_gradients=False)
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Computes the gradients during the forward pass, slice by slice; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, softcap):
        loss, grad_hidden, grad_weight = _loss_and_gradients(
            hidden, weight, targets, rows, softcap, with_gradients=True
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = grad_weight * grad_loss if grad_weight.numel() else None  # a frozen head has none
        return grad_hidden * grad_loss, grad_weight, None, None, None


def _loss_and_gradients(hidden, weight, targets, rows, softcap, with_gradients):
    """The mean loss and, if asked, its gradients with respect to hidden and weight."""
    counted = targets != IGNORE_INDEX  # (N,)
    count = counted.sum().clamp(min=1)  # a batch with nothing to count gives 0 loss, not NaN
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if with_gradients else None
    # A frozen head (LoRA) needs no weight gradient: an empty one skips its (V, C) product and memory.
    weight_shape = weight.shape if weight.requires_grad else (0,)
    grad_weight = torch.zeros(weight_shape, dtype=torch.float32, device=weight.device) if with_gradients else None
    for start in range(0, hidden.size(0), rows):
        h, y, keep = hidden[start : start + rows], targets[start : start + rows], counted[start : start + rows]
        y = y.clamp(min=0)  # an ignored position reads any real column; `keep` zeroes its share
        logits = (h @ weight.t()).float()  # (rows, V): the only logits in memory
        if softcap is not None:
            squashed = torch.tanh(logits / softcap)  # kept: the cap's derivative is 1 - squashed²
            logits = softcap * squashed
        log_probs = torch.log_softmax(logits, dim=-1)
        total -= (log_probs.gather(1, y[:, None]).squeeze(1) * keep).sum()
        if not with_gradients:
            continue
        # d loss / d logits = (softmax - one_hot) / count on counted rows, 0 on ignored ones. The
        # products run before the division by count: their inputs stay within [-1, 1], which fp16
        # holds, where unscaled gradients (no GradScaler acts here) could underflow. Ignored rows
        # are zeroed in the narrow (rows, C) operands, 20x cheaper than in the (rows, V) logits.
        grad_logits = log_probs.exp_()
        grad_logits[torch.arange(len(y), device=y.device), y] -= 1
        if softcap is not None:
            grad_logits.mul_(1 - squashed.square_())  # through the cap: d(c tanh(z / c)) / dz
        grad_logits = grad_logits.to(weight.dtype)  # under autocast the products cast it anyway
        row_scale = (keep / count)[:, None]  # (rows, 1)
        grad_hidden[start : start + rows] = (grad_logits @ weight).float().mul_(row_scale).to(hidden.dtype)
        if grad_weight.numel():
            grad_weight += (grad_logits.t() @ (h * keep[:, None])).float()
    grad_weight = grad_weight.div_(count).to(weight.dtype) if with_gradients else None
    return total / count, grad_hidden, grad_weight
