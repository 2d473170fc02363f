"""Data-parallel training across processes started by torchrun: DDP, or FSDP2 with --fsdp.

Every rank runs the same loop on its own rows of each batch (see batching.py); gradients are
averaged across ranks by DDP / FSDP, and only rank 0 logs and writes files. NCCL carries the
collectives on CUDA, gloo on CPU. A process not started by torchrun is a world of one, and
every function here is then a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gptlab.config import TrainConfig
from gptlab.device import resolve_device
from gptlab.errors import GptlabError

TORCHRUN_HINT = "torchrun --nproc_per_node=N -m gptlab train ..."


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    """Rank 0 under torchrun, or a process on its own: the one that prints and writes."""
    return os.environ.get("RANK", "0") == "0"


def setup(cfg: TrainConfig) -> tuple[World, torch.device]:
    """Join the torchrun process group (when there is one) and pick this rank's device:
    cuda:LOCAL_RANK on GPUs, else the device cfg.device names."""
    if not launched_by_torchrun():
        if cfg.fsdp:
            raise GptlabError(
                f"--fsdp shards a model across processes started by torchrun; launch with {TORCHRUN_HINT}"
            )
        return World(), resolve_device(cfg.device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    return World(rank, world_size, local_rank, cfg.fsdp), device


def teardown(world: World) -> None:
    """Leave the process group this module joined."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


@contextlib.contextmanager
def main_first(world: World) -> Iterator[None]:
    """Run the body on rank 0 first (e.g. preparing data into a shared cache), then on the others."""
    if not world.is_main:
        barrier(world)
    yield
    if world.is_main:
        barrier(world)


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """`values` summed over ranks (the tensor itself when alone)."""
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(value: Any, world: World) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank; [value] when alone."""
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.world_size
    dist.all_gather_object(values, value)
    return values


def wrap_model(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The model ready for data-parallel training: DDP, or FSDP2 (each block sharded on its own,
    then the rest) with world.fsdp. Unchanged in a world of one."""
    if not world.distributed:
        return model
    if world.fsdp:
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, world: World, sync: bool) -> Iterator[None]:
    """Within the body, backward() averages gradients across ranks only when `sync` (the last
    micro-batch of a step): the earlier ones just accumulate locally."""
    inner = getattr(model, "_orig_mod", model)
    if not world.distributed or sync:
        if world.fsdp:
            inner.set_requires_gradient_sync(True)
        yield
    elif world.fsdp:
        inner.set_requires_gradient_sync(False)
        yield
    else:
        with inner.no_sync():
            yield


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module, plain: nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain tensors, loadable by a single process. With FSDP this
    gathers the shards (a collective: every rank must call it)."""
    if world.fsdp:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(plain, options=_full_options())
    return plain.state_dict()


def load_full_model_state(plain: nn.Module, state: dict[str, torch.Tensor], world: World) -> None:
    """Load full weights (as full_model_state returns them) into this rank's model or shards."""
    if world.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(plain, state, options=StateDictOptions(full_state_dict=True))
    else:
        plain.load_state_dict(state)


def full_optimizer_state(plain: nn.Module, optimizer: Any, world: World) -> dict[str, Any]:
    """optimizer.state_dict() of an OptimizerSet in the single-process layout (parameters by
    index). With FSDP the sharded moments are gathered first (a collective), onto rank 0 only."""
    if not world.fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    names = {id(p): name for name, p in plain.named_parameters()}
    states = {}
    for key, inner in optimizer.optimizers.items():
        by_name = get_optimizer_state_dict(plain, inner, options=_full_options())
        if not world.is_main:  # with cpu_offload only rank 0 receives the gathered state
            continue
        order = [names[id(p)] for group in inner.param_groups for p in group["params"]]
        index = {name: i for i, name in enumerate(order)}
        groups = [
            {**{k: v for k, v in group.items() if k != "params"}, "params": [index[n] for n in group["params"]]}
            for group in by_name["param_groups"]
        ]
        states[key] = {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}
    return {"optimizers": states}


def load_full_optimizer_state(plain: nn.Module, optimizer: Any, state: dict[str, Any], world: World) -> None:
    """Load what full_optimizer_state returned into this rank's optimizers (and shards)."""
    from gptlab.training.optim import load_optimizer_state

    if not world.fsdp:
        load_optimizer_state(optimizer, state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): name for name, p in plain.named_parameters()}
    saved = state.get("optimizers", {"adamw": state})
    for key, inner in optimizer.optimizers.items():
        order = [names[id(p)] for group in inner.param_groups for p in group["params"]]
        by_index = saved[key]
        by_name = {
            "state": {order[i]: s for i, s in by_index["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in by_index["param_groups"]],
        }
        settings = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
        set_optimizer_state_dict(plain, inner, by_name, options=StateDictOptions(full_state_dict=True))
        for group, kept in zip(inner.param_groups, settings):
            group.update(kept)
