"""Several processes (torchrun) with FSDP2: sharded parameters, gradients and optimizer state.

One process stays the plain default: every helper here is a no-op when WORLD_SIZE is 1.
Invariants:
- Every rank sees the same global batch order; rank r takes the r-th slice of each global batch, so
  the loss and gradients equal the single-process ones (up to floating-point reduction order).
- Only rank 0 writes model files, logs and applies retention; each rank writes its own optimizer shard.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from shared.hf_models import tied_weight_names


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    cpu_group: Any = None
    """A gloo group for numbers the host already has (stop flag, token counts): reducing them never waits for
    the GPU, so the host keeps queueing work ahead of it. None: the default group (gloo already on the CPU)."""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs); Dist() without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else None
    return Dist(dist.get_rank(), world, local_rank, cpu_group)


def shard_model(
    root: torch.nn.Module,
    layers: list[torch.nn.Module],
    compute_dtype: torch.dtype,
    reshard_after_forward: bool,
    layers_per_unit: int,
) -> None:
    """FSDP2: one unit (one all-gather, one reduce-scatter) per `layers_per_unit` consecutive decoder layers, and
    `root` (holding the other parameters) around them. Parameters stay fp32 (the optimizer's master copy);
    compute runs in `compute_dtype`, gradients are reduced in fp32.
    Each unit's pre-forward issues the next unit's all-gather (explicit prefetch): without it the all-gather is
    issued only when the host reaches the next unit, late whenever the host is not far ahead of the GPU.
    The last unit always keeps its gathered parameters after the forward: its backward comes right after."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    units = [list(layers[i : i + layers_per_unit]) for i in range(0, len(layers), layers_per_unit)]
    for i, unit in enumerate(units):
        fully_shard(unit, mp_policy=policy, reshard_after_forward=reshard_after_forward and i < len(units) - 1)
    fully_shard(root, mp_policy=policy)
    firsts = [unit[0] for unit in units]  # the layers of a unit share its FSDP state: any one stands for it
    for here, after in zip([root, *firsts], firsts, strict=False):  # the last unit prefetches nothing
        here.set_modules_to_forward_prefetch([after])
    if reshard_after_forward:
        for before, here in itertools.pairwise(firsts):
            here.set_modules_to_backward_prefetch([before])


def all_reduce(value: float | torch.Tensor, d: Dist, op: str = "sum") -> float:
    """The sum (or max) of `value` over ranks. A host number goes through the gloo group and does not wait for the
    GPU; a GPU tensor goes through NCCL, and reading the result waits for the GPU."""
    if not d.enabled:
        return float(value)
    on_gpu = isinstance(value, torch.Tensor) and value.device.type != "cpu"
    t = value.detach().clone() if on_gpu else torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(
        t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=None if on_gpu else d.cpu_group
    )
    return float(t)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_model_state_on_rank0(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered to rank 0's CPU memory, one parameter at a time (never the
    full model on one GPU). Collective: every rank calls it; other ranks get {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if getattr(model.config, "tie_word_embeddings", False):
        for name in tied_weight_names(model):
            state.pop(name, None)  # re-tied from the config on load, as save_pretrained does
    return state


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shard of the optimizer state, as plain tensors (DTensors unwrapped)."""
    state = optimizer.state_dict()
    return {
        "state": {
            k: {n: (v.to_local() if hasattr(v, "to_local") else v) for n, v in s.items()}
            for k, s in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Inverse of local_optimizer_state: wrap each shard back into a DTensor laid out like its parameter."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for key, entry in saved["state"].items():
        param = params[int(key)]
        state[key] = {
            name: DTensor.from_local(v.to(param.device), param.device_mesh, param.placements, run_check=False)
            if isinstance(param, DTensor) and v.dim() > 0
            else v
            for name, v in entry.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def from_main(value: Any, d: Dist) -> Any:
    """Rank 0's `value` on every rank (pickled); `value` itself with one process."""
    if not d.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    """Leave together: a rank that tears its process group down while a peer still uses it can abort."""
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class StopFlag:
    """Ctrl-C and SIGTERM ask the run to stop; every rank stops at the same step boundary.

    A signal only sets a flag. `should_stop()`, called once per step, all-reduces it (max): a request on any
    rank is seen by all ranks at the same step, so they leave the loop together, finish the pending
    checkpoint (a collective with several ranks) and exit 0, and none waits in a collective the others left.
    Under torchrun a terminal's Ctrl-C reaches each rank twice (directly, and forwarded by the agent), so a
    repeat within FORCE_AFTER_S is the same request; a later one interrupts at once (KeyboardInterrupt)."""

    FORCE_AFTER_S = 3.0

    def __init__(self, d: Dist):
        self.d = d
        self.requested_at: float | None = None
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested_at is not None and now - self.requested_at > self.FORCE_AFTER_S:
            raise KeyboardInterrupt
        self.requested_at = self.requested_at or now

    def should_stop(self) -> bool:
        return all_reduce(1.0 if self.requested_at is not None else 0.0, self.d, op="max") > 0
