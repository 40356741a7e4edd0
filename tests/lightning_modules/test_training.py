"""Training the encoders: the Lightning module, the data module, `lightning fit`, resume, export and push."""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import safetensors.torch
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_dashkv import DashKVCache, DecodePolicy, EncoderConfig, HashEncoders, with_cache
from hf_dashkv.embedded import embedded_model_dir
from hf_dashkv.hub import encoders_from_checkpoint, export, load_with_adapter
from lightning_modules import DashKVDistillation, ExportEncoders, LongTextDataModule
from tests.tiny import SelectionLog

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a transformers folder, plus a few text documents."""
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper attention than a random init gives, so that there is something to learn
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / "docs").mkdir()
    words = "the of a river mountain city council harbour treaty budget navy winter".split()
    generator = torch.Generator().manual_seed(1)
    for i in range(6):
        picks = torch.randint(0, len(words), (900,), generator=generator).tolist()
        (folder / "docs" / f"doc{i}.txt").write_text(" ".join(words[j] for j in picks))
    return folder


def tiny_module(tiny_dir, **overrides):
    kwargs = dict(model=str(tiny_dir / "model"), bits=16, budget=0.125, sink_tokens=2, recent_tokens=8,
                  query_positions=32, lr=0.02, dense_layers=[0])
    return DashKVDistillation(**{**kwargs, **overrides})


def tiny_data(tiny_dir, **overrides):
    kwargs = dict(sources=[str(tiny_dir / "docs" / "*.txt")], tokenizer=str(tiny_dir / "model"), seq_len=128,
                  val_documents=1, max_val_blocks=1)
    return LongTextDataModule(**{**kwargs, **overrides})


def test_a_few_steps_reduce_the_loss_and_raise_recall(tiny_dir):
    module = tiny_module(tiny_dir, bits=32, beta_start=4.0, beta_end=4.0)
    ids = torch.randint(0, 1000, (2, 128), generator=torch.Generator().manual_seed(0))
    positions = module.late_positions(128, 48, torch.Generator().manual_seed(0))
    assert positions.min() >= 32 and len(positions.unique()) == 48  # the last three quarters, distinct
    captured = module.capture(ids, positions)
    module.set_input_scales([captured])
    scale_k = module.encoders[1].key.input_scale
    torch.testing.assert_close(scale_k, captured[1][1][:, :, 2:].norm(dim=-1).mean((0, 2)))  # keys after the sinks

    def ce_and_recall(encoders):
        ce = sum(module.layer_losses(layer, *captured[layer], positions)["ce"].item() for layer in module.hashed_layers)
        recall = sum(float(module.layer_ranking(encoders, layer, *captured[layer], positions)["R@8"].mean())
                     for layer in module.hashed_layers)
        return ce, recall

    ce_before, recall_before = ce_and_recall(module.encoders)
    assert recall_before == pytest.approx(ce_and_recall(module.random_encoders)[1])  # training starts at SimHash
    optimizer = torch.optim.Adam([*module.encoders.parameters(), module.log_temperature], lr=0.02)
    for _ in range(40):
        loss = 0
        for layer in module.hashed_layers:
            parts = module.layer_losses(layer, *captured[layer], positions)
            loss = loss + parts["ce"] + 0.1 * parts["balance"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ce_after, recall_after = ce_and_recall(module.encoders)
    assert ce_after < 0.9 * ce_before
    assert recall_after > recall_before
    assert float(module.weight_shift()) > 0


def test_the_teacher_keeps_its_top_keys_or_the_whole_list(tiny_dir):
    ids = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(100, 128)
    losses = {}
    for top in (1, 4, None):
        module = tiny_module(tiny_dir, teacher_top=top)
        captured = module.capture(ids, positions)
        losses[top] = module.layer_losses(1, *captured[1], positions)["ce"].item()
    # the student starts near uniform over the candidates, so every target costs about log(candidates);
    # a wider teacher spreads over keys the student ranks alike: the three targets differ
    assert len({round(v, 4) for v in losses.values()}) == 3
    with pytest.raises(ValueError, match="teacher_top=0"):
        tiny_module(tiny_dir, teacher_top=0)


def test_capture_leaves_the_model_outputs_unchanged(tiny_dir):
    module = tiny_module(tiny_dir)
    ids = torch.randint(0, 1000, (1, 40))
    reference = LlamaForCausalLM.from_pretrained(tiny_dir / "model", attn_implementation="sdpa").eval()
    with torch.no_grad():
        assert torch.equal(module.base(input_ids=ids).logits, reference(input_ids=ids).logits)
    captured = module.capture(ids, torch.tensor([30, 39]))  # stops after the last hashed layer
    assert sorted(captured) == [1, 2] and captured[1][0].shape == (1, 4, 2, 16) and captured[1][1].shape[2] == 40
    assert sorted(tiny_module(tiny_dir, dense_layers=[0, 2]).capture(ids, torch.tensor([39]))) == [1]
    assert captured[1][2] == 16**-0.5  # the model's own scaling


def test_qwen2_family_trains_too(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m")).save_pretrained(tmp_path)
    module = DashKVDistillation(model=str(tmp_path), bits=16, sink_tokens=2, recent_tokens=8, query_positions=16)
    positions = torch.arange(60, 96)
    captured = module.capture(torch.randint(0, 300, (1, 96)), positions)
    losses = module.layer_losses(1, *captured[1], positions)
    losses["ce"].backward()
    assert module.encoders[1].query.proj.grad.abs().sum() > 0
    assert module.encoders[1].key.weight.grad.abs().sum() > 0


def test_documents_are_split_not_blocks(tiny_dir):
    data = tiny_data(tiny_dir)
    data.prepare_data()
    data.setup("fit")
    train, val = data.splits["train"], data.splits["val"]
    assert train.shape[1] == val.shape[1] == 128 and len(train) > len(val) >= 1
    train_rows = {tuple(row.tolist()) for row in train}
    assert not any(tuple(row.tolist()) in train_rows for row in val)


def test_sources_take_turns_block_by_block(tiny_dir):
    docs = tiny_dir / "docs"
    first, second = str(docs / "doc[0-2].txt"), str(docs / "doc[3-5].txt")

    def blocks(sources):
        data = tiny_data(tiny_dir, sources=sources)
        data.prepare_data()
        data.setup("fit")
        return data.splits["train"]

    alone = [blocks([first]), blocks([second])]
    both = blocks([first, second])
    expected = [rows[i] for i in range(max(map(len, alone))) for rows in alone if i < len(rows)]
    assert len(both) == len(expected) and all(torch.equal(a, b) for a, b in zip(both, expected))


class KillAfter(L.Callback):
    """Stops training abruptly after ``steps`` optimizer steps, as a killed job would (its checkpoint is written)."""

    def __init__(self, steps):
        self.steps = steps

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def fit(tiny_dir, root, max_steps, ckpt_path=None, kill_after=None, module=None, callbacks=()):
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_last=True,
                                                      save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, use_distributed_sampler=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=root, log_every_n_steps=1,
        callbacks=[checkpoints, *([KillAfter(kill_after)] if kill_after else []), *callbacks],
    )
    L.seed_everything(0)
    module = module or tiny_module(tiny_dir)
    trainer.fit(module, datamodule=tiny_data(tiny_dir), ckpt_path=ckpt_path)
    return trainer, module


def test_resume_after_a_kill_loses_no_step_and_no_data(tiny_dir, tmp_path):
    _, straight = fit(tiny_dir, tmp_path / "straight", 4)
    first, _ = fit(tiny_dir, tmp_path / "killed", 4, kill_after=2)  # killed right after the step-2 checkpoint
    assert first.global_step == 2
    trainer, resumed = fit(tiny_dir, tmp_path / "killed", 4, ckpt_path="last")
    assert trainer.global_step == 4
    for name, tensor in straight.encoders.state_dict().items():
        assert torch.equal(tensor, resumed.encoders.state_dict()[name]), name


def test_export_round_trip_and_push_arguments(tiny_dir, tmp_path, monkeypatch):
    _, module = fit(tiny_dir, tmp_path, 2)
    out = tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "hf_dashkv.apps.cli", "export", str(tmp_path / "last.ckpt"), str(out)],
                   check=True, cwd=REPO)
    loaded = HashEncoders.from_pretrained(out)
    for name, tensor in module.encoders.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    card = (out / "README.md").read_text()
    assert str(tiny_dir / "model") in card and "optimizer steps: 2" in card
    # what training fixed, and the policy it selected with, recommended beside the weights (decode_policy.json)
    assert loaded.config == module.encoder_config and loaded.config.bits == 16
    trained_policy = DecodePolicy(budget=0.125, sink_tokens=2, recent_tokens=8)
    assert DecodePolicy.load(out / "decode_policy.json") == loaded.policy == module.policy == trained_policy
    assert loaded.layout.dense_layers == (0,)

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create_repo", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload_folder", folder_path, repo_id))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    from hf_dashkv.apps.cli import main

    assert main(["push", str(out), "me/tiny-dashkv"]) == 0
    assert calls[1:] == [("create_repo", "me/tiny-dashkv", False, True), ("upload_folder", str(out), "me/tiny-dashkv")]


def test_export_refuses_other_checkpoints(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a DashKVDistillation checkpoint"):
        encoders_from_checkpoint(tmp_path / "other.ckpt")


def test_a_checkpoint_with_the_legacy_combined_config_still_exports(tmp_path):
    # written before the encoders' shape and the decode policy were split: one "config" held both (and the
    # baseline knobs `selector` / `page_size`)
    from dataclasses import asdict

    from hf_dashkv.apps.cli import main
    from tests.tiny import CONFIGS

    encoders = HashEncoders.random(CONFIGS["llama-gqa"](), EncoderConfig(bits=16, query_hidden=8), (0,), seed=2)
    legacy = dict(bits=16, budget=0.125, sink_tokens=2, recent_tokens=8, dense_layers=(0,), query_hidden=8,
                  group_reduce="min", selector="hash", page_size=16, tier2_budget=0, spatial_calibration=False,
                  temporal_calibration=False, rerank=1)
    torch.save({"dashkv": {"layout": asdict(encoders.layout), "config": legacy, "recall": None},
                "state_dict": {f"encoders.{name}": value for name, value in encoders.state_dict().items()},
                "hyper_parameters": {"model": "tiny"}, "global_step": 3}, tmp_path / "legacy.ckpt")
    assert main(["export", str(tmp_path / "legacy.ckpt"), str(tmp_path / "out")]) == 0
    exported = HashEncoders.from_pretrained(tmp_path / "out")
    assert exported.config == EncoderConfig(bits=16, query_hidden=8)
    recommended = DecodePolicy(budget=0.125, sink_tokens=2, recent_tokens=8, dense_layers=(0,), group_reduce="min")
    assert exported.policy == recommended == DecodePolicy.load(tmp_path / "out" / "decode_policy.json")
    assert exported.layout == encoders.layout
    state = exported.state_dict()
    assert all(torch.equal(state[name], value) for name, value in encoders.state_dict().items())


class Payload:
    """Stands for any object a pickle could smuggle in (loading it would run its class's code)."""


def test_export_never_unpickles_objects(tmp_path):
    torch.save({"dashkv": {}, "state_dict": {}, "extra": Payload()}, tmp_path / "odd.ckpt")
    with pytest.raises(ValueError, match="holds objects other than tensors .* not loaded"):
        encoders_from_checkpoint(tmp_path / "odd.ckpt")


def ddp_fit_command(tiny_dir, steps, *extra):
    """`lightning fit` of the SmolLM2 recipe on the tiny model: 2 processes (DDP over gloo), ``steps`` steps."""
    return [
        "lightning", "fit", "--config", str(REPO / "recipes" / "smollm2.yaml"),
        "--model.init_args.model", str(tiny_dir / "model"), "--model.init_args.bits", "16",
        "--model.init_args.query_positions", "16", "--model.init_args.recent_tokens", "8",
        "--data.init_args.tokenizer", str(tiny_dir / "model"),
        "--data.init_args.sources", f"[{tiny_dir / 'docs' / '*.txt'}]", "--data.init_args.seq_len", "128",
        "--data.init_args.val_documents", "1", "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "2", *extra,
    ]


def test_lightning_fit_runs_ddp_with_two_processes(tiny_dir, tmp_path):
    done = subprocess.run(ddp_fit_command(tiny_dir, 4), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting with 2 processes" in done.stderr + done.stdout
    exported = HashEncoders.from_pretrained(tmp_path / "runs" / "smollm2" / "encoders")
    assert exported.config.bits == 16
    assert (tmp_path / "runs" / "smollm2" / "encoders" / "README.md").read_text().count("| 1 |") == 1


def test_ddp_hard_killed_between_checkpoints_resumes_to_the_uninterrupted_weights(tiny_dir, tmp_path):
    import os
    import signal
    import time

    # a checkpoint every 2 steps (the recipe's 50 is beyond this run); the final weights are read from the last one
    every_two = tmp_path / "every_two.yaml"
    every_two.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {every_n_train_steps: 2, save_last: true, save_top_k: -1}\n"
    )
    steps = 20
    command = ddp_fit_command(tiny_dir, steps, "--config", str(every_two))
    (tmp_path / "straight").mkdir()
    done = subprocess.run(command, cwd=tmp_path / "straight", capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    run = subprocess.Popen(command, cwd=killed_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    checkpoints = killed_dir / "runs" / "smollm2" / "lightning_logs" / "version_0" / "checkpoints"
    deadline = time.time() + 600
    while not (checkpoints / "epoch=0-step=4.ckpt").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # let the step-4 checkpoint and last.ckpt finish; 16 steps are still to come
    os.killpg(run.pid, signal.SIGKILL)  # both processes, no clean-up, mid-step
    run.wait()
    assert not (checkpoints / f"epoch=0-step={steps}.ckpt").exists()  # the run did not get to finish
    resumed = subprocess.run(command + ["--ckpt_path", str(checkpoints / "last.ckpt")], cwd=killed_dir,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def final_encoders(folder):
        (path,) = folder.glob(f"runs/smollm2/lightning_logs/version_*/checkpoints/epoch=0-step={steps}.ckpt")
        return encoders_from_checkpoint(path)[0].state_dict()

    straight, after = final_encoders(tmp_path / "straight"), final_encoders(killed_dir)
    assert straight.keys() == after.keys()
    for name in straight:
        assert torch.equal(straight[name], after[name]), name


def test_two_processes_sharded_or_not_train_the_encoders_one_process_trains_on_the_same_blocks(tiny_dir, tmp_path):
    setups = {
        "replicated": [],
        "sharded": ["--model.init_args.shard_frozen_model", "true"],
        # the same 2 blocks per step in one process: the ranks' blocks, in rank order
        "one process": ["--trainer.devices", "1", "--trainer.strategy", "auto", "--data.init_args.batch_size", "2"],
    }
    runs = {}
    for name, extra in setups.items():
        (tmp_path / name).mkdir()
        done = subprocess.run(ddp_fit_command(tiny_dir, 4, *extra), cwd=tmp_path / name, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        encoders = HashEncoders.from_pretrained(tmp_path / name / "runs" / "smollm2" / "encoders").state_dict()
        runs[name] = (done.stdout + done.stderr, encoders)
    total = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(tiny_dir / "model").parameters())
    assert f"frozen model sharded over 2 processes: {total // 2:,} of {total:,} parameters held here" in runs["sharded"][0]
    assert "sharded" not in runs["replicated"][0]
    replicated, sharded, single = (runs[name][1] for name in setups)
    for name in replicated:
        assert torch.equal(replicated[name], sharded[name]), name  # the shards gather back to the very same weights
        # the same blocks and draws, summed in another order: equal to float rounding
        torch.testing.assert_close(single[name], replicated[name], atol=1e-5, rtol=1e-4)
    trained = HashEncoders.from_pretrained(tmp_path / "replicated" / "runs" / "smollm2" / "encoders")
    start = HashEncoders.random(LlamaForCausalLM.from_pretrained(tiny_dir / "model").config, trained.config,
                                trained.layout.dense_layers).state_dict()
    moved = [name for name in start if name.endswith("key.weight") and not torch.equal(start[name], replicated[name])]
    assert moved, "the runs did not train: equal weights would prove nothing"


def test_sharding_with_a_lora_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="shard_frozen_model with a LoRA"):
        tiny_module(tiny_dir, lora_rank=4, shard_frozen_model=True)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_parses(recipe):
    done = subprocess.run(["lightning", "fit", "--config", str(recipe), "--print_config"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "class_path: lightning_modules.DashKVDistillation" in done.stdout


def test_capture_keeps_sliding_windows(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              max_position_embeddings=256,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    Gemma3ForCausalLM(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m")).save_pretrained(tmp_path)
    ids = torch.randint(0, 300, (1, 48))
    reference = Gemma3ForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    for lora_rank in (0, 2):  # "dashkv-train" without and with peft, told nothing: plain attention
        module = DashKVDistillation(model=str(tmp_path), bits=16, sink_tokens=2, recent_tokens=8, lora_rank=lora_rank)
        with torch.no_grad():
            assert torch.equal(module.base(input_ids=ids).logits, reference(input_ids=ids).logits)


# Joint LoRA (docs/design.md §1)


def test_lora_path_trains_only_lora_and_encoder_parameters(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="lora_rank=-1"):
        tiny_module(tiny_dir, lora_rank=-1)
    module = tiny_module(tiny_dir, lora_rank=4)
    base_params = dict(module.base.named_parameters())
    assert len(module.lora) == 3 * 4 * 2  # layers x (q, k, v, o) x (A, B)
    assert all(p is base_params[name.replace("/", ".")] for name, p in module.lora.items())  # the peft layers' own
    frozen = {name: p.detach().clone() for name, p in base_params.items() if "lora_" not in name}
    lora_before = {name: p.detach().clone() for name, p in module.lora.items()}
    encoders_before = {name: p.detach().clone() for name, p in module.encoders.named_parameters()}

    trainer, _ = fit(tiny_dir, tmp_path, 3, module=module)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in [*module.encoders.parameters(), module.log_temperature, *module.lora.values()]}
    for name, before in frozen.items():
        assert torch.equal(base_params[name], before) and not base_params[name].requires_grad, name
    for name, before in lora_before.items():
        assert not torch.equal(module.lora[name], before), name
    assert any(not torch.equal(p, encoders_before[name]) for name, p in module.encoders.named_parameters())
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]  # the adapter, not the base
    assert {name for name in state if not name.startswith(("encoders.", "random_encoders."))} == {
        "log_temperature", "scales_set", *(f"lora.{name}" for name in module.lora)}


def test_lora_lowers_the_logit_kl_under_sparse_attention(tiny_dir):
    module = tiny_module(tiny_dir, lora_rank=8)
    ids = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(module.lora.parameters(), lr=1e-3)
    history = []
    for _ in range(8):
        loss = module.lora_loss(ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert all(p.grad is None for p in module.encoders.parameters())  # selection is not differentiable
    assert history[0] > 0 and module.lora_loss(ids).item() < 0.7 * history[0]


def test_lora_export_round_trip_gives_identical_logits(tiny_dir, tmp_path):
    module = tiny_module(tiny_dir, lora_rank=4)
    fit(tiny_dir, tmp_path, 2, module=module, callbacks=[ExportEncoders(str(tmp_path / "callback"))])
    encoders, facts = encoders_from_checkpoint(tmp_path / "last.ckpt")
    out = export(encoders, facts, tmp_path / "exported")
    module.base.save_pretrained(tmp_path / "peft")  # what peft itself writes, for comparison
    theirs = safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    for folder in (out, tmp_path / "callback"):
        ours = safetensors.torch.load_file(folder / "lora" / "adapter_model.safetensors")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert json.loads((out / "training.json").read_text())["lora"]["rank"] == 4
    assert "joint LoRA (rank 4" in (out / "README.md").read_text()

    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    loaded = load_with_adapter(LlamaForCausalLM.from_pretrained(tiny_dir / "model", attn_implementation="sdpa"), out)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, module.base(input_ids=ids).logits)

    model = load_with_adapter(LlamaForCausalLM.from_pretrained(tiny_dir / "model", attn_implementation="dashkv"), out)
    cache = DashKVCache(model.config, HashEncoders.from_pretrained(out))
    with cache.observing(SelectionLog()) as log:
        generated = model.generate(input_ids=ids, **with_cache(cache), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 43) and 1 in log.last  # decoded sparsely
    with pytest.raises(FileNotFoundError, match="without a joint LoRA"):
        load_with_adapter(model, tmp_path)


def test_the_rope_shift_is_the_models_own_rotation_to_later_positions(tiny_dir):
    from hf_dashkv.capture import Capture

    module = tiny_module(tiny_dir)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    captured = module.capture(ids, torch.arange(24))
    later = Capture(until=2)
    with pytest.raises(Capture.Done), torch.no_grad():
        module.base(input_ids=ids, position_ids=torch.arange(24).view(1, -1) + 1000, use_cache=False,
                    dashkv_capture=later)
    query, key = module.shifted(1, 1000, captured[1][0], captured[1][1])
    torch.testing.assert_close(query, later.layers[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(key, later.layers[1][1], atol=1e-4, rtol=1e-4)
    scores = captured[1][0] @ captured[1][1].repeat_interleave(2, 1).transpose(-1, -2)
    torch.testing.assert_close(query @ key.repeat_interleave(2, 1).transpose(-1, -2), scores, atol=1e-3, rtol=1e-4)
