"""configs/scale/ (FSDP at the paper's sizes, emu_lightning.fsdp.EmuFSDPStrategy): every overlay parses on its
base configs and keeps its strategy in the printed config; the wrap and checkpointing policies that torch FSDP would
apply pick exactly the intended blocks of the 14B model built on the meta device (no process group); frozen
components have no parameter in the optimizer; sharded checkpoints become one file and back (`emu-lightning
consolidate`). Slow: a 2-process CPU (gloo) fit through Lightning with EmuFSDPStrategy trains the weights a plain
one-process loop does, and resumes from its checkpoint consolidated and sharded again."""

import importlib.util
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.plugins.precision import FSDPPrecision
from torch import nn
from torch.distributed.fsdp import MixedPrecision

from emu_lightning.cli import EmuCLI, cli
from emu_lightning.fsdp import (
    EMU_BLOCKS,
    EMU_WRAP_ONLY,
    EVA_BLOCK,
    LLAMA_LAYER,
    T5_BLOCK,
    UNET,
    EmuFSDPStrategy,
    FSDPNormClipping,
    _to_float32,
    consolidate_main,
    is_sharded_checkpoint,
)
from emu_lightning.inspect import build

ROOT = Path(__file__).resolve().parents[1]
SCALE = sorted(p.name for p in (ROOT / "configs" / "scale").glob("*.yaml"))
STACKS = {
    "emu-14b-fsdp.yaml": ["configs/emu-14b.yaml"],
    "emu-14b-decoder-fsdp.yaml": ["configs/emu-14b.yaml", "configs/stages/decoder.yaml"],
    "emu-14b-instruct-fsdp.yaml": ["configs/emu-14b.yaml", "configs/stages/instruct.yaml"],
}
"""Each scale overlay and the configs it stacks on, in order (its header says the same)."""
STAGES = {
    "emu-14b-fsdp.yaml": "pretrain",
    "emu-14b-decoder-fsdp.yaml": "decoder",
    "emu-14b-instruct-fsdp.yaml": "instruct",
}
BLOCK_COUNTS = {"LlamaDecoderLayer": 40, "EvaBlock": 40, "T5Block": 12}
"""LLaMA-13B's decoder layers, EVA-CLIP g/14's blocks as the vision tower builds them, the Causal Transformer's."""
UNET_PARAMS = 859_520_964 + 2 * 12_480 * (5120 - 768)  # Stable Diffusion 1.5's, k/v reading 5120 wide (test_inspect)
LORA_PARAMS = 40 * 4 * 2 * 16 * 5120  # r 16 on q, k, v, o (5120 x 5120) of 40 layers: A and B


def _args(name: str, *extra: str) -> list[str]:
    return [a for c in [*STACKS[name], f"configs/scale/{name}"] for a in ("--config", str(ROOT / c))] + list(extra)


class ParseOnly(EmuCLI):
    def instantiate_classes(self) -> None:  # parse and validate types, build nothing
        pass


@pytest.fixture(scope="module")
def parsed():
    return {name: cli(_args(name), run=False, cli_class=ParseOnly) for name in STACKS}


def _strategy(parsed, name: str) -> EmuFSDPStrategy:
    """The strategy as LightningCLI builds it: every parsed init argument, the ones left at None included."""
    init = parsed[name].config.trainer.strategy.init_args
    return EmuFSDPStrategy(**{k: v for k, v in init.items()})


def test_every_scale_config_names_its_base_configs():
    assert SCALE == sorted(STACKS)


@pytest.mark.parametrize("name", sorted(STACKS))
def test_scale_config_parses_on_its_base_configs(parsed, name):
    built = parsed[name]
    cfg = built.config
    trainer, model = cfg.trainer, cfg.model
    assert trainer.strategy.class_path == "emu_lightning.fsdp.EmuFSDPStrategy"
    init = trainer.strategy.init_args
    assert list(init.blocks) == [LLAMA_LAYER, EVA_BLOCK, T5_BLOCK] == list(EMU_BLOCKS)
    assert list(init.wrap_only) == [UNET] == list(EMU_WRAP_ONLY)
    assert init.checkpoint_blocks is True and init.state_dict_type == "sharded"
    assert str(init.sharding_strategy).endswith("FULL_SHARD")
    assert (init.reduce_dtype, init.buffer_dtype) == ("float32", "float32")
    assert trainer.precision == "bf16-mixed" and trainer.gradient_clip_val == 1.0
    assert (trainer.accelerator, trainer.devices, trainer.num_nodes) == ("gpu", 8, 1)
    assert model.stage == STAGES[name]
    assert model.llm.init_args.gradient_checkpointing is False  # the strategy checkpoints LLaMA's layers
    # the printed (and saved: config.yaml) config keeps the strategy, unlike a set of classes given to FSDPStrategy
    dumped = yaml.safe_load(built.parser.dump(cfg, skip_none=False))["trainer"]["strategy"]["init_args"]
    assert dumped["blocks"] == list(EMU_BLOCKS) and dumped["wrap_only"] == list(EMU_WRAP_ONLY)
    if name == "emu-14b-fsdp.yaml":
        return
    # the stage overlays put back the paper's sizes over the tiny stage files
    assert trainer.max_time is None  # and no ShapesWorld evaluation: the learning-rate monitor only
    assert [c.class_path for c in trainer.callbacks] == ["emu_lightning.reporting.LearningRateMonitor"]
    assert cfg.data.class_path == "emu_lightning.data.StreamingDataModule" and cfg.data.init_args.writer is None
    assert "runs/emu-14b" in model.init_checkpoint
    if name == "emu-14b-decoder-fsdp.yaml":
        decoder = model.decoder.init_args
        assert decoder.image_size == 512 and decoder.pretrained == "checkpoints/Emu/pretrain"
        assert (decoder.spatial_condition, decoder.sketch_weight, model.decoder_sketch_fit) == (0, 0.0, 0)
        assert decoder.condition_norm is False and decoder.pooled_condition is False
        assert decoder.scheduler_config is None
        assert cfg.data.init_args.reader.init_args.image_first_prob == 0.0  # caption, then the image to draw
    else:
        assert model.llm.init_args.lora["r"] == 16 and model.decoder is not None


# ------------------------------------------------------------------------------------ the 14B model's units
@pytest.fixture(scope="module")
def emu_14b():
    model, _ = build(_args("emu-14b-fsdp.yaml"), device="meta")
    return model


def _units(strategy: EmuFSDPStrategy, model: nn.Module) -> dict[nn.Module, dict]:
    """The modules torch FSDP makes units of (besides the root), as FullyShardedDataParallel's auto wrap asks the
    policy; activation checkpointing asks its policy the same way."""
    return strategy.wrap_policy._run_policy(model, set(), {})


def test_wrap_policy_wraps_exactly_the_blocks_and_the_unet(parsed, emu_14b):
    strategy = _strategy(parsed, "emu-14b-fsdp.yaml")
    units = _units(strategy, emu_14b)
    assert Counter(type(m).__name__ for m in units) == {**BLOCK_COUNTS, "UNet2DConditionModel": 1}
    classes = (*strategy.block_classes, *strategy.wrap_only_classes)
    assert set(units) == {m for m in emu_14b.modules() if isinstance(m, classes)}
    unet = emu_14b.decoder.unet
    assert unet in units and sum(p.numel() for p in unet.parameters()) == UNET_PARAMS
    assert not any(m is not unet and isinstance(m, nn.Module) and unet in m.modules() for m in units)  # not nested
    # every parameter of the units is in exactly one unit; the rest is the root unit
    inside = [id(p) for m in units for p in m.parameters()]
    assert len(inside) == len(set(inside))
    root = sum(p.numel() for p in emu_14b.parameters() if id(p) not in set(inside))
    total = sum(p.numel() for p in emu_14b.parameters())
    # LLaMA's embeddings, LM head, final norm and Emu's regression head, the vision tower's patch and position
    # embeddings and LayerNorm, the resampler's queries, final norm and projection, and the frozen VAE
    assert (root, total) == (442_752_359, 15_234_099_883)


def test_checkpointing_policy_selects_the_same_blocks_without_the_unet(parsed, emu_14b):
    strategy = _strategy(parsed, "emu-14b-fsdp.yaml")
    checkpointed = strategy.checkpoint_policy._run_policy(emu_14b, set(), {})
    assert Counter(type(m).__name__ for m in checkpointed) == BLOCK_COUNTS
    assert set(checkpointed) == set(_units(strategy, emu_14b)) - {emu_14b.decoder.unet}


@pytest.mark.parametrize(
    ("name", "trainable_units", "trainable"),
    [("emu-14b-decoder-fsdp.yaml", {"UNet2DConditionModel": 1}, UNET_PARAMS),
     ("emu-14b-instruct-fsdp.yaml", {"LlamaDecoderLayer": 40}, LORA_PARAMS)],
)  # fmt: skip
def test_frozen_components_have_no_optimizer_state(parsed, name, trainable_units, trainable):
    # the stage's weights would come from the earlier stage's file: on meta, from nowhere
    model, _ = build(_args(name, "--model.init_checkpoint", "null"), device="meta")
    units = _units(_strategy(parsed, name), model)
    assert Counter(type(m).__name__ for m in units) == {**BLOCK_COUNTS, "UNet2DConditionModel": 1}
    with_grad = Counter(type(m).__name__ for m in units if any(p.requires_grad for p in m.parameters()))
    assert with_grad == trainable_units
    inside = {id(p) for m in units for p in m.parameters()}
    assert not any(p.requires_grad for p in model.parameters() if id(p) not in inside)  # the root unit: all frozen
    model.scheduler_factory = None  # the schedule needs a trainer; the groups do not
    optimizer = model.configure_optimizers()
    grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == trainable
    if name == "emu-14b-decoder-fsdp.yaml":  # the data comes at Stable Diffusion's 512 px; EVA-CLIP takes 224
        assert (model.data_image_size, model.vision.image_size, model.decoder.image_size) == (512, 224, 512)
    if name == "emu-14b-instruct-fsdp.yaml":  # LoRA: frozen weights and trainable adapters share each layer's unit
        assert model.data_image_size == 224
        layer = next(m for m in units if type(m).__name__ == "LlamaDecoderLayer")
        assert {p.requires_grad for p in layer.parameters()} == {True, False}


# ------------------------------------------------------------------------------------ the strategy object
def test_strategy_precision_clipping_and_cpu(parsed):
    strategy = _strategy(parsed, "emu-14b-fsdp.yaml")
    # Lightning's own FSDPStrategy refuses accelerator="cpu"; this one runs on CPU processes (gloo)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, precision="bf16-mixed", logger=False)
    plugin = trainer.precision_plugin
    assert type(plugin) is FSDPNormClipping and plugin.strategy is strategy and plugin.precision == "bf16-mixed"
    assert strategy.mixed_precision_config == MixedPrecision(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32
    )
    assert strategy.kwargs["use_orig_params"] is True
    lightning_default = EmuFSDPStrategy(reduce_dtype=None, buffer_dtype=None)
    lightning_default.precision_plugin = FSDPPrecision("bf16-mixed")
    assert lightning_default.mixed_precision_config == MixedPrecision(torch.bfloat16, torch.bfloat16, torch.bfloat16)
    no_checkpointing = EmuFSDPStrategy(checkpoint_blocks=False)
    assert no_checkpointing.checkpoint_policy is None and no_checkpointing.wrap_policy is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"blocks": ["torch.nn.NoSuchLayer"]}, "cannot import"),
     ({"blocks": ["NoDots"]}, "dotted import path"),
     ({"auto_wrap_policy": {nn.Linear}}, "from `blocks`"),
     ({"use_orig_params": False}, "use_orig_params=True"),
     ({"reduce_dtype": "fp8"}, "reduce_dtype")],
)  # fmt: skip
def test_strategy_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EmuFSDPStrategy(**kwargs)


def test_master_weights_are_made_float32():
    module = nn.Sequential(nn.Linear(4, 4).half(), nn.Linear(4, 4))
    module.register_buffer("scale", torch.ones(3, dtype=torch.bfloat16))
    module.register_buffer("index", torch.arange(3))
    assert _to_float32(module) == 4 * 4 + 4 + 3
    assert {t.dtype for t in [*module.parameters(), module.scale]} == {torch.float32}
    assert module.index.dtype == torch.int64


def test_setup_model_wraps_checkpoints_and_casts_on_one_cpu_process(tmp_path):
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FullyShardedDataParallel

    from emu_lightning.components.llm import HFCausalLM

    tiny = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2)  # fmt: skip
    llm = HFCausalLM(config=tiny, gradient_checkpointing=True).half()  # as transformers loads LLaMA-13B: float16
    llm.regression_head.requires_grad_(False)
    strategy = EmuFSDPStrategy(blocks=[LLAMA_LAYER, EVA_BLOCK], wrap_only=[])
    strategy.parallel_devices = [torch.device("cpu")]
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with pytest.warns(UserWarning) as caught:
            wrapped = strategy._setup_model(llm)
        messages = " ".join(str(w.message) for w in caught)
        assert "the model has no ['timm.models.eva.EvaBlock']" in messages  # a block class the model lacks
        assert "three times" in messages  # HF's own gradient checkpointing and the strategy's, both on
        assert sum(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules()) == 1 + 2  # root + 2 layers
        assert sum(isinstance(m, CheckpointWrapper) for m in wrapped.modules()) == 2
        assert {p.dtype for p in wrapped.parameters()} == {torch.float32}  # master weights
        out = wrapped(torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.long))
        out.logits.float().pow(2).mean().backward()
        assert out.logits.dtype == torch.bfloat16  # computed in bf16 (FSDP's param_dtype)
        assert llm.regression_head.weight.grad is None  # frozen: no gradient
        assert all(
            p.grad is not None for n, p in wrapped.named_parameters() if p.requires_grad and "regression" not in n
        )
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ consolidation
def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("layout", ["fsdp", "model_parallel"])
def test_consolidate_a_file_to_a_sharded_folder_and_back(tmp_path, layout, capsys):
    torch.manual_seed(0)
    checkpoint = {
        "state_dict": {"llm.w": torch.randn(6, 4), "vision.b": torch.randn(3, dtype=torch.bfloat16)},
        "optimizer_states": [
            {
                "state": {"llm.w": {"step": torch.tensor(7.0), "exp_avg": torch.randn(6, 4)}},
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.98), "params": ["llm.w"]}],
            },
        ],  # fmt: skip
        "global_step": 7,
        "epoch": 0,
        "hyper_parameters": {"stage": "pretrain", "max_length": 1024},
        "emu_tokenizer": {"vocab": ["a", "b"]},
    }
    file = tmp_path / "one.ckpt"
    torch.save(checkpoint, file)
    folder, back = tmp_path / "sharded.ckpt", tmp_path / "back.ckpt"
    assert consolidate_main([str(file), "--out", str(folder), "--layout", layout]) == 0
    assert is_sharded_checkpoint(folder) and list(folder.glob("*.distcp"))
    assert consolidate_main([str(folder), "--out", str(back)]) == 0
    assert _same(checkpoint, torch.load(back, weights_only=True))
    assert '"global_step": 7' in capsys.readouterr().out
    assert consolidate_main([str(folder), "--out", str(back)]) == 2  # refuses to replace a file
    assert consolidate_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "neither a sharded checkpoint folder" in capsys.readouterr().err


def test_consolidate_is_an_emu_lightning_subcommand(monkeypatch, capsys):
    from emu_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["emu-lightning", "consolidate", "--help"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "emu-lightning consolidate" in out and "--out" in out and "--layout" in out


# ------------------------------------------------------------------------------------ FSDP on CPU processes
RUN = '''
"""A Lightning fit of a small model with EmuFSDPStrategy on CPU processes (gloo); test_scale.py runs it:
python fsdp_cpu_run.py DEVICES MAX_STEPS OUT [RESUME]."""
import sys

import lightning as L
import torch
from torch import nn

CLIP, LR, MOMENTUM = 0.5, 0.05, 0.9


class Block(nn.Module):  # one unit each, checkpointed
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))


class Spare(nn.Module):  # a unit of its own, trainable but never run (the UNet in pretraining)
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(16, 16)

    def forward(self, x):
        return self.l(x)


class Small(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        self.frozen = Block().requires_grad_(False)  # a frozen unit (the decoder stage's LLM)
        self.blocks = nn.Sequential(Block(), Block(), Block())
        self.spare = Spare()
        self.head = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.head(self.blocks(self.frozen(self.inp(x)))) - y) ** 2).mean()

    def configure_optimizers(self):  # as EmuModel's: the parameters that require grad
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)


def data():
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    return x, x.sum(1, keepdim=True)


if __name__ == "__main__":
    from emu_lightning.fsdp import EmuFSDPStrategy

    devices, max_steps, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    # one batch of 8 rows a step (4 per rank): every step, resumed or not, sees the same rows
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data()), batch_size=8 // devices)
    strategy = EmuFSDPStrategy(blocks=["fsdp_cpu_run.Block"], wrap_only=["fsdp_cpu_run.Spare"],
                               state_dict_type="sharded")
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps,
                        gradient_clip_val=CLIP, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Small(), loader, ckpt_path=sys.argv[4] if len(sys.argv) > 4 else None)
    trainer.save_checkpoint(out)
'''


def _reference(run, steps: int) -> dict[int, dict[str, torch.Tensor]]:
    """The one-process loop: the same model, data, global-norm clipping and optimizer, without any strategy."""
    model = run.Small()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=run.LR, momentum=run.MOMENTUM)
    batch, states = run.data(), {}
    for step in range(1, steps + 1):
        loss = model.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        assert torch.nn.utils.clip_grad_norm_(params, run.CLIP) > run.CLIP  # the clipping matters
        optimizer.step()
        states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return states


# two 2-process fits, ~35-45 s on 2 cores: in `make test`, as the scale-out issue asks for the CPU FSDP check
def test_two_cpu_processes_train_the_one_process_weights_and_resume_from_a_resharded_folder(tmp_path):
    script = tmp_path / "fsdp_cpu_run.py"
    script.write_text(RUN)
    spec = importlib.util.spec_from_file_location("fsdp_cpu_run", script)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    reference = _reference(run, 4)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }

    def fit(*args: str) -> None:
        out = subprocess.run([sys.executable, str(script), "2", *args], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-4000:]

    def consolidated(folder: Path) -> dict:
        assert is_sharded_checkpoint(folder) and len(list(folder.glob("*.distcp"))) == 2  # one shard file per rank
        assert consolidate_main([str(folder), "--out", str(folder.with_suffix(".pt"))]) == 0
        return torch.load(folder.with_suffix(".pt"), weights_only=True)

    fit("3", "step3")
    three = consolidated(tmp_path / "step3")
    assert three["global_step"] == 3
    for key, value in reference[3].items():
        torch.testing.assert_close(three["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    initial = run.Small().state_dict()
    for key in ("frozen.a.weight", "spare.l.weight"):  # frozen, and trainable but never run: unchanged
        assert torch.equal(three["state_dict"][key], initial[key])
    state = three["optimizer_states"][0]["state"]
    assert not any(key.startswith("frozen.") for key in state)  # frozen parameters have no optimizer state
    # (FSDP's sharded optimizer state dict stores zero-filled state for the unused unit: it got no update)
    assert all(not v["momentum_buffer"].any() for k, v in state.items() if k.startswith("spare."))

    # the one file back to a sharded folder, resumed on 2 processes for a 4th step
    assert consolidate_main([str(tmp_path / "step3.pt"), "--out", str(tmp_path / "again")]) == 0
    fit("4", "step4", str(tmp_path / "again"))
    four = consolidated(tmp_path / "step4")
    assert four["global_step"] == 4
    for key, value in reference[4].items():  # the momentum came back too
        torch.testing.assert_close(four["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
