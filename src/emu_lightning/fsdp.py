"""FSDP at the paper's sizes: the strategy of ``configs/scale/`` (:class:`EmuFSDPStrategy`: one unit per transformer
block, activation checkpointing, fp32 master weights; it also runs on CPU with gloo) and the conversion of its sharded
checkpoints to one file and back (:func:`consolidate_checkpoint`, :func:`shard_checkpoint`,
``emu-lightning consolidate``)."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy

LLAMA_LAYER = "transformers.models.llama.modeling_llama.LlamaDecoderLayer"
EVA_BLOCK = "timm.models.eva.EvaBlock"
T5_BLOCK = "transformers.models.t5.modeling_t5.T5Block"
UNET = "diffusers.models.unets.unet_2d_condition.UNet2DConditionModel"
EMU_BLOCKS = (LLAMA_LAYER, EVA_BLOCK, T5_BLOCK)
"""The repeated blocks of Emu at the paper's sizes: LLaMA-13B's decoder layers, EVA-CLIP g/14's (timm) blocks and the
Causal Transformer's T5 layers. Each is one FSDP unit and has its activations checkpointed."""
EMU_WRAP_ONLY = (UNET,)
"""Modules that are one FSDP unit of their own, whole, without activation checkpointing: the diffusion UNet."""
DTYPES = ("float32", "bfloat16", "float16")
SHARDED_METADATA = "meta.pt"
"""The file beside the shards of a Lightning FSDP sharded checkpoint: everything that is not weights or optimizer
state (step, loops, callbacks, hyper-parameters, the tokenizer)."""


def import_class(path: str) -> type:
    """The class a dotted import path names (``package.module.Class``)."""
    import importlib

    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{path!r} is not a dotted import path of a class (package.module.Class)")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import the class {path!r}: {err}") from None
    if not isinstance(cls, type):
        raise ValueError(f"{path!r} is not a class but a {type(cls).__name__}")
    return cls


class FSDPNormClipping(FSDPPrecision):
    """Lightning's FSDPPrecision, with ``gradient_clip_algorithm: norm`` working: the norm of every rank's gradient
    shards together, through the FSDP root's ``clip_grad_norm_`` (Lightning's own refuses norm clipping, because
    ``torch.nn.utils.clip_grad_norm_`` would see one rank's shards only). :class:`EmuFSDPStrategy` sets ``strategy``."""

    strategy: Any = None

    def clip_grad_by_norm(self, optimizer: Any, clip_val: int | float) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = getattr(self.strategy, "model", None)
        if not isinstance(root, FullyShardedDataParallel):
            return super().clip_grad_by_norm(optimizer, clip_val)
        root.clip_grad_norm_(clip_val)


class EmuFSDPStrategy(FSDPStrategy):
    """Lightning's :class:`~lightning.pytorch.strategies.FSDPStrategy` (FSDP1, ``FullyShardedDataParallel``) with its
    units and activation checkpointing named by dotted class paths, which YAML and ``--print_config`` keep (a set of
    classes given to FSDPStrategy's ``auto_wrap_policy`` parses, but is silently left out of the printed and saved
    config, so a run started again from its ``config.yaml`` would train unwrapped).

    Besides the wrapping, it:

    - keeps ``use_orig_params=True``: ``EmuModel.configure_optimizers`` builds its parameter groups from each
      component's own ``named_parameters()`` and keeps only those with ``requires_grad`` (frozen components, the LLM's
      weights under LoRA), so frozen parameters get neither gradients nor optimizer state; FSDP must then show the
      original parameters (not flat ones), and lets frozen and trainable ones share a unit;
    - makes every floating-point parameter and buffer float32 before sharding under a ``*-mixed`` precision: those are
      the master weights and the optimizer state's dtype (transformers loads LLaMA in its checkpoint's float16, and
      FSDP cannot flatten a unit of mixed dtypes);
    - sets the dtype gradients are reduced in and buffers are kept in (Lightning's ``bf16-mixed`` gives bfloat16 to
      both), see ``reduce_dtype`` and ``buffer_dtype``;
    - clips gradients by their global norm (``gradient_clip_val`` with the default ``norm`` algorithm), which
      Lightning's FSDP precision plugin refuses;
    - also runs on CPU processes (gloo; Lightning's own FSDPStrategy requires a GPU), which is how the tests run it.

    Args:
        blocks: dotted class paths of the repeated blocks: each instance is one FSDP unit (its parameters are gathered
            just for its forward and backward) and, with ``checkpoint_blocks``, has its activations checkpointed.
        wrap_only: dotted class paths of modules that are one FSDP unit each, whole, without checkpointing.
        checkpoint_blocks: checkpoint the activations of ``blocks`` (recomputed in the backward pass).
        reduce_dtype: dtype of the gradient reduce-scatter under a ``*-mixed`` precision; ``None``: Lightning's (the
            compute dtype).
        buffer_dtype: dtype of the buffers (e.g. LLaMA's rotary ``inv_freq``) under a ``*-mixed`` precision; ``None``:
            Lightning's (the compute dtype).
        **kwargs: the arguments of Lightning's ``FSDPStrategy`` (``state_dict_type``, ``sharding_strategy``,
            ``cpu_offload``, ``device_mesh``, ...), except the policies, which ``blocks`` and ``wrap_only`` set.
    """

    def __init__(
        self,
        blocks: list[str] | None = None,
        wrap_only: list[str] | None = None,
        checkpoint_blocks: bool = True,
        reduce_dtype: str | None = "float32",
        buffer_dtype: str | None = "float32",
        **kwargs: Any,
    ) -> None:
        policies = ("auto_wrap_policy", "activation_checkpointing", "activation_checkpointing_policy")
        given = [name for name in policies if kwargs.pop(name, None) is not None]  # None: as a saved config has them
        if given:
            raise ValueError(f"EmuFSDPStrategy sets {given} from `blocks` and `wrap_only`: give class paths there")
        if kwargs.pop("use_orig_params", True) is not True:
            raise ValueError(
                "EmuFSDPStrategy needs use_orig_params=True: EmuModel's optimizer groups are built from the original "
                "parameters, and frozen and trainable parameters share FSDP units"
            )
        for name, value in (("reduce_dtype", reduce_dtype), ("buffer_dtype", buffer_dtype)):
            if value is not None and value not in DTYPES:
                raise ValueError(f"{name} {value!r} must be one of {list(DTYPES)} or None")
        self.blocks = list(EMU_BLOCKS if blocks is None else blocks)
        self.wrap_only = list(EMU_WRAP_ONLY if wrap_only is None else wrap_only)
        self.block_classes = tuple(import_class(p) for p in self.blocks)
        self.wrap_only_classes = tuple(import_class(p) for p in self.wrap_only)
        self.checkpoint_blocks = checkpoint_blocks
        self.reduce_dtype, self.buffer_dtype = reduce_dtype, buffer_dtype
        units = {*self.block_classes, *self.wrap_only_classes}
        checkpointed = set(self.block_classes) if checkpoint_blocks else set()
        super().__init__(
            auto_wrap_policy=units or None,
            activation_checkpointing_policy=checkpointed or None,
            use_orig_params=True,
            **kwargs,
        )

    # --------------------------------------------------------------------- the policies torch applies
    @property
    def wrap_policy(self) -> Any:
        """The ``torch.distributed.fsdp.wrap`` policy that picks the FSDP units (``None``: the root only)."""
        return self.kwargs.get("auto_wrap_policy")

    @property
    def checkpoint_policy(self) -> Any:
        """The policy that picks the modules whose activations are checkpointed (``None``: none)."""
        return self._activation_checkpointing_kwargs.get("auto_wrap_policy")

    # --------------------------------------------------------------------- precision
    @property
    def precision_plugin(self) -> Any:
        if self._precision_plugin is None:
            self.precision_plugin = FSDPNormClipping("32-true")
        return self._precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        if plugin is not None and not isinstance(plugin, FSDPPrecision):
            raise TypeError(f"EmuFSDPStrategy works with the FSDPPrecision plugin only, got {plugin}")
        if type(plugin) is FSDPPrecision:  # the one Lightning picks for FSDP: the same, with norm clipping
            plugin = FSDPNormClipping(plugin.precision, scaler=plugin.scaler)
        if isinstance(plugin, FSDPNormClipping):
            plugin.strategy = self
        self._precision_plugin = plugin

    @property
    def mixed_precision_config(self) -> Any:
        config = super().mixed_precision_config
        if config is None or self.mixed_precision is not None or not self._mixed:
            return config
        dtypes = {"reduce_dtype": self.reduce_dtype, "buffer_dtype": self.buffer_dtype}
        return dataclasses.replace(config, **{k: getattr(torch, v) for k, v in dtypes.items() if v is not None})

    @property
    def _mixed(self) -> bool:
        return "mixed" in str(self.precision_plugin.precision)

    # --------------------------------------------------------------------- wrapping
    def _setup_model(self, model: Any) -> Any:
        from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
        from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        paths = [*self.blocks, *self.wrap_only]
        classes = [*self.block_classes, *self.wrap_only_classes]
        counts = {path: sum(isinstance(m, cls) for m in model.modules()) for path, cls in zip(paths, classes)}
        missing = [path for path, n in counts.items() if n == 0]
        if missing:
            rank_zero_warn(
                f"EmuFSDPStrategy: the model has no {missing}; those parts stay in their parent's FSDP unit (a "
                "swapped component? list its block class in `blocks`)"
            )
        rank_zero_info(
            "EmuFSDPStrategy units: " + ", ".join(f"{n} x {p.rpartition('.')[2]}" for p, n in counts.items())
        )
        if self.checkpoint_blocks:
            twice = {type(m).__name__ for m in model.modules() if isinstance(m, self.block_classes)
                     and getattr(m, "gradient_checkpointing", False)}  # fmt: skip
            if twice:
                rank_zero_warn(
                    f"EmuFSDPStrategy: {sorted(twice)} checkpoint their activations themselves (e.g. the LLM's "
                    "gradient_checkpointing: true) and are checkpointed again here, which runs their forward three "
                    "times: turn one of them off"
                )
        if self._mixed:
            cast = _to_float32(model)
            if cast:
                rank_zero_info(f"EmuFSDPStrategy: {cast:,} parameter and buffer elements made float32 (master weights)")
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        # FSDP refuses a module on CPU unless device_id says CPU, and Lightning passes None there.
        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **self.kwargs,
        )
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped


def _to_float32(model: Any) -> int:
    """Make every floating-point parameter and buffer of ``model`` float32 in place; the number of elements cast."""
    cast = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            cast += tensor.numel()
            tensor.data = tensor.data.float()
    return cast


# ---------------------------------------------------------------------------------------------- sharded checkpoints
def is_sharded_checkpoint(path: str | Path) -> bool:
    """True for a folder holding a Lightning FSDP sharded checkpoint (``state_dict_type: sharded``)."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_METADATA).is_file()


SHARDED_LAYOUTS = {"fsdp": "model", "model_parallel": "state_dict"}
"""Where each Lightning strategy's sharded checkpoint keeps the weights: FSDPStrategy under ``model``,
ModelParallelStrategy (FSDP2) under ``state_dict``; both keep optimizer ``i``'s state under ``optimizer_<i>``."""


def consolidate_checkpoint(folder: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the sharded checkpoint ``folder`` (of Lightning's FSDPStrategy or ModelParallelStrategy) as one file
    ``out`` in Lightning's usual layout (``state_dict``, ``optimizer_states`` and the rest), as ``python -m
    lightning.pytorch.utilities.consolidate_checkpoint`` does for FSDPStrategy's; the file loads with
    ``EmuModel.load_from_checkpoint``, ``--ckpt_path`` and ``model.init_checkpoint``. Runs in one process, without a
    process group; the whole checkpoint must fit in CPU memory. Returns a summary."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    folder, out = Path(folder), Path(out)
    if not is_sharded_checkpoint(folder):
        raise ValueError(f"{str(folder)!r} is not a sharded checkpoint (a folder with {SHARDED_METADATA} and shards)")
    if out.exists():
        raise FileExistsError(f"{str(out)!r} exists: consolidate into a new path")
    checkpoint = _load_distributed_checkpoint(folder)  # the shards, then meta.pt's entries
    if "model" in checkpoint and "state_dict" not in checkpoint:
        checkpoint["state_dict"] = checkpoint.pop("model")
    count = sum(1 for key in checkpoint if key.startswith("optimizer_") and key[len("optimizer_") :].isdigit())
    if count:
        checkpoint["optimizer_states"] = [checkpoint.pop(f"optimizer_{i}") for i in range(count)]
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    return _summary(checkpoint, folder, out)


def shard_checkpoint(file: str | Path, out: str | Path, layout: str = "fsdp") -> dict[str, Any]:
    """Write the one-file checkpoint ``file`` as a sharded checkpoint folder ``out`` in the layout Lightning's
    FSDPStrategy (``layout="fsdp"``, ``state_dict_type: sharded``) or ModelParallelStrategy (``"model_parallel"``)
    saves: the weights and each optimizer's state through ``torch.distributed.checkpoint``, everything else in
    ``meta.pt``. It resumes with ``--ckpt_path out`` on any number of processes: the tensors are resharded on load.
    Runs in one process, without a process group. Returns a summary."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    from emu_lightning.checkpoints import load_checkpoint

    if layout not in SHARDED_LAYOUTS:
        raise ValueError(f"layout {layout!r} must be one of {sorted(SHARDED_LAYOUTS)}")
    file, out = Path(file), Path(out)
    if out.exists():
        raise FileExistsError(f"{str(out)!r} exists: shard into a new folder")
    checkpoint = load_checkpoint(file, what="checkpoint", require=("state_dict",), mmap=True)
    summary = _summary(checkpoint, file, out)
    converted = {SHARDED_LAYOUTS[layout]: checkpoint.pop("state_dict")}
    converted.update({f"optimizer_{i}": state for i, state in enumerate(checkpoint.pop("optimizer_states", []))})
    out.mkdir(parents=True)
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp_save(converted, storage_writer=FileSystemWriter(out), no_dist=True)
    torch.save(checkpoint, out / SHARDED_METADATA)
    return summary


def _summary(checkpoint: dict[str, Any], source: Path, out: Path) -> dict[str, Any]:
    state = checkpoint.get("state_dict", checkpoint.get("model", {}))
    optimizers = checkpoint.get("optimizer_states") or [v for k, v in checkpoint.items() if k.startswith("optimizer_")]
    return {
        "from": str(source),
        "to": str(out),
        "tensors": len(state),
        "parameters": sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor)),
        "optimizers": len(optimizers),
        "global_step": checkpoint.get("global_step"),
    }


def consolidate_main(argv: list[str] | None = None) -> int:
    """``emu-lightning consolidate``: a sharded checkpoint folder to one file, or one file to a sharded folder."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="emu-lightning consolidate",
        description="Convert between the sharded checkpoint folders that FSDP (state_dict_type: sharded) saves and "
        "one-file checkpoints: a folder becomes one file (for load_from_checkpoint, init_checkpoint, chat, convert, "
        "or resuming on another strategy), a file becomes a sharded folder (for resuming under FSDP with "
        "state_dict_type: sharded). One process, no GPU; the checkpoint must fit in CPU memory.",
    )
    parser.add_argument("checkpoint", help="a sharded checkpoint folder (with meta.pt), or a one-file checkpoint")
    parser.add_argument("--out", required=True, help="the file (from a folder) or the folder (from a file) to write")
    parser.add_argument(
        "--layout",
        choices=sorted(SHARDED_LAYOUTS),
        default="fsdp",
        help="from a file: the strategy whose folder layout to write (fsdp: FSDPStrategy, the default; "
        "model_parallel: ModelParallelStrategy); a folder's layout is read from it",
    )
    args = parser.parse_args(argv)
    source = Path(args.checkpoint)
    try:
        if is_sharded_checkpoint(source):
            summary = consolidate_checkpoint(source, args.out)
        elif source.is_file():
            summary = shard_checkpoint(source, args.out, args.layout)
        else:
            raise ValueError(f"{args.checkpoint!r} is neither a sharded checkpoint folder (with meta.pt) nor a file")
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError
        sys.stderr.write(f"error: {err}\n")
        return 2
    print(json.dumps(summary))
    return 0
