"""``DashKVCPUWorker``: vLLM's CPU worker, which also tells DASH-KV's metadata builders each request's prompt length.

DASH-KV decodes a generated token with selection, a prompt token densely. vLLM's builders see positions, not where a
request's prompt ends, and vLLM recomputes a preempted request's generated tokens in a prefill: without the prompt
length those would be prefilled densely, where the uninterrupted run decoded them with selection (and the request
would continue differently). The engine's input batch holds the prompt lengths (``num_prompt_tokens``), row for row
with the batch the builders see; this worker hands every DASH-KV builder a reader of it once, after the builders are
made. ``hf_dashkv.vllm.LLM`` and ``dashkv serve`` start engines with it (``worker_cls``).
"""

from __future__ import annotations

import itertools

from vllm.v1.worker.cpu_worker import CPUWorker

from .backend import DashKVCPUMetadataBuilder


class DashKVCPUWorker(CPUWorker):
    """``CPUWorker`` whose DASH-KV metadata builders read the prompt lengths of the batch they build for."""

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        runner = self.model_runner

        def prompt_lengths():
            return runner.input_batch.num_prompt_tokens_cpu_tensor  # read at each build: the runner may replace it

        for group in itertools.chain.from_iterable(runner.attn_groups):
            for builder in group.metadata_builders:
                if isinstance(builder, DashKVCPUMetadataBuilder):
                    builder.prompt_lengths = prompt_lengths
