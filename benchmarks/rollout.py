"""Rollout throughput: ttrl's engine, vLLM (rollout.backend=vllm, where vLLM imports) and
`model.generate`, same model, prompts and settings, in each of --dtypes, measured side by side in one
run (each in a fresh process, so peak RSS and CPU time are its own).

    .venv/bin/python benchmarks/rollout.py                 # SmolLM2-135M, 8 prompts x 16 samples x 64 tokens
    .venv/bin/python benchmarks/rollout.py --threads 1 --ignore-eos   # per-core figures, every sample 64 tokens
    .venv/bin/python benchmarks/rollout.py --device cuda --arch qwen1.5b   # GPU, random Qwen2.5-1.5B-shaped model
    .venv/bin/python benchmarks/rollout.py --prompts 1 --samples 2 --new-tokens 4   # smoke run

The vLLM arm is the backend as training runs it (vLLM samples, ttrl's `score` recomputes the
log-probs); `vllm engine` is vLLM's sampling alone. Tokens per CPU-second divide by the process's
CPU time (all its threads), the fair figure on a shared machine. Last line: one JSON object with
the figures (the top-level ones at the first of --dtypes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import tempfile
import time

from _child import in_child
from _shapes import model_dir


def _setup(args, dtype: str):
    import torch

    from ttrl.config import ArithmeticConfig, ModelConfig
    from ttrl.data import arithmetic_problems
    from ttrl.data import encode_prompts
    from ttrl.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        name, arch = model_dir(args.arch, root) if args.arch != "smollm2" else ("smollm2-135m", {})
        model, tok = load_model(ModelConfig(name=name, architecture=arch, dtype=dtype), device=args.device)
    problems = arithmetic_problems(ArithmeticConfig(n=args.prompts, seed=1))
    ids = encode_prompts(tok, [f"{p.prompt} Answer with just the number." for p in problems])
    return model, tok, ids


def _sampling(args, n=None, new_tokens=None):
    from ttrl.rollout import Sampling

    return Sampling(n=n or args.samples, temperature=1.0, max_new_tokens=new_tokens or args.new_tokens,
                    ignore_eos=args.ignore_eos)


def _timed(args, fn):
    """(fn(), wall seconds, CPU seconds of this process)."""
    _sync(args)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    _sync(args)
    return out, time.perf_counter() - t0, time.process_time() - c0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(args, queue):
    args, dtype = args
    import torch

    from ttrl.rollout import generate

    model, tok, ids = _setup(args, dtype)
    generate(model, tok, ids[:1], _sampling(args, 2, 4))  # warm-up
    r, dt, cpu = _timed(args, lambda: generate(model, tok, ids, _sampling(args), torch.Generator().manual_seed(0)))
    queue.put({"tokens": r.n_tokens, "seconds": dt, "cpu_seconds": cpu, "peak_rss_mb": _peak_rss_mb(),
               **_gpu_mem(args), "params": sum(p.numel() for p in model.parameters())})


def run_vllm(args, queue):
    """The vLLM backend (ttrl.vllm_rollout) on the same job: as training runs it, and its engine alone."""
    args, dtype = args
    from ttrl.config import Config
    from ttrl.distributed import Dist
    from ttrl.vllm_rollout import VLLMSampler

    model, tok, ids = _setup(args, dtype)
    cfg = Config()
    cfg.model.dtype, cfg.rollout.backend = dtype, "vllm"
    cfg.train.prompts_per_step, cfg.rollout.n_votes, cfg.rollout.max_new_tokens = args.prompts, args.samples, \
        args.new_tokens
    if args.arch != "smollm2":
        raise SystemExit("the vLLM arm runs on the embedded model only (--arch smollm2)")
    t0 = time.perf_counter()
    sampler = VLLMSampler(cfg, model, tok, Dist())
    start = time.perf_counter() - t0
    seeds = list(range(len(ids)))
    sampler.generate(model, ids[:1], _sampling(args, 2, 4), seeds[:1])  # warm-up
    r, dt, cpu = _timed(args, lambda: sampler.generate(model, ids, _sampling(args), seeds))
    sampler.llm.reset_prefix_cache()  # the engine alone, as cold as the first time
    s, vllm = _sampling(args), sampler._vllm
    params = [vllm.SamplingParams(n=s.n, temperature=s.temperature, top_k=-1, max_tokens=s.max_new_tokens,
                                  ignore_eos=s.ignore_eos, seed=seed) for seed in seeds]
    out, edt, ecpu = _timed(args, lambda: sampler.llm.generate([{"prompt_token_ids": p} for p in ids], params,
                                                               use_tqdm=False))
    queue.put({"tokens": r.n_tokens, "seconds": dt, "cpu_seconds": cpu, "peak_rss_mb": _peak_rss_mb(),
               **_gpu_mem(args), "start_seconds": start,
               "engine": {"tokens": sum(len(o.token_ids) for x in out for o in x.outputs), "seconds": edt,
                          "cpu_seconds": ecpu}})


def run_hf(args, queue):
    args, dtype = args
    import torch

    model, tok, ids = _setup(args, dtype)
    from ttrl.rollout import eos_ids
    from ttrl.scoring import pad as _pad

    eos = sorted(eos_ids(model, tok))
    input_ids, mask = _pad(ids, tok.pad_token_id, args.device, left=True)
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id,
                  eos_token_id=None if args.ignore_eos else eos)
    model.generate(input_ids=input_ids[:1], attention_mask=mask[:1], max_new_tokens=4, **kwargs)  # warm-up
    torch.manual_seed(0)
    out, dt, cpu = _timed(args, lambda: model.generate(input_ids=input_ids, attention_mask=mask,
                                                       max_new_tokens=args.new_tokens,
                                                       num_return_sequences=args.samples, **kwargs))
    gen = out[:, input_ids.shape[1]:].tolist()
    tokens = 0
    for row in gen:  # count up to and including the first end-of-sequence token
        ends = [] if args.ignore_eos else [i for i, t in enumerate(row) if t in eos]
        tokens += ends[0] + 1 if ends else len(row)
    queue.put({"tokens": tokens, "seconds": dt, "cpu_seconds": cpu, "peak_rss_mb": _peak_rss_mb(), **_gpu_mem(args)})


def matmul_gflops(args) -> float:
    """The machine's measured matmul throughput (fp32 on CPU, bf16 on GPU) — the roofline."""
    import torch

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    n = 4096 if args.device == "cuda" else 1024
    a = torch.randn(n, n, device=args.device, dtype=dtype)
    b = torch.randn(n, n, device=args.device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(args)
    reps = 50 if args.device == "cuda" else 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(args)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def _sync(args):
    if args.device == "cuda":
        import torch

        torch.cuda.synchronize()


def _gpu_mem(args) -> dict:
    if args.device != "cuda":
        return {}
    import torch

    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}


def _rates(r: dict) -> dict:
    return {"tokens": r["tokens"], "seconds": round(r["seconds"], 2), "cpu_seconds": round(r["cpu_seconds"], 2),
            "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
            "tokens_per_cpu_s": round(r["tokens"] / max(r["cpu_seconds"], 1e-9), 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="smollm2", choices=["smollm2", "qwen1.5b", "qwen7b", "tiny"],
                    help="smollm2: the embedded pretrained model; others: random weights of that shape (_shapes.py)")
    ap.add_argument("--dtypes", default=None,
                    help="comma-separated model dtypes to measure (default: float32,bfloat16 on CPU, bfloat16 on GPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each arm (0: torch's default)")
    ap.add_argument("--ignore-eos", action="store_true", help="every sample runs to --new-tokens (the same work "
                    "in every arm)")
    ap.add_argument("--no-vllm", action="store_true", help="leave the vLLM arm out even where vLLM imports")
    args = ap.parse_args()
    dtypes = (args.dtypes or ("bfloat16" if args.device == "cuda" else "float32,bfloat16")).split(",")
    with_vllm = not args.no_vllm and importlib.util.find_spec("vllm") is not None and args.arch == "smollm2"
    if not with_vllm:
        print("vLLM arm left out (" + ("--no-vllm" if args.no_vllm else "vLLM not installed: make install-vllm"
                                       if args.arch == "smollm2" else "--arch smollm2 only") + ")")

    results = {}
    for dtype in dtypes:
        results[dtype] = {"ttrl": in_child(run_ours, (args, dtype)), "generate": in_child(run_hf, (args, dtype))}
        if with_vllm:
            results[dtype]["vllm"] = in_child(run_vllm, (args, dtype))
    limit = matmul_gflops(args)
    print(f"{'dtype':<10}{'engine':<16}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'tokens/CPU-s':>14}"
          f"{'peak RSS MB':>13}")
    for dtype, arms in results.items():
        rows = [("ttrl", arms["ttrl"]), ("vllm", arms.get("vllm")),
                ("vllm engine", {**arms["vllm"]["engine"], "peak_rss_mb": arms["vllm"]["peak_rss_mb"]}
                 if "vllm" in arms else None), ("model.generate", arms["generate"])]
        for name, r in rows:
            if r:
                print(f"{dtype:<10}{name:<16}{r['tokens']:>8}{r['seconds']:>9.2f}{r['tokens'] / r['seconds']:>10.1f}"
                      f"{r['tokens'] / max(r['cpu_seconds'], 1e-9):>14.1f}{r['peak_rss_mb']:>13.0f}")
    main_arms = results[dtypes[0]]
    ours, hf, vllm = main_arms["ttrl"], main_arms["generate"], main_arms.get("vllm")
    ours_tps, hf_tps = ours["tokens"] / ours["seconds"], hf["tokens"] / hf["seconds"]
    roofline_tps = limit * 1e9 / (2 * ours["params"])
    print(f"{dtypes[0]}: ttrl {ours_tps / hf_tps:.2f}x model.generate"
          + (f", {ours_tps / (vllm['tokens'] / vllm['seconds']):.2f}x vLLM (start-up {vllm['start_seconds']:.0f} s)"
             if vllm else "")
          + f"; matmul {limit:.0f} GFLOP/s -> at most {roofline_tps:.0f} tokens/s for {ours['params'] / 1e6:.0f}M "
            f"parameters; ttrl reaches {ours_tps / roofline_tps:.0%} of it")
    print(json.dumps({
        "device": args.device, "arch": args.arch, "machine": platform.processor() or platform.machine(),
        "prompts": args.prompts, "samples": args.samples, "new_tokens": args.new_tokens, "dtype": dtypes[0],
        "threads": args.threads, "ignore_eos": args.ignore_eos,
        "ttrl_tokens_per_s": round(ours_tps, 1), "generate_tokens_per_s": round(hf_tps, 1),
        "vllm_tokens_per_s": round(vllm["tokens"] / vllm["seconds"], 1) if vllm else None,
        "speedup": round(ours_tps / hf_tps, 2), "ttrl_peak_rss_mb": round(ours["peak_rss_mb"]),
        "generate_peak_rss_mb": round(hf["peak_rss_mb"]), "matmul_gflops": round(limit, 1),
        "roofline_share": round(ours_tps / roofline_tps, 3),
        **({"ttrl_peak_gpu_mb": round(ours["peak_gpu_mb"]), "generate_peak_gpu_mb": round(hf["peak_gpu_mb"])}
           if args.device == "cuda" else {}),
        "by_dtype": {dtype: {name: {**_rates(r), "peak_rss_mb": round(r["peak_rss_mb"]),
                                    **({"start_seconds": round(r["start_seconds"], 1),
                                        "engine": _rates(r["engine"])} if name == "vllm" else {})}
                             for name, r in arms.items()} for dtype, arms in results.items()},
    }))


if __name__ == "__main__":
    main()
