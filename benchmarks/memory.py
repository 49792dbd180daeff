"""Peak memory of one update micro-batch (teacher-forced log-probs, GRPO loss, backward, as the
trainer runs it) with the memory features on (activation checkpointing + log-probs from 64 MB
chunks of logits) and off (no checkpointing, all logits at once), for growing answer lengths.

A 2-layer model of the tests' tiny shape (hidden 64) with Qwen2.5's vocabulary of 151,936: the
logits dominate, as they do for a real model at thousands of tokens. Random weights and token
ids; every (side, length) runs in a fresh process, so its peak RSS is its own.

    .venv/bin/python benchmarks/memory.py        # ~2 minutes on 2 cores; peak ~6 GB (the "off" side)

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

from _child import in_child

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one_update(args, queue):
    import torch

    from ttrl.config import ModelConfig
    from ttrl.losses import policy_loss
    from ttrl.models import load_model, set_gradient_checkpointing
    from ttrl.scoring import score

    torch.set_num_threads(args.threads)
    model, tok = load_model(ModelConfig(architecture={**TINY, "vocab_size": args.vocab}), seed=0)
    set_gradient_checkpointing(model, args.on, "cpu")
    model.train()
    g = torch.Generator().manual_seed(args.length)
    prompt = torch.randint(0, args.vocab, (args.prompt,), generator=g).tolist()
    completions = [torch.randint(0, args.vocab, (args.length,), generator=g).tolist() for _ in range(args.rows)]
    old = torch.randn(args.rows, args.length, generator=g) * 0.1 - 12.0  # log-probs near uniform over 151,936
    adv = torch.randn(args.rows, generator=g)
    before = _rss_mb()
    t0 = time.perf_counter()
    logp, mask = score(model, [prompt], completions, 1.0, tok.pad_token_id, group_size=args.rows,
                       chunk_mb=args.chunk_mb if args.on else 0)
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, float(mask.sum()))
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    queue.put({"peak_mb": round(peak - before, 1), "seconds": round(seconds, 2), "loss": float(loss.detach()),
               "grad_norm": float(grad.norm())})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="128,256,512,1024", help="answer lengths (tokens per sample)")
    ap.add_argument("--rows", type=int, default=2, help="samples in the micro-batch (one prompt's group)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--chunk-mb", type=float, default=64, help="algorithm.logprob_chunk_mb on the 'on' side")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    rows = []
    print(f"{'tokens':>7}{'off MB':>9}{'on MB':>9}{'ratio':>7}{'off s':>7}{'on s':>7}  loss off / on")
    for length in map(int, args.lengths.split(",")):
        sides = {}
        for on in (False, True):
            args.length, args.on = length, on
            sides["on" if on else "off"] = in_child(one_update, args)
        off, on = sides["off"], sides["on"]
        rows.append({"tokens": length * args.rows, "length": length, "off": off, "on": on,
                     "ratio": round(off["peak_mb"] / max(on["peak_mb"], 1.0), 2)})
        print(f"{length * args.rows:>7}{off['peak_mb']:>9.0f}{on['peak_mb']:>9.0f}{rows[-1]['ratio']:>7.1f}"
              f"{off['seconds']:>7.1f}{on['seconds']:>7.1f}  {off['loss']:.6f} / {on['loss']:.6f}")
    last = rows[-1]
    # What the off side must hold at once: [tokens, vocab] float32 logits; the on side one chunk of them.
    print(f"longest: {last['ratio']}x less peak update memory with the features on; "
          f"logits of the whole micro-batch would be {last['tokens'] * args.vocab * 4 / 2**20:.0f} MB")
    print(json.dumps({"machine": platform.machine(), "threads": args.threads, "vocab": args.vocab, "hidden": 64,
                      "rows": args.rows, "prompt": args.prompt, "chunk_mb": args.chunk_mb, "results": rows,
                      "ratio_at_longest": last["ratio"],
                      "equal_loss": all(abs(r["off"]["loss"] - r["on"]["loss"]) <= 1e-5 * max(1, abs(r["off"]["loss"]))
                                        for r in rows)}))


if __name__ == "__main__":
    main()
