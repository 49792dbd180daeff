"""Crash-safe checkpoints: RUN_DIR/checkpoints/step-NNNNNNNN/ holds everything a resumed run
needs to continue bit for bit — trained weights (all of them, or the LoRA adapter's), optimizer
and scheduler state, the Python/NumPy/torch RNG states, the eval
history and how many metrics rows were logged; with PPO also the critic's trained weights
(`critic.safetensors`) and its optimizer state (in `trainer.pt`).

A checkpoint is written into a temporary directory, fsynced, then renamed into place, so a crash
at any moment leaves either the whole new checkpoint or none of it beside the previous ones.
`state.json` is written last; a directory without it is never used. `SHA256SUMS` (the format of
`sha256sum -c`) holds a checksum of each file, so bytes damaged later on disk are caught on load
and the previous checkpoint is used instead; checkpoints from before checksums load unverified.
Under train.parallel=fsdp every rank writes its shard instead (ttrl.fsdp, same directory scheme).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ttrl.console import warn


CHECKPOINTS = "checkpoints"
WEIGHTS, TRAINER, STATE = "weights.safetensors", "trainer.pt", "state.json"
CRITIC = "critic.safetensors"
CHECKSUMS = "SHA256SUMS"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks (hashlib releases the GIL on them, so several
    files hash in parallel threads)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def read_checksums(path: Path) -> dict[str, str] | None:
    """{file name: sha256} from a checkpoint's SHA256SUMS; None for a checkpoint written before
    checksums existed. A malformed file raises ValueError (the checkpoint counts as damaged)."""
    if not (path / CHECKSUMS).exists():
        return None
    sums = {}
    for n, line in enumerate((path / CHECKSUMS).read_text(encoding="utf-8").splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{path / CHECKSUMS}:{n} is not '<sha256>  <file>'")
        sums[name] = digest
    return sums


def trained_weights(model) -> dict[str, torch.Tensor]:
    """The parameters the optimizer updates: the whole model, or only a LoRA adapter."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def rng_states() -> tuple[dict, dict]:
    """(JSON-able, tensor) RNG states of Python, NumPy and torch (CPU and CUDA)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return plain, tensors


def set_rng_states(plain: dict, tensors: dict) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def list_checkpoints(run_dir: str | Path, upto: int | None = None) -> list[Path]:
    """Complete checkpoints (with state.json), oldest first; only those of step `upto` or before, when given."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE).is_file() and p.name[5:].isdigit()]
    return sorted((p for p in found if upto is None or step_of(p) <= upto), key=step_of)


def step_of(checkpoint: Path) -> int:
    """The step of checkpoint directory `step-N`."""
    return int(checkpoint.name[5:])


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, scheduler, state: dict,
                    keep: int = 2, critic: tuple | None = None) -> Path:
    """Write checkpoint `step` atomically and keep only the latest `keep`. `state` is JSON-able
    (evals, counters, config); tensors and RNG states are gathered here. `critic`: PPO's
    (value model, its optimizer), saved beside the policy. On a full disk (OSError ENOSPC)
    nothing of it is left behind and the previous checkpoints are untouched."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write(tmp, model, optimizer, scheduler, {**state, "step": step}, critic)
    except BaseException as e:  # a full disk, a second Ctrl-C: a half-written checkpoint must not stay
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError) and os.strerror(errno.ENOSPC) in str(e):  # safetensors' own error type
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from e
        raise
    return publish(run_dir, tmp, final, keep)


def publish(run_dir: str | Path, tmp: Path, final: Path, keep: int) -> Path:
    """Rename the complete checkpoint `tmp` to `final` and keep only the latest `keep`."""
    root, step = final.parent, step_of(final)
    if final.exists():  # the same step saved again (e.g. stopped right after resuming): swap it out
        _retire(final)
    os.rename(tmp, final)
    _fsync(root)
    for later in list_checkpoints(run_dir):  # steps past this one: the abandoned future of a run resumed
        if step_of(later) > step:          # from an earlier checkpoint (the later one was damaged)
            _retire(later)
    for old in list_checkpoints(run_dir)[:-keep]:
        _retire(old)
    for stale in list(root.glob(".tmp-*")) + list(root.glob(".old-*")):  # left by an earlier crash
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _write(tmp: Path, model, optimizer, scheduler, state: dict, critic: tuple | None) -> None:
    """The checkpoint's files into `tmp`, each hashed and fsynced."""
    from safetensors.torch import save_file

    plain, tensors = rng_states()
    files = (WEIGHTS, TRAINER, STATE) + ((CRITIC,) if critic else ())
    # Each file is hashed in a thread as soon as it is written (read back from the page cache),
    # overlapping the next write and the fsyncs: see docs/report.md for what checksums cost.
    with ThreadPoolExecutor(3) as pool:
        save_file(trained_weights(model), tmp / WEIGHTS)
        sums = {WEIGHTS: pool.submit(sha256_file, tmp / WEIGHTS)}
        if critic:
            save_file(trained_weights(critic[0]), tmp / CRITIC)
            sums[CRITIC] = pool.submit(sha256_file, tmp / CRITIC)
        # Through a Python file: a full disk is then an OSError (ENOSPC), not torch's "unexpected pos".
        with open(tmp / TRAINER, "wb") as f:
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": tensors,
                        **({"critic_optimizer": critic[1].state_dict()} if critic else {})}, f)
        sums[TRAINER] = pool.submit(sha256_file, tmp / TRAINER)
        (tmp / STATE).write_text(json.dumps({**state, "rng": plain, "checksums": CHECKSUMS,
                                             **({"critic": CRITIC} if critic else {})},
                                            default=str), encoding="utf-8")
        sums[STATE] = pool.submit(sha256_file, tmp / STATE)
        for name in files:
            _fsync(tmp / name)
        (tmp / CHECKSUMS).write_text("".join(f"{sums[n].result()}  {n}\n" for n in files), encoding="utf-8")
    _fsync(tmp / CHECKSUMS)
    _fsync(tmp)


def _retire(path: Path) -> None:
    """Rename away, then delete: a crash mid-delete never leaves a half checkpoint under a valid name."""
    gone = path.with_name(f".old-{path.name}-{os.getpid()}")
    os.rename(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def _copy_weights(path: Path, model, weights: dict[str, torch.Tensor]) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params) or any(weights[k].shape != params[k].shape for k in weights):
        raise CheckpointError(f"checkpoint {path} holds weights of a different model (or LoRA setup) than "
                              "this config builds; resume with the model.* settings of the original run")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


class DamagedCheckpoint(ValueError):
    """A file of a checkpoint does not match its recorded checksum."""


def _read(path: Path) -> tuple[dict, dict, dict, dict | None]:
    """state, weights, trainer state and critic weights (None without) of one checkpoint, verified
    against SHA256SUMS when it has one (hashed in threads while the files load, so verifying costs
    little extra time)."""
    from safetensors.torch import load_file

    expected = read_checksums(path)
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    if expected is None and state.get("checksums"):  # written with checksums, but the file is gone
        raise DamagedCheckpoint(f"{CHECKSUMS} is missing")
    with ThreadPoolExecutor(3) as pool:
        actual = {name: pool.submit(sha256_file, path / name) for name in expected or {}}
        weights = load_file(path / WEIGHTS)
        critic = load_file(path / CRITIC) if state.get("critic") else None
        trainer = torch.load(path / TRAINER, map_location="cpu", weights_only=True)
        bad = [name for name, digest in (expected or {}).items() if actual[name].result() != digest]
    files = {WEIGHTS, TRAINER, STATE} | ({CRITIC} if critic is not None else set())
    if bad or (expected is not None and not files <= set(expected)):
        raise DamagedCheckpoint(f"{', '.join(bad) or CHECKSUMS} does not match its checksum in {CHECKSUMS}"
                                if bad else f"{CHECKSUMS} does not list every file")
    return state, weights, trainer, critic


def load_checkpoint(run_dir: str | Path, model, optimizer, scheduler, critic: tuple | None = None,
                    upto: int | None = None) -> dict | None:
    """Restore the newest readable checkpoint (of step `upto` or before, when given) into the given
    objects and the global RNGs; return its `state` (None when there is none). A damaged checkpoint
    is skipped with a warning. `critic`: PPO's (value model, its optimizer), restored too; a
    checkpoint without one is refused (one with a critic loads into a run without: the critic is
    left out)."""
    for path in reversed(list_checkpoints(run_dir, upto)):
        if (path / "shards").is_dir():
            raise CheckpointError(f"checkpoint {path} was written with train.parallel=fsdp (sharded); resume with "
                                  "train.parallel=fsdp")
        try:
            state, weights, trainer, critic_weights = _read(path)
        except Exception as e:  # noqa: BLE001 - any damage means: fall back to the one before
            warn(f"checkpoint {path} is damaged ({type(e).__name__}: {e}); trying the one before")
            continue
        if critic and critic_weights is None:
            raise CheckpointError(f"checkpoint {path} has no critic: it was written by a run without "
                                  "algorithm.advantage=ppo; resume with the original algorithm.advantage")
        _copy_weights(path, model, weights)
        if critic:
            _copy_weights(path, critic[0], critic_weights)
            critic[1].load_state_dict(trainer["critic_optimizer"])
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        set_rng_states(state.pop("rng"), trainer["rng"])
        state.pop("checksums", None)
        state.pop("critic", None)
        return {**state, "path": str(path)}
    return None


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is one checkpoint directory (RUN_DIR/checkpoints/step-N) written by ttrl."""
    path = Path(path).expanduser()
    return (path / STATE).is_file() and (path / WEIGHTS).is_file()


def checkpoint_config(path: str | Path) -> dict:
    """The settings (config.json's content) of the run that wrote checkpoint `path`."""
    file = Path(path).expanduser() / STATE
    try:
        config = json.loads(file.read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{file} is not a readable checkpoint state ({e}); pick another checkpoint") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} holds no run settings (config); pick another checkpoint")
    return config


def load_policy(path: str | Path, model) -> None:
    """Copy checkpoint `path`'s trained weights (all of them, or the LoRA adapter's) into `model`,
    built as the run built it; checked against SHA256SUMS when it has one. Reads no optimizer state."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    expected = read_checksums(path) or {}
    if WEIGHTS in expected and sha256_file(path / WEIGHTS) != expected[WEIGHTS]:
        raise CheckpointError(f"{path / WEIGHTS} does not match its checksum in {CHECKSUMS} (damaged on disk); "
                              "pick another checkpoint")
    _copy_weights(path, model, load_file(path / WEIGHTS))
