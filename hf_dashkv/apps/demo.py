"""The `dashkv generate` job: a question about a long real document, answered with full attention and with DASH-KV.

The document is public-domain text from the registry package ``sotu`` (State of the Union addresses) with one
planted fact (a passkey) at a chosen depth; the question asks for it. The prompt is plain text, the format in
which SmolLM2 retrieves such facts reliably with full attention.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..compat import with_cache
from ..corpora import sotu_text


@dataclass
class PasskeyPrompt:
    text: str
    answer: str
    num_tokens: int


def passkey_prompt(tokenizer, context_tokens: int, passkey: str = "71432", depth: float = 0.5) -> PasskeyPrompt:
    """A document of about ``context_tokens`` tokens with ``passkey`` planted at relative ``depth``, then the question."""
    needle = f" The secret passkey is {passkey}. Remember it: the secret passkey is {passkey}. "
    question = "\n\nQuestion: What is the secret passkey mentioned in the text above?\nAnswer: The secret passkey is"
    budget = context_tokens - len(tokenizer(needle + question).input_ids)
    if budget < 16:
        raise ValueError(f"context_tokens={context_tokens} leaves no room for a document; use at least 128.")
    doc_ids = tokenizer(sotu_text()).input_ids[:budget]
    cut = int(len(doc_ids) * depth)
    text = tokenizer.decode(doc_ids[:cut]) + needle + tokenizer.decode(doc_ids[cut:]) + question
    return PasskeyPrompt(text=text, answer=passkey, num_tokens=len(tokenizer(text).input_ids))


class StepClock(LogitsProcessor):
    """Records the time of every generation step; the first step comes right after prefill."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores

    def tokens_per_second(self) -> float:
        """Decode steps per second, prefill excluded."""
        steps = len(self.times) - 1
        return steps / (self.times[-1] - self.times[0]) if steps > 0 else float("nan")


@dataclass
class TimedGeneration:
    text: str
    new_tokens: int
    decode_tokens_per_s: float


@torch.inference_mode()
def timed_generate(model, tokenizer, prompt: str, cache, max_new_tokens: int) -> TimedGeneration:
    """Greedy ``generate`` with ``cache``, timing decode steps only (prefill excluded)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    clock = StepClock()
    out = model.generate(
        **inputs,
        **with_cache(cache),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    new = out[0, inputs.input_ids.shape[1] :]
    return TimedGeneration(tokenizer.decode(new, skip_special_tokens=True), len(new), clock.tokens_per_second())
