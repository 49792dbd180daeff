"""`ttrl plan`'s prediction beside a measurement, on CPU: the peak of allocated tensor bytes (not
RSS) of the rollout phase and of the update phase (optimizer step included), for the tiny shape
(configs/tiny.yaml) and SmolLM2-135M's shape, over answer lengths, N, M and micro-batch settings.

Measured as the trainer runs: a model of the shape (random weights), AdamW and the last-good-weights
copy, one update first (so AdamW's state and the gradients exist, as from the second step on), then
ttrl.rollout.generate (end-of-sequence ignored: every answer runs to the limit, as the plan assumes)
and ttrl.update.update, each under `LiveBytes`. Each case in a fresh process.

    .venv/bin/python benchmarks/plan_memory.py          # ~5 minutes on 2 idle cores

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import weakref

from _child import in_child

CASES = [  # shape, prompts, N, M, answer tokens, overrides
    ("tiny", 4, 8, 4, 64, []),
    ("tiny", 4, 16, 8, 128, ["algorithm.micro_batch_size=4"]),
    ("tiny", 2, 8, 8, 192, ["algorithm.micro_batch_tokens=1000", "algorithm.gradient_checkpointing=true",
                            "algorithm.logprob_chunk_mb=8"]),
    ("smollm2-135m", 2, 4, 2, 16, []),
    ("smollm2-135m", 1, 4, 4, 48, ["algorithm.gradient_checkpointing=true", "algorithm.micro_batch_size=2"]),
]
PROMPT = 24
"""Prompt tokens (random ids) of every case."""


def live_bytes_mode():
    """A TorchDispatchMode that counts the bytes of every live tensor storage created inside it
    (or handed to `track`), and their peak: the CPU's stand-in for torch.cuda.max_memory_allocated."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.weak import WeakIdKeyDictionary

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.seen = WeakIdKeyDictionary()

        def _free(self, n):
            self.live -= n

        def track(self, t):
            st = t.untyped_storage()
            if st not in self.seen:
                self.seen[st] = n = st.nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, n)

        def reset(self):
            self.peak = self.live

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    self.track(t)
            return out

    return LiveBytes()


def one_case(case, queue):
    import torch

    from ttrl.config import load_config
    from ttrl.models import load_model, set_gradient_checkpointing
    from ttrl.plan import GB, plan
    from ttrl.rollout import Sampling, generate
    from ttrl.train_batch import TrainBatch
    from ttrl.update import LastGoodWeights, Policy, update

    torch.set_num_threads(2)
    arch, prompts, n, m, length, overrides = case
    tiny = arch == "tiny"
    cfg = load_config("configs/tiny.yaml", [f"train.prompts_per_step={prompts}", f"rollout.n_votes={n}",
                                            f"reward.n_train_samples={m}", f"rollout.max_new_tokens={length}",
                                            *([] if tiny else ["model.architecture={}"]), *overrides])
    predicted = plan(cfg, device="cpu", prompt_tokens=PROMPT)
    model, tok = load_model(cfg.model, seed=0)
    set_gradient_checkpointing(model, cfg.algorithm.gradient_checkpointing, "cpu")
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(100, 40000, (PROMPT,), generator=g).tolist() for _ in range(prompts)]
    s = Sampling.of(cfg.rollout, n=n, ignore_eos=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    policy = Policy(model=model, optimizer=optimizer, ref_model=None, pad_id=tok.pad_token_id,
                    scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                    good=LastGoodWeights(model))
    advantages = [torch.randn(m, generator=g) for _ in ids]

    def trained(rollout):  # each prompt's first M samples, on random advantages
        picks = [list(rollout.group(p))[:m] for p in range(prompts)]
        return TrainBatch(prompt_ids=rollout.prompt_ids, completion_ids=[[rollout.completion_ids[i] for i in pick]
                                                                         for pick in picks],
                          old_logprobs=[[rollout.logprobs[i] for i in pick] for pick in picks],
                          rewards=[[0.0] * m for _ in ids], temperature=s.temperature, advantages=advantages)
    rollout = generate(model, tok, ids, s, seeds=list(range(prompts)))
    update(policy, trained(rollout), cfg.algorithm)  # AdamW's state and the gradients now exist
    mode = live_bytes_mode()
    for t in [*model.parameters(), *[p.grad for p in params if p.grad is not None], *policy.good.copies,
              *[v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]]:
        mode.track(t)
    figures = {"arch": arch, "prompts": prompts, "N": n, "M": m, "answer_tokens": length, "overrides": overrides,
               "sizes": predicted.sizes}
    t0 = time.perf_counter()
    with mode:
        mode.reset()
        rollout = generate(model, tok, ids, s, seeds=list(range(prompts, 2 * prompts)))
        figures["rollout_measured_mb"] = mode.peak / 2**20
        mode.reset()
        update(policy, trained(rollout), cfg.algorithm)
        figures["update_measured_mb"] = mode.peak / 2**20
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    figures["rollout_predicted_mb"] = predicted.peak("rollout") / 2**20
    figures["update_predicted_mb"] = max(predicted.peak("update"), predicted.peak("optimizer step")) / 2**20
    for phase in ("rollout", "update"):
        figures[f"{phase}_error"] = round(figures[f"{phase}_predicted_mb"] / figures[f"{phase}_measured_mb"] - 1, 3)
        for k in ("measured", "predicted"):
            figures[f"{phase}_{k}_mb"] = round(figures[f"{phase}_{k}_mb"], 1)
    figures["predicted_gb_items"] = {p: {k: round(v / GB * 1024, 1) for k, v in items.items()}
                                     for p, items in predicted.phases.items() if p in ("rollout", "update")}
    queue.put(figures)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="", help="comma-separated case numbers (0-based; default all)")
    args = ap.parse_args()
    picked = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES
    rows = []
    print(f"{'shape':<13}{'P':>3}{'N':>4}{'M':>4}{'T':>5}  {'settings':<58}{'rollout MB meas/pred':>22}{'err':>7}"
          f"{'update MB meas/pred':>22}{'err':>7}")
    for case in picked:
        r = in_child(one_case, case)
        rows.append(r)
        print(f"{r['arch']:<13}{r['prompts']:>3}{r['N']:>4}{r['M']:>4}{r['answer_tokens']:>5}  "
              f"{' '.join(o.split('.')[-1] for o in r['overrides']) or 'defaults':<58}"
              f"{r['rollout_measured_mb']:>11.1f}/{r['rollout_predicted_mb']:<10.1f}{r['rollout_error']:>+7.1%}"
              f"{r['update_measured_mb']:>11.1f}/{r['update_predicted_mb']:<10.1f}{r['update_error']:>+7.1%}",
              flush=True)
    worst = max(abs(r[f"{p}_error"]) for r in rows for p in ("rollout", "update"))
    print(json.dumps({"machine": platform.machine(), "prompt_tokens": PROMPT, "results": rows,
                      "worst_abs_error": worst, "within_15pct": worst <= 0.15}))


if __name__ == "__main__":
    main()
