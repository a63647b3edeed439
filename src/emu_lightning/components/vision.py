"""timm image encoders as a :class:`VisionBackbone`; the paper's EVA-CLIP g/14 is ``eva_giant_patch14_clip_224``."""

from __future__ import annotations

import importlib
import inspect
import math
import re
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from emu_lightning.components.base import VisionBackbone, on_meta_device

# The classifier is built away (num_classes=0), so a checkpoint's head weights are dropped rather than reported.
_HEAD_PREFIXES = ("head.", "fc_norm.", "attn_pool.")
_CONTAINER_KEYS = ("state_dict", "model", "module", "model_ema")


class TimmVisionBackbone(VisionBackbone):
    """The last transformer block's tokens (prefix/CLS tokens first) before the final norm, then a LayerNorm.

    Convolutional models give their last stage's feature map flattened to ``(B, H*W, C)``.

    Args:
        model_name: timm architecture, e.g. ``eva_giant_patch14_clip_224``; weights are never downloaded.
        image_size: Square input size in pixels; ``None`` keeps the architecture's default.
        model_kwargs: Extra ``timm.create_model`` arguments, e.g. ``{"embed_dim": 64, "depth": 2}`` for tiny models.
        checkpoint_path: Local ``.safetensors`` or torch state dict (timm, open_clip or EVA-CLIP layout) to load.
        checkpoint_prefix: Key prefix of the vision tower in the checkpoint; ``None`` strips ``module.``/``visual.``.
        freeze: Turn off gradients for every parameter and keep the module in eval mode.
        normalize: Inputs are in ``[0, 1]``; normalise them with the architecture's mean and std.
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        image_size: int | None = None,
        model_kwargs: dict | None = None,
        checkpoint_path: str | None = None,
        checkpoint_prefix: str | None = None,
        freeze: bool = False,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if not timm.is_model(model_name):
            raise ValueError(f"unknown timm model {model_name!r}")
        model_kwargs = dict(model_kwargs or {})
        if image_size:
            # Fail before building a possibly billion-parameter model when the patch size is already known.
            match = re.search(r"patch(\d+)", model_name)
            _check_patch_multiple(image_size, model_kwargs.get("patch_size") or (match and int(match[1])))
        load = checkpoint_path is not None and not on_meta_device()
        if load and not Path(checkpoint_path).is_file():
            raise FileNotFoundError(f"checkpoint_path {checkpoint_path} does not exist")
        self.model_name = model_name
        self.checkpoint_path = checkpoint_path
        self.checkpoint_prefix = checkpoint_prefix
        self.frozen = freeze  # not `self.freeze`: that would shadow LightningModule.freeze()
        self.normalize = normalize

        self.model = _create_model(model_name, image_size, model_kwargs)
        patch_embed = getattr(self.model, "patch_embed", None)
        if image_size and patch_embed is not None:
            _check_patch_multiple(image_size, patch_embed.patch_size)
        full_keys = set(self.model.state_dict())
        # timm's converters may read the unpruned model (head, pos_embed), so convert before pruning.
        state_dict = self._read_checkpoint(checkpoint_path, checkpoint_prefix) if load else None
        # The final norm and head never see our features; dropping them leaves no unused parameter under DDP.
        if hasattr(self.model, "prune_intermediate_layers"):
            self.model.prune_intermediate_layers(indices=1, prune_norm=True, prune_head=True)
        else:
            self.model.reset_classifier(0)
        if state_dict is not None:
            self._load(state_dict, full_keys - set(self.model.state_dict()))

        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        fwd = getattr(self.model, "forward_intermediates", None)
        self._intermediates_args = set(inspect.signature(fwd).parameters) if fwd is not None else set()
        self._nlc = "return_prefix_tokens" in self._intermediates_args  # ViT / EVA families
        if self._nlc and getattr(patch_embed, "img_size", None):
            self.image_size = image_size or int(patch_embed.img_size[0])
        else:
            self.image_size = image_size or int(self.model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        if self._nlc and getattr(patch_embed, "grid_size", None):
            # Known without a forward pass, which would cost seconds on CPU for the giant models.
            self.num_tokens = math.prod(patch_embed.grid_size) + self.num_prefix_tokens
            self.out_dim = int(self.model.num_features)
        else:
            self.num_tokens, self.out_dim = self._probe_shape()
        self.ln = nn.LayerNorm(self.out_dim, eps=1e-6)  # as the released ln_visual

        cfg = self.model.pretrained_cfg
        mean = torch.tensor(cfg.get("mean") or IMAGENET_DEFAULT_MEAN, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(cfg.get("std") or IMAGENET_DEFAULT_STD, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        if freeze:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> TimmVisionBackbone:
        # A frozen tower keeps dropout / drop-path / batch-norm statistics fixed even when its parent trains.
        return super().train(mode and not self.frozen)

    def forward(self, pixels: Tensor) -> Tensor:
        size = tuple(pixels.shape[-2:])
        if pixels.ndim != 4 or size != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images (B, 3, {self.image_size}, {self.image_size}), got shape {tuple(pixels.shape)}"
            )
        pixels = pixels.to(self.ln.weight.dtype)
        if self.normalize:
            pixels = (pixels - self.pixel_mean) / self.pixel_std
        return self.ln(self._features(pixels))

    def _features(self, x: Tensor) -> Tensor:
        if self._nlc:
            (out,) = self.model.forward_intermediates(
                x,
                indices=1,
                norm=False,
                output_fmt="NLC",
                intermediates_only=True,
                return_prefix_tokens=self.num_prefix_tokens > 0,  # EVA fails asking for prefix tokens it lacks
            )
            return torch.cat([out[1], out[0]], dim=1) if isinstance(out, tuple) else out
        if self._intermediates_args:
            kwargs = {"norm": False} if "norm" in self._intermediates_args else {}
            out = self.model.forward_intermediates(x, indices=1, intermediates_only=True, **kwargs)[-1]
        else:
            out = self.model.forward_features(x)
        return out.flatten(2).transpose(1, 2) if out.ndim == 4 else out

    @torch.no_grad()
    def _probe_shape(self) -> tuple[int, int]:
        # Eval mode: a train-mode pass would update batch-norm statistics of freshly loaded weights.
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device  # meta when built under torch.device("meta")
        _, n, c = self._features(torch.zeros(1, 3, self.image_size, self.image_size, device=device)).shape
        self.model.train(was_training)
        return int(n), int(c)

    def _read_checkpoint(self, path: str, prefix: str | None) -> dict[str, Tensor]:
        if path.endswith(".safetensors"):
            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        while isinstance(state_dict, dict):  # training checkpoints wrap the weights, possibly more than once
            inner = next((state_dict[k] for k in _CONTAINER_KEYS if isinstance(state_dict.get(k), dict)), None)
            if inner is None:
                break
            state_dict = inner
        if not isinstance(state_dict, dict):
            raise RuntimeError(f"{path} holds no state dict but a {type(state_dict).__name__}")
        state_dict = {k: v for k, v in state_dict.items() if isinstance(v, Tensor)}
        if prefix:
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if not state_dict:
                raise RuntimeError(f"no key of {path} starts with checkpoint_prefix {prefix!r}")
        else:
            state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
            if any(k.startswith("visual.") for k in state_dict):  # CLIP: keep the image tower, drop the text one
                state_dict = {k[len("visual.") :]: v for k, v in state_dict.items() if k.startswith("visual.")}

        filter_fn = getattr(importlib.import_module(type(self.model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is None:
            return state_dict
        # timm's vision_transformer filter only recognises the OpenAI / open_clip layouts under "visual.".
        if "class_embedding" in state_dict or any(k.startswith("trunk.") for k in state_dict):
            state_dict = {f"visual.{k}": v for k, v in state_dict.items()}
        state_dict = filter_fn(state_dict, self.model)
        return {k.removeprefix("visual."): v for k, v in state_dict.items()}

    def _load(self, state_dict: dict[str, Tensor], pruned: set[str]) -> None:
        expected = set(self.model.state_dict())
        # Weights of the pruned final norm / head are optional: a checkpoint of a pruned backbone still loads.
        state_dict = {
            k: v
            for k, v in state_dict.items()
            if k not in pruned and not (k.startswith(_HEAD_PREFIXES) and k not in expected)
        }
        missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {self.checkpoint_path} does not fit {self.model_name}: "
                f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}"
            )
        try:
            self.model.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:  # shape mismatches
            raise RuntimeError(f"checkpoint {self.checkpoint_path} does not fit {self.model_name}: {err}") from err


def _create_model(name: str, image_size: int | None, kwargs: dict) -> nn.Module:
    if image_size:
        try:
            return timm.create_model(name, pretrained=False, num_classes=0, **{**kwargs, "img_size": image_size})
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            # Convolutional nets take any input size and have no img_size argument.
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def _check_patch_multiple(image_size: int, patch_size: int | tuple[int, ...] | None) -> None:
    if patch_size is None:
        return
    for patch in sorted({patch_size} if isinstance(patch_size, int) else set(patch_size)):
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch size {patch}")
