"""Sequential voting against fixed N, cheaply: sample N votes per prompt once, then replay the
stopping rule (ttrl.sequential.vote_decided) on prefixes of them — the votes a prompt would have
drawn had it stopped there — for several round sizes and confidences. Per rule: the rollout
tokens it would have spent, the votes drawn, and how often the early pseudo-label equals the full-N
one (and, where there is gold, each one's accuracy). Then one live run of a chosen rule
(ttrl.sequential.sample_in_rounds) beside one call of N on the same prompts: seconds and tokens.

    .venv/bin/python benchmarks/adaptive_votes.py [--model DIR] [--sets demo,hard] [--votes 16]
        [--rules 8:0,4:0,8:0.95,4:0.95] [--live 4:0.95] [--threads 1]

Sets: `demo` is configs/demo.yaml's 64 one-digit sums (no held-out split); `hard` the same
template on 64 two-digit sums (10..99), where SmolLM2-135M's votes are spread thin. `--model`
takes a model directory, e.g. a trained run's RUN_DIR/model. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETS = {"demo": ["data.holdout=0"],
        "hard": ["data.holdout=0", "data.arithmetic.low=10", "data.arithmetic.high=99", "rollout.max_new_tokens=12"]}


def stop_point(answers: list, rounds) -> int:
    """Samples a prompt draws under `rounds` when its votes, in order, are `answers` (replayed)."""
    from ttrl.sequential import vote_decided
    from ttrl.voting import majority_vote

    return next(b for b in rounds.boundaries()
                if vote_decided(majority_vote(answers[:b]).counts, b, rounds.n_max, rounds.confidence))


def same_label(a: str | None, b: str | None) -> bool:
    from ttrl.grading import is_equivalent

    return a == b or (a is not None and b is not None and is_equivalent(a, b))


def replay(answers: list[list], lengths: list[list[int]], golds: list, rounds) -> dict:
    """The rule `rounds` replayed on each prompt's N recorded votes."""
    from ttrl.grading import is_equivalent
    from ttrl.voting import majority_vote

    used = tokens = agree = 0
    early_ok, full_ok = [], []
    for a, n, gold in zip(answers, lengths, golds):
        k = stop_point(a, rounds)
        early, full = majority_vote(a[:k]).pseudo_label, majority_vote(a).pseudo_label
        used, tokens, agree = used + k, tokens + sum(n[:k]), agree + same_label(early, full)
        if gold is not None:
            early_ok.append(is_equivalent(early, gold))
            full_ok.append(is_equivalent(full, gold))
    total = sum(map(sum, lengths))
    return {"round": rounds.size, "confidence": rounds.confidence, "votes_drawn": used / len(answers),
            "tokens": tokens, "token_saving": 1 - tokens / total if total else 0.0, "agreement": agree / len(answers),
            "label_accuracy_early": sum(early_ok) / len(early_ok) if early_ok else None,
            "label_accuracy_full": sum(full_ok) / len(full_ok) if full_ok else None}


def run_set(name: str, args) -> dict:
    from ttrl.config import load_config
    from ttrl.data import load_sets
    from ttrl.grading import sample_answers
    from ttrl.data import encode_problems
    from ttrl.models import load_model
    from ttrl.rollout import Sampling, TorchSampler, generate
    from ttrl.sequential import VoteRounds, sample_in_rounds
    from ttrl.step import prompt_seed
    from ttrl.voting import majority_vote

    overrides = [*SETS[name], f"rollout.n_votes={args.votes}", f"reward.n_train_samples={args.votes // 2}",
                 *([f"model.name={args.model}"] if args.model else []), *args.overrides]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    problems, _ = load_sets(cfg)
    model, tok = load_model(cfg.model, seed=cfg.train.seed)
    ids = encode_problems(tok, problems, cfg)
    seeds = [prompt_seed(cfg.train.seed, 0, i) for i in range(len(ids))]
    sampling = Sampling.of(cfg.rollout, n=cfg.rollout.n_votes)
    t0 = time.perf_counter()
    fixed = generate(model, tok, ids, sampling, seeds=seeds)
    fixed_s = time.perf_counter() - t0
    answers = [sample_answers([fixed.texts[i] for i in fixed.group(p)], [fixed.truncated[i] for i in fixed.group(p)],
                              [problems[p].choices] * cfg.rollout.n_votes) for p in range(len(ids))]
    lengths = [[len(fixed.completion_ids[i]) for i in fixed.group(p)] for p in range(len(ids))]
    golds = [p.answer for p in problems]
    m = cfg.reward.n_train_samples
    rules = []
    for rule in args.rules.split(","):
        size, confidence = rule.split(":")
        rules.append(replay(answers, lengths, golds, VoteRounds(cfg.rollout.n_votes, m, int(size), float(confidence))))
        r = rules[-1]
        print(f"{name}: round {r['round']} confidence {r['confidence']}: {r['votes_drawn']:.1f} votes, "
              f"{r['token_saving']:.1%} fewer tokens, agreement {r['agreement']:.3f}", flush=True)
    size, confidence = args.live.split(":")
    rounds = VoteRounds(cfg.rollout.n_votes, m, int(size), float(confidence))
    t0 = time.perf_counter()
    live = sample_in_rounds(TorchSampler(tok), model, ids, sampling, seeds, rounds, [p.choices for p in problems])
    live_s = time.perf_counter() - t0
    return {"prompts": len(ids), "n_votes": cfg.rollout.n_votes, "n_train_samples": m,
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "fixed": {"tokens": fixed.n_tokens, "seconds": round(fixed_s, 2),
                      "majority_ratio": sum(majority_vote(a).majority_ratio for a in answers) / len(answers)},
            "rules": rules,
            "live": {"round": rounds.size, "confidence": rounds.confidence, "tokens": live.n_tokens,
                     "seconds": round(live_s, 2), "votes_drawn": sum(live.group_sizes) / len(ids),
                     "token_saving": 1 - live.n_tokens / fixed.n_tokens,
                     "seconds_saving": 1 - live_s / fixed_s}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="a model directory (default: the config's, SmolLM2-135M)")
    ap.add_argument("--sets", default="demo,hard")
    ap.add_argument("--votes", type=int, default=16, help="N; M is N/2 as in the demo")
    ap.add_argument("--rules", default="8:0,4:0,8:0.9,4:0.9,8:0.95,4:0.95,4:0.99",
                    help="round size:confidence pairs to replay (confidence 0: stop only when decided)")
    ap.add_argument("--live", default="4:0.95", help="the rule also run live, round size:confidence")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    sets = {name: run_set(name, args) for name in args.sets.split(",")}
    print(json.dumps({"model": args.model or "smollm2-135m", "votes": args.votes, "threads": torch.get_num_threads(),
                      "machine": f"{platform.machine()} {platform.processor()}".strip(),
                      "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.time() - t0, 1), "sets": sets}))


if __name__ == "__main__":
    main()
