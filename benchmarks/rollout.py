"""Rollout throughput: ttrl's engine vs `model.generate`, same model, prompts and settings,
measured side by side in one run (each in a fresh process, so peak RSS is its own).

    .venv/bin/python benchmarks/rollout.py                 # SmolLM2-135M, 8 prompts x 16 samples x 64 tokens
    .venv/bin/python benchmarks/rollout.py --device cuda --arch qwen1.5b   # GPU, random Qwen2.5-1.5B-shaped model
    .venv/bin/python benchmarks/rollout.py --arch tiny --prompts 2 --samples 2 --new-tokens 4   # smoke run

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time

from _child import in_child
from _shapes import model_dir


def _setup(args):
    import torch

    from ttrl.config import ArithmeticConfig, ModelConfig
    from ttrl.data import arithmetic_problems
    from ttrl.models import encode_prompts, load_model

    torch.manual_seed(0)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    with tempfile.TemporaryDirectory() as root:
        name, arch = model_dir(args.arch, root) if args.arch != "smollm2" else ("smollm2-135m", {})
        model, tok = load_model(ModelConfig(name=name, architecture=arch, dtype=dtype), device=args.device)
    problems = arithmetic_problems(ArithmeticConfig(n=args.prompts, seed=1))
    ids = encode_prompts(tok, [f"{p.prompt} Answer with just the number." for p in problems])
    return model, tok, ids


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(args, queue):
    import torch

    from ttrl.rollout import Sampling, generate

    model, tok, ids = _setup(args)
    s = Sampling(n=args.samples, temperature=1.0, max_new_tokens=args.new_tokens)
    generate(model, tok, ids[:1], Sampling(n=2, max_new_tokens=4))  # warm-up
    _sync(args)
    t0 = time.perf_counter()
    r = generate(model, tok, ids, s, torch.Generator().manual_seed(0))
    _sync(args)
    dt = time.perf_counter() - t0
    queue.put({"tokens": r.n_tokens, "seconds": dt, "peak_rss_mb": _peak_rss_mb(), **_gpu_mem(args),
               "params": sum(p.numel() for p in model.parameters())})


def run_hf(args, queue):
    import torch

    model, tok, ids = _setup(args)
    from ttrl.rollout import _pad, eos_ids

    eos = sorted(eos_ids(model, tok))
    input_ids, mask = _pad(ids, tok.pad_token_id, args.device, left=True)
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id,
                  eos_token_id=eos)
    model.generate(input_ids=input_ids[:1], attention_mask=mask[:1], max_new_tokens=4, **kwargs)  # warm-up
    _sync(args)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                         num_return_sequences=args.samples, **kwargs)
    _sync(args)
    dt = time.perf_counter() - t0
    gen = out[:, input_ids.shape[1]:].tolist()
    tokens = 0
    for row in gen:  # count up to and including the first end-of-sequence token
        ends = [i for i, t in enumerate(row) if t in eos]
        tokens += ends[0] + 1 if ends else len(row)
    queue.put({"tokens": tokens, "seconds": dt, "peak_rss_mb": _peak_rss_mb(), **_gpu_mem(args)})


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="smollm2", choices=["smollm2", "qwen1.5b", "qwen7b", "tiny"],
                    help="smollm2: the embedded pretrained model; others: random weights of that shape (_shapes.py)")
    args = ap.parse_args()

    ours = in_child(run_ours, args)
    hf = in_child(run_hf, args)
    limit = matmul_gflops(args)
    ours_tps, hf_tps = ours["tokens"] / ours["seconds"], hf["tokens"] / hf["seconds"]
    roofline_tps = limit * 1e9 / (2 * ours["params"])
    print(f"{'engine':<16}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'peak RSS MB':>13}")
    for name, r in (("ttrl", ours), ("model.generate", hf)):
        print(f"{name:<16}{r['tokens']:>8}{r['seconds']:>9.2f}{r['tokens'] / r['seconds']:>10.1f}"
              f"{r['peak_rss_mb']:>13.0f}")
    print(f"speed-up {ours_tps / hf_tps:.2f}x; matmul {limit:.0f} GFLOP/s -> at most {roofline_tps:.0f} tokens/s "
          f"for {ours['params'] / 1e6:.0f}M parameters; ttrl reaches {ours_tps / roofline_tps:.0%} of it")
    print(json.dumps({
        "device": args.device, "arch": args.arch, "machine": platform.processor() or platform.machine(),
        "prompts": args.prompts, "samples": args.samples, "new_tokens": args.new_tokens,
        "ttrl_tokens_per_s": round(ours_tps, 1), "generate_tokens_per_s": round(hf_tps, 1),
        "speedup": round(ours_tps / hf_tps, 2), "ttrl_peak_rss_mb": round(ours["peak_rss_mb"]),
        "generate_peak_rss_mb": round(hf["peak_rss_mb"]), "matmul_gflops": round(limit, 1),
        "roofline_share": round(ours_tps / roofline_tps, 3),
        **({"ttrl_peak_gpu_mb": round(ours["peak_gpu_mb"]), "generate_peak_gpu_mb": round(hf["peak_gpu_mb"])}
           if args.device == "cuda" else {}),
    }))


if __name__ == "__main__":
    main()
