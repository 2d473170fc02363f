"""GPT: a decoder-only Transformer language model (token ids in, next-token logits out)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.models.base import LanguageModel, position_encoding
from gptlab.models.blocks import Block, make_norm
from gptlab.models.dropout import Dropout
from gptlab.models.fused_loss import IGNORE_INDEX, cap_logits, linear_cross_entropy
from gptlab.models.kv_cache import KVCache

# Our options that neither GPT-2 nor Llama has, at the values that turn them off: a model must
# have these to export to transformers or llama.cpp.
EXTRAS_OFF = {"qk_norm": False, "logit_softcap": None, "value_embeddings": 0, "unet_skips": False, "smear": False}
# The smear's gate reads this many channels of a token's embedding (modded-nanogpt's choice): enough
# to tell a token that wants its predecessor from one that does not, at the cost of a dot product.
SMEAR_GATE_CHANNELS = 12


class GPT(LanguageModel):
    """Token embedding, positional encoding, `num_layers` pre-norm blocks, final norm, head.

    Options from modded-nanogpt: value embeddings (config.value_embeddings), token tables whose
    rows are added to the attention values of the first and last layers, parameters that cost a
    lookup instead of a product; a soft cap on the logits (config.logit_softcap); U-net skip
    connections (config.unet_skips), which hand the first half's outputs to the second half's inputs;
    and the smear (config.smear), which adds to each token's embedding its predecessor's.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.tgt_vocab_size, config.embed_dim)
        self.value_embeds = nn.ModuleList(
            nn.Embedding(config.tgt_vocab_size, config.embed_dim) for _ in range(config.value_embeddings)
        )
        self.wpe, self.rotary = position_encoding(config, config.seq_len)
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        # One learned weight per skip (none with one layer); at 1, as modded-nanogpt starts them.
        skips = config.num_layers // 2 if config.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.ones(skips)) if skips else None
        # The smear's strength and gate, at 0: the model starts as the one without it.
        gate_channels = min(SMEAR_GATE_CHANNELS, config.embed_dim)
        self.smear_strength = nn.Parameter(torch.zeros(1)) if config.smear else None
        self.smear_gate = nn.Parameter(torch.zeros(gate_channels)) if config.smear else None
        self.norm_f = make_norm(config)
        self.lm_head = self.output_head(self.wte)
        self.apply(self._init_weights)
        self.scale_residual_writes(config.num_layers)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        start_pos: int = 0,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, V) for token ids idx (B, T) at positions start_pos .. start_pos+T-1.

        With targets (B, T), also the mean cross-entropy over positions whose target is not IGNORE_INDEX.
        With a kv_cache, idx holds only the tokens after those already in the cache: they take
        the next slots (start_pos is then the cache's length) and attend to the cached ones.
        last_only=True computes the logits of the last position only, (B, 1, V): all that
        generation needs, and it spares the output head's work on a long prompt.
        return_logits=False (with targets) returns (None, loss) and computes the loss without ever
        holding the logits, a slice of rows at a time (models/fused_loss.py): what training uses.
        """
        if idx.dim() != 2:
            raise GptlabError(f"GPT expects token ids of shape (batch, time), got shape {tuple(idx.shape)}")
        T = idx.size(1)
        if kv_cache is not None:
            start_pos = kv_cache.length
        self.check_positions(start_pos, T)
        positions = kv_cache.start(T) if kv_cache is not None else None  # (B, T) for padded rows
        x = self.wte(idx)  # (B, T, C)
        if self.smear_gate is not None:
            x = self.smear(x, kv_cache, positions)
        if self.wpe is not None:
            x = x + self.wpe(T, start_pos, positions)  # (T, C) broadcast over the batch, or (B, T, C)
        x = self.drop(x)
        rope = self.rotary(T, start_pos, positions) if self.rotary is not None else None
        values = self.layer_values(idx)
        outputs: list[torch.Tensor] = []  # the first half's, for the U-net skips
        for layer, block in enumerate(self.blocks):
            x = block(self.add_skip(x, layer, outputs), rope, kv_cache, layer, values[layer])  # (B, T, C)
            self.keep_for_skip(x, layer, outputs)
        if kv_cache is not None:
            kv_cache.advance(T)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        x = self.norm_f(x)
        softcap = self.config.logit_softcap
        if targets is not None and not return_logits:
            flat = x.flatten(0, 1)
            return None, linear_cross_entropy(flat, self.lm_head.weight, targets.flatten(), softcap=softcap)
        logits = cap_logits(self.lm_head(x), softcap)  # (B, T, V)
        if targets is None:
            return logits, None
        # The loss in float32 even under autocast: a bf16 log-softmax over V classes loses digits.
        # Summed, then divided by at least 1: a batch with nothing to count gives 0, as the fused loss does.
        flat = targets.flatten()
        summed = F.cross_entropy(logits.flatten(0, 1).float(), flat, ignore_index=IGNORE_INDEX, reduction="sum")
        return logits, summed / (flat != IGNORE_INDEX).sum().clamp(min=1)

    def layer_values(self, idx: torch.Tensor) -> list[torch.Tensor | None]:
        """For each layer, the value embeddings of token ids idx (..., C) from the table that
        feeds it (value_table), or None; each table is looked up once."""
        looked_up = [table(idx) for table in self.value_embeds]
        tables = (self.value_table(layer) for layer in range(self.config.num_layers))
        return [None if table is None else looked_up[table] for table in tables]

    def value_table(self, layer: int) -> int | None:
        """Which value-embedding table feeds `layer`: table j feeds layer j and layer
        num_layers - N + j (N tables), so the first and the last layers get one each; None for
        the layers between."""
        tables, depth = len(self.value_embeds), self.config.num_layers
        if layer < tables:
            return layer
        if layer >= depth - tables:
            return layer - (depth - tables)
        return None

    def add_skip(self, x: torch.Tensor, layer: int, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The input of `layer`: x, plus, with unet_skips and in the second half, the output of its
        mirror layer j = num_layers - 1 - layer (outputs[j], kept by keep_for_skip) times its weight."""
        mirror = self.config.num_layers - 1 - layer
        if self.skip_weights is None or mirror >= len(self.skip_weights):
            return x
        return x + self.skip_weights[mirror] * outputs[mirror]

    def keep_for_skip(self, x: torch.Tensor, layer: int, outputs: list[torch.Tensor]) -> None:
        """With unet_skips, append the output x of a layer of the first half to outputs."""
        if self.skip_weights is not None and layer < len(self.skip_weights):
            outputs.append(x)

    def smear(self, x: torch.Tensor, kv_cache: KVCache | None, positions: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings x (B, T, C), each plus its predecessor's times a gate in (0, strength)
        that its own first channels open: every layer then knows the previous token, which an
        induction head would otherwise spend a layer of attention finding (modded-nanogpt's smear).

        After a kv_cache's slots the first predecessor is the cache's last token (this call keeps
        the new last one there); a text's first token, position 0, has none, nor has a left-padded
        row's first real token (positions (B, T) from the cache, 0 there).
        """
        first = x.new_zeros(x[:, :1].shape) if kv_cache is None or kv_cache.length == 0 else kv_cache.last_embedding
        if kv_cache is not None:
            kv_cache.last_embedding = x[:, -1:]  # (B, 1, C)
        previous = torch.cat([first, x[:, :-1]], dim=1)  # (B, T, C)
        opened = torch.sigmoid(x[..., : self.smear_gate.numel()] @ self.smear_gate)  # (B, T)
        if positions is not None:
            opened = opened * (positions > 0)
        return x + self.smear_strength * opened[..., None] * previous

    def check_positions(self, start_pos: int, T: int) -> None:
        """GptlabError unless positions start_pos .. start_pos+T-1 lie within the context."""
        if start_pos < 0 or start_pos + T > self.config.seq_len:
            raise GptlabError(
                f"positions {start_pos}..{start_pos + T - 1} exceed the model's context of seq_len="
                f"{self.config.seq_len} tokens; pass at most {self.config.seq_len} tokens"
            )

    def new_kv_cache(self, batch: int, max_len: int | None = None, pad: torch.Tensor | None = None) -> KVCache:
        """An empty KVCache for this model: `batch` rows of up to max_len (default seq_len) slots,
        on the model's device and in its dtype; pad (B,) counts each row's leading <PAD> slots."""
        cfg, weight = self.config, self.wte.weight
        return KVCache(
            batch,
            cfg.num_layers,
            cfg.n_heads,
            max_len or cfg.seq_len,
            cfg.head_dim,
            dtype=weight.dtype,
            device=weight.device,
            pad=pad,
        )

    # ---- sizes and costs ---------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters, a tied matrix counted once.

        non_embedding=True counts only the blocks and the final norm (Kaplan et al. 2020):
        no token or position table, and no output head.
        """
        if non_embedding:
            return sum(p.numel() for p in [*self.blocks.parameters(), *self.norm_f.parameters()])
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token, forward and backward (PaLM, appendix B): 6 per weight that
        multiplies an activation (blocks and output head; embedding lookups are free), plus
        12 * num_layers * seq_len * embed_dim for the attention scores and their weighted sum."""
        cfg = self.config
        matmul_weights = self.num_params(non_embedding=True) + self.lm_head.weight.numel()
        return 6 * matmul_weights + 12 * cfg.num_layers * cfg.seq_len * cfg.embed_dim

    # ---- foreign weights ---------------------------------------------------------------------

    @classmethod
    def from_hf_gpt2(cls, state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> GPT:
        """A GPT holding the weights of a Hugging Face `GPT2LMHeadModel` state dict.

        The config must describe GPT-2: learned positions, layernorm with biases, tanh-GELU and
        tied embeddings; its sizes must match the weights (GPT-2 small: embed_dim=768,
        n_heads=12, num_layers=12, seq_len=1024, tgt_vocab_size=50257). Raises GptlabError
        naming the field or the weight that disagrees.
        """
        for field, needed in [
            ("pos_encoding", "learned"), ("norm", "layernorm"), ("activation", "gelu"),
            ("bias", True), ("tie_embeddings", True),
        ]:  # fmt: skip
            if getattr(config, field) != needed:
                got = getattr(config, field)
                raise GptlabError(f"GPT-2 weights need ModelConfig.{field}={needed!r}, got {got!r}")
        theirs = {key.removeprefix("transformer."): value for key, value in state_dict.items()}

        # Our name -> Hugging Face's name. lm_head.weight is wte.weight (tied), so it is not listed.
        names = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight"}
        for i in range(config.num_layers):
            for ours, hf in [
                ("norm_1", "ln_1"), ("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                ("norm_2", "ln_2"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj"),
            ]:  # fmt: skip
                for kind in ("weight", "bias"):
                    names[f"blocks.{i}.{ours}.{kind}"] = f"h.{i}.{hf}.{kind}"
        names |= {"norm_f.weight": "ln_f.weight", "norm_f.bias": "ln_f.bias"}
        # GPT-2 stores these as Conv1D, whose weight is the transpose of nn.Linear's.
        transposed = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")

        # attn.bias / attn.masked_bias are GPT-2's causal-mask buffers, not weights.
        ignored = {"lm_head.weight"} | {k for k in theirs if k.endswith((".attn.bias", ".attn.masked_bias"))}
        unexpected = sorted(set(theirs) - set(names.values()) - ignored)
        if unexpected:
            raise GptlabError(f"GPT-2 weight {unexpected[0]} has no place in the model; check num_layers")

        model = cls(config)
        ours = model.state_dict()
        with torch.no_grad():
            for our_key, hf_key in names.items():
                if hf_key not in theirs:
                    raise GptlabError(f"GPT-2 weight {hf_key} is missing from the state dict; check num_layers")
                value = theirs[hf_key].t() if our_key.endswith(transposed) else theirs[hf_key]
                if value.shape != ours[our_key].shape:
                    raise GptlabError(
                        f"GPT-2 weight {hf_key} has shape {tuple(value.shape)} but the model expects "
                        f"{tuple(ours[our_key].shape)}; set embed_dim, expansion_factor, seq_len and "
                        "tgt_vocab_size to match"
                    )
                ours[our_key].copy_(value)
        return model
