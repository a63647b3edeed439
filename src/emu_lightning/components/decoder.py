"""The visual decoder: a diffusers conditional UNet that turns Emu's visual embeddings into images.

Emu fine-tunes Stable Diffusion 1.5 with its regressed embeddings ``(B, Q, D)`` in place of the CLIP text
encoder's states: every cross-attention's key and value projections are replaced by fresh ``Linear(D, inner)``
layers, and the rest of the UNet starts from the pretrained weights. :class:`DiffusionDecoder` does that from a
local Stable Diffusion folder (latent space, through the frozen VAE), or builds a tiny UNet from a config dict
that works directly in pixel space (tests, the demo).
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.utils import is_accelerate_available
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from emu_lightning.components.base import VisualDecoder, on_meta_device

TINY_UNET: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    # Cross-attention at the lower resolution only: full-resolution self-attention dominates the cost on CPU.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=8,
)
"""Pixel-space UNet defaults (under 1M parameters with a small ``cond_dim``); ``unet=`` overrides any field."""

SD15_UNET: dict[str, Any] = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=8,
    norm_num_groups=32,
    sample_size=64,
    cross_attention_dim=768,
)
"""Stable Diffusion 1.5's UNet (the fields that differ from :data:`TINY_UNET` or diffusers' defaults)."""
SD15_VAE: dict[str, Any] = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
"""Stable Diffusion 1.5's ``AutoencoderKL``."""
SD15_SCHEDULER: dict[str, Any] = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, clip_sample=False,
)  # fmt: skip
"""Stable Diffusion 1.5's noise schedule (its ``scheduler/`` folder)."""

_COMMON_SCHEDULERS = "DDPMScheduler, DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler"


class DiffusionDecoder(VisualDecoder):
    """A conditional diffusion UNet (diffusers) on Emu's visual embeddings, trained by DDPM noise prediction.

    Args:
        cond_dim: width D of Emu's visual embeddings, the UNet's cross-attention input width.
        num_queries: Q, the number of embeddings in a condition (the resampler's); needed by
            ``spatial_condition``, and makes ``condition_norm`` per embedding.
        image_size: side of the square output images in pixels.
        unet: ``UNet2DConditionModel`` config fields overriding :data:`TINY_UNET` when building from scratch
            (not with ``pretrained``). ``in_channels``, ``out_channels``, ``sample_size`` and
            ``cross_attention_dim`` follow from the other arguments.
        pretrained: a local diffusers folder in the Stable Diffusion 1.5 layout (``unet/``, optional ``vae/`` and
            ``scheduler/``). Loading is strict and offline. If the UNet's ``cross_attention_dim`` is not
            ``cond_dim``, every cross-attention's ``to_k`` and ``to_v`` is replaced by a freshly initialised
            ``Linear(cond_dim, inner_dim)``, as in the Emu paper; all other weights are loaded.
        latent: diffuse in the latent space of a frozen ``AutoencoderKL``. Default: True iff ``pretrained`` has a
            ``vae/`` folder or a ``vae`` config is given.
        vae: ``AutoencoderKL`` config to build a (random, frozen) VAE from scratch, for tests; not with a
            ``pretrained`` folder that has its own ``vae/``.
        train_scheduler: diffusers scheduler class whose noise schedule (``alphas_cumprod``, from the betas)
            noises the training images at integer timesteps as ``DDPMScheduler.add_noise`` does.
        sample_scheduler: diffusers scheduler class used by :meth:`sample` (any of them, e.g. ``DDIMScheduler``,
            ``PNDMScheduler``, ``EulerDiscreteScheduler``, ``DDPMScheduler``).
        scheduler_config: scheduler config fields shared by both schedulers, e.g.
            ``{"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}``; with ``pretrained`` they
            override the folder's ``scheduler/`` config.
        condition_dropout: in training, the probability that a row's condition is replaced by the unconditional
            one (classifier-free guidance needs the UNet to know both).
        pooled_condition: also feed the mean of the Q embeddings through a projection added to the time embedding
            (diffusers' ``class_embed_type="projection"``), so every ResNet block sees the condition, not only the
            cross-attention layers; the tiny decoder learns to follow its prompt much sooner with it. Only for a
            UNet built here.
        condition_norm: standardise the condition (:class:`ConditionNorm`: the mean and variance of every
            condition seen in training, not the batch's) before the UNet sees it: each (embedding, dimension)
            pair when ``num_queries`` is given, else each dimension over all Q embeddings. Emu's visual
            embeddings share a large component across images (on tiny ShapesWorld about 90% of their variance),
            which this removes, so what tells images apart is not drowned in it.
        spatial_condition: channels of a coarse map computed from all Q embeddings (flattened, through
            :class:`SpatialCondition`) and concatenated, upsampled, to the UNet's input; 0: none. A pretrained
            UNet's first convolution gets that many new zero-initialised input channels.
        spatial_grid: side of that map (it must divide the UNet's input side).
        spatial_hidden: hidden width of the map's MLP; 0: a single linear layer.
        sketch_weight: weight of an auxiliary loss that makes the map's first channels predict the target
            image (or latent) average-pooled to ``spatial_grid`` (a "sketch"), for the rows whose condition was
            not dropped; 0: the map is learned through the diffusion loss alone. With a linear map
            (``spatial_hidden=0``) :meth:`fit_sketch` solves the sketch in closed form before training.
    """

    def __init__(
        self,
        cond_dim: int,
        num_queries: int | None = None,
        image_size: int = 32,
        unet: dict[str, Any] | None = None,
        pretrained: str | None = None,
        latent: bool | None = None,
        vae: dict[str, Any] | None = None,
        train_scheduler: str = "DDPMScheduler",
        sample_scheduler: str = "DDIMScheduler",
        scheduler_config: dict[str, Any] | None = None,
        condition_dropout: float = 0.1,
        pooled_condition: bool = False,
        condition_norm: bool = False,
        spatial_condition: int = 0,
        spatial_grid: int = 8,
        spatial_hidden: int = 0,
        sketch_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if cond_dim <= 0 or image_size <= 0:
            raise ValueError(f"cond_dim ({cond_dim}) and image_size ({image_size}) must be positive")
        if not 0.0 <= condition_dropout <= 1.0:
            raise ValueError(f"condition_dropout {condition_dropout} must be in [0, 1]")
        if num_queries is not None and num_queries <= 0:
            raise ValueError(f"num_queries ({num_queries}) must be positive")
        if spatial_condition < 0 or spatial_hidden < 0 or sketch_weight < 0:
            raise ValueError("spatial_condition, spatial_hidden and sketch_weight must not be negative")
        if spatial_condition and num_queries is None:
            raise ValueError("spatial_condition needs num_queries (the number of embeddings in a condition)")
        root = Path(pretrained) if pretrained is not None else None
        if root is not None and on_meta_device() and not root.is_dir():
            # `inspect` without the files: count the Stable Diffusion 1.5 UNet and VAE that Emu's decoder starts from
            warnings.warn(f"pretrained {str(root)!r} is not here: counting Stable Diffusion 1.5's UNet and VAE",
                          stacklevel=2)  # fmt: skip
            root, vae = None, vae or SD15_VAE
            unet = {**SD15_UNET, "cross_attention_dim": cond_dim, **(unet or {})}  # k and v re-projected, as Emu's
            scheduler_config = {**SD15_SCHEDULER, **(scheduler_config or {})}
        if root is not None:
            if not root.is_dir():
                raise FileNotFoundError(f"pretrained {str(root)!r} is not a local diffusers folder")
            if not (root / "unet").is_dir():
                raise FileNotFoundError(f"pretrained folder {str(root)!r} has no unet/ subfolder")
            if unet is not None:
                raise ValueError("`unet` config overrides only apply when building from scratch, not with `pretrained`")
        has_vae_folder = root is not None and (root / "vae").is_dir()
        if vae is not None and has_vae_folder:
            raise ValueError(f"give either a `vae` config or a pretrained folder with vae/ ({str(root)!r}), not both")
        if latent is None:
            latent = has_vae_folder or vae is not None
        if latent and not has_vae_folder and vae is None:
            raise ValueError("latent=True needs a `pretrained` folder with a vae/ subfolder or a `vae` config")
        if not latent and vae is not None:
            raise ValueError("a `vae` config was given but latent=False")

        self.cond_dim, self.image_size, self.latent = cond_dim, image_size, bool(latent)
        self.condition_dropout = condition_dropout
        self.sketch_weight = sketch_weight
        self.pretrained = pretrained
        load = root is not None and not on_meta_device()  # `inspect` builds on the meta device: configs only

        self.vae: AutoencoderKL | None = None
        self.scaling_factor, self.shift_factor = 1.0, 0.0
        channels, side = 3, image_size
        if latent:
            if has_vae_folder:
                self.vae = _from_folder(AutoencoderKL, root, "vae", load)
            else:
                self.vae = AutoencoderKL(**vae)
            self.vae.requires_grad_(False)
            self.vae.eval()
            cfg = self.vae.config
            factor = 2 ** (len(cfg.block_out_channels) - 1)
            if image_size % factor:
                raise ValueError(f"image_size {image_size} is not divisible by the VAE's downsampling factor {factor}")
            channels, side = int(cfg.latent_channels), image_size // factor
            self.scaling_factor = float(cfg.scaling_factor)
            self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)

        if root is not None:
            self.unet = _from_folder(UNet2DConditionModel, root, "unet", load)
        else:
            cfg = {**TINY_UNET, **(unet or {})}
            fixed = {
                "in_channels": channels + spatial_condition,
                "out_channels": channels,
                "cross_attention_dim": cond_dim,
            }
            for key, value in fixed.items():
                if cfg.setdefault(key, value) != value:
                    raise ValueError(f"unet {key}={cfg[key]} conflicts with the decoder's {key} {value}")
            cfg.setdefault("sample_size", side)
            if pooled_condition:  # the mean embedding also shifts every ResNet block, through the time embedding
                cfg.update(class_embed_type="projection", projection_class_embeddings_input_dim=cond_dim)
            self.unet = UNet2DConditionModel(**cfg)
        ucfg = self.unet.config
        space = "the VAE's latent space" if latent else "RGB pixel space"
        extra = spatial_condition if root is None else 0  # a pretrained UNet is widened below
        if ucfg.in_channels != channels + extra or ucfg.out_channels != channels:
            raise ValueError(
                f"the UNet maps {ucfg.in_channels} to {ucfg.out_channels} channels, but {space} needs {channels}"
                + (f" (plus {extra} spatial condition channels in)" if extra else "")
            )
        if getattr(ucfg, "encoder_hid_dim", None) is not None:
            raise ValueError("UNets with an encoder_hid_proj (encoder_hid_dim set) are not supported")
        if ucfg.cross_attention_dim != cond_dim:
            _replace_cross_attention_kv(self.unet, cond_dim)
        if root is not None and spatial_condition:
            _widen_conv_in(self.unet, spatial_condition)
        self.latent_channels, self.latent_size = channels, side
        if sketch_weight and spatial_condition < channels:
            raise ValueError(f"sketch_weight needs spatial_condition >= {channels} (the sketch's channels in {space})")
        self.num_queries = num_queries
        self.spatial = None
        if spatial_condition:
            self.spatial = SpatialCondition(
                cond_dim, num_queries, spatial_condition, spatial_grid, side, spatial_hidden
            )
        self.condition_norm = None
        if condition_norm:
            self.condition_norm = ConditionNorm(cond_dim * (num_queries or 1))
        self.pooled_condition = getattr(ucfg, "class_embed_type", None) == "projection"
        if pooled_condition and not self.pooled_condition:
            raise ValueError("pooled_condition needs a UNet built here (a pretrained one has no projection embedding)")

        train_cls, sample_cls = _scheduler_class(train_scheduler), _scheduler_class(sample_scheduler)
        base_config: dict[str, Any] = {}
        if root is not None and (root / "scheduler").is_dir():
            base_config = dict(train_cls.load_config(root, subfolder="scheduler", local_files_only=True))
        base_config.update(scheduler_config or {})
        self.train_scheduler = train_cls.from_config(base_config)
        if not hasattr(self.train_scheduler, "alphas_cumprod"):
            raise ValueError(
                f"train_scheduler {train_scheduler!r} has no DDPM noise schedule (alphas_cumprod); "
                "use e.g. DDPMScheduler or DDIMScheduler"
            )
        self.sample_scheduler = sample_cls.from_config(base_config)
        self._scheduler_config = {k: v for k, v in base_config.items() if not k.startswith("_")}
        self.prediction_type = str(getattr(self.train_scheduler.config, "prediction_type", "epsilon"))
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def self_contained_config(self) -> dict[str, Any]:
        """Init arguments that rebuild these networks without the ``pretrained`` folder (``unet``, ``vae`` and
        ``scheduler_config`` as the folder describes them), for a checkpoint that holds every weight."""

        def fields(module: Any) -> dict[str, Any]:
            items = module.config.items()
            return {k: (list(v) if isinstance(v, tuple) else v) for k, v in items if not k.startswith("_")}

        return {
            "pretrained": None,
            "unet": fields(self.unet),
            "vae": fields(self.vae) if self.vae is not None else None,  # `latent` follows from it
            "scheduler_config": dict(self._scheduler_config),
        }

    def save_pretrained_parts(self, folder: str | Path) -> list[str]:
        """Write ``unet/``, ``vae/`` and ``scheduler/`` (the sampling scheduler) under ``folder`` in diffusers' layout,
        as the released generation pipeline reads them; returns the names written."""
        extra = [n for n, m in (("spatial_condition", self.spatial), ("condition_norm", self.condition_norm)) if m]
        if extra or self.pooled_condition:
            raise ValueError(f"this decoder has parts a diffusers pipeline lacks: {extra or ['pooled_condition']}")
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet")
        wrote = ["unet/"]
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae")
            wrote.append("vae/")
        self.sample_scheduler.save_pretrained(folder / "scheduler")
        return [*wrote, "scheduler/"]

    def train(self, mode: bool = True) -> DiffusionDecoder:
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # frozen: always in eval mode
        return self

    # ------------------------------------------------------------------ pixels <-> diffusion space
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` to the UNet's input space (pixels in [-1, 1], or scaled latents)."""
        x = images.to(self.unet.dtype) * 2 - 1
        if self.vae is None:
            return x
        z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample()
        return ((z - self.shift_factor) * self.scaling_factor).to(self.unet.dtype)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """The UNet's space back to images in ``[0, 1]``."""
        if self.vae is not None:
            x = self.vae.decode((x / self.scaling_factor + self.shift_factor).to(self.vae.dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ interface
    def loss(self, images: Tensor, condition: Tensor, uncondition: Tensor | None = None) -> Tensor:
        """DDPM loss: MSE between the UNet's prediction and the noise (or velocity / clean sample, following the
        scheduler's ``prediction_type``) at uniformly random timesteps.

        Args:
            images: ``(B, 3, image_size, image_size)`` in ``[0, 1]``.
            condition: ``(B, Q, cond_dim)`` visual embeddings.
            uncondition: ``(1, Q, cond_dim)`` or ``(B, Q, cond_dim)``, the condition that replaces a row's with
                probability ``condition_dropout`` in training; zeros when None.
        """
        size = (self.image_size, self.image_size)
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != size:
            raise ValueError(f"expected images (B, 3, {size[0]}, {size[1]}), got shape {tuple(images.shape)}")
        condition = self._check_condition(condition, images.shape[0])
        drop = torch.zeros(condition.shape[0], dtype=torch.bool, device=condition.device)
        if self.training and self.condition_dropout > 0:
            drop = torch.rand(condition.shape[0], device=condition.device) < self.condition_dropout
            uncond = self._uncondition(uncondition, condition)
            condition = torch.where(drop[:, None, None], uncond, condition)
        x0 = self.encode(images)
        noise = torch.randn_like(x0)
        alphas_cumprod = self.train_scheduler.alphas_cumprod.to(device=x0.device, dtype=torch.float32)
        t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), device=x0.device)
        # DDPMScheduler.add_noise / get_velocity: x_t = sqrt(a) x0 + sqrt(1 - a) eps, v = sqrt(a) eps - sqrt(1 - a) x0
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        signal, sigma = a.sqrt().to(x0.dtype), (1 - a).sqrt().to(x0.dtype)
        noisy = signal * x0 + sigma * noise
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = signal * noise - sigma * x0
        else:
            target = x0
        pred, coarse = self._unet(noisy, t, condition, return_coarse=True)
        loss = F.mse_loss(pred.float(), target.float())
        if self.sketch_weight > 0:
            keep = ~drop
            sketch = F.adaptive_avg_pool2d(x0, coarse.shape[-1])
            err = (coarse[:, : x0.shape[1]].float() - sketch.float()).pow(2).mean(dim=(1, 2, 3))
            loss = loss + self.sketch_weight * (err * keep).sum() / keep.sum().clamp(min=1)
        return loss

    @torch.no_grad()
    def sample(
        self,
        condition: Tensor,
        uncondition: Tensor | None = None,
        steps: int = 50,
        guidance_scale: float = 7.5,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Generate images ``(B, 3, image_size, image_size)`` in ``[0, 1]`` with classifier-free guidance.

        Args:
            condition: ``(B, Q, cond_dim)`` visual embeddings.
            uncondition: ``(1, Q, cond_dim)`` or ``(B, Q, cond_dim)``; zeros when None and ``guidance_scale > 1``.
            steps: denoising steps of ``sample_scheduler``.
            guidance_scale: ``eps = eps_u + s * (eps_c - eps_u)``; 1 runs the conditional branch only (no guidance,
                ``uncondition`` unused), values below 1 are refused.
            generator: seeds the initial noise (and the stochastic schedulers' steps).
        """
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {guidance_scale}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        batch = condition.shape[0]
        condition = self._check_condition(condition, batch)
        guided = guidance_scale > 1
        context = torch.cat([self._uncondition(uncondition, condition), condition]) if guided else condition
        was_training = self.training
        self.eval()
        try:
            sched = self.sample_scheduler
            try:
                sched.set_timesteps(steps, device=condition.device)
            except ValueError as err:  # e.g. PNDMScheduler's Runge-Kutta warm-up needs at least 4 steps
                raise ValueError(f"{type(sched).__name__} cannot sample in {steps} steps: {err}") from err
            shape = (batch, self.latent_channels, self.latent_size, self.latent_size)
            x = randn_tensor(shape, generator=generator, device=condition.device, dtype=self.unet.dtype)
            x = x * sched.init_noise_sigma
            step_kwargs = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
            for t in sched.timesteps:
                inp = sched.scale_model_input(torch.cat([x, x]) if guided else x, t)
                out = self._unet(inp, t, context)
                if guided:
                    out_u, out_c = out.chunk(2)
                    out = out_u + guidance_scale * (out_c - out_u)
                x = sched.step(out, t, x, **step_kwargs).prev_sample
            return self.decode(x)
        finally:
            self.train(was_training)

    @property
    def fits_before_training(self) -> bool:
        return self.spatial is not None and len(self.spatial.proj) == 1 and self.sketch_weight > 0

    def fit_before_training(self, condition: Tensor, images: Tensor) -> tuple[float, list[Tensor]]:
        """:meth:`fit_sketch`; the tensors set are the spatial map's and the condition norm's."""
        mse = self.fit_sketch(condition, images)
        fitted = [m for m in (self.spatial, self.condition_norm) if m is not None]
        return mse, [t for m in fitted for t in m.state_dict().values()]

    @torch.no_grad()
    def fit_sketch(self, condition: Tensor, images: Tensor, ridge: float = 1e-2) -> float:
        """Solve the spatial map's sketch channels in closed form: the ridge regression from the normalised,
        flattened conditions to the target images average-pooled to the grid (what ``sketch_weight`` trains
        towards by gradient descent, reached at once). ``condition_norm``'s statistics are first set from
        ``condition``. Training then goes on from the solution.

        Args:
            condition: ``(N, Q, cond_dim)`` conditions of the training images, N well above ``Q * cond_dim``.
            images: ``(N, 3, image_size, image_size)`` in ``[0, 1]``, the images they condition.
            ridge: added to the diagonal of the normal equations.

        Returns:
            the fit's mean squared error on these pairs.
        """
        if self.spatial is None or len(self.spatial.proj) != 1 or self.sketch_weight <= 0:
            raise ValueError("fit_sketch needs a linear spatial map (spatial_hidden=0) with a sketch (sketch_weight>0)")
        if images.dim() != 4 or images.shape[0] != condition.shape[0]:
            raise ValueError(f"expected one image per condition, got {tuple(images.shape)} for {condition.shape[0]}")
        condition = self._check_condition(condition, images.shape[0])
        if self.condition_norm is not None:
            self.condition_norm.reset()
            self.condition_norm.update(condition.flatten(1) if self.num_queries else condition.flatten(0, 1))
        was_training = self.training
        self.eval()  # normalise with the statistics just set, without updating them
        x = self._normalise(condition).flatten(1).double()
        self.train(was_training)
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        y = F.adaptive_avg_pool2d(self.encode(images), self.spatial.grid).flatten(1).double()
        gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        solution = torch.linalg.solve(gram, x.T @ y)
        linear: nn.Linear = self.spatial.proj[0]
        k = y.shape[1]  # the sketch's channels come first in the map
        linear.weight[:k] = solution[:-1].T.to(linear.weight.dtype)
        linear.bias[:k] = solution[-1].to(linear.bias.dtype)
        return float((x @ solution - y).pow(2).mean())

    # ------------------------------------------------------------------ helpers
    def _normalise(self, condition: Tensor) -> Tensor:
        if self.condition_norm is None:
            return condition
        flat = condition.flatten(1) if self.num_queries else condition.flatten(0, 1)
        return self.condition_norm(flat).view_as(condition)

    def _unet(self, x: Tensor, t: Tensor, condition: Tensor, return_coarse: bool = False) -> Any:
        condition = self._normalise(condition)
        coarse = None
        if self.spatial is not None:
            coarse = self.spatial(condition)
            up = F.interpolate(coarse, scale_factor=self.spatial.side // self.spatial.grid, mode="nearest")
            x = torch.cat([x, up.to(x.dtype)], dim=1)
        labels = condition.mean(dim=1) if self.pooled_condition else None
        out = self.unet(x, t, encoder_hidden_states=condition, class_labels=labels).sample
        return (out, coarse) if return_coarse else out

    def _check_condition(self, condition: Tensor, batch: int) -> Tensor:
        q = self.num_queries
        if (
            condition.dim() != 3
            or tuple(condition.shape[::2]) != (batch, self.cond_dim)
            or q not in (None, condition.shape[1])
        ):
            raise ValueError(
                f"expected condition ({batch}, {q or 'Q'}, {self.cond_dim}), got shape {tuple(condition.shape)}"
            )
        return condition.to(self.unet.dtype)

    def _uncondition(self, uncondition: Tensor | None, condition: Tensor) -> Tensor:
        """``uncondition`` (zeros when None) broadcast to ``condition``'s shape."""
        if uncondition is None:
            return torch.zeros_like(condition)
        b, q, d = condition.shape
        if uncondition.dim() != 3 or uncondition.shape[0] not in (1, b) or uncondition.shape[1:] != (q, d):
            raise ValueError(
                f"expected uncondition (1, {q}, {d}) or ({b}, {q}, {d}) like the condition, "
                f"got shape {tuple(uncondition.shape)}"
            )
        return uncondition.to(condition).expand(b, q, d)


class ConditionNorm(nn.Module):
    """Standardises features with the mean and variance of every condition seen in training, accumulated
    (exactly, as one large batch would give them), and used as they stand in training and sampling alike.

    Unlike a ``BatchNorm1d`` in training mode, a condition's normalised value never depends on the other rows
    of its batch, so what the decoder learns from it is what it will see when sampling.
    """

    def __init__(self, features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("var", torch.ones(features))
        self.register_buffer("count", torch.zeros(()))

    def reset(self) -> None:
        self.mean.zero_()
        self.var.fill_(1.0)
        self.count.zero_()

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add the rows of ``x`` ``(N, features)`` to the statistics (Chan et al.'s parallel update)."""
        x = x.detach().to(self.mean.dtype)
        n, total = x.shape[0], self.count + x.shape[0]
        mean, var = x.mean(dim=0), x.var(dim=0, unbiased=False)
        delta = mean - self.mean
        self.var.copy_((self.var * self.count + var * n + delta.pow(2) * self.count * n / total) / total)
        self.mean.add_(delta * n / total)
        self.count.copy_(total)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.update(x)
        return (x - self.mean.to(x.dtype)) / (self.var.to(x.dtype) + self.eps).sqrt()


class SpatialCondition(nn.Module):
    """The Q embeddings laid out as a coarse ``(channels, grid, grid)`` map for the UNet's input.

    An MLP (or one linear layer) from all Q embeddings, flattened, to the map; the decoder upsamples it (nearest)
    to the UNet's input side and concatenates it to the noisy input. Every pixel thus sees, from the first
    convolution on, what the condition says about its part of the image; cross-attention at low resolution and
    a pooled vector learn that only slowly. With ``DiffusionDecoder(sketch_weight=...)`` the first channels are
    also trained to predict the pooled target image.
    """

    def __init__(self, cond_dim: int, num_queries: int, channels: int, grid: int, side: int, hidden: int = 0) -> None:
        super().__init__()
        if grid <= 0 or side % grid:
            raise ValueError(f"spatial_grid {grid} must divide the UNet's input side {side}")
        self.num_queries, self.grid, self.side = num_queries, grid, side
        width = num_queries * cond_dim
        out = channels * grid * grid
        layers = [nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, out)] if hidden else [nn.Linear(width, out)]
        self.proj = nn.Sequential(*layers)

    def forward(self, condition: Tensor) -> Tensor:
        """``(B, Q, D)`` embeddings to the coarse map ``(B, channels, grid, grid)``."""
        return self.proj(condition.flatten(1)).view(condition.shape[0], -1, self.grid, self.grid)


def _scheduler_class(name: str) -> type[SchedulerMixin]:
    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(
            f"unknown diffusers scheduler {name!r} (or its optional dependency is missing); "
            f"give a scheduler class name such as {_COMMON_SCHEDULERS}"
        )
    return cls


def _from_folder(cls: type, root: Path, subfolder: str, load: bool) -> nn.Module:
    """``cls.from_pretrained(root, subfolder=...)``, offline and strict: any missing or unused weight raises.

    Without ``load`` (on the meta device) the model is built from the folder's config alone, no weights read.
    """
    if not load:
        return cls.from_config(cls.load_config(root, subfolder=subfolder, local_files_only=True))
    try:
        model, info = cls.from_pretrained(
            root,
            subfolder=subfolder,
            local_files_only=True,
            output_loading_info=True,
            low_cpu_mem_usage=is_accelerate_available(),
        )
    except OSError as err:
        raise FileNotFoundError(f"could not load {cls.__name__} from {str(root / subfolder)!r}: {err}") from err
    except RuntimeError as err:  # diffusers refuses mismatched shapes
        raise RuntimeError(f"weights in {str(root / subfolder)!r} do not fit its config: {err}") from err
    problems = {k: v for k, v in info.items() if v}
    if problems:
        details = "; ".join(f"{k}: {sorted(map(str, v))[:5]}" for k, v in problems.items())
        raise RuntimeError(f"weights in {str(root / subfolder)!r} do not match its config ({details})")
    return model


def _widen_conv_in(unet: UNet2DConditionModel, extra: int) -> None:
    """Add ``extra`` zero-initialised input channels to a pretrained UNet's first convolution (the InstructPix2Pix
    recipe): the pretrained model's output is unchanged until the new channels' weights train."""
    old: nn.Conv2d = unet.conv_in
    new = nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, old.stride, old.padding,
                    bias=old.bias is not None).to(device=old.weight.device, dtype=old.weight.dtype)  # fmt: skip
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=old.in_channels + extra)


def _replace_cross_attention_kv(unet: UNet2DConditionModel, cond_dim: int) -> None:
    """Emu's recipe: fresh ``to_k`` / ``to_v`` reading ``cond_dim``-wide conditions in every cross-attention."""
    found = 0
    for name, module in unet.named_modules():
        if not (isinstance(module, Attention) and module.is_cross_attention):
            continue
        if module.to_k is None or module.to_v is None or getattr(module, "norm_cross", None) is not None:
            raise ValueError(f"cannot re-project the cross-attention {name!r}: it has no plain to_k/to_v projections")
        for attr in ("to_k", "to_v"):
            old: nn.Linear = getattr(module, attr)
            new = nn.Linear(cond_dim, old.out_features, bias=old.bias is not None)
            setattr(module, attr, new.to(device=old.weight.device, dtype=old.weight.dtype))
        module.cross_attention_dim = cond_dim
        found += 1
    if not found:
        raise ValueError("the UNet has no cross-attention layers to condition on the visual embeddings")
    unet.register_to_config(cross_attention_dim=cond_dim)  # its config describes its weights again
    unet.register_to_config(cross_attention_dim=cond_dim)
