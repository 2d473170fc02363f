"""Every option of gptlab as a typed, validated field: the only place configuration lives.

The command line and config files (YAML or JSON) are two ways of filling these models;
everything downstream receives them as arguments.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gptlab.errors import GptlabError


class _Config(BaseModel):
    # Unknown keys are typos; catch them instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Config):
    """The shape of a GPT or an encoder-decoder Transformer. Stored in every checkpoint, so
    generation never re-types it."""

    model: Literal["gpt", "transformer"] = Field(
        "gpt", description="gpt (decoder-only, text) or transformer (encoder-decoder, source/target pairs)."
    )
    embed_dim: int = Field(384, gt=0, description="Width of the residual stream.")
    tgt_vocab_size: int | None = Field(
        None, gt=0, description="Embedding rows; None means the tokenizer's vocabulary size."
    )
    seq_len: int = Field(256, gt=0, description="Context length in tokens.")
    num_layers: int = Field(6, gt=0, description="Number of Transformer blocks.")
    expansion_factor: int = Field(4, gt=0, description="MLP hidden width = expansion_factor * embed_dim.")
    n_heads: int = Field(6, gt=0, description="Attention heads; must divide embed_dim.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on attention, MLP and embeddings.")
    attention_dropout: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Dropout on the attention weights; None means `dropout`. 0 keeps PyTorch's fused "
        "CPU attention kernel, which has no dropout, while the residual and embedding dropout still regularise.",
    )
    bias: bool = Field(False, description="Biases in linear layers and norms.")
    pos_encoding: Literal["rope", "sinusoidal", "learned"] = Field("rope", description="Positional encoding.")
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="Normalisation layer.")
    activation: Literal["gelu", "relu2", "swiglu"] = Field("gelu", description="MLP nonlinearity.")
    tie_embeddings: bool = Field(True, description="Share the token embedding with the output head.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of the normalisation layers.")
    qk_norm: bool = Field(
        False,
        description="RMS-normalise each head's queries and keys (no gain) before attention, as modded-nanogpt does.",
    )
    zero_init_projections: bool = Field(
        False,
        description="Start the projections that write into the residual stream at zero: each block "
        "begins as the identity.",
    )
    logit_softcap: float | None = Field(
        None,
        gt=0,
        description="GPT: squash the output logits smoothly into (-c, c), c * tanh(logits / c), as Gemma 2 and "
        "modded-nanogpt do; None leaves them as they are.",
    )
    value_embeddings: int = Field(
        0,
        ge=0,
        description="GPT: this many extra token tables whose rows are added to the attention values, table j in "
        "layer j and in layer num_layers - N + j (modded-nanogpt's value embeddings); 0 for none.",
    )
    unet_skips: bool = Field(
        False,
        description="GPT: U-net skip connections (modded-nanogpt): the output of layer j of the first half is "
        "added, times a learned weight that starts at 1, to the input of layer num_layers - 1 - j.",
    )
    smear: bool = Field(
        False,
        description="GPT: add to each token's embedding its predecessor's, times a learned gate that starts at 0 "
        "(modded-nanogpt's smear): every layer sees the previous token without attention having to find it.",
    )
    # Encoder-decoder only (model=transformer); seq_len is then the longest target.
    num_encoder_layers: int | None = Field(None, gt=0, description="Transformer encoder depth; None means num_layers.")
    num_decoder_layers: int | None = Field(None, gt=0, description="Transformer decoder depth; None means num_layers.")
    shared_embeddings: bool = Field(True, description="Transformer: one token table for source and target.")
    max_source_len: int | None = Field(
        None, gt=0, description="Transformer: longest source in tokens (longer ones are truncated); None means seq_len."
    )

    @property
    def attention_dropout_p(self) -> float:
        """The dropout on attention weights: attention_dropout, or dropout where that is None."""
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    @model_validator(mode="before")
    @classmethod
    def _transformer_positions(cls, values: Any) -> Any:
        # "Attention Is All You Need" adds sinusoids; that is the Transformer's default, RoPE the GPT's.
        if isinstance(values, dict) and values.get("model") == "transformer" and "pos_encoding" not in values:
            return {**values, "pos_encoding": "sinusoidal"}
        return values

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.embed_dim % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide embed_dim ({self.embed_dim})")
        if self.pos_encoding == "rope" and (self.embed_dim // self.n_heads) % 2:
            raise ValueError("rope needs an even head size (embed_dim / n_heads)")
        gpt_only = self.logit_softcap is not None or self.value_embeddings or self.unet_skips or self.smear
        if self.model == "transformer" and gpt_only:
            raise ValueError(
                "logit_softcap, value_embeddings, unet_skips and smear are for GPTs (model: gpt), not the Transformer"
            )
        if 2 * self.value_embeddings > self.num_layers:
            raise ValueError(
                f"value_embeddings ({self.value_embeddings}) feeds two layers each: at most num_layers / 2 "
                f"({self.num_layers // 2})"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.n_heads

    @property
    def encoder_layers(self) -> int:
        return self.num_encoder_layers or self.num_layers

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def source_len(self) -> int:
        return self.max_source_len or self.seq_len


class DatasetConfig(_Config):
    """How windows of the token file are batched."""

    batch_size: int = Field(
        64, gt=0, description="Sequences per micro-batch, over all ranks (a step takes batch_size x grad_accum_steps)."
    )
    shuffle: bool = Field(True, description="Reorder the windows every epoch (seeded).")
    shift_windows: bool = Field(
        False,
        description="Text for a GPT: from the second epoch on, cut the windows at a random offset "
        "(seeded per epoch), so that a text read again is read in different windows.",
    )
    skip_bad_lines: bool = Field(
        False,
        description="Paired data and conversations: skip malformed lines with a warning instead of refusing the file.",
    )


class TrainConfig(_Config):
    """The optimisation run: schedule, evaluation, checkpoints, logging, device."""

    epochs: int = Field(100, gt=0, description="Passes over the training windows.")
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="The schedule's floor, as a fraction of the peak.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    lr_schedule: Literal["cosine", "wsd"] = Field(
        "cosine",
        description="After warmup: cosine, a half cosine from the peak down to the floor; wsd "
        "(warmup-stable-decay), the peak until the last decay_fraction of the steps, then a straight line to the floor.",
    )
    decay_fraction: float = Field(
        0.3, gt=0, le=1, description="With lr_schedule wsd: the share of the run's steps spent decaying."
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay, on matrices only.")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables.")
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Keep an exponential moving average of the weights, this decay per step (0.99 remembers "
        "about 100 steps); evaluations and checkpoints use the average (training/weight_average.py).",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Training loss target: this much probability spread over all tokens."
    )
    eval_interval: int = Field(500, gt=0, description="Evaluate every this many steps (and at each epoch end).")
    eval_batches: int = Field(20, gt=0, description="Batches per evaluation.")
    task: Literal["lm", "chat"] = Field(
        "lm",
        description="lm: next-token loss on text; chat: supervised fine-tuning on JSONL conversations "
        '({"messages": [...]}), the loss on assistant tokens only (GPT only).',
    )
    eval_task: str | None = Field(
        None,
        description="A multiple-choice .jsonl file (HellaSwag's or {context, choices, answer}) scored in full "
        "at each evaluation (GPT only): acc and acc_norm beside the bits per byte.",
    )
    checkpoint_every: int = Field(5, gt=0, description="Save a checkpoint every this many epochs.")
    experiment_name: str = Field("gpt_experiment", min_length=1, description="Names checkpoints and logs.")
    checkpoint_dir: str = Field(".", description="Where <experiment_name>_e<epoch>.pth files go.")
    log_dir: str = Field("runs", description="TensorBoard logs go to <log_dir>/<experiment_name>/.")
    device: str = Field("auto", description="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")
    seed: int = Field(1337, ge=-(2**63), lt=2**63, description="Seeds weights, shuffling and dropout.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    time_budget: float | None = Field(None, gt=0, description="Stop after this many seconds ('10m', '1h' accepted).")
    size_to_budget: float | None = Field(
        None,
        gt=0,
        description="With a time budget: train the largest of this model and smaller ones (fewer layers, then "
        "narrower) whose speed, timed over a few steps at the start, shows it this many training tokens per "
        "parameter within the budget (GPT from scratch only); a narrower one takes AdamW's learning rate "
        "times configured / chosen width.",
    )
    save_every_steps: int | None = Field(
        None, gt=0, description="Also save <experiment_name>_s<step>.pth every this many steps."
    )
    keep_last: int | None = Field(
        None, gt=0, description="Keep only the newest this many step checkpoints (never the latest one)."
    )
    grad_accum_steps: int = Field(
        1, gt=0, description="Micro-batches of batch_size per optimizer step (gradients accumulated)."
    )
    total_batch_tokens: int | None = Field(
        None, gt=0, description="Tokens per optimizer step; sets grad_accum_steps (a multiple of batch_size*seq_len)."
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast precision; auto = bf16 on GPUs that support it and on CPUs whose bf16 matmuls "
        "are measured faster than fp32, else fp32.",
    )
    compile: bool = Field(False, description="torch.compile the model (faster steps after a slow first one).")
    fsdp: bool = Field(False, description="Shard weights and optimizer state across torchrun ranks (FSDP2).")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw, or muon for the blocks' 2-D weights (AdamW for the rest)."
    )
    muon_lr: float = Field(0.02, gt=0, description="Peak learning rate of Muon (with --optimizer muon).")
    muon_momentum_warmup: int = Field(
        0,
        ge=0,
        description="With --optimizer muon: raise Muon's momentum from 0.85 to 0.95 over this many first steps "
        "(modded-nanogpt); 0 keeps 0.95 throughout.",
    )
    peak_flops: float | None = Field(
        None,
        gt=0,
        description="Peak FLOP/s of one device in the dtype the run computes in, for MFU; default: known GPUs' "
        "data sheets, a measured matmul on CPU.",
    )
    # LoRA (models/lora.py, training/lora.py): fine-tune low-rank adapters of a frozen --init_from model.
    lora_rank: int | None = Field(
        None, gt=0, description="Train LoRA adapters of this rank instead of every weight (needs --init_from)."
    )
    lora_alpha: float | None = Field(
        None, gt=0, description="LoRA scale alpha (the update is alpha/rank * B A); default 2 * lora_rank."
    )
    lora_targets: Literal["attention", "mlp", "both"] | None = Field(
        None, description="Layers LoRA adapts: attention (qkv, proj), mlp (fc, proj) or both (default: both)."
    )
    lora_save: Literal["adapter", "merged"] | None = Field(
        None,
        description="LoRA checkpoints: adapter (the adapters and a fingerprinted pointer to the base) or merged "
        "(a whole model, adapters folded in) (default: adapter).",
    )

    @field_validator("experiment_name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if "/" in name or "\\" in name:
            raise ValueError("must be a plain name, without a directory (use checkpoint_dir)")
        return name

    @model_validator(mode="after")
    def _lora_needs_rank(self) -> TrainConfig:
        if self.lora_rank is None:
            given = [name for name in ("lora_alpha", "lora_targets", "lora_save") if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{given[0]} is a LoRA setting: set lora_rank too (or drop it)")
        return self

    @field_validator("time_budget", mode="before")
    @classmethod
    def _parse_duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value


class SampleConfig(_Config):
    """How text is sampled from a trained model.

    The logits are shaped in this order: repetition penalty, temperature, top-k, top-p, min-p;
    greedy (or temperature 0) then takes the most likely token instead of drawing one.
    """

    max_new_tokens: int = Field(200, gt=0, description="Tokens to generate.")
    temperature: float = Field(1.0, ge=0, le=100, description="Divide the logits by this; 0 means greedy.")
    top_k: int | None = Field(None, gt=0, description="Keep only the k most likely tokens.")
    top_p: float | None = Field(None, gt=0, le=1, description="Keep the smallest set with this total probability.")
    min_p: float | None = Field(
        None, ge=0, le=1, description="Drop tokens less likely than min_p times the most likely one."
    )
    repetition_penalty: float = Field(
        1.0,
        ge=0.01,
        le=1e30,  # beyond float32's range a logit of 0 times the penalty is NaN
        description="Make tokens already in the text less likely (CTRL); 1 is off, 1.1-1.3 typical.",
    )
    greedy: bool = Field(False, description="Always take the most likely token.")
    num_samples: int = Field(1, gt=0, description="Independent samples of the same prompt, generated as one batch.")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63, description="Seed for reproducible samples.")
    window_keep: int | None = Field(
        None,
        gt=0,
        description="When the text outgrows the context, continue from its last this many tokens "
        "(default seq_len/2; seq_len = a sliding window, slower).",
    )
    stop: list[str] = Field(
        default_factory=list, description="Stop when the text contains one of these (not included in the output)."
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # `--stop "x"` on the command line

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if "" in value:
            raise ValueError("a stop string must not be empty")
        return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1.5h' -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"cannot read duration {text!r}; write e.g. 600, 600s, 10m or 1h")
    number, unit = match.groups()
    return float(number) * {"": 1, "s": 1, "m": 60, "h": 3600}[unit]


SECTIONS: dict[str, type[_Config]] = {"model": ModelConfig, "data": DatasetConfig, "train": TrainConfig}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into one flat dict of field -> value.

    Fields may be written flat (`embed_dim: 384`) or grouped under `model:`, `data:`, `train:`.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"config file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise GptlabError(f"config file {path} is not valid YAML/JSON: {str(err).splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise GptlabError(f"config file {path} must hold a mapping of field: value")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def build_configs(values: dict[str, Any]) -> tuple[ModelConfig, DatasetConfig, TrainConfig]:
    """Route a flat dict of field -> value to the three configs, validating each.

    Raises GptlabError naming the unknown or invalid field.
    """
    known = {name: section for section, cls in SECTIONS.items() for name in cls.model_fields}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise GptlabError(f"unknown config field(s): {', '.join(unknown)}")
    grouped: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for name, value in values.items():
        grouped[known[name]][name] = value
    return tuple(validated(SECTIONS[s], grouped[s]) for s in SECTIONS)  # type: ignore[return-value]


def validated(cls: type[BaseModel], values: dict[str, Any]) -> Any:
    """cls(**values), with a validation error turned into one line that names the field."""
    try:
        return cls(**values)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or cls.__name__
        message = first["msg"].removeprefix("Value error, ")
        raise GptlabError(f"invalid config: {field}: {message}") from None


def validated_from(cls: type[BaseModel], values: Any, source: str | Path, fix: str) -> Any:
    """validated(), for values read from the file `source` (a checkpoint, a config.json): a
    missing section or an invalid field is one line naming the file and `fix`."""
    if not isinstance(values, dict):
        raise GptlabError(f"{source} holds no valid {cls.__name__}; {fix}")
    try:
        return validated(cls, values)
    except GptlabError as error:
        raise GptlabError(f"{source}: {error}") from None
