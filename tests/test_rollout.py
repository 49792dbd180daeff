import sys
from pathlib import Path

import pytest
import torch

from ttrl.data import encode_prompts
from ttrl.models import ModelError, set_gradient_checkpointing
from ttrl.rollout import Rollout, Sampling, decode_rows, generate, kv_bytes_per_token
from ttrl.scoring import score, tempered_logprobs

sys.path.insert(0, str(Path(__file__).parent))

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


def test_top_k_then_top_p_cut_as_hugging_face_does():
    """Both set: the nucleus is taken of the top-k tokens' renormalised distribution (HF's warpers in
    that order, and vLLM), so the torch and vLLM backends sample the same tokens."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    from ttrl.rollout import _truncation_mask

    gen = torch.Generator().manual_seed(0)
    cases = [torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()] + [torch.randn(3, 40, generator=gen) * 2 for _ in range(5)]
    for logits in cases:
        for k, p in ((2, 0.6), (5, 0.8), (10, 0.55), (3, 0.99)):  # no p on a cumulative sum (float ties)
            logp = torch.log_softmax(logits, -1)
            hf = TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None, logp.clone())).isinf()
            assert torch.equal(_truncation_mask(logp, k, p), hf), (k, p)


def test_a_stop_string_of_many_tokens_per_character_is_found(tiny):
    """The window searched for a stop string holds it however many tokens it takes: '答案：' is 3
    characters but more tokens than 3 + 2, the window once counted in characters."""
    from ttrl.rollout import _stop_hits, stop_window

    _, tok = tiny
    for stop in ("答案：", "🙂", "</answer>"):
        ids = tok("The result is 5 " + stop, add_special_tokens=False)["input_ids"]
        assert _stop_hits(tok, [ids[-stop_window((stop,)):]], (stop,)) == [True], stop
    assert len(tok("答案：", add_special_tokens=False)["input_ids"]) > len("答案：") + 2  # the case that was missed


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
# --- memory-lean scoring: chunked log-probs, activation checkpointing, groups split over micro-batches ---

def _fresh_tiny(lora_rank=0):
    """A model of its own (these tests switch checkpointing on or train an adapter)."""
    from ttrl.config import ModelConfig
    from ttrl.models import load_model
    from conftest import TINY_ARCH

    cfg = ModelConfig(architecture=TINY_ARCH, lora_rank=lora_rank, lora_target_modules=["q_proj", "v_proj"])
    return load_model(cfg, seed=0)


def _reference_logprobs(model, prompts, completions, group, temperature, pad_id):
    """Today's definition spelled out: each row's prompt + completion in one forward, full logits."""
    rows = [prompts[i // group] + c for i, c in enumerate(completions)]
    out = []
    for p, c, row in zip([prompts[i // group] for i in range(len(completions))], completions, rows):
        logits = model(input_ids=torch.tensor([row])).logits[0, len(p) - 1: len(row) - 1]
        out.append(tempered_logprobs(logits, temperature).gather(-1, torch.tensor(c)[:, None]).squeeze(-1))
    return out


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _loss_and_grads(model, fn):
    model.zero_grad()
    lps = fn()
    loss = sum((lp * torch.linspace(-1, 1, len(lp))).sum() for lp in lps)  # advantage-like weights
    loss.backward()
    return [lp.detach() for lp in lps], float(loss.detach()), _grads(model)


def _as_rows(lp, completions):
    return [lp[i, : len(c)] for i, c in enumerate(completions)]


def test_chunked_logprobs_and_checkpointing_give_todays_values_and_gradients():
    model, tok = _fresh_tiny()
    model.train()
    prompts = encode_prompts(tok, PROMPTS[:2])
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(0, 49152, (int(n),), generator=g).tolist() for n in (7, 3, 1, 9, 5, 2)]
    pad = tok.pad_token_id
    ref = _loss_and_grads(model, lambda: _reference_logprobs(model, prompts, completions, 3, 0.8, pad))
    runs = {}
    for chunk_mb in (0, 0.2):  # 0.2 MB = one position per chunk
        runs[f"chunk {chunk_mb}"] = _loss_and_grads(model, lambda: _as_rows(
            score(model, prompts, completions, 0.8, pad, group_size=3, chunk_mb=chunk_mb)[0], completions))
    assert set_gradient_checkpointing(model, True, "cpu")
    runs["checkpointed"] = _loss_and_grads(model, lambda: _as_rows(
        score(model, prompts, completions, 0.8, pad, group_size=3, chunk_mb=0.2)[0], completions))
    for name, (lps, loss, grads) in runs.items():
        for a, b in zip(lps, ref[0]):
            assert torch.allclose(a, b, atol=1e-5), name
        assert abs(loss - ref[1]) < 1e-4 * max(1.0, abs(ref[1])), name
        assert float((grads - ref[2]).norm() / ref[2].norm()) < 1e-5, name


def test_checkpointing_with_lora_matches_without():
    model, tok = _fresh_tiny(lora_rank=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    model.train()
    prompts, pad = encode_prompts(tok, PROMPTS[:2]), tok.pad_token_id
    completions = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]

    def run():
        return _as_rows(score(model, prompts, completions, 1.0, pad, group_size=2, chunk_mb=0.2)[0], completions)
    plain = _loss_and_grads(model, run)
    assert set_gradient_checkpointing(model, True, "cpu")
    checkpointed = _loss_and_grads(model, run)
    assert plain[2].numel() == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain[0], checkpointed[0]))
    assert float((plain[2] - checkpointed[2]).norm() / plain[2].norm()) < 1e-5


def test_no_full_vocabulary_tensor_is_kept_for_the_backward(tiny):
    """Saved-for-backward tensors of one scoring pass: with chunks, none holds more than one chunk's
    logits; without, the whole [positions, vocab] float32 tensor is kept."""
    model, tok = tiny
    prompts, pad = encode_prompts(tok, PROMPTS[:1]), tok.pad_token_id
    completions = [list(range(100 + 40 * i, 140 + 40 * i)) for i in range(4)]  # 160 positions
    vocab = model.config.vocab_size
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def largest_logits_saved(chunk_mb):
        sizes = [0]

        def pack(t):
            if t.shape and t.shape[-1] == vocab and t.untyped_storage().data_ptr() not in weights:
                sizes.append(t.numel() // vocab)
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            score(model, prompts, completions, 1.0, pad, group_size=4, chunk_mb=chunk_mb)
        return max(sizes)

    per_chunk = int(2**20) // (4 * vocab)  # positions in 1 MB of float32 logits
    assert largest_logits_saved(0) == 160 - 4  # each row's first token: from its prompt's last logits
    assert largest_logits_saved(1) <= per_chunk < 156


def test_a_group_split_over_micro_batches_scores_as_the_whole_group(tiny):
    model, tok = tiny
    prompts, pad = encode_prompts(tok, PROMPTS[:2]), tok.pad_token_id
    completions = [[5, 6, 7, 8, 9], [9, 10], [11, 12, 13], [14], [15, 16, 17, 18, 19, 20], [21, 22]]
    with torch.no_grad():
        whole = _as_rows(score(model, prompts, completions, 1.0, pad, group_size=3)[0], completions)
        parts = []
        for p, rows in ((0, [0, 1]), (0, [2]), (1, [3, 4, 5])):  # prompt 0's group in two micro-batches
            sub = [completions[i] for i in rows]
            parts += _as_rows(score(model, [prompts[p]], sub, 1.0, pad, group_size=len(sub))[0], sub)
    for a, b in zip(whole, parts):
        assert torch.allclose(a, b, atol=1e-6)


# --- rollouts within a memory budget; LoRA rollouts on merged weights ---

def test_decode_rows_by_hand():
    # Qwen2.5-7B in bf16: 28 layers x 4 kv heads x head_dim 128 x (K, V) x 2 bytes = 57,344 bytes a token.
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, num_hidden_layers=28)
    assert kv_bytes_per_token(config, torch.bfloat16) == 57_344
    # 200-token prompts + 3,072 new = 3,272 tokens: 187,629,568 bytes of cache a row, plus 8 float32 copies of
    # the 152,064-entry vocabulary (4,866,048): 192,495,616 a row. 60 GiB hold 334 rows: 5 prompts of 64.
    assert decode_rows(60 * 2**30, 57_344, 3_272, 152_064, n=64, cap=512) == 320
    assert decode_rows(60 * 2**30, 57_344, 3_272, 152_064, n=64, cap=256) == 256  # the cap still rules
    assert decode_rows(10 * 2**30, 57_344, 3_272, 152_064, n=64, cap=512) == 64  # never less than one prompt


def test_ignore_eos_runs_every_sample_to_the_limit(tiny):
    eos = list(range(0, 49152, 10))  # a tenth of the vocabulary ends a sample
    stopped = _rollout(tiny, Sampling(n=4, temperature=1.0, max_new_tokens=12), eos=eos)
    assert min(len(c) for c in stopped.completion_ids) < 12
    full = _rollout(tiny, Sampling(n=4, temperature=1.0, max_new_tokens=12, ignore_eos=True), eos=eos)
    assert {len(c) for c in full.completion_ids} == {12} and all(full.truncated)


def test_lora_samples_from_merged_weights_and_leaves_the_base_untouched():
    model, tok = _fresh_tiny(lora_rank=4)
    with torch.no_grad():  # a trained adapter: B is zero at initialisation
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter_calls = []
    hooks = [m.register_forward_hook(lambda *a: adapter_calls.append(1))
             for n, m in model.named_modules() if n.endswith("lora_A.default")]
    r = generate(model, tok, encode_prompts(tok, PROMPTS), Sampling(n=4, temperature=1.0, max_new_tokens=10),
                 seeds=[1, 2, 3])
    assert not adapter_calls  # the rollout ran the merged matmuls only
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n  # bit for bit: exact resume depends on it
    with torch.no_grad():  # the trained (unmerged) policy, teacher-forced
        lp, _ = score(model, r.prompt_ids, r.completion_ids, 1.0, tok.pad_token_id, group_size=4)
    assert adapter_calls  # scoring runs the adapter
    for h in hooks:
        h.remove()
    for i, c in enumerate(r.completion_ids):
        assert torch.allclose(lp[i, : len(c)], r.logprobs[i], atol=1e-4), i


def test_the_head_runs_under_the_models_mixed_precision():
    """accelerate's bf16 wraps the model's forward in autocast: every chunk of logits scoring
    computes must come from that forward's head call, in its precision (not float32 outside it)."""
    model, tok = _fresh_tiny()
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)  # what accelerate does
    head, dtypes = model.get_output_embeddings(), []
    plain_forward = head.forward

    def recording(h):
        out = plain_forward(h)
        dtypes.append(out.dtype)
        return out
    head.forward = recording
    with torch.no_grad():
        score(model, encode_prompts(tok, PROMPTS[:1]), [[5, 6, 7, 8]] * 2, 1.0, tok.pad_token_id, group_size=2,
              chunk_mb=0.2)
    assert len(dtypes) > 3 and set(dtypes) == {torch.bfloat16}, dtypes
    assert head.forward is recording  # put back as it was


def test_a_model_that_changes_its_logits_after_the_head_is_refused():
    """Gemma-2 soft-caps its logits after the LM head; scoring computes log-probs inside the head,
    so it must refuse such a model rather than score it wrongly."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    shape = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)
    torch.manual_seed(0)
    capped = AutoModelForCausalLM.from_config(Gemma2Config(**shape, final_logit_softcapping=30.0))
    plain = AutoModelForCausalLM.from_config(Gemma2Config(**shape, final_logit_softcapping=None))
    with torch.no_grad():
        lp, mask = score(plain, [[1, 2, 3]], [[4, 5, 6]], 1.0, 0)
        ref = tempered_logprobs(plain(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits[0, 2:], 1.0)
        assert torch.allclose(lp[0], ref.gather(-1, torch.tensor([[4], [5], [6]])).squeeze(-1), atol=1e-5)
        with pytest.raises(ModelError, match="changes its logits after the LM head"):
            score(capped, [[1, 2, 3]], [[4, 5, 6]], 1.0, 0)


def _texts_rollout(texts: list[str], n: int, sizes=None, prompts=None) -> Rollout:
    z = [torch.zeros(1) for _ in texts]
    prompts = prompts if prompts is not None else [[1]] * (len(sizes) if sizes else len(texts) // n)
    return Rollout(n=n, prompt_ids=prompts, completion_ids=[[1]] * len(texts), logprobs=z, entropy=z, certainty=z,
                   texts=texts, truncated=[False] * len(texts), sizes=sizes)


def test_groups_of_different_sizes_index_and_concatenate_in_prompt_order():
    fixed = _texts_rollout(["a", "b", "c", "d"], n=2)
    assert fixed.group_sizes == [2, 2] and list(fixed.group(1)) == [2, 3]  # sizes=None: n each, as before
    varied = _texts_rollout(["a", "b", "c", "d", "e", "f"], n=4, sizes=[1, 4, 1])
    assert [list(varied.group(p)) for p in range(3)] == [[0], [1, 2, 3, 4], [5]]
    # Ranks' parts, one with a prompt that stopped early, one with every prompt at N: one step, in order.
    whole = Rollout.concat([varied, _texts_rollout(["g", "h", "i", "j"], n=4, prompts=[[2]])])
    assert whole.group_sizes == [1, 4, 1, 4] and whole.n == 4
    assert [whole.texts[i] for i in whole.group(3)] == ["g", "h", "i", "j"]
    assert Rollout.concat([fixed, _texts_rollout(["e", "f"], n=2)]).sizes is None  # all at N: no sizes kept
