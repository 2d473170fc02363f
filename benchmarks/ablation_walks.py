"""The walks of benchmarks/ablation.py: what each row changes in `cpu-10min`, and why it was tried.

Twenty-one walks, in the order they were made. `first` (the first recipe, 2 minutes a row) starts from
`nanogpt-char` (nanoGPT's GPU recipe for Shakespeare-char); `budget` starts from that first `cpu-10min` and
is measured at the budget the preset is sold for, 10 minutes, where a run repeats the training text several
times (2-minute rows never finish one epoch, so they cannot see what regularisation does); `faster` starts
from the `cpu-10min` of 2026-12-02 (the budget walk's result), compiled, and asks what steps made faster are
best spent on; `sweeps` starts from the preset that walk chose and tries Muon's learning rate at a third
value and the vocabulary's size; `data` starts from the preset with the vocabulary that walk chose and tries
QK-norm, zero-initialised projections and what data each step learns from; `regularisation` starts from the
preset that walk chose and tries less dropout, a higher learning rate for the AdamW half and more weight
decay; `size` tries smaller models, for a machine that sees less than one epoch in the budget; `small` tries
the learning rates of the smaller model that the preset, sized to the budget, trains on such a machine;
`compute` asks what that small model, bound by compute rather than by the text, should spend its steps on;
`schedule` tries the learning rate's decay, Muon's momentum warmup, and more layers at the parameters the
sizing chose; `modded` tries two of modded-nanogpt's architecture changes on that preset: a soft cap on the
logits and value embeddings; `repeat` tries dropout, weight decay and width where the text is read five
times; `shortlist` checks at the real budget what benchmarks/step_sweep.py (33 changes at a fixed step
count, on a GPU) found best; `refine` lowers AdamW's β1 once more and tries 3 heads of 64; `lighter` tries
a narrower MLP, Muon's momentum warmup over more steps and β1 lower still; `unclipped` trains without
gradient clipping; `wider` tries an MLP 5 × wide and AdamW's rate halved; `decay` decays the learning
rate over 60 % of the run; `context` tries a context of 512 and a head untied from the embeddings; `unet`
tries U-net skip connections; `smear` adds to each token's embedding its predecessor's, at a context of 256
and of 512.

Each walk starts from the preset as it is today with the values it had when the walk was made (the
BEFORE_* dictionaries below put back what later walks changed), so that every walk still runs as it ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gptlab.presets import TokenizerRecipe


@dataclass(frozen=True)
class Change:
    """One row of the ablation: config values to set and/or a different tokenizer."""

    label: str
    values: dict[str, object] = field(default_factory=dict)
    tokenizer: TokenizerRecipe | None = None


BPE = "default"  # our byte-level BPE
# The order is deliberate: first what makes steps cheaper (more steps in the budget), then the
# tokenizer, then the architecture, then the optimizer and precision, then size again.
FIRST_WALK = [
    Change("no dropout (a run is shorter than one epoch)", {"dropout": 0.0}),
    Change("batch 64 → 16 sequences (4× the optimizer steps)", {"batch_size": 16}),
    Change("warmup 100 → 30 steps", {"warmup_steps": 30}),
    Change("6 layers × 384 wide → 4 × 256", {"num_layers": 4, "embed_dim": 256, "n_heads": 4}),
    Change("characters → our BPE with 2048 ids", tokenizer=TokenizerRecipe(BPE, 2048)),
    Change("BPE with 4096 ids", tokenizer=TokenizerRecipe(BPE, 4096)),
    Change("BPE with 1024 ids", tokenizer=TokenizerRecipe(BPE, 1024)),
    Change("learned positions → RoPE", {"pos_encoding": "rope"}),
    Change("LayerNorm → RMSNorm", {"norm": "rmsnorm"}),
    Change("GELU → ReLU²", {"activation": "relu2"}),
    Change("no biases", {"bias": False}),
    Change("untied output head", {"tie_embeddings": False}),
    Change("peak learning rate 1e-3 → 2e-3", {"learning_rate": 2e-3}),
    Change("bf16 autocast", {"dtype": "bf16"}),
    Change("Muon for the blocks' matrices", {"optimizer": "muon"}),
    Change("context 256 → 128 tokens, batch ×2", {"seq_len": 128, "batch_size": 32}),
    Change("6 layers × 384 wide again", {"num_layers": 6, "embed_dim": 384, "n_heads": 6}),
    Change("torch.compile", {"compile": True}),
]

# The first cpu-10min (the end of FIRST_WALK) at its own budget: what a run that repeats the text
# needs (regularisation, a schedule that ends well) and what more steps of the same time buy.
BUDGET_WALK = [
    Change("dropout 0.1 (the run repeats the text several times)", {"dropout": 0.1}),
    Change("Muon for the blocks' matrices, lr 0.02", {"optimizer": "muon", "muon_lr": 0.02}),
    Change("Muon, lr 0.04", {"optimizer": "muon", "muon_lr": 0.04}),
    Change("learning-rate floor 0.1 → 0 of the peak", {"min_lr_ratio": 0.0}),
    Change("dropout 0.2", {"dropout": 0.2}),
    Change("no dropout on the attention weights (the fused CPU kernel)", {"attention_dropout": 0.0}),
    Change("stop after 6 epochs if the budget lasts longer", {"epochs": 6}),
    Change("6 layers × 384 wide", {"num_layers": 6, "embed_dim": 384, "n_heads": 6}),
]
# The cpu-10min of 2026-12-02 once its steps got faster (the cheap CPU dropout mask, attention
# chosen by measurement) and compiled: it then ends its 6 epochs before the budget does, so the question
# is what the spare time is best spent on, at the same full budget.
FASTER_WALK = [
    Change("6 layers (about as many epochs as the budget allows)", {"num_layers": 6}),
    Change("context 128 → 256 tokens, batch ÷2", {"seq_len": 256, "batch_size": 16}),
    Change("dropout 0.15", {"dropout": 0.15}),
    Change("at most 8 epochs", {"epochs": 8}),
]
# The cpu-10min of 2026-12-03 (the third walk's result): the sweeps that issue 16 asks for and no
# walk had made at 10 minutes, Muon's learning rate at a third value and the vocabulary's size.
SWEEPS_WALK = [
    Change("Muon lr 0.02 → 0.01", {"muon_lr": 0.01}),
    Change("BPE with 8192 ids", tokenizer=TokenizerRecipe(BPE, 8192)),
    Change("BPE with 2048 ids", tokenizer=TokenizerRecipe(BPE, 2048)),
]
# The cpu-10min of 2026-12-03 with BPE 2048 (the fourth walk's result): it ends its 10 minutes
# before its sixth epoch without overfitting: what might each step learn more from? Two changes
# to the model that modded-nanogpt found to speed up learning, then the data each step sees.
DATA_WALK = [
    Change("QK-norm", {"qk_norm": True}),
    Change("projections into the residual stream start at zero", {"zero_init_projections": True}),
    Change("windows cut at a new offset every epoch", {"shift_windows": True}),
    Change("batch 16 → 8 sequences (twice the optimizer steps)", {"batch_size": 8}),
    Change("BPE with 1024 ids", tokenizer=TokenizerRecipe(BPE, 1024)),
]
# The cpu-10min of 2026-12-03 after the data walk (QK-norm, shifted windows): its runs no longer
# overfit at 10 minutes (last evaluation within 0.004 of the best), so less regularisation may
# now pay, and the AdamW half of the optimizer (embeddings, head, norms) was last tuned before Muon.
REGULARISATION_WALK = [
    Change("dropout 0.1 → 0.05", {"dropout": 0.05}),
    Change("AdamW lr 0.002 → 0.004 (embeddings, head, norms)", {"learning_rate": 0.004}),
    Change("weight decay 0.1 → 0.2", {"weight_decay": 0.2}),
]
# The cpu-10min after the regularisation walk, on a CPU without fast bf16 (an AVX2 EPYC: 1,950
# tokens/s in fp32, 0.8 of an epoch in 10 minutes, its evaluations still falling at the end): is a
# smaller model, which sees the text more times in the same minutes, better there?
SIZE_WALK = [
    Change("6 → 4 layers", {"num_layers": 4}),
    Change("256 → 192 wide", {"embed_dim": 192}),
    Change("192 → 128 wide", {"embed_dim": 128}),
]
# The sized cpu-10min on that EPYC trains 4 x 128, a model half as wide as any that the learning
# rates were tuned on (6 x 256 and 4 x 256, on Xeons): does the small model want larger steps?
# Since this walk, sizing scales AdamW's rate by 256 / width: the walk starts from 0.002, which
# 4 x 128 takes as 0.004, the rate it trained with before.
SMALL_WALK = [
    Change("Muon lr 0.02 → 0.03", {"muon_lr": 0.03}),
    Change("AdamW lr 0.004 → 0.008 at 128 wide (embeddings, head, norms)", {"learning_rate": 0.004}),
]
# The sized cpu-10min after that walk, on the same EPYC (4 x 128 at 9,400-10,400 tokens/s, 3.8
# epochs, its evaluations still falling at the end): a model that small is bound by compute, not by
# the text, so what it spends its steps on may differ from the 6 x 256 the recipe was tuned on.
COMPUTE_WALK = [
    Change("dropout 0.05 → 0", {"dropout": 0.0}),
    Change("embeddings tied to the head", {"tie_embeddings": True}),
    Change("context 256 → 128 tokens, batch 16 → 32 sequences", {"seq_len": 128, "batch_size": 32}),
    Change("size_to_budget 1.5 → 1.2 tokens per parameter", {"size_to_budget": 1.2}),
]
# The preset after the compute walk, with its weight average, at the size its sizing chose on the
# machine of 2026-12-04 by a hair (4 x 192 at 1.51 tokens per parameter, against 1.5 asked): set
# here, so that timing noise cannot hand one row a different size than the next.
SCHEDULE_WALK_SIZE = {"size_to_budget": None, "num_layers": 4, "embed_dim": 192, "learning_rate": 0.004 * 256 / 192}
SCHEDULE_WALK = [
    Change("cosine → warmup-stable-decay (the last 40 % of the steps)", {"lr_schedule": "wsd", "decay_fraction": 0.4}),
    Change("Muon's momentum 0.85 → 0.95 over the first 300 steps", {"muon_momentum_warmup": 300}),
    # The ladder drops layers before width; as deep as configured and narrower, at the same parameters?
    Change(
        "6 × 160 instead of 4 × 192 (2.2M parameters each; AdamW 0.0064)",
        {"num_layers": 6, "embed_dim": 160, "learning_rate": 0.0064},
    ),
]
# modded-nanogpt's changes that cost almost no compute, on the preset after the schedule walk at
# the size that walk set (which the Zen 4 the walk ran on chose by itself: 3.1 tokens per parameter).
# A third row, 2 value tables, was stopped unmeasured: one table had already lost on both seeds.
MODDED_WALK = [
    Change("logits soft-capped at 15 (15 tanh(logits / 15))", {"logit_softcap": 15.0}),
    Change("value embeddings: 1 table, added to the values of layers 1 and 4", {"value_embeddings": 1}),
]
# The preset after the modded walk, at the same size, on a machine with fast bf16 where it reads the
# text about five times in 10 minutes and its train loss ends 0.3 nats below its validation loss:
# does it now want what the slower machines' three epochs did not (dropout, more weight decay), or
# a larger model? None of the three was kept (2026-12-04, a Zen 4 at 4.4 epochs: +0.011, +0.013, +0.018).
REPEAT_WALK = [
    Change("dropout 0 → 0.05 (residual)", {"dropout": 0.05}),
    Change("weight decay 0.2 → 0.4", {"weight_decay": 0.4}),
    Change("4 × 256 instead of 4 × 192 (AdamW 0.004)", {"embed_dim": 256, "learning_rate": 0.004}),
]
# The preset after the repeat walk, at the same size: the two changes that won on every seed of a
# sweep at a fixed step count on a GPU (1,750 steps, what a fast Zen 4 takes in 10 minutes; 28 single
# changes, 2-3 seeds each, many processes at once), checked here at the real budget on the CPU.
SHORTLIST_WALK = [
    Change("AdamW β1 0.9 → 0.8 (embeddings, head, norms)", {"beta1": 0.8}),
    Change("Muon lr 0.02 → 0.015", {"muon_lr": 0.015}),
]  # 2026-12-04, a Zen 4 (5.3 epochs): β1 0.8 kept (-0.014, both seeds), Muon 0.015 not (+0.005)
# The preset after the shortlist walk, at the same size: AdamW's β1 lowered once more (0.8 won on
# every seed, so is 0.8 the bottom?), and the one architecture change of the step sweep that won on
# both its seeds per step (3 heads of 64: -0.007) but may cost a CPU some of its steps.
REFINE_WALK = [
    Change("AdamW β1 0.8 → 0.7 (embeddings, head, norms)", {"beta1": 0.7}),
    Change("3 heads of 64 instead of 4 of 48", {"n_heads": 3}),
]  # 2026-12-04, a Zen 4 (5.4 epochs): β1 0.7 kept (-0.006, both seeds), 3 heads not (+0.001, both seeds)
# The preset after the refine walk, at the same size: an MLP 3 × wide instead of 4 × (the step sweep's
# -0.001 per step, and a sixth fewer block FLOPs: more steps in the budget), Muon's momentum warmup
# over 600 steps instead of 300 (-0.012 on both seeds of the sweep at β1 0.9) and AdamW's β1 lowered
# once more (0.9 -> 0.8 -> 0.7 gave -0.014, then -0.006: is 0.7 the bottom?).
LIGHTER_WALK = [
    Change("MLP 3 × wide instead of 4 ×", {"expansion_factor": 3}),
    Change("Muon's momentum warmup 300 → 600 steps", {"muon_momentum_warmup": 600}),
    Change("AdamW β1 0.7 → 0.6 (embeddings, head, norms)", {"beta1": 0.6}),
]  # 2026-12-05, a Zen 4 (5.5 epochs): none kept (+0.021, +0.003, +0.018; each worse on both seeds)
# The preset after the lighter walk (the same as after the refine walk), at the same size: the row of
# the step sweep left that costs nothing and won there on both seeds (at β1 0.9), no gradient
# clipping (-0.004). (AdamW's rate halved, -0.010 on one seed of two there, is measured in the next walk.)
UNCLIPPED_WALK = [
    Change("no gradient clipping (it was at norm 1.0)", {"grad_clip": 0.0}),
]
# The preset after the unclipped walk (the same as after the refine walk), at the same size: the MLP
# 3 × wide lost 0.021 with 13 % faster steps, so is 5 × better (6 % slower steps in bf16, eagerly, 13 %
# more parameters)? Then AdamW's rate halved (-0.010 on one seed of two in the step sweep).
WIDER_WALK = [
    Change("MLP 5 × wide instead of 4 ×", {"expansion_factor": 5}),
    Change("AdamW lr × 0.5 (embeddings, head, norms)", {"learning_rate": 0.002 * 256 / 192}),
]  # 2026-12-05, a Zen 4 (5.6 epochs): neither kept (+0.017, worse on both seeds; +0.005, a tie and a loss)
# The preset after the wider walk (unchanged since the refine walk), at the same size: the schedule's
# decay over more of the run, the one row of the step sweep left that won on both its seeds there
# (-0.003 at β1 0.9; 25 % instead of 40 % lost 0.006 on both, so the trend points to a longer decay).
DECAY_WALK = [
    Change("decay over the last 60 % of the steps (was 40 %)", {"decay_fraction": 0.6}),
]  # 2026-12-05, a Zen 4 (5.5 epochs): not kept (+0.0025, worse on both seeds)
# The preset after the decay walk (the same as after the refine walk), at the same size: two changes
# that need no code. A context of 512 with batch 8 (the same 4,096 tokens a step): 256 beat 128 twice
# (-0.006 at 4 x 256, +0.010 for 128 at 4 x 128), so is longer better still, at 10 % more attention
# work a token? And the head untied from the embeddings: tied won at 4 x 128 on a slow machine (3.1
# epochs, -0.023), where the second table was a quarter of the parameters; at 4 x 192 it is a sixth.
CONTEXT_WALK = [
    Change("context 256 → 512, batch 16 → 8 (the same tokens a step)", {"seq_len": 512, "batch_size": 8}),
    Change("output head untied from the embeddings", {"tie_embeddings": False}),
]  # 2026-12-05, a Zen 4: neither kept (+0.017, seeds 1.857 and 1.784, 18 % fewer tokens/s; +0.053, both worse)
# The preset after the context walk (the same as after the refine walk), at the same size: U-net skip
# connections (modded-nanogpt), two learned weights that hand layers 1 and 2's outputs to the inputs of
# layers 4 and 3: a later layer reads what an early one wrote, for two weights and two additions.
UNET_WALK = [
    Change("U-net skips: layers 1 and 2's outputs into layers 4 and 3 (learned weights)", {"unet_skips": True}),
]  # 2026-12-05, a Zen 4 (5.3 epochs): not kept (+0.015, worse on both seeds)
# The preset after the unet walk (the same as after the refine walk), at the same size: the smear
# (modded-nanogpt), each token's embedding plus its predecessor's through a learned gate, two
# parameters and an addition. The context walk's 512 row fell steeply on two seeds of three, as if a
# copying head (an induction head: a previous-token head, then one that attends after earlier copies
# of the current token) formed on some seeds only; the smear hands every layer the previous token, the
# first half of that circuit. So the smear at 256, then at 512 with batch 8.
SMEAR_WALK = [
    Change("smear: each token's embedding plus its predecessor's (learned gate)", {"smear": True}),
    Change("smear, context 256 → 512, batch 16 → 8", {"smear": True, "seq_len": 512, "batch_size": 8}),
]  # 2026-12-05, an AMX Xeon (6.0 epochs): neither kept (+0.014, both worse; +0.004, seeds 1.822 and 1.775)
# What the refine walk kept, as it was at its start.
BEFORE_REFINE_WALK = {"beta1": 0.8}
# What the shortlist walk kept, as it was at its start (the walks before it trained with this).
BEFORE_SHORTLIST_WALK = {"beta1": 0.9}
# What the schedule walk kept, as it was at its start.
BEFORE_SCHEDULE_WALK = {**BEFORE_SHORTLIST_WALK, "lr_schedule": "cosine", "muon_momentum_warmup": 0}
# What the compute walk kept, as it was at its start (before the weight average, measured after it).
BEFORE_COMPUTE_WALK = {**BEFORE_SCHEDULE_WALK, "dropout": 0.05, "tie_embeddings": False, "ema_decay": None}
BEFORE_SMALL_WALK = {**BEFORE_COMPUTE_WALK, "learning_rate": 0.002}
# What the size walk led to, off again at its start: the preset's size as configured.
BEFORE_SIZE_WALK = {**BEFORE_COMPUTE_WALK, "size_to_budget": None}
# What the regularisation walk changed, as it was at its start.
BEFORE_REGULARISATION_WALK = {**BEFORE_SIZE_WALK, "dropout": 0.1, "learning_rate": 0.002, "weight_decay": 0.1}
# What the data walk kept, off again at its start.
BEFORE_DATA_WALK = {**BEFORE_REGULARISATION_WALK, "qk_norm": False, "shift_windows": False}
# The cpu-10min of 2026-12-02 (the second walk's result) where today's preset differs.
SECOND_CPU_10MIN = {**BEFORE_DATA_WALK, "num_layers": 4, "seq_len": 128, "batch_size": 32, "compile": False}
# What the first cpu-10min set where today's preset differs.
FIRST_CPU_10MIN = {
    **SECOND_CPU_10MIN, "dropout": 0.0, "attention_dropout": None, "optimizer": "adamw", "epochs": 1000,
}  # fmt: skip


@dataclass(frozen=True)
class Walk:
    title: str
    base: str  # the preset the walk starts from ...
    base_values: dict[str, object]  # ... with these values set
    changes: list[Change]
    section: str  # the marked section of BENCHMARKS.md the report goes into
    base_tokenizer: TokenizerRecipe | None = None  # ... and this tokenizer instead of the preset's


BPE_4096 = TokenizerRecipe(BPE, 4096)  # cpu-10min's tokenizer until the fourth walk
WALKS = {
    "first": Walk("how the first cpu-10min was chosen", "nanogpt-char", {}, FIRST_WALK, "ablation"),
    "budget": Walk(
        "cpu-10min at its own budget", "cpu-10min", FIRST_CPU_10MIN, BUDGET_WALK, "ablation-budget", BPE_4096
    ),
    "faster": Walk(
        "cpu-10min with faster steps",
        "cpu-10min",
        {**SECOND_CPU_10MIN, "compile": True},
        FASTER_WALK,
        "ablation-faster",
        BPE_4096,
    ),
    "sweeps": Walk(
        "cpu-10min's learning rate and vocabulary",
        "cpu-10min",
        BEFORE_DATA_WALK,
        SWEEPS_WALK,
        "ablation-sweeps",
        BPE_4096,
    ),
    "data": Walk("what cpu-10min's steps learn from", "cpu-10min", BEFORE_DATA_WALK, DATA_WALK, "ablation-data"),
    "regularisation": Walk(
        "cpu-10min's regularisation and AdamW learning rate",
        "cpu-10min",
        BEFORE_REGULARISATION_WALK,
        REGULARISATION_WALK,
        "ablation-regularisation",
    ),
    "size": Walk("cpu-10min's size on a slower CPU", "cpu-10min", BEFORE_SIZE_WALK, SIZE_WALK, "ablation-size"),
    "small": Walk("the sized cpu-10min's learning rates", "cpu-10min", BEFORE_SMALL_WALK, SMALL_WALK, "ablation-small"),
    "schedule": Walk(
        "cpu-10min's schedule, Muon's momentum and depth",
        "cpu-10min",
        {**BEFORE_SCHEDULE_WALK, **SCHEDULE_WALK_SIZE},
        SCHEDULE_WALK,
        "ablation-schedule",
    ),
    "modded": Walk(
        "modded-nanogpt's logit soft cap and value embeddings",
        "cpu-10min",
        {**BEFORE_SHORTLIST_WALK, **SCHEDULE_WALK_SIZE},
        MODDED_WALK,
        "ablation-modded",
    ),
    "repeat": Walk(
        "cpu-10min when it reads the text five times: dropout, weight decay, width",
        "cpu-10min",
        {**BEFORE_SHORTLIST_WALK, **SCHEDULE_WALK_SIZE},
        REPEAT_WALK,
        "ablation-repeat",
    ),
    "shortlist": Walk(
        "cpu-10min: what a fixed-step sweep on a GPU shortlisted, at the real budget",
        "cpu-10min",
        {**BEFORE_SHORTLIST_WALK, **SCHEDULE_WALK_SIZE},
        SHORTLIST_WALK,
        "ablation-shortlist",
    ),
    "refine": Walk(
        "cpu-10min after the shortlist walk: β1 lower still, 3 heads",
        "cpu-10min",
        {**BEFORE_REFINE_WALK, **SCHEDULE_WALK_SIZE},
        REFINE_WALK,
        "ablation-refine",
    ),
    "smear": Walk(
        "cpu-10min with the smear, at a context of 256 and of 512",
        "cpu-10min",
        SCHEDULE_WALK_SIZE,
        SMEAR_WALK,
        "ablation-smear",
    ),
    "unet": Walk(
        "cpu-10min with U-net skip connections",
        "cpu-10min",
        SCHEDULE_WALK_SIZE,
        UNET_WALK,
        "ablation-unet",
    ),
    "context": Walk(
        "cpu-10min with a context of 512, and with its head untied",
        "cpu-10min",
        SCHEDULE_WALK_SIZE,
        CONTEXT_WALK,
        "ablation-context",
    ),
    "decay": Walk(
        "cpu-10min with its learning rate decayed over 60 % of the run",
        "cpu-10min",
        SCHEDULE_WALK_SIZE,
        DECAY_WALK,
        "ablation-decay",
    ),
    "wider": Walk(
        "cpu-10min with a wider MLP, and AdamW's rate halved",
        "cpu-10min",
        SCHEDULE_WALK_SIZE,
        WIDER_WALK,
        "ablation-wider",
    ),
    "unclipped": Walk(
        "cpu-10min without gradient clipping",
        "cpu-10min",
        SCHEDULE_WALK_SIZE,
        UNCLIPPED_WALK,
        "ablation-unclipped",
    ),
    "lighter": Walk(
        "cpu-10min after the refine walk: a lighter MLP, a longer momentum warmup, β1 0.6",
        "cpu-10min",
        SCHEDULE_WALK_SIZE,
        LIGHTER_WALK,
        "ablation-lighter",
    ),
    "compute": Walk(
        "what the compute-bound cpu-10min spends its steps on",
        "cpu-10min",
        BEFORE_COMPUTE_WALK,
        COMPUTE_WALK,
        "ablation-compute",
    ),
}
