"""Optional rollout on vLLM (`rollout.backend=vllm`, `pip install 'ttrl[vllm]'`, CUDA only).

Each rank runs its own vLLM engine beside the trained model on its GPU ("colocated", tensor
parallel 1) and samples its share of the prompts there; after every update the trained weights
are copied into the engine. The sampling log-probs are recomputed with the trained model
(`score`), so the importance ratio compares one implementation of the policy with itself; vLLM
gives no per-token entropy, so entropy-based rewards and stopping need the torch backend.

UNTESTED: written against vLLM's offline `LLM` API (0.8-0.11) without a GPU to run it on; the
torch backend is the reference implementation.
"""

from __future__ import annotations

import os

import torch

from ttrl.config import Config, ConfigError
from ttrl.distributed import warn
from ttrl.models import ModelError, resolve
from ttrl.rollout import Rollout, Sampling, score

GPU_MEMORY = float(os.environ.get("TTRL_VLLM_GPU_MEMORY", "0.3"))
"""Share of the GPU's memory vLLM may take (weights + KV cache); the rest is for training."""


class VLLMSampler:
    """vLLM behind the same interface as the built-in engine (ttrl.rollout.Sampler)."""

    def __init__(self, cfg: Config, policy, tokenizer, dist):
        try:
            import vllm
        except ImportError:
            raise ModelError("rollout.backend=vllm needs vLLM: pip install 'ttrl[vllm]' (CUDA GPUs only); "
                             "or use rollout.backend=torch") from None
        if not torch.cuda.is_available():
            raise ModelError("rollout.backend=vllm needs a CUDA GPU; on CPU use rollout.backend=torch")
        unsupported = [why for bad, why in [
            (cfg.reward.kind in ("neg_entropy", "self_certainty"), f"reward.kind={cfg.reward.kind}"),
            (cfg.reward.kind == "penalized_majority" and cfg.reward.penalty_entropy_gate,
             "reward.penalty_entropy_gate=true (set it false)"),
            (cfg.train.stop_on in ("entropy", "collapse"), f"train.stop_on={cfg.train.stop_on}"),
            (cfg.model.lora_rank > 0, "model.lora_rank > 0"),
            (dist.sharded, "FSDP / DeepSpeed (use DDP: configs/accelerate/multi_gpu.yaml)")] if bad]
        if unsupported:
            raise ConfigError(f"rollout.backend=vllm does not support {', '.join(unsupported)} yet; "
                              "use rollout.backend=torch")
        warn("rollout.backend=vllm gives no per-token entropy: train/entropy is NaN, and the collapse watch "
             "(docs/method.md), which needs it, does not run; watch train/majority_ratio and response length")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights sync in place
        self.cfg, self.tokenizer, self.dist = cfg, tokenizer, dist
        self.llm = vllm.LLM(model=str(resolve(cfg.model.name)), dtype=cfg.model.dtype, seed=cfg.train.seed,
                            gpu_memory_utilization=GPU_MEMORY, tensor_parallel_size=1,
                            distributed_executor_backend="external_launcher" if dist.world > 1 else None,
                            max_model_len=getattr(policy.config, "max_position_embeddings", None),
                            enable_prefix_caching=True)
        self._vllm = vllm
        if cfg.model.architecture:  # a randomly initialised model of that shape: start from our weights
            self.sync(policy)

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
        """Copy the trained weights into the engine (after each update)."""
        state = self.dist.unwrap(model).state_dict()
        engine = self.llm.llm_engine
        executor = getattr(engine, "model_executor", None) or engine.engine_core.engine_core.model_executor
        worker = executor.driver_worker
        runner = getattr(worker, "worker", worker).model_runner
        runner.model.load_weights(state.items())
        self.llm.reset_prefix_cache()  # cached keys/values were computed with the old weights
