"""The paper's training step on one GPU, phase by phase: a model of Qwen2.5-1.5B's or -7B's shape
(random weights, bf16), 8 prompts x N=64 votes sampled to 3,072 new tokens each (end-of-sequence
ignored: every answer runs to the limit, the worst case), then the trainer's update
(ttrl.update.update) on M=32 samples of each prompt: teacher-forced log-probs, GRPO loss and
backward in micro-batches of `--micro-batch` samples (a prompt's M samples split over several),
with activation checkpointing and chunked log-probs. The optimizer is plain SGD at lr 0 (AdamW's
state for a full 7B would not fit 80 GB besides weights and gradients; use --lora-rank for that).

    python benchmarks/gpu_step.py                       # qwen1.5b then qwen7b, each in a fresh process
    python benchmarks/gpu_step.py --arch tiny --device cpu --prompts 2 --votes 4 --train-samples 2 \\
        --new-tokens 8 --micro-batch 1                   # CPU smoke run (seconds)

Per phase (build, rollout, update): seconds, tokens/s and peak memory (torch.cuda.max_memory_allocated
since the phase began; peak RSS on CPU), beside `ttrl plan`'s prediction of that peak ("plan GB"), so
the first GPU this runs on checks the planner too. A failing phase is reported with its error and the later
phases are skipped; the last line is always one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
import traceback

from _child import ChildFailed, in_child
from _shapes import model_dir

TARGET_GB = {"qwen1.5b": 40, "qwen7b": 80}
"""Issue 16's targets for the whole step's peak GPU memory."""


def _sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _phase(name, device, figures, fn):
    """Run fn() as phase `name`; record seconds and peak memory, or the error. Returns fn's result."""
    import torch

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        out = fn()
        _sync(device)
    except Exception as e:  # torch.OutOfMemoryError included: report it, keep the JSON line
        first = (str(e).strip().splitlines() or [""])[0][:400]
        figures[name] = {"error": f"{type(e).__name__}: {first}", "seconds": round(time.perf_counter() - t0, 2)}
        traceback.print_exc()
        if cuda:
            torch.cuda.empty_cache()
        return None
    figures[name] = {"seconds": round(time.perf_counter() - t0, 2)}
    if cuda:
        figures[name]["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        figures[name]["allocated_after_gb"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    else:
        figures[name]["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


def predicted(args, model_cfg) -> dict:
    """ttrl.plan's prediction (GB) of each phase's peak as this benchmark runs it: no AdamW state
    (it steps SGD), no gradients yet in the first rollout, no evaluation or last-good copy."""
    import torch

    from ttrl.config import Config
    from ttrl.plan import GB, plan

    cfg = Config(model=model_cfg)
    cfg.rollout.n_votes, cfg.rollout.max_new_tokens = args.votes, args.new_tokens
    cfg.rollout.max_batch_rows, cfg.rollout.memory_fraction = args.max_batch_rows, args.memory_fraction
    cfg.reward.n_train_samples, cfg.train.prompts_per_step = args.train_samples, args.prompts
    cfg.algorithm.micro_batch_size, cfg.algorithm.micro_batch_tokens = args.micro_batch, args.micro_batch_tokens
    cfg.algorithm.logprob_chunk_mb, cfg.algorithm.gradient_checkpointing = args.logprob_chunk_mb, args.checkpointing
    cfg.eval.before = False
    cuda = torch.device(args.device).type == "cuda"
    card = args.budget_gb or (torch.cuda.get_device_properties(args.device).total_memory / GB if cuda else None)
    try:
        p = plan(cfg, 1, card, prompt_tokens=PROMPT_TOKENS, device="cuda" if cuda else "cpu", suggest=False)
    except Exception as e:  # the benchmark measures the trainer; a planner failure must not stop it
        return {"error": f"{type(e).__name__}: {e}"}
    absent = lambda phase, *items: sum(p.phases[phase].get(k, 0) for k in items)  # noqa: E731
    host = ("AdamW state", "last good weights (CPU copy)")
    return {"rollout": round((p.peak("rollout") - absent("rollout", "gradients", *host)) / GB, 2),
            "update": round((p.peak("update") - absent("update", *host)) / GB, 2),
            "rollout_rows": p.sizes["rollout"]["rows"], "micro_batch_rows": p.sizes["update"]["micro_batch_rows"]}


PROMPT_TOKENS = 48
"""Prompt length the plan assumes here: the arithmetic prompts in SmolLM2's chat template are ~40 tokens."""


def run_step(args, queue):
    import torch

    from ttrl.config import ArithmeticConfig, Config, ModelConfig
    from ttrl.data import arithmetic_problems
    from ttrl.data import encode_prompts
    from ttrl.models import load_model, set_gradient_checkpointing
    from ttrl.rollout import Sampling, generate
    from ttrl.train_batch import TrainBatch
    from ttrl.update import Policy
    from ttrl.update import update as trainer_update

    torch.manual_seed(0)
    figures = {"arch": args.arch}
    dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"
    try:
        with tempfile.TemporaryDirectory() as root:
            name, arch = model_dir(args.arch, root)
            cfg = ModelConfig(name=name, architecture=arch, dtype=dtype, lora_rank=args.lora_rank)

            figures["plan"] = predicted(args, cfg)  # from the config directory, before any weight exists

            def build():
                model, tok = load_model(cfg, seed=0, device=args.device)
                figures["gradient_checkpointing"] = set_gradient_checkpointing(model, args.checkpointing, args.device)
                generate(model, tok, [[1, 2, 3]], Sampling(n=2, max_new_tokens=4))  # warm-up: kernels, allocator
                return model, tok
            built = _phase("build", args.device, figures, build)
        if built is None:
            return
        model, tok = built
        figures["params"] = sum(p.numel() for p in model.parameters())
        problems = arithmetic_problems(ArithmeticConfig(n=args.prompts, seed=1))
        ids = encode_prompts(tok, [f"{p.prompt}\nPlease reason step by step, and put your final answer within "
                                   "\\boxed{}." for p in problems])
        s = Sampling(n=args.votes, temperature=1.0, max_new_tokens=args.new_tokens, ignore_eos=True,
                     max_batch_rows=args.max_batch_rows, memory_fraction=args.memory_fraction)
        if args.budget_gb and torch.device(args.device).type == "cuda":
            # As on a card of budget_gb: the sampler may fill what is left of it after the weights,
            # less 2 GB for the prefill's activations (the update frees the KV caches first).
            room = args.budget_gb * 2**30 - torch.cuda.memory_allocated() - 2 * 2**30
            s.memory_fraction = max(0.01, min(1.0, room / torch.cuda.mem_get_info()[0]))
            figures["rollout_memory_fraction"] = round(s.memory_fraction, 3)
        rollout = _phase("rollout", args.device, figures,
                         lambda: generate(model, tok, ids, s, seeds=list(range(len(ids)))))
        if rollout is None:
            return
        figures["rollout"]["tokens"] = rollout.n_tokens
        figures["rollout"]["tokens_per_s"] = round(rollout.n_tokens / figures["rollout"]["seconds"], 1)

        def update():
            # The trainer's own update (ttrl.update.update: micro-batches by sequences and tokens,
            # a prompt's M samples split over several), on random advantages in place of the vote's;
            # plain SGD at lr 0 stands in for AdamW, whose state a full 7B could not hold here.
            m = args.train_samples
            algo = Config().algorithm
            algo.micro_batch_size, algo.micro_batch_tokens = args.micro_batch, args.micro_batch_tokens
            algo.logprob_chunk_mb = args.logprob_chunk_mb
            g = torch.Generator().manual_seed(0)
            picks = [list(rollout.group(p))[:m] for p in range(len(ids))]
            batch = TrainBatch(prompt_ids=rollout.prompt_ids,
                               completion_ids=[[rollout.completion_ids[i] for i in pick] for pick in picks],
                               old_logprobs=[[rollout.logprobs[i] for i in pick] for pick in picks],
                               rewards=[[0.0] * m for _ in ids], temperature=s.temperature,
                               advantages=[torch.randn(m, generator=g) for _ in ids])
            params = [q for q in model.parameters() if q.requires_grad]
            optimizer = torch.optim.SGD(params, lr=0.0)
            policy = Policy(model=model, optimizer=optimizer, pad_id=tok.pad_token_id, ref_model=None,
                            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
            stats = trainer_update(policy, batch, algo)
            return stats["loss/policy"], sum(map(sum, batch.lengths))
        done = _phase("update", args.device, figures, update)
        if done is not None:
            figures["update"]["loss"] = done[0]
            figures["update"]["tokens"] = int(done[1])
            figures["update"]["tokens_per_s"] = round(done[1] / figures["update"]["seconds"], 1)
    finally:
        peaks = [v.get("peak_gpu_gb", v.get("peak_rss_gb")) for v in figures.values() if isinstance(v, dict)]
        figures["peak_gb"] = max([p for p in peaks if p is not None], default=None)
        queue.put(figures)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen1.5b,qwen7b", help="comma-separated: qwen1.5b, qwen7b, tiny")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--votes", type=int, default=64, help="N: samples per prompt")
    ap.add_argument("--train-samples", type=int, default=32, help="M: samples per prompt in the update")
    ap.add_argument("--new-tokens", type=int, default=3072)
    ap.add_argument("--micro-batch", type=int, default=8, help="algorithm.micro_batch_size: samples per "
                    "forward/backward in the update")
    ap.add_argument("--micro-batch-tokens", type=int, default=0, help="algorithm.micro_batch_tokens (0 = no bound)")
    ap.add_argument("--max-batch-rows", type=int, default=512, help="rollout.max_batch_rows")
    ap.add_argument("--memory-fraction", type=float, default=0.9, help="rollout.memory_fraction")
    ap.add_argument("--budget-gb", type=float, default=0,
                    help="size the rollout as on a card of this many GB (e.g. 40 for the 1.5B target); 0 = all free")
    ap.add_argument("--logprob-chunk-mb", type=float, default=64, help="algorithm.logprob_chunk_mb")
    ap.add_argument("--checkpointing", default="auto", type=lambda v: {"true": True, "false": False}.get(v, v),
                    help="algorithm.gradient_checkpointing: true, false or auto")
    ap.add_argument("--lora-rank", type=int, default=0)
    args = ap.parse_args()

    results = []
    for arch in args.arch.split(","):
        args.arch = arch
        try:
            results.append(in_child(run_step, args))
        except ChildFailed as e:  # a hard crash (killed, segfault): still one result per shape
            results.append({"arch": arch, "error": f"process died with exit code {e.exitcode}: "
                                                   f"{e.tail.splitlines()[-1] if e.tail else ''}"})
    device_name = args.device
    try:
        import torch

        if torch.device(args.device).type == "cuda" and torch.cuda.is_available():
            device_name = torch.cuda.get_device_name()
    except Exception:
        pass
    print(f"{'shape':<10}{'phase':<9}{'seconds':>9}{'tokens/s':>11}{'peak GB':>9}{'plan GB':>9}  error")
    for r in results:
        for phase in ("build", "rollout", "update"):
            f = r.get(phase)
            if isinstance(f, dict):
                peak = f.get("peak_gpu_gb", f.get("peak_rss_gb", ""))
                plan = r.get("plan", {}).get(phase, "")
                print(f"{r['arch']:<10}{phase:<9}{f['seconds']:>9}{f.get('tokens_per_s', ''):>11}{peak:>9}{plan:>9}  "
                      f"{f.get('error', '')}")
        if "error" in r:
            print(f"{r['arch']:<10}{'':<9}{'':>9}{'':>11}{'':>9}  {r['error']}")
        if r.get("peak_gb") is not None and r["arch"] in TARGET_GB and "peak_gpu_gb" in r.get("build", {}):
            print(f"{r['arch']}: peak {r['peak_gb']} GB, target {TARGET_GB[r['arch']]} GB")
    settings = {k: v for k, v in vars(args).items() if k != "arch"}
    print(json.dumps({"device": device_name, "machine": platform.machine(), **settings,
                      "results": results}))


if __name__ == "__main__":
    main()
