"""Data parallelism on `accelerate`: the few operations the trainer needs, in one place.

One process per GPU (or per CPU process, on gloo), started by `torchrun` or `accelerate launch`.
Each rank samples and votes on its contiguous share of a step's prompts, so all N votes of a
prompt stay on one rank; the shares are then gathered, so every rank holds the whole step and
computes advantages and metrics exactly as a single process would; each rank trains on its
share, and the engine (DDP, FSDP, DeepSpeed) all-reduces the gradients. See docs/distributed.md.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, nullcontext

import torch

from ttrl.config import ConfigError
from ttrl.rollout import score


def is_main_process() -> bool:
    """Rank 0, read from the launcher's environment (usable before any process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def warn(message: str) -> None:
    """Every warning ttrl prints: one line on stderr, from rank 0 only (every rank would say the
    same); rich's live progress bar redirects stderr above itself."""
    if is_main_process():
        print(f"warning: {message}", file=sys.stderr)


def shard(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous block of n items; blocks are in rank order and differ in size by
    at most one, so concatenating them in rank order gives back 0..n-1."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def make_accelerator():
    """An Accelerator configured from the launcher's environment (torchrun / accelerate launch).

    Buffers (rotary tables, the same on every rank) are not broadcast on each forward: that
    would be a collective per forward, and ranks need not run equally many. On CPU we stay in
    float32: bf16 autocast there is slower and would change results.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = not torch.cuda.is_available()
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if cpu and asked != "no":
        warn(f"mixed precision {asked!r} ignored on CPU; training in float32")
    return Accelerator(cpu=cpu, mixed_precision="no" if cpu else None,
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


class Dist:
    """This process's place among the ranks, and the collectives the trainer uses. Without an
    Accelerator: one process, and every operation is the identity."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        self.is_main = self.rank == 0
        self.device = accelerator.device if accelerator else torch.device("cpu")
        kind = str(accelerator.distributed_type) if accelerator else "NO"
        self.deepspeed = "DEEPSPEED" in kind
        self.sharded = self.deepspeed or "FSDP" in kind
        """Parameters and/or optimizer state are split across ranks (FSDP, DeepSpeed ZeRO)."""

    def share(self, n: int, rank: int | None = None) -> range:
        return shard(n, self.rank if rank is None else rank, self.world)

    def check_batch(self, prompts_per_step: int) -> None:
        if prompts_per_step % self.world:
            raise ConfigError(f"config key 'train.prompts_per_step' = {prompts_per_step} (the prompts of a step, "
                              f"at most the number of training prompts): must be divisible by the {self.world} "
                              f"processes, so each trains on as many; use a multiple of {self.world}")

    def prepare(self, model, optimizer):
        """(model, optimizer) wrapped for the engine; the model is moved to this rank's device."""
        if self.accelerator is None:
            return model, optimizer
        if self.deepspeed:  # no DataLoader is prepared, so DeepSpeed cannot infer its micro-batch size
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                ds["train_micro_batch_size_per_gpu"] = 1
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
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    @contextmanager
    def accumulating(self, model, sync: bool):
        """Backward passes inside accumulate gradients locally; the one with `sync` (the last
        micro-batch of an optimizer step) all-reduces them, so a step costs one all-reduce."""
        if self.accelerator is None:
            yield
            return
        if self.deepspeed:  # DeepSpeed reads the boundary from accelerate's state, and steps inside backward
            self.accelerator.gradient_state._set_sync_gradients(sync)
        try:
            with nullcontext() if sync else self.accelerator.no_sync(model):
                yield
        finally:
            if self.deepspeed:
                self.accelerator.gradient_state._set_sync_gradients(True)

    def clip_grad_norm_(self, params, max_norm: float) -> float:
        if self.accelerator is None:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        return float(norm) if norm is not None else 0.0  # DeepSpeed clips inside its step and may not report

    def autocast(self):
        """Mixed precision (bf16/fp16 from the accelerate config) for forwards outside the prepared model."""
        return self.accelerator.autocast() if self.accelerator else nullcontext()

    @contextmanager
    def generation(self, model):
        """The plain model to sample from. Under ZeRO-3 and FSDP its parameters are gathered for the
        whole rollout (ranks decode different numbers of steps, so a collective per forward would
        deadlock); otherwise this is just the unwrapped model."""
        plain = self.unwrap(model)
        with self.autocast():
            if self.deepspeed and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
                try:  # TRL's helper: gather once, lift DeepSpeed's per-module hooks, put them back after
                    from trl.models import unwrap_model_for_generation
                except ImportError:
                    raise ConfigError("DeepSpeed ZeRO-3 rollouts gather the parameters with TRL's helper: "
                                      "pip install 'ttrl[trl]' (or use ZeRO-2 or FSDP)") from None
                with unwrap_model_for_generation(model, self.accelerator) as gathered:
                    yield gathered
            elif self.sharded and not self.deepspeed:
                with _fsdp_full_params(plain):
                    yield plain
            else:
                yield plain


@contextmanager
def _fsdp_full_params(module):
    """FSDP2: all-gather every sharded module once and keep it unsharded through the rollout."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        raise ConfigError("FSDP rollouts need FSDP2 (fully_shard): set fsdp_version: 2 in the accelerate config, "
                          "as configs/accelerate/fsdp.yaml does")
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield module
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def zero_loss(model, pad_id: int, temperature: float) -> torch.Tensor:
    """A loss of 0 through every parameter, for a rank out of work in a micro-batch: it still has
    to join the gradient all-reduce (and, under FSDP, as many forwards) as the others."""
    logp, _ = score(model, [[pad_id]], [[pad_id, pad_id]], temperature, pad_id)
    return logp.sum() * 0.0
