"""Optional rollout on vLLM (`rollout.backend=vllm`): on GPUs (`pip install 'ttrl[vllm]'`) and on
CPUs with vLLM's CPU build (`make install-vllm`), one code path.

The engine runs in this process beside the trained model ("colocated"; under DDP each rank has its
own, tensor parallel 1) and samples its share of the prompts; after every update the trained
weights are loaded into it in place (the worker's `reload_weights`, on GPU and CPU alike). The
sampling log-probs are recomputed with the trained model (`score`), so the importance ratio
compares one implementation of the policy with itself; vLLM gives no per-token entropy, so
entropy-based rewards and stopping need the torch backend. Tested on the CPU build
(tests/test_vllm.py); the GPU settings are vLLM's defaults.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager

import torch

from ttrl.config import Config, ConfigError
from ttrl.console import warn
from ttrl.models import ModelError, model_config, resolve
from ttrl.rewards import needs_entropy
from ttrl.rollout import Rollout, Sampling
from ttrl.scoring import score

GPU_MEMORY = float(os.environ.get("TTRL_VLLM_GPU_MEMORY", "0.3"))
"""Share of the GPU's memory vLLM may take (weights + KV cache); the rest is for training."""
CPU_KV_CACHE_BYTES = (64 << 20, 1 << 30)
"""Least and most of the engine's KV cache on CPU (vLLM would otherwise take a share of host RAM);
in between, what a step's samples take (`cpu_kv_cache_bytes`). VLLM_CPU_KVCACHE_SPACE (GiB, vLLM's
own setting) overrides it."""
PROMPT_TOKENS = 512
"""Prompt length the CPU KV cache is sized for (longer prompts fit, fewer at a time)."""
INSTALL = "pip install 'ttrl[vllm]' on a CUDA machine, or `make install-vllm` (vLLM's CPU build)"


def check(cfg: Config, dist) -> None:
    """Refuse, before any model loads, what the vLLM backend cannot do (one `error:` line each)."""
    unsupported = [why for bad, why in [
        (needs_entropy(cfg.reward.kind, cfg.reward.penalty_entropy_gate),
         f"reward.kind={cfg.reward.kind}" + (" with reward.penalty_entropy_gate=true (set it false)"
                                              if cfg.reward.kind == "penalized_majority" else "")),
        (cfg.train.stop_on in ("entropy", "collapse"), f"train.stop_on={cfg.train.stop_on}"),
        (cfg.model.lora_rank > 0, "model.lora_rank > 0"),
        (dist.sharded, "train.parallel=fsdp (use DDP: train.parallel=ddp)")] if bad]
    if unsupported:
        raise ConfigError(f"rollout.backend=vllm does not support {', '.join(unsupported)} yet; "
                          "use rollout.backend=torch", "rollout.backend")
    platform = _platform()
    if platform.is_unspecified():
        raise ConfigError("rollout.backend=vllm: the installed vLLM finds no device it runs on (a GPU build on a "
                          f"machine without a GPU?); {INSTALL}, or use rollout.backend=torch", "rollout.backend")
    if platform.device_type != dist.device.type:
        raise ConfigError(f"rollout.backend=vllm: the installed vLLM runs on {platform.device_type} but the model "
                          f"trains on {dist.device.type}; install the matching build ({INSTALL}) or use "
                          "rollout.backend=torch", "rollout.backend")
    if platform.is_cpu() and dist.world > 1:
        raise ConfigError(f"rollout.backend=vllm on CPU runs in one process, this launch has {dist.world}; run "
                          "`ttrl train` without torchrun / accelerate launch, or use rollout.backend=torch",
                          "rollout.backend")
    if platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes, head_dim = CPUAttentionBackend.get_supported_head_sizes(), _head_dim(model_config(cfg.model))
        if head_dim not in sizes:
            raise ConfigError(f"rollout.backend=vllm on CPU: the model's attention heads have {head_dim} dimensions; "
                              f"vLLM's CPU attention takes {', '.join(map(str, sizes))} only (model.architecture: "
                              "hidden_size / num_attention_heads, or head_dim); or use rollout.backend=torch",
                              "rollout.backend")


def _platform():
    try:
        from vllm.platforms import current_platform
    except ImportError:
        raise ModelError(f"rollout.backend=vllm needs vLLM: {INSTALL}; or use rollout.backend=torch") from None
    return current_platform


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_bytes_per_token(config, dtype: str) -> int:
    """Bytes of keys and values one token holds in the KV cache (all layers)."""
    head_dim = _head_dim(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(getattr(torch, dtype)).bits // 8


def cpu_kv_cache_bytes(cfg: Config, config) -> int:
    """Room for one step's samples at once (its prompts shared by prefix caching, each with its N
    answers), within CPU_KV_CACHE_BYTES: less would queue them, more is memory training may need."""
    new_tokens = max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
    tokens = cfg.train.prompts_per_step * (PROMPT_TOKENS + cfg.rollout.n_votes * new_tokens)
    low, high = CPU_KV_CACHE_BYTES
    return min(max(tokens * kv_bytes_per_token(config, cfg.model.dtype), low), high)


def engine_settings(cfg: Config, config, cpu: bool, world: int) -> dict:
    """vLLM's `LLM(...)` keyword arguments besides the model. On CPU: eager (compiling costs minutes
    of start-up), no chunked prefill (seeded sampling fails with it), an explicit KV cache, and a
    context no longer than that cache holds."""
    settings = dict(dtype=cfg.model.dtype, seed=cfg.train.seed, tensor_parallel_size=1, enable_prefix_caching=True,
                    logprobs_mode="processed_logprobs")
    positions = getattr(config, "max_position_embeddings", None)
    if not cpu:
        return {**settings, "gpu_memory_utilization": GPU_MEMORY, "max_model_len": positions,
                "distributed_executor_backend": "external_launcher" if world > 1 else None}
    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    kv_bytes = int(space) << 30 if space else cpu_kv_cache_bytes(cfg, config)
    # vLLM rounds the cache down to whole blocks (of all layers): leave it a tenth to spare
    length = min(positions or 1 << 20, int(0.9 * kv_bytes / kv_bytes_per_token(config, cfg.model.dtype)) // 256 * 256)
    return {**settings, "enforce_eager": True, "enable_chunked_prefill": False, "max_model_len": length,
            "max_num_batched_tokens": length, "kv_cache_memory_bytes": kv_bytes}


@contextmanager
def torch_threads_kept():
    """An in-process vLLM engine on CPU would leave torch at one thread (training silently single-
    threaded) and `torch.set_num_threads` a no-op; keep the thread count and the function as they were."""
    threads, set_threads, omp = torch.get_num_threads(), torch.set_num_threads, os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # vLLM leaves torch's threads alone where this is set
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        set_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


class VLLMSampler:
    """vLLM behind the same interface as the built-in engine (ttrl.rollout.Sampler)."""

    def __init__(self, cfg: Config, policy, tokenizer, dist):
        check(cfg, dist)
        import vllm

        warn("rollout.backend=vllm gives no per-token entropy: train/entropy is NaN, and the collapse watch "
             "(docs/method.md), which needs it, does not run, nor does train.guard; watch train/majority_ratio and "
             "response length")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights sync in place
        self.cfg, self.tokenizer, self.dist, self._vllm = cfg, tokenizer, dist, vllm
        settings = engine_settings(cfg, policy.config, _platform().is_cpu(), dist.world)
        with tempfile.TemporaryDirectory(prefix="ttrl-vllm-") as tmp, torch_threads_kept():
            model_dir = resolve(cfg.model.name)
            if cfg.model.architecture:  # a randomly initialised model of that shape: the engine starts from ours
                policy.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                model_dir = tmp
            self.llm = vllm.LLM(model=str(model_dir), **settings)

    def generate(self, model, prompt_ids: list[list[int]], s: Sampling, seeds: list[int]) -> Rollout:
        """`s.n` samples per prompt, each prompt on its own seed (as the torch sampler)."""
        model = self.dist.unwrap(model)
        params = [self._vllm.SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p,
                                            top_k=s.top_k if s.top_k else -1, max_tokens=s.max_new_tokens,
                                            stop=list(s.stop), include_stop_str_in_output=True, ignore_eos=s.ignore_eos,
                                            seed=seed % 2**63) for seed in seeds]
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        completion_ids = [list(o.token_ids) for out in outputs for o in out.outputs]
        truncated = [o.finish_reason == "length" for out in outputs for o in out.outputs]
        logprobs = []
        pad_id = self.tokenizer.pad_token_id
        with torch.no_grad(), self.dist.autocast():
            for p, prompt in enumerate(prompt_ids):  # one prompt (and its N samples) at a time: bounded memory
                group = completion_ids[p * s.n:(p + 1) * s.n]
                if not any(group):
                    logprobs += [torch.zeros(0) for _ in group]
                    continue
                lp, _ = score(model, [prompt], [c or [pad_id] for c in group], s.temperature, pad_id, group_size=s.n)
                logprobs += [lp[i, :len(c)].float().cpu() for i, c in enumerate(group)]
        nan = [torch.full((len(c),), float("nan")) for c in completion_ids]  # not computed by vLLM
        return Rollout(n=s.n, prompt_ids=[list(p) for p in prompt_ids], completion_ids=completion_ids,
                       logprobs=logprobs, entropy=nan, certainty=[t.clone() for t in nan],
                       texts=self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
                       truncated=truncated)

    def sync(self, model) -> None:
        """Load the trained weights into the engine (after each update), in place."""
        state = self.dist.unwrap(model).state_dict()
        dtype = getattr(torch, self.cfg.model.dtype)  # the engine's; trained weights are float32 (trained_weights)
        weights = ((name, w.to(dtype) if w.is_floating_point() else w) for name, w in state.items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached keys/values were computed with the old weights
