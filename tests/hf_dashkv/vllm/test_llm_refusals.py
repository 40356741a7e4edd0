"""``hf_dashkv.vllm.LLM`` checks the model, encoders and policy before it imports vLLM (so these run without it),
and the settings travel as ``hf_overrides`` fields that load back to the same encoders and policy."""

import re
import subprocess
import sys

import pytest

from hf_dashkv import DecodePolicy, EncoderConfig, HashEncoders
from hf_dashkv.embedded import shipped_encoders
from hf_dashkv.vllm import LLM, settings
from hf_dashkv.vllm.llm import prepare
from tests.tiny import CONFIGS


def saved_config(tmp_path, name, architecture, **changes):
    config = CONFIGS[name]()
    config.architectures = [architecture]
    config.update(changes)
    config.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def test_other_architectures_are_refused_naming_the_supported_ones(tmp_path):
    supported = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
    assert sorted(settings.ARCHITECTURES) == supported
    with pytest.raises(ValueError, match=re.escape(f"supports the architectures {supported}") + ".*PhiForCausalLM"):
        LLM(saved_config(tmp_path, "llama-gqa", "PhiForCausalLM"))
    # tried in vLLM 0.32 and refused: the message says why
    with pytest.raises(ValueError, match=re.escape(f"{supported} for now") + ".*Gemma3ForCausalLM.*block ids"):
        LLM(saved_config(tmp_path, "llama-gqa", "Gemma3ForCausalLM"))


def test_mistral_with_a_sliding_window_is_refused_and_the_override_lifts_it(tmp_path):
    model = saved_config(tmp_path, "mistral-gqa", "MistralForCausalLM", sliding_window=4096)
    HashEncoders.random(CONFIGS["mistral-gqa"](), EncoderConfig(bits=16, query_hidden=0)).save_pretrained(tmp_path / "e")
    with pytest.raises(ValueError, match=r"sets sliding_window=4096.*hf_overrides=\{'sliding_window': None\}"):
        LLM(model, encoders=tmp_path / "e")
    # a Mistral that attends to the whole context: the caller's override reaches the checks and the engine
    _, overrides = prepare(model, encoders=tmp_path / "e", extra={"sliding_window": None})
    assert overrides["sliding_window"] is None and overrides["architectures"] == ["DashKVMistralForCausalLM"]


def test_encoders_for_another_model_are_refused(tmp_path):
    # the default encoders are SmolLM2's: a 4-layer tiny Llama does not fit them
    with pytest.raises(ValueError, match="do not fit this model"):
        LLM(saved_config(tmp_path, "llama-gqa", "LlamaForCausalLM"))


def test_learned_terms_are_refused(tmp_path):
    model = saved_config(tmp_path, "llama-gqa", "LlamaForCausalLM")
    HashEncoders.random(CONFIGS["llama-gqa"](), EncoderConfig(bits=16, query_hidden=0)).save_pretrained(tmp_path / "e")
    with pytest.raises(ValueError, match="not the learned terms"):
        LLM(model, encoders=tmp_path / "e", policy=DecodePolicy(spatial_calibration=True))


def test_more_tensor_parallel_ranks_than_kv_heads_are_refused(tmp_path):
    model = saved_config(tmp_path, "llama-gqa", "LlamaForCausalLM")  # 2 KV heads
    HashEncoders.random(CONFIGS["llama-gqa"](), EncoderConfig(bits=16, query_hidden=0)).save_pretrained(tmp_path / "e")
    with pytest.raises(ValueError, match=r"each GQA group's query heads on one rank.*tensor_parallel_size <= 2"):
        LLM(model, encoders=tmp_path / "e", tensor_parallel_size=4)


def test_another_worker_is_refused(tmp_path):
    # DASH-KV's worker tells the backend where each prompt ends; vLLM's default ("auto") is replaced by it
    model = saved_config(tmp_path, "llama-gqa", "LlamaForCausalLM")
    HashEncoders.random(CONFIGS["llama-gqa"](), EncoderConfig(bits=16, query_hidden=0)).save_pretrained(tmp_path / "e")
    with pytest.raises(ValueError, match=r"worker_cls='my.Worker' was given: leave worker_cls out"):
        LLM(model, encoders=tmp_path / "e", worker_cls="my.Worker")
    assert settings.worker_cls("auto") == settings.worker_cls(None) == "hf_dashkv.vllm.worker.DashKVCPUWorker"


def test_overrides_load_back_the_encoders_and_policy():
    encoders = HashEncoders.from_pretrained(shipped_encoders("smollm2-135m"))
    from transformers import AutoConfig

    from hf_dashkv.embedded import embedded_model_dir

    config = AutoConfig.from_pretrained(embedded_model_dir("smollm2-135m"))
    policy = DecodePolicy(budget=0.0625, rerank=1)
    config.update(settings.overrides(shipped_encoders("smollm2-135m"), policy, "DashKVLlamaForCausalLM"))
    loaded, loaded_policy, layout = settings.load(config)
    assert loaded_policy == policy
    assert layout.hashed_layers == encoders.layout.hashed_layers
    assert all((a == b).all() for a, b in zip(loaded.state_dict().values(), encoders.state_dict().values()))


def test_importing_the_library_does_not_import_numba():
    # vLLM 0.32's CPU worker fails to start once llvmlite.binding is imported (its kernel-override scan trips over
    # llvmlite's library wrapper), and the plugin imports hf_dashkv in that process: the numba kernels load at first use
    code = "import sys, hf_dashkv, hf_dashkv.vllm.settings; assert 'numba' not in sys.modules, 'numba was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
