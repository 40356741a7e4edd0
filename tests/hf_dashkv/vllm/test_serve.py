"""``dashkv serve``: refusals before anything starts (no vLLM needed), and (e) the OpenAI-compatible server with
DASH-KV on a tiny random Llama, from this environment (without vLLM) through ``.venv-vllm``: one completion over
loopback, the server always stopped."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hf_dashkv.apps import cli
from hf_dashkv.vllm import serve as serve_module
from tests.hf_dashkv.vllm.test_vllm_e2e import VLLM_PYTHON
from tests.hf_dashkv.vllm.test_llm_refusals import saved_config

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def no_exec(monkeypatch):
    started = []
    monkeypatch.setattr(serve_module.os, "execve", lambda *a: started.append(a))
    return started


def test_other_architectures_are_refused_before_anything_starts(tmp_path, no_exec):
    with pytest.raises(SystemExit, match=r"dashkv serve: DASH-KV in vLLM supports .*PhiForCausalLM"):
        cli.main(["serve", saved_config(tmp_path, "llama-gqa", "PhiForCausalLM"), "--dtype", "float32"])
    assert no_exec == []


def test_foreign_encoders_are_refused_before_anything_starts(tmp_path, no_exec):
    # the default encoders are SmolLM2's: a 4-layer tiny Llama does not fit them
    with pytest.raises(SystemExit, match="do not fit this model"):
        cli.main(["serve", saved_config(tmp_path, "llama-gqa", "LlamaForCausalLM"), "--budget", "8"])
    assert no_exec == []


def test_the_server_command_carries_the_overrides_and_passes_the_rest_through(tmp_path, no_exec):
    from hf_dashkv import EncoderConfig, HashEncoders
    from tests.tiny import CONFIGS

    model = saved_config(tmp_path, "llama-gqa", "LlamaForCausalLM")
    HashEncoders.random(CONFIGS["llama-gqa"](), EncoderConfig(bits=16, query_hidden=0)).save_pretrained(tmp_path / "e")
    cli.main(["serve", model, "--encoders", str(tmp_path / "e"), "--budget", "8", "--port", "8123", "--dtype",
              "float32", "--hf-overrides", '{"rope_theta": 10000.0}'])
    ((python, argv, _),) = no_exec
    assert argv[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", model] and argv[-2:] == ["--dtype", "float32"]
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])
    assert overrides["architectures"] == ["DashKVLlamaForCausalLM"] and overrides["rope_theta"] == 10000.0
    assert json.loads(overrides["dashkv_policy"])["budget"] == 8 and argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--worker-cls") + 1] == "hf_dashkv.vllm.worker.DashKVCPUWorker"
    # another worker would not tell the backend where prompts end: refused before anything starts
    with pytest.raises(SystemExit, match="leave worker_cls out"):
        cli.main(["serve", model, "--encoders", str(tmp_path / "e"), "--budget", "8", "--worker-cls", "my.Worker"])
    assert len(no_exec) == 1


def save_tiny_llama_with_tokenizer(folder: Path) -> None:
    """The e2e tests' tiny random Llama (fp32, vocab 256) with a word-level tokenizer ("w0" .. "w255"), so that the
    server can take a text prompt and return text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hf_dashkv.vllm.selftest import save_tiny

    save_tiny(str(folder))
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0").save_pretrained(str(folder))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, body: dict | None = None, timeout: float = 5) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_serve_answers_a_completion_with_dashkv_on(tmp_path):
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run scripts/install_vllm.sh, which makes the vLLM environment.")
    from hf_dashkv.vllm.selftest import save_random_encoders

    model = tmp_path / "tiny-llama"
    save_tiny_llama_with_tokenizer(model)
    save_random_encoders(str(tmp_path / "encoders"), str(model), bits=32)
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DASHKV_VLLM_PYTHON": str(VLLM_PYTHON)}
    started = time.monotonic()
    server = subprocess.Popen(
        [sys.executable, "-m", "hf_dashkv.apps.cli", "serve", str(model), "--encoders", str(tmp_path / "encoders"),
         "--budget", "8", "--sink-tokens", "4", "--recent-tokens", "8", "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--served-model-name", "tiny",
         # a fixed K/V budget: by default vLLM reserves a share of all memory, which a busy machine may not have free
         "--kv-cache-memory-bytes", str(64 << 20)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            assert server.poll() is None, f"the server exited ({server.returncode}):\n{_tail(log)}"
            assert time.monotonic() - started < 180, f"no /health within 180 s:\n{_tail(log)}"
            try:
                if get(f"{base}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        ready = time.monotonic() - started
        # 60 prompt tokens: decode steps attend to 4 sinks + 8 recent + 8 selected of 60+ rows
        prompt = " ".join(f"w{(7 * i) % 251 + 1}" for i in range(60))
        status, body = get(f"{base}/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 6,
                                                      "temperature": 0, "ignore_eos": True}, timeout=60)
        print(f"ready after {ready:.1f} s; completion: {status} {body[:300]!r}")
        assert status == 200, body
        choice = json.loads(body)["choices"][0]
        assert choice["text"].strip() and json.loads(body)["usage"]["completion_tokens"] == 6
        assert "Resolved architecture: DashKVLlamaForCausalLM" in _tail(log, 10**6)  # the hf_overrides arrived
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # vLLM's server and the engine process it started
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)
        log.close()


def _tail(log, chars: int = 6000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-chars:]
