"""The KV cache: keys and values of the positions already seen, so that generation runs the
model over each new token once instead of over the whole text at every step.

The generation engine allocates it and passes it to `GPT.forward(idx, kv_cache=cache)`; the
model stays a plain nn.Module. Rows of a batch may be left padded (prompts of different
lengths): `pad[b]` slots of row b hold <PAD>, are never attended to, and row b's positions
start at 0 on its first real token.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values of every layer, written in place, one slot per token.

    All rows share the slot count `length`; a forward pass over T new tokens fills slots
    length .. length+T-1 in every layer, then `advance(T)` moves on.
    """

    def __init__(
        self,
        batch: int,
        layers: int,
        heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        pad: torch.Tensor | None = None,
    ):
        shape = (layers, batch, heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, nh, max_len, hs)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # Each layer's slice, made once: a decoding step writes to them some 2 * layers times a token.
        self._layer_keys, self._layer_values = self.keys.unbind(0), self.values.unbind(0)  # (B, nh, max_len, hs) each
        self.max_len = max_len
        self.length = 0
        self.pad: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # the attention mask of the chunk being run
        self.last_embedding: torch.Tensor | None = None  # (B, 1, C): the last slot's token, for GPT.smear
        self.reset(pad)

    def reset(self, pad: torch.Tensor | None = None) -> None:
        """Empty the cache (the tensors are reused); `pad` (B,) counts each row's leading <PAD> slots."""
        self.length = 0
        self.last_embedding = None
        if pad is not None and not bool(pad.any()):
            pad = None  # no row is padded: take the cheaper unmasked paths
        self.pad = None if pad is None else pad.to(device=self.keys.device, dtype=torch.long)

    def start(self, T: int) -> torch.Tensor | None:
        """Prepare a forward pass over T new slots; returns their positions (B, T), or None
        when every row starts at slot 0 (positions are then length .. length+T-1)."""
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} slots; {self.length} used, {T} more asked")
        self.mask = self._attention_mask(T)
        if self.pad is None:
            return None
        slots = torch.arange(self.length, self.length + T, device=self.keys.device)  # (T,)
        # A padding slot gets position 0: its output is never read, but must stay finite.
        return (slots[None, :] - self.pad[:, None]).clamp(min=0)  # (B, T)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) of the new slots; return keys, values of all slots so far."""
        keys, values, T = self._layer_keys[layer], self._layer_values[layer], k.size(2)
        keys.narrow(2, self.length, T).copy_(k)
        values.narrow(2, self.length, T).copy_(v)
        end = self.length + T
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)  # (B, nh, end, hs)

    def advance(self, T: int) -> None:
        """The T slots of the last forward pass are now part of the past."""
        self.length += T
        self.mask = None

    def _attention_mask(self, T: int) -> torch.Tensor | None:
        """Which keys each of T new queries may see: (B or 1, 1, T, length+T) bool, True = attend.

        None means "no mask" for one query (it sees every slot so far) and "causal" for a chunk
        that starts at slot 0, where SDPA's top-left aligned is_causal is right. A chunk after
        earlier slots needs the explicit mask, aligned bottom-right.
        """
        if self.pad is None and (T == 1 or self.length == 0):
            return None
        device = self.keys.device
        query_slot = torch.arange(self.length, self.length + T, device=device)[:, None]  # (T, 1)
        key_slot = torch.arange(self.length + T, device=device)[None, :]  # (1, S)
        mask = key_slot <= query_slot  # (T, S) causal
        if self.pad is None:
            return mask[None, None]
        real_key = key_slot >= self.pad[:, None, None]  # (B, 1, S)
        # A padding query sees itself, so that its softmax never runs over an empty set (NaN).
        mask = (mask & real_key) | (key_slot == query_slot)  # (B, T, S)
        return mask[:, None]  # (B, 1, T, S), broadcast over heads
