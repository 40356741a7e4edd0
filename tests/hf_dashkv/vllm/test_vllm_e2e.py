"""The vLLM plugin end to end: vLLM engines run in the vLLM environment (``.venv-vllm``, made by
``scripts/install.sh``: vLLM pins its own torch and transformers) through ``python -m hf_dashkv.vllm.selftest``;
this environment compares what they return. Every engine is single-process, eager and small.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from hf_dashkv.policy import DecodePolicy

REPO = Path(__file__).resolve().parents[3]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
TINY_PROMPTS = [list(range(1, 41)), list(range(5, 75))]


def selftest(tmp_path: Path, name: str, runs: list[dict], plugins: str | None = None, timeout: int = 150,
             **spec) -> list[dict]:
    """Run ``hf_dashkv.vllm.selftest`` in the vLLM environment; ``plugins=""`` turns every vLLM plugin off."""
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run scripts/install.sh, which makes the vLLM environment these "
                    "tests need.")
    out = tmp_path / f"{name}.json"
    spec_path = tmp_path / f"{name}-spec.json"
    spec_path.write_text(json.dumps({"out": str(out), "runs": runs, **spec}))
    # PYTHONPATH: worker processes (tensor parallelism) import this checkout too, not the editable install's
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    done = subprocess.run([str(VLLM_PYTHON), "-m", "hf_dashkv.vllm.selftest", str(spec_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"selftest {name} failed:\n{done.stderr[-6000:]}"
    return json.loads(out.read_text())["runs"]


def tiny_dashkv(tmp_path: Path, policy: DecodePolicy) -> dict:
    return {"encoders": str(tmp_path / "encoders"), "policy": policy.to_dict()}


def tiny_spec(tmp_path: Path) -> dict:
    model = str(tmp_path / "tiny-llama")
    return {"tiny": model, "random_encoders": {"folder": str(tmp_path / "encoders"), "model": model, "bits": 32}}


def test_installed_but_not_asked_for_is_stock_and_a_covering_budget_gives_stock_tokens(tmp_path):
    model = str(tmp_path / "tiny-llama")
    plain = {"model": model, "prompts": TINY_PROMPTS, "max_tokens": 12}
    (stock,) = selftest(tmp_path, "stock", [plain], plugins="", tiny=model)
    covering = {**plain, "dashkv": tiny_dashkv(tmp_path, DecodePolicy(budget=10_000, sink_tokens=4, recent_tokens=8))}
    installed, dashkv = selftest(tmp_path, "plugin", [plain, covering], **tiny_spec(tmp_path))

    assert stock["impls"] == ["CPUAttentionBackendImpl"]
    # (f) the plugin is loaded (its impl serves every layer) but nothing asked for DASH-KV: stock tokens
    assert installed["impls"] == ["DashKVCPUImpl"] and installed["dashkv_layers"] == []
    assert installed["tokens"] == stock["tokens"]
    # (b) DASH-KV on both layers, codes paged beside K/V, a budget that covers every context: stock tokens
    assert dashkv["dashkv_layers"] == ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    assert all(shape[1:] == [2, 32, 4] for shape in dashkv["codes_shapes"].values())  # [blocks, Hkv, 32, 32 bits]
    assert dashkv["tokens"] == stock["tokens"]


def test_small_budget_each_decode_step_is_the_librarys_selection(tmp_path):
    # a long third prompt, prefilled in chunks of 64 tokens while the others decode: mixed batches; a short one
    # whose context the budget covers throughout
    prompts = TINY_PROMPTS + [list(range(3, 9)), [(7 * i) % 251 + 1 for i in range(300)]]
    policy = DecodePolicy(budget=8, sink_tokens=4, recent_tokens=8)
    run = {"model": str(tmp_path / "tiny-llama"), "prompts": prompts, "max_tokens": 10, "check": True,
           "dashkv": tiny_dashkv(tmp_path, policy),
           "llm": {"max_num_batched_tokens": 64, "enable_chunked_prefill": True, "max_num_seqs": 4}}
    (result,) = selftest(tmp_path, "small", [run], **tiny_spec(tmp_path))
    checks = result["checks"]
    print(checks)
    assert checks["selected"] > 0 and checks["covered"] > 0 and checks["mixed batches"] > 0
    assert checks["code bytes differing"] == 0  # codes written at the K/V's slots, read back through the table
    assert checks["max covered error"] < 1e-4  # the stock kernel vs dense attention in PyTorch
    assert checks["max selected error"] < 1e-5  # = HashSelector's plan on the contiguous cache (generate's)
    assert checks["dropped rows"] == checks["selected"]  # every selected step attends to fewer rows than it has
    assert checks["max rows attended"] <= 4 + 8 + 8
    assert checks["max selected vs dense"] > 1e-3  # and that changes the output


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_families_give_stock_tokens_when_covered_and_the_librarys_selection_otherwise(tmp_path, family):
    # tiny random Qwen2 (q/k/v biases) and Qwen3 (q/k norms before RoPE), their biases and norms random: the codes
    # read back must be encode_keys of the keys vLLM cached, and those are the keys after norm and RoPE
    model = str(tmp_path / f"tiny-{family}")
    plain = {"model": model, "prompts": TINY_PROMPTS, "max_tokens": 12}
    covering = {**plain, "dashkv": tiny_dashkv(tmp_path, DecodePolicy(budget=10_000, sink_tokens=4, recent_tokens=8))}
    small = {**plain, "max_tokens": 10, "check": True,
             "dashkv": tiny_dashkv(tmp_path, DecodePolicy(budget=8, sink_tokens=4, recent_tokens=8))}
    spec = {"tiny": model, "family": family,
            "random_encoders": {"folder": str(tmp_path / "encoders"), "model": model, "bits": 32}}
    stock, dashkv, selected = selftest(tmp_path, family, [plain, covering, small], **spec)
    checks = selected["checks"]
    print(family, checks, [(run["build_seconds"], run["generate_seconds"]) for run in (stock, dashkv, selected)])
    assert stock["dashkv_layers"] == []
    assert dashkv["dashkv_layers"] == selected["dashkv_layers"] == [f"model.layers.{i}.self_attn.attn" for i in (0, 1)]
    assert dashkv["tokens"] == stock["tokens"]
    # 2 layers x 2 prompts x 9 decode steps, each selecting 4 + 8 + 8 of >= 41 rows, = the library's plan
    assert checks["selected"] == checks["dropped rows"] == 2 * 2 * 9
    assert checks["code bytes differing"] == 0 and checks["max selected error"] < 1e-5
    assert checks["max rows attended"] <= 4 + 8 + 8 and checks["max selected vs dense"] > 1e-3


def test_two_tensor_parallel_ranks_give_the_single_process_dashkv_tokens(tmp_path, monkeypatch):
    # vLLM's CPU build runs tensor parallelism as worker processes (gloo); with 2 KV heads, each rank holds one KV
    # head, its two query heads and their encoders (LayerEncoders.shard). The per-step checker cannot reach the
    # workers, so the claim is on tokens: the budget-8 tokens of 2 ranks are the single process's, which differ from
    # stock (so selection ran on the ranks). Thread binding off: 2 workers on one NUMA node otherwise refuse to start.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    model = str(tmp_path / "tiny-qwen3")
    dashkv = {"model": model, "prompts": TINY_PROMPTS, "max_tokens": 10,
              "dashkv": tiny_dashkv(tmp_path, DecodePolicy(budget=8, sink_tokens=4, recent_tokens=8))}
    runs = [{**dashkv, "llm": {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}},
            {**dashkv, "check": True}, {"model": model, "prompts": TINY_PROMPTS, "max_tokens": 10}]
    spec = {"tiny": model, "family": "qwen3",
            "random_encoders": {"folder": str(tmp_path / "encoders"), "model": model, "bits": 32}}
    ranks, single, stock = selftest(tmp_path, "tp", runs, timeout=240, **spec)
    print(ranks["tokens"], single["tokens"], stock["tokens"], ranks["build_seconds"], ranks["generate_seconds"])
    assert single["checks"]["selected"] > 0 and single["checks"]["max selected error"] < 1e-5
    assert single["tokens"] != stock["tokens"]
    assert ranks["tokens"] == single["tokens"]


@pytest.mark.slow
def test_smollm2_at_1_32_with_shipped_encoders_matches_generate(tmp_path, smollm2):
    import torch

    from hf_dashkv import DashKVCache, HashEncoders, with_cache
    from hf_dashkv.corpora import sotu_text
    from hf_dashkv.embedded import embedded_model_dir, shipped_encoders

    model, tokenizer = smollm2
    ids = tokenizer(sotu_text(), return_tensors="pt").input_ids[0]
    prompts = [ids[:2000].tolist(), ids[6000:8100].tolist()]
    new_tokens = 16
    encoders = HashEncoders.from_pretrained(shipped_encoders("smollm2-135m"))
    assert encoders.policy.budget == 1 / 32
    reference = []
    with torch.inference_mode():
        for prompt in prompts:
            cache = DashKVCache(model.config, encoders)
            out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id, **with_cache(cache))
            reference.append(out[0, len(prompt):].tolist())
    run = {"model": str(embedded_model_dir("smollm2-135m")), "prompts": prompts, "max_tokens": new_tokens,
           "dashkv": {"encoders": None, "policy": None}, "check": True,
           "llm": {"max_model_len": 2304, "kv_cache_memory_bytes": 320 << 20}}
    (result,) = selftest(tmp_path, "smollm2", [run], timeout=240)
    # the layers the shipped encoders hash (all but 12, 14, 26, 29, which run stock), each with a codes cache
    hashed = encoders.layout.hashed_layers
    assert result["dashkv_layers"] == sorted(f"model.layers.{i}.self_attn.attn" for i in hashed)
    assert len(result["codes_shapes"]) == len(hashed) == 26
    agree = [sum(a == b for a, b in zip(mine, theirs)) for mine, theirs in zip(result["tokens"], reference)]
    prefix = [next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), new_tokens)
              for mine, theirs in zip(result["tokens"], reference)]
    checks = result["checks"]
    print("vLLM", result["tokens"], "generate", reference, "agree", agree, "common prefix", prefix, checks,
          result["cache"],
          {k: v for k, v in result.items() if k.endswith("seconds")})
    # every hashed layer's decode steps select (2k contexts, 63 + 4 + 64 rows) and equal the library's plan
    # (HashSelector with re-ranking, on vLLM's own K/V read back) to float rounding
    assert checks["selected"] == checks["dropped rows"] == 26 * 2 * (new_tokens - 1)
    assert checks["code bytes differing"] == 0 and checks["max selected error"] < 1e-5
    # Against transformers' generate: measured 32 of 32 tokens equal (both prompts, all 16 steps). The two engines'
    # fp32 kernels round differently (~1e-6 in the hidden states), which can flip a key-code bit near zero and so
    # change a selected row; the bound leaves room for one late divergence per prompt on another CPU.
    assert min(prefix) >= new_tokens // 2 and sum(agree) >= 2 * new_tokens - 4
    # memory, as vLLM bound the caches: K/V 30 layers x 3 heads x 2 x 64 fp32 = 46,080 bytes per token; codes
    # 26 layers x 3 heads x 16 bytes = 1,248 (2.7%), both inside the kv_cache_memory_bytes budget
    cache = result["cache"]
    assert cache["kv_bytes_per_token"] == 30 * 3 * 2 * 64 * 4 and cache["codes_bytes_per_token"] == 26 * 3 * 16
    assert cache["codes_bytes_per_token"] <= 0.03 * cache["kv_bytes_per_token"] and cache["bytes"] <= 320 << 20


def test_prefix_cache_hits_reuse_the_codes_with_the_kv(tmp_path):
    # a second request shares the first one's 3 full blocks (96 tokens): vLLM reuses those blocks' K/V, and so
    # their codes (same block ids); with prefix caching off, both are recomputed. Same tokens, every step checked.
    shared = [(5 * i) % 251 + 1 for i in range(100)]
    policy = DecodePolicy(budget=8, sink_tokens=4, recent_tokens=8)
    run = {"model": str(tmp_path / "tiny-llama"), "prompts": [shared], "then": [[shared[:96] + list(range(1, 41))]],
           "max_tokens": 10, "check": True, "dashkv": tiny_dashkv(tmp_path, policy)}
    uncached = {**run, "llm": {"enable_prefix_caching": False}}
    cached, recomputed = selftest(tmp_path, "prefix", [run, uncached], **tiny_spec(tmp_path))
    print(cached["checks"], recomputed["checks"])
    assert cached["prefix_caching"] and not recomputed["prefix_caching"]
    assert recomputed["checks"]["tokens hashed"] - cached["checks"]["tokens hashed"] == 96  # the hit was real
    assert cached["then_tokens"] == recomputed["then_tokens"] and cached["tokens"] == recomputed["tokens"]
    for checks in (cached["checks"], recomputed["checks"]):
        assert checks["selected"] > 0 and checks["code bytes differing"] == 0
        assert checks["max selected error"] < 1e-5


# (d) continuous batching. Eight prompts of different lengths (5 and 17 tokens: covered by the budget of 4 + 8 + 8
# rows for some or all steps; the rest select), the last two sharing a 4-block prefix; none shares a block otherwise.
# Lengths 60, 125, 158 and 190 reach a new block while decoding: under a cache of 26 blocks the running requests
# outgrow it and the scheduler must preempt one.
SHARED_PREFIX = [(5 * i) % 251 + 1 for i in range(128)]
BATCH_TOKENS = 10


def distinct_prompt(n: int, k: int) -> list[int]:
    return [(k * 37 + 11 * i * (k + 1)) % 251 + 1 for i in range(n)]


BATCH_PROMPTS = [distinct_prompt(n, k) for k, n in enumerate([5, 17, 40, 60, 100, 125], start=1)] + [
    SHARED_PREFIX + distinct_prompt(30, 7), SHARED_PREFIX + distinct_prompt(62, 8)]


NEXT_TURN = [distinct_prompt(10, k) for k in range(9, 17)]


@pytest.fixture(scope="module")
def batching(tmp_path_factory):
    """One selftest process, three engines, every DASH-KV decode step checked:

    - ``batched``: the eight prompts in one ``generate`` call, prefix caching on (vLLM's default), a roomy cache;
    - ``pressure``: the same call, prefix caching off, 27 blocks (26 usable): requests are preempted and
      recomputed from scratch (caching off, so nothing of a preempted request survives in the cache: every one of
      its tokens is prefilled and hashed again);
    - ``alone``: each prompt in a ``generate`` call of its own, prefix caching off, a roomy cache: the reference.
      On one engine: with caching off nothing carries over from one call to the next but stale block contents,
      which no step reads (a fresh engine per prompt would cost 8 builds and prove no more);

    ``batched`` and ``alone`` then run a next turn (``NEXT_TURN``): each prompt followed by its output and 10 new
    tokens, batched with caching on (hits on the first turn's blocks) and alone with caching off.
    """
    tmp_path = tmp_path_factory.mktemp("batching")
    policy = DecodePolicy(budget=8, sink_tokens=4, recent_tokens=8)
    run = {"model": str(tmp_path / "tiny-llama"), "prompts": BATCH_PROMPTS, "max_tokens": BATCH_TOKENS,
           "check": True, "dashkv": tiny_dashkv(tmp_path, policy)}
    off = {"max_model_len": 256, "enable_prefix_caching": False}
    turn = {"next_turn": NEXT_TURN}
    runs = [{**run, **turn, "llm": {"max_model_len": 256}}, {**run, "llm": {**off, "num_gpu_blocks_override": 27}},
            {**run, **turn, "alone": True, "llm": off}]
    results = selftest(tmp_path, "batching", runs, timeout=240, **tiny_spec(tmp_path))
    return dict(zip(["batched", "pressure", "alone"], results))


def tokens_hashed_alone() -> int:
    """Tokens whose codes are written when each prompt runs alone: its prompt, then each fed-back token."""
    return sum(len(p) + BATCH_TOKENS - 1 for p in BATCH_PROMPTS)


def assert_every_step_checked(checks: dict) -> None:
    assert checks["selected"] > 0 and checks["covered"] > 0
    assert checks["code bytes differing"] == 0  # codes read through the block table = codes of the K/V read
    assert checks["max selected error"] < 1e-5 and checks["max covered error"] < 1e-4
    assert checks["dropped rows"] == checks["selected"]  # each selected step attends to fewer rows than it has


def test_eight_batched_requests_two_sharing_a_cached_prefix_each_equal_their_run_alone(batching):
    batched, alone = batching["batched"], batching["alone"]
    print({name: (r["checks"], r["preempted"], r["generate_seconds"]) for name, r in batching.items()})
    assert batched["prefix_caching"] and not alone["prefix_caching"]
    assert batched["preempted"] == [] and alone["preempted"] == []
    assert alone["checks"]["tokens hashed"] == tokens_hashed_alone()
    # the second sharer found the first one's 4 prefix blocks cached within the same generate call (scheduled in
    # the same step: each layer writes K/V and codes of the whole batch before any request attends)
    assert batched["checks"]["tokens hashed"] == tokens_hashed_alone() - len(SHARED_PREFIX)
    assert batched["tokens"] == alone["tokens"]
    for run in (batched, alone):
        assert_every_step_checked(run["checks"])


def test_a_preempted_request_is_recomputed_with_its_codes_and_equals_its_run_alone(batching):
    pressure, alone = batching["pressure"], batching["alone"]
    print(pressure["preempted"], pressure["checks"], pressure["zeroing"])
    preempted = {p["prompt"]: p["output_tokens"] for p in pressure["preempted"]}
    assert preempted and len(preempted) == len(pressure["preempted"])  # at least one, each once
    # RECOMPUTE with caching off: every token a preempted request had computed (its prompt and all but the last
    # token it had generated) is hashed again, its codes rewritten with its K/V in the blocks it gets anew
    recomputed = sum(len(BATCH_PROMPTS[i]) + k - 1 for i, k in preempted.items())
    assert pressure["checks"]["tokens hashed"] == tokens_hashed_alone() + recomputed
    # no block is zeroed: freed blocks come back with the codes of their last owner, and every step still reads
    # only codes written for its own tokens (the checks below run on every decode step)
    assert pressure["zeroing"]["blocks"] == 0
    assert_every_step_checked(pressure["checks"])
    # the recompute prefills a request's k generated positions (the last one is the next decode step); each that
    # the budget does not cover is replayed as the decode step it was, on every DASH-KV layer
    covering = 4 + 8 + 8  # sinks + recent + budget
    replayed = sum(sum(p + 1 > covering for p in range(len(BATCH_PROMPTS[i]), len(BATCH_PROMPTS[i]) + k))
                   for i, k in preempted.items())
    assert replayed > 0
    assert pressure["checks"]["replayed"] == replayed * len(pressure["dashkv_layers"])
    assert pressure["tokens"] == alone["tokens"]


def test_codes_are_paged_in_vllms_kv_cache_budget(batching):
    # 2 layers x 2 KV heads: K/V 2 x 32 fp32 = 256 bytes per head and token, codes 32 bits = 4 bytes
    cache = batching["batched"]["cache"]
    assert cache["kv_bytes_per_token"] == 2 * 2 * 256 and cache["codes_bytes_per_token"] == 2 * 2 * 4
    # the 64 MiB budget (the selftest's default) is divided by K/V and codes together: 2,016 blocks, not 2,048
    per_block = (cache["kv_bytes_per_token"] + cache["codes_bytes_per_token"]) * cache["block_size"]
    assert cache["num_blocks"] == (64 << 20) // per_block < (64 << 20) // (cache["kv_bytes_per_token"] * 32)
    assert cache["bytes"] <= 64 << 20



def test_a_next_turn_hits_the_blocks_of_its_first_turn_and_on_prompt_blocks_equals_its_run_alone(batching):
    # next turn: each prompt + its 10 generated tokens + 10 new ones. With caching on, it finds every full block of
    # its first turn's computed tokens (prompt + 9 fed back) cached; alone, with caching off, it recomputes them.
    cached, recomputed = batching["batched"]["next_turn"], batching["alone"]["next_turn"]
    lengths = [len(p) for p in BATCH_PROMPTS]
    hits = [32 * ((n + BATCH_TOKENS - 1) // 32) for n in lengths]
    turn = sum(n + 2 * 10 + BATCH_TOKENS - 1 for n in lengths)  # tokens hashed by the next turn alone
    assert recomputed["checks"]["tokens hashed"] - batching["alone"]["checks"]["tokens hashed"] == turn
    assert cached["checks"]["tokens hashed"] - batching["batched"]["checks"]["tokens hashed"] == turn - sum(hits)
    # hit blocks that hold only prompt tokens were prefilled in both runs: same K/V, same codes, same tokens
    # (blocks that hold generated tokens: next test)
    prompt_only = [i for i, (n, hit) in enumerate(zip(lengths, hits)) if hit <= n]
    assert len(prompt_only) == 4 and len(hits) - len(prompt_only) == 4
    for i in prompt_only:
        assert cached["tokens"][i] == recomputed["tokens"][i]
    for checks in (cached["checks"], recomputed["checks"]):
        assert_every_step_checked(checks)


@pytest.mark.xfail(strict=True, reason=(
    "vLLM caches full blocks of generated tokens too; their K/V in layers >= 1 were computed by DASH-KV decode "
    "steps (selected attention below), where the run alone prefills them (exact attention). Measured: 1 of the 4 "
    "next turns that hit such blocks (the 125-token prompt, 3 generated positions in its last hit block) diverges "
    "(a covering budget: all equal)."))
def test_a_next_turn_that_hits_blocks_of_generated_tokens_equals_its_run_alone(batching):
    assert batching["batched"]["next_turn"]["tokens"] == batching["alone"]["next_turn"]["tokens"]
