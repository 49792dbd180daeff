"""FSDP2 as ttrl applies it (`train.parallel=fsdp`): PyTorch's own `fully_shard` on each decoder
layer and then the whole model, and sharded checkpoints written with torch.distributed.checkpoint
(DCP). Each rank holds 1/world of the parameters, gradients and optimizer state; the same code
runs on gloo (CPU) and NCCL (GPU), under torchrun and accelerate launch.

A sharded checkpoint, RUN_DIR/checkpoints/step-NNNNNNNN/:
  shards/            DCP: one `__<rank>_0.distcp` per rank (its shard of the weights and optimizer
                     state, with PPO the critic's too) and `.metadata` (rank 0, once all are written)
  rng-<rank>.pt      that rank's Python/NumPy/torch RNG states
  trainer.pt         the scheduler's state
  state.json         the run state (evals, counters, config), written last
  SHA256SUMS         every file above, hashed by the rank that wrote it
Every rank writes into one temporary directory; after a barrier rank 0 adds the rest and renames
it into place, so a checkpoint exists only once every shard and the metadata are complete. DCP
reshards on load, so a run may resume on another number of processes.
"""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from ttrl.checkpoint import (CHECKPOINTS, CHECKSUMS, STATE, CheckpointError, _fsync, list_checkpoints, publish,
                             read_checksums, rng_states, set_rng_states, sha256_file)
from ttrl.console import warn

SHARDS, SCHEDULER = "shards", "trainer.pt"


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks (the classes its Hugging Face `_no_split_modules` names), each
    an FSDP unit: one all-gather per layer keeps at most a layer's full parameters in memory."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard by")
    return layers


def shard_model(model, device: torch.device, world: int, bf16: bool = False):
    """`model` sharded in place over `world` ranks (per decoder layer, then the root, which holds the
    embeddings and head). `bf16`: parameters gathered in bf16, gradients reduced in float32 (only
    with mixed precision asked for on CUDA). Build the optimizer after this: the parameters are
    replaced by this rank's shards (DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@contextmanager
def full_params(module):
    """All-gather every FSDP unit of `module` once and keep it whole until the block ends: ranks
    that sample or score different numbers of batches then need no collective per forward."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield module
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def local_bytes(model, optimizer=None) -> dict[str, int]:
    """Bytes this rank holds of the parameters and of the optimizer state (its shards under FSDP)."""
    size = lambda t: local(t).numel() * local(t).element_size()  # noqa: E731
    params = sum(size(p) for p in model.parameters())
    state = sum(size(v) for s in (optimizer.state.values() if optimizer else []) for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)
    return {"params": params, "optimizer": state}


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, gathered from every rank (a collective); rank 0 saves them.
    A weight tied to an earlier one (the LM head to the embeddings) is left out, as save_pretrained
    leaves it out of an unsharded model, so model/ reads as any Hugging Face directory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            full.pop(name, None)
        seen.add(id(t))
    return full


# --- sharded checkpoints --------------------------------------------------------------------------

_OPTIONS = dict(ignore_frozen_params=True)  # LoRA: only the adapter is trained (the base is rebuilt on load)


def _state(model, optimizer, critic: tuple | None) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(**_OPTIONS)
    out = dict(zip(("model", "optimizer"), get_state_dict(model, optimizer, options=options)))
    if critic:
        out.update(zip(("critic", "critic_optimizer"), get_state_dict(*critic, options=options)))
    return out


@contextmanager
def _one_process_is_fine():
    """Silence DCP's warning that it runs without a process group: in one process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def save_sharded(run_dir: str | Path, step: int, model, optimizer, scheduler, state: dict, dist,
                 keep: int = 2, critic: tuple | None = None) -> Path:
    """Checkpoint `step`, each rank writing its shards (every rank calls this). `critic`: PPO's
    (value model, its optimizer)."""
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}"  # one name on every rank
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    with _one_process_is_fine():
        dcp.save(_state(model, optimizer, critic), checkpoint_id=tmp / SHARDS, no_dist=dist.world == 1)
    plain, tensors = rng_states()
    mine = [tmp / f"rng-{dist.rank}.pt"]
    torch.save({**plain, **tensors}, mine[0])
    _fsync(mine[0])
    mine += sorted((tmp / SHARDS).glob(f"__{dist.rank}_*.distcp"))
    parts = dist.gather([{str(p.relative_to(tmp)): sha256_file(p) for p in mine}])  # each rank hashes its own
    sums = {name: digest for part in parts for name, digest in part.items()}
    if dist.is_main:  # every shard is written (DCP wrote .metadata after all of them): complete the checkpoint
        torch.save({"scheduler": scheduler.state_dict()}, tmp / SCHEDULER)
        (tmp / STATE).write_text(json.dumps({**state, "step": step, "world": dist.world, "format": "dcp",
                                             "critic": bool(critic)}, default=str), encoding="utf-8")
        for name in (f"{SHARDS}/.metadata", SCHEDULER, STATE):
            _fsync(tmp / name)
            sums[name] = sha256_file(tmp / name)
        (tmp / CHECKSUMS).write_text("".join(f"{d}  {n}\n" for n, d in sorted(sums.items())), encoding="utf-8")
        _fsync(tmp / CHECKSUMS)
        _fsync(tmp / SHARDS)
        _fsync(tmp)
        publish(run_dir, tmp, final, keep)
    dist.barrier()
    return final


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / SHARDS).is_dir()


def _complete(path: Path, dist) -> str | None:
    """Why checkpoint `path` cannot be used (None: every file is there and matches SHA256SUMS).
    The files are hashed by the ranks in turn; every rank gets the same answer."""
    try:
        sums = read_checksums(path)
        if sums is None:
            raise ValueError(f"{CHECKSUMS} is missing")
        needed = {f"{SHARDS}/.metadata", SCHEDULER, STATE}
        if not needed <= set(sums):
            raise ValueError(f"{CHECKSUMS} does not list {', '.join(sorted(needed - set(sums)))}")
        names = sorted(sums)
        bad = [n for n in names[dist.rank::dist.world] if not (path / n).is_file() or sha256_file(path / n) != sums[n]]
        problem = f"{', '.join(bad)} missing or not matching {CHECKSUMS}" if bad else None
    except Exception as e:  # noqa: BLE001 - any damage means: fall back to the one before
        problem = f"{type(e).__name__}: {e}"
    problems = [p for p in dist.gather([problem]) if p]
    return "; ".join(problems) or None


def load_sharded(run_dir: str | Path, model, optimizer, scheduler, dist, critic: tuple | None = None,
                 upto: int | None = None) -> dict | None:
    """Restore the newest complete sharded checkpoint (of step `upto` or before, when given; on any
    number of processes: DCP reshards); its state, or None when there is none. A damaged one (a
    shard or the metadata missing or not matching its checksum) is skipped with a warning."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    for path in reversed(list_checkpoints(run_dir, upto)):
        if not is_sharded_checkpoint(path):
            raise CheckpointError(f"checkpoint {path} was written with train.parallel=ddp (whole weights); resume "
                                  "with train.parallel=ddp")
        problem = _complete(path, dist)
        if problem:
            if dist.is_main:
                warn(f"checkpoint {path} is damaged ({problem}); trying the one before")
            continue
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        if critic and not state.get("critic"):
            raise CheckpointError(f"checkpoint {path} has no critic: it was written by a run without "
                                  "algorithm.advantage=ppo; resume with the original algorithm.advantage")
        target = _state(model, optimizer, critic)
        try:
            with _one_process_is_fine():
                dcp.load(target, checkpoint_id=path / SHARDS, no_dist=dist.world == 1)
        except Exception as e:  # noqa: BLE001 - another model's shapes or keys: one clear line
            raise CheckpointError(f"checkpoint {path} does not fit the model this config builds "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); resume with the "
                                  "model.* settings of the original run") from None
        # Not strict: the frozen weights (LoRA's base) are not in the checkpoint; every trained one is
        # (dcp.load fails on any key of `target` it lacks).
        options = StateDictOptions(**_OPTIONS, strict=False)
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"],
                       options=options)
        if critic:
            set_state_dict(*critic, model_state_dict=target["critic"], optim_state_dict=target["critic_optimizer"],
                           options=options)
        scheduler.load_state_dict(torch.load(path / SCHEDULER, map_location="cpu", weights_only=True)["scheduler"])
        rng = path / f"rng-{dist.rank}.pt"  # on more processes than wrote it, the new ranks take rank 0's
        rng = torch.load(rng if rng.exists() else path / "rng-0.pt", map_location="cpu", weights_only=True)
        set_rng_states({k: rng[k] for k in ("python", "numpy")}, {k: rng[k] for k in ("torch", "cuda") if k in rng})
        for key in ("world", "format", "critic"):
            state.pop(key, None)
        return {**state, "path": str(path)}
    return None
