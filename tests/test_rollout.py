import torch

from ttrl.models import encode_prompts
from ttrl.rollout import Sampling, generate, score, tempered_logprobs

PROMPTS = ["What is 2 + 3?", "Hi", "Please add seven and eight and say the result in words, then digits."]


def _rollout(tiny, s, seed=0, eos=None):
    model, tok = tiny
    saved = model.generation_config.eos_token_id
    if eos is not None:
        model.generation_config.eos_token_id = eos
    try:
        ids = encode_prompts(tok, PROMPTS)
        return generate(model, tok, ids, s, torch.Generator().manual_seed(seed))
    finally:
        model.generation_config.eos_token_id = saved


def _check_logprobs_match_teacher_forcing(tiny, r, temperature):
    """Both ways of scoring: each sample with its own prompt copy, and one prompt per group."""
    model, tok = tiny
    per_sample = [r.prompt_ids[i // r.n] for i in range(len(r.completion_ids))]
    with torch.no_grad():
        scored = [score(model, per_sample, r.completion_ids, temperature, tok.pad_token_id),
                  score(model, r.prompt_ids, r.completion_ids, temperature, tok.pad_token_id, group_size=r.n)]
    for lp, mask in scored:
        for i, c in enumerate(r.completion_ids):
            assert mask[i].sum() == len(c)
            assert torch.allclose(lp[i, : len(c)], r.logprobs[i], atol=1e-4), i


def test_logprobs_equal_teacher_forced_forward(tiny):
    s = Sampling(n=4, temperature=0.8, max_new_tokens=12)
    r = _rollout(tiny, s)
    assert len(r.completion_ids) == 12 and len({len(p) for p in r.prompt_ids}) > 1  # padded prompts
    _check_logprobs_match_teacher_forcing(tiny, r, 0.8)


def test_early_stopped_rows_leave_batch_and_logprobs_still_match(tiny):
    # Make a tenth of the vocabulary end-of-sequence so rows finish at many different steps.
    eos = list(range(0, 49152, 10))
    r = _rollout(tiny, Sampling(n=8, temperature=1.0, max_new_tokens=16), eos=eos)
    lengths = [len(c) for c in r.completion_ids]
    assert min(lengths) < 16 and len(set(lengths)) > 2
    for c, trunc in zip(r.completion_ids, r.truncated):
        assert trunc == (c[-1] not in eos)
        assert all(t not in eos for t in c[:-1])  # nothing generated after end-of-sequence
    _check_logprobs_match_teacher_forcing(tiny, r, 1.0)


def test_fixed_seed_reproducible(tiny):
    s = Sampling(n=3, temperature=1.0, top_p=0.9, max_new_tokens=8)
    a, b, c = _rollout(tiny, s, 1), _rollout(tiny, s, 1), _rollout(tiny, s, 2)
    assert a.completion_ids == b.completion_ids
    assert a.completion_ids != c.completion_ids


def test_temperature_zero_matches_greedy_generate(tiny):
    model, tok = tiny
    r = _rollout(tiny, Sampling(n=1, temperature=0.0, max_new_tokens=10))
    for p, c in zip(r.prompt_ids, r.completion_ids):
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             do_sample=False, max_new_tokens=10, pad_token_id=tok.pad_token_id)
        ref = out[0, len(p):].tolist()
        assert c == ref[: len(c)]


def test_samples_do_not_depend_on_batching(tiny):
    model, tok = tiny
    ids = encode_prompts(tok, PROMPTS)
    s = Sampling(n=4, temperature=1.0, top_k=20, max_new_tokens=8)
    whole = generate(model, tok, ids, s, seeds=[11, 12, 13])
    s.max_batch_rows = 4  # one prompt per chunk
    assert generate(model, tok, ids, s, seeds=[11, 12, 13]).completion_ids == whole.completion_ids
    alone = generate(model, tok, ids[1:2], s, seeds=[12])  # as a data-parallel rank would see it
    assert alone.completion_ids == whole.completion_ids[4:8]


def _first_token_frequencies(tiny, s, n):
    model, tok = tiny
    ids = encode_prompts(tok, PROMPTS[:1])
    s.n, s.max_new_tokens = n, 1
    r = generate(model, tok, ids, s, torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor([c[0] for c in r.completion_ids]), minlength=len(tok))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids)).logits[0, -1]
    return counts.float() / n, logits


def test_sampled_distribution_matches_softmax_over_temperature(tiny):
    # top_k makes the support small enough to estimate; within it, p ∝ softmax(logits / T).
    freq, logits = _first_token_frequencies(tiny, Sampling(temperature=0.7, top_k=8), 6000)
    top = torch.topk(logits, 8).indices
    expected = torch.zeros_like(freq)
    expected[top] = torch.softmax(logits[top] / 0.7, -1)
    tv = 0.5 * (freq - expected).abs().sum()
    assert tv < 0.03, tv  # sampling noise at n=6000 over 8 outcomes is ~0.01
    assert freq[[i for i in range(len(freq)) if i not in set(top.tolist())]].sum() == 0


def test_top_p_keeps_smallest_nucleus(tiny):
    freq, logits = _first_token_frequencies(tiny, Sampling(temperature=0.05, top_p=0.5), 500)
    probs = tempered_logprobs(logits[None], 0.05)[0].exp()
    order = torch.argsort(probs, descending=True)
    k = int((probs[order].cumsum(0) < 0.5).sum()) + 1
    allowed = set(order[:k].tolist())
    assert set(torch.nonzero(freq).flatten().tolist()) <= allowed


def test_shared_prefix_scoring_gives_the_same_gradient(tiny):
    model, tok = tiny
    r = _rollout(tiny, Sampling(n=3, temperature=1.0, max_new_tokens=5))
    grads = []
    for prompts, group in ((r.prompt_ids, r.n), ([r.prompt_ids[i // r.n] for i in range(len(r.texts))], 1)):
        model.zero_grad()
        lp, mask = score(model, prompts, r.completion_ids, 1.0, tok.pad_token_id, group_size=group)
        (lp * mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad()
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-5  # float32 summation-order noise


def test_entropy_and_self_certainty_of_the_first_step(tiny):
    model, tok = tiny
    r = _rollout(tiny, Sampling(n=2, temperature=0.7, max_new_tokens=3))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([r.prompt_ids[0]])).logits[0, -1]
    p = torch.softmax(logits.double() / 0.7, -1)
    entropy = float(-(p * p.log()).sum())
    certainty = float((-(p * len(p)).log()).mean())  # KL(U || p) = mean_j log(1 / (V p_j))
    assert abs(float(r.entropy[0][0]) - entropy) < 1e-3
    assert abs(float(r.certainty[0][0]) - certainty) < 1e-3


def test_stop_strings_end_samples_where_the_string_completes(tiny):
    model, tok = tiny
    ids = encode_prompts(tok, PROMPTS)
    s = Sampling(n=4, temperature=1.0, max_new_tokens=16)
    free = generate(model, tok, ids, s, seeds=[1, 2, 3])
    stop = free.texts[0][3:5]  # a string the first sample is known to produce
    s.stop = (stop,)
    stopped = generate(model, tok, ids, s, seeds=[1, 2, 3])
    n_stopped = 0
    for full, cut, lp, full_lp, trunc in zip(free.completion_ids, stopped.completion_ids, stopped.logprobs,
                                             free.logprobs, stopped.truncated):
        # The first prefix whose text holds the stop string; a stopped row's own random stream is
        # unchanged, so the samples agree token for token up to there.
        k = next((i for i in range(1, len(full) + 1) if stop in tok.decode(full[:i])), len(full))
        assert cut == full[:k]
        assert torch.allclose(lp, full_lp[:k], atol=1e-5)
        if k < len(full) or stop in tok.decode(cut):
            n_stopped += 1
            assert stop in tok.decode(cut) and not trunc
    assert n_stopped >= 1


def test_groups_of_different_sizes_score_as_separate_calls(tiny):
    """A group split over micro-batches: pieces of 2 and 1 samples of prompt 0 and 3 of prompt 1
    give the log-probs (and gradient) of scoring each sample with its own prompt."""
    model, tok = tiny
    r = _rollout(tiny, Sampling(n=3, temperature=1.0, max_new_tokens=5))
    prompts = [r.prompt_ids[0], r.prompt_ids[0], r.prompt_ids[1]]
    grads, logps = [], []
    for p, sizes in ((prompts, [2, 1, 3]), ([r.prompt_ids[i // 3] for i in range(6)], 1)):
        model.zero_grad()
        lp, mask = score(model, p, r.completion_ids[:6], 1.0, tok.pad_token_id, group_size=sizes)
        (lp * mask).sum().backward()
        logps.append(lp * mask)
        grads.append(torch.cat([q.grad.flatten() for q in model.parameters()]))
    model.zero_grad()
    assert torch.allclose(logps[0], logps[1], atol=1e-5)
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-5
