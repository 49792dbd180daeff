"""DDP against FSDP2 on CPU: seconds per optimizer step, per-rank peak RSS and the bytes of
parameters + AdamW state each rank holds, for 1 process and for 2 processes of each engine.

A model of SmolLM2-135M's shape (the embedded model's config, random weights); each rank trains
on its share of one global batch of random token ids (teacher-forced log-probs, a policy-gradient
loss, backward, clip, AdamW), through ttrl's own `Dist` as `ttrl train` does. Every arm runs in
fresh processes under torchrun (a fresh process group), so its peak RSS is its own.

    .venv/bin/python benchmarks/fsdp.py                      # the record: 30 layers, 3 timed steps
    .venv/bin/python benchmarks/fsdp.py --layers 2 --steps 1 --length 8   # smoke run, seconds

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args) -> None:
    """One rank of one arm: prints its figures as one JSON line (rank 0 prints every rank's)."""
    import torch

    from ttrl.config import ModelConfig
    from ttrl.distributed import Dist, make_accelerator
    from ttrl.fsdp import local_bytes
    from ttrl.losses import policy_loss
    from ttrl.models import load_model
    from ttrl.scoring import score

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(make_accelerator() if world > 1 else None, args.engine)
    model, tok = load_model(ModelConfig(architecture={"num_hidden_layers": args.layers}), seed=0)
    model = dist.shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    wrapped, optimizer = dist.prepare(model, optimizer)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rows = [torch.randint(0, vocab, (args.length,), generator=g).tolist() for _ in range(args.batch)]
    mine = rows[dist.share(len(rows)).start: dist.share(len(rows)).stop]
    prompt = torch.randint(0, vocab, (args.prompt,), generator=g).tolist()
    old = torch.full((len(mine), args.length), -10.0)
    adv = torch.randn(len(mine), generator=g)
    times = []
    for i in range(args.steps + 1):  # the first step warms up (allocations, lazy inits)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logp, mask = score(wrapped, [prompt], mine, 1.0, tok.pad_token_id, group_size=len(mine))
        loss, _ = policy_loss(logp, old, adv, mask, 0.2, float(args.batch * args.length))
        dist.backward(loss * dist.world)
        dist.clip_grad_norm_([p for p in wrapped.parameters()], 1.0)
        optimizer.step()
        dist.barrier()
        if i:
            times.append(time.perf_counter() - t0)
    mine_out = {"rank": dist.rank, "seconds_per_step": sum(times) / len(times),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                **{f"{k}_bytes": v for k, v in local_bytes(model, optimizer).items()}}
    everyone = dist.gather([mine_out])
    if dist.is_main:
        print(json.dumps(everyone))
    dist.close()


def run_arm(engine: str, procs: int, args) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    flags = ["--worker", "--engine", engine, "--layers", str(args.layers), "--steps", str(args.steps),
             "--batch", str(args.batch), "--length", str(args.length), "--prompt", str(args.prompt)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    proc = subprocess.run(launcher + [__file__] + flags, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{engine} x{procs} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per arm (after one warm-up)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step, over all ranks")
    p.add_argument("--length", type=int, default=128, help="answer tokens per sequence")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (one prompt, shared)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", default="ddp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    arms = {}
    for name, engine, procs in [("one_process", "ddp", 1), ("ddp_2", "ddp", 2), ("fsdp_2", "fsdp", 2)]:
        ranks = run_arm(engine, procs, args)
        arms[name] = {"processes": procs, "seconds_per_step": round(max(r["seconds_per_step"] for r in ranks), 3),
                      "peak_rss_mb_per_rank": [round(r["peak_rss_mb"]) for r in ranks],
                      "params_mb_per_rank": [round(r["params_bytes"] / 2**20, 1) for r in ranks],
                      "optimizer_mb_per_rank": [round(r["optimizer_bytes"] / 2**20, 1) for r in ranks]}
        print(f"{name:12s} {json.dumps(arms[name])}", file=sys.stderr)
    state = lambda a: arms[a]["params_mb_per_rank"][0] + arms[a]["optimizer_mb_per_rank"][0]  # noqa: E731
    print(json.dumps({"benchmark": "fsdp", "model": f"SmolLM2-135M shape, {args.layers} layers, random weights",
                      "batch": args.batch, "length": args.length, "threads_per_process": args.threads,
                      "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "arms": arms,
                      "fsdp_state_share_of_ddp": round(state("fsdp_2") / state("ddp_2"), 3)}))


if __name__ == "__main__":
    main()
