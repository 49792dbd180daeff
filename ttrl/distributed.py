"""Data parallelism on `accelerate`: the few operations the trainer needs, in one place.

One process per GPU (or per CPU process, on gloo), started by `torchrun` or `accelerate launch`.
Each rank samples and votes on its contiguous share of a step's prompts, so all N votes of a
prompt stay on one rank; the shares are then gathered, so every rank holds the whole step and
computes advantages and metrics exactly as a single process would; each rank trains on its
share, and the engine all-reduces the gradients: accelerate's DDP, or (`train.parallel=fsdp`)
PyTorch's FSDP2 applied by ttrl itself (ttrl.fsdp). See docs/distributed.md.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch

from ttrl.config import ConfigError
from ttrl.console import warn


def shard(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous block of n items; blocks are in rank order and differ in size by
    at most one, so concatenating them in rank order gives back 0..n-1."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


MIXED = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}
"""model.dtype -> accelerate's mixed_precision."""


def make_accelerator(dtype: str = "float32"):
    """An Accelerator configured from the launcher's environment (torchrun / accelerate launch)
    and from model.dtype, the dtype forwards compute in: bf16 or fp16 is mixed precision over
    float32 trained weights (`ttrl.models.trained_weights`), as accelerate's `mixed_precision` or
    FSDP2's MixedPrecisionPolicy run it. A launch that asks for another precision than
    model.dtype is refused. On CPU bf16 runs (AVX-512 BF16 makes it the faster; benchmarks/README.md,
    update_dtype.py); fp16 does not, and the run stays in float32.

    Buffers (rotary tables, the same on every rank) are not broadcast on each forward: that
    would be a collective per forward, and ranks need not run equally many.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = not torch.cuda.is_available()
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    wanted = MIXED[dtype]
    if "no" not in (asked, wanted) and asked != wanted:
        raise ConfigError(f"config key 'model.dtype' = {dtype!r} computes in {wanted}, but this launch asks for "
                          f"mixed precision {asked!r}: set model.dtype to match the accelerate config "
                          f"(or drop mixed_precision from it)", "model.dtype")
    mixed = wanted if wanted != "no" else asked
    if cpu and mixed == "fp16":
        warn("fp16 is not run on CPU; training in float32 (model.dtype=bfloat16 computes in bf16 there)")
        mixed = "no"
    _forget_precision(mixed)
    return Accelerator(cpu=cpu, mixed_precision=mixed,
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


def _forget_precision(mixed: str) -> None:
    """accelerate keeps one precision per process: a second run in the same process (a notebook,
    the tests) with another model.dtype starts from a fresh state instead of failing."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:
        AcceleratorState._reset_state()


class Dist:
    """This process's place among the ranks, and the collectives the trainer uses. Without an
    Accelerator: one process, and every operation is the identity. `parallel`: train.parallel."""

    def __init__(self, accelerator=None, parallel: str = "ddp"):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        self.is_main = self.rank == 0
        self.device = accelerator.device if accelerator else torch.device("cpu")
        kind = str(accelerator.distributed_type) if accelerator else "NO"
        if "FSDP" in kind or "DEEPSPEED" in kind:
            engine = "FSDP" if "FSDP" in kind else "DeepSpeed"
            raise ConfigError(f"this launch asks accelerate for {engine}, which ttrl "
                              "does not use: launch with a DDP accelerate config (configs/accelerate/multi_gpu.yaml) "
                              "or torchrun, and set train.parallel=fsdp to shard the model (docs/distributed.md)")
        self.parallel = parallel
        self.sharded = parallel == "fsdp" and self.world > 1
        """Parameters, gradients and optimizer state are split across ranks (FSDP2, ttrl.fsdp)."""
        if self.sharded and getattr(accelerator, "mixed_precision", "no") == "fp16":
            raise ConfigError("config key 'train.parallel' = 'fsdp': FSDP trains in float32 or bf16 (bf16 parameters, "
                              "float32 gradient reduction), not with fp16 loss scaling; use mixed_precision bf16 or "
                              "no in the accelerate config", "train.parallel")

    def share(self, n: int, rank: int | None = None) -> range:
        return shard(n, self.rank if rank is None else rank, self.world)

    def check_batch(self, prompts_per_step: int) -> None:
        if prompts_per_step % self.world:
            raise ConfigError(f"config key 'train.prompts_per_step' = {prompts_per_step} (the prompts of a step, "
                              f"at most the number of training prompts): must be divisible by the {self.world} "
                              f"processes, so each trains on as many; use a multiple of {self.world}")

    def shard(self, model):
        """Under FSDP `model` sharded in place (ttrl.fsdp.shard_model); build its optimizer after this."""
        if not self.sharded:
            return model
        from ttrl.fsdp import shard_model

        bf16 = self.device.type == "cuda" and self.accelerator.mixed_precision == "bf16"  # gloo: float32
        return shard_model(model, self.device, self.world, bf16=bf16)

    def prepare(self, model, optimizer):
        """(model, optimizer) wrapped for the engine (DDP); the model is moved to this rank's device.
        A model sharded by `shard` is its own engine and is returned as it is."""
        if self.accelerator is None or self.sharded:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model) if self.accelerator else model

    # --- collectives (no-ops in one process) ----------------------------------------------------

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def max(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def all_true(self, flag: bool) -> bool:
        return flag if self.world == 1 else self.max(0 if flag else 1) == 0

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """Wait for every rank, then end the process group (a rank leaving first can abort gloo)."""
        if self.world > 1:
            self.accelerator.wait_for_everyone()
            self.accelerator.end_training()

    # --- the backward pass --------------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None or self.sharded:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    @contextmanager
    def accumulating(self, model, sync: bool):
        """Backward passes inside accumulate gradients locally; the one with `sync` (the last
        micro-batch of an optimizer step) all-reduces them, so a step costs one all-reduce."""
        if self.accelerator is None:
            yield
        elif self.sharded:  # FSDP2: unsharded gradients accumulate until the reduce-scatter of the last
            model.set_requires_gradient_sync(sync)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        else:
            with nullcontext() if sync else self.accelerator.no_sync(model):
                yield

    def clip_grad_norm_(self, params, max_norm: float) -> float:
        """Clip to the norm of the whole gradient (under FSDP, of every rank's shards together)."""
        if self.accelerator is None or self.sharded:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    def autocast(self):
        """Mixed precision (bf16/fp16 from the accelerate config) for forwards outside the prepared model."""
        return self.accelerator.autocast() if self.accelerator else nullcontext()

    @contextmanager
    def generation(self, model):
        """The plain model to sample from. Under FSDP its parameters are gathered for the whole
        rollout (ranks decode different numbers of steps, so a collective per forward would
        deadlock); otherwise this is just the unwrapped model."""
        plain = self.unwrap(model)
        with self.autocast(), self.gathered(plain):
            yield plain

    def gathered(self, model):
        """Under FSDP, `model`'s parameters gathered whole until the block ends (ttrl.fsdp.full_params):
        for passes whose number differs between ranks. Otherwise nothing."""
        if not self.sharded:
            return nullcontext(model)
        from ttrl.fsdp import full_params

        return full_params(model)
