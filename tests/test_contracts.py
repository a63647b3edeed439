"""The component contracts are complete: one minimal component per family, written only against
``emu_lightning.components.base`` (no transformers, timm or diffusers), trains in every stage and generates text and
images inside EmuModel."""

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emu_lightning import shapesworld
from emu_lightning.components.base import LanguageModel, LMOutput, Resampler, VisionBackbone, VisualDecoder
from emu_lightning.model import EmuModel
from emu_lightning.shapesworld import ShapesWorldDataModule
from emu_lightning.tokenizer import TrainedBPE


class PatchVision(VisionBackbone):
    def __init__(self, image_size: int = 16, patch: int = 8, dim: int = 16) -> None:
        super().__init__()
        self.image_size, self.out_dim, self.num_tokens = image_size, dim, (image_size // patch) ** 2
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.proj(pixels.float()).flatten(2).transpose(1, 2)


class MeanResampler(Resampler):
    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 2) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.num_queries = in_dim, out_dim, num_queries
        self.proj = nn.Linear(in_dim, out_dim)
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)

    def forward(self, features: Tensor) -> Tensor:
        return self.proj(features.mean(1, keepdim=True)) + self.queries


class GRULanguageModel(LanguageModel):
    """A GRU: causal by construction, its cache is its hidden state."""

    def __init__(self, vocab: int = 64, dim: int = 16) -> None:
        super().__init__()
        self.hidden_size = dim
        self.table, self.rnn = nn.Embedding(vocab, dim), nn.GRU(dim, dim, batch_first=True)
        self.head, self.regression = nn.Linear(dim, vocab), nn.Linear(dim, dim, bias=False)

    @property
    def vocab_size(self) -> int:
        return self.table.num_embeddings

    def resize_token_embeddings(self, num_tokens: int) -> None:
        old = self.vocab_size
        if num_tokens <= old:
            return
        table, head = nn.Embedding(num_tokens, self.hidden_size), nn.Linear(self.hidden_size, num_tokens)
        with torch.no_grad():
            table.weight[:old], table.weight[old:] = self.table.weight, self.table.weight.mean(0)
            head.weight[:old], head.weight[old:] = self.head.weight, self.head.weight.mean(0)
            head.bias[:old], head.bias[old:] = self.head.bias, self.head.bias.mean()
        self.table, self.head = table, head

    def embed(self, ids: Tensor) -> Tensor:
        return self.table(ids)

    def forward(self, inputs_embeds, attention_mask, past_key_values=None, use_cache=False, position_ids=None):
        x = inputs_embeds * attention_mask[:, -inputs_embeds.shape[1] :, None].to(inputs_embeds.dtype)
        out, state = self.rnn(x, past_key_values)
        cache = state if use_cache or past_key_values is not None else None
        return LMOutput(logits=self.head(out), hidden=out, past_key_values=cache)

    def regress(self, hidden: Tensor) -> Tensor:
        return self.regression(hidden)

    @torch.no_grad()
    def generate(self, inputs_embeds, attention_mask, max_new_tokens=20, eos_token_id=None, **kwargs) -> Tensor:
        out = self(inputs_embeds, attention_mask, use_cache=True)
        new = []
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            new.append(token)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], 1)
            out = self(self.embed(token[:, None]), attention_mask, past_key_values=out.past_key_values)
        return torch.stack(new, 1)


class LinearDecoder(VisualDecoder):
    def __init__(self, cond_dim: int, image_size: int = 8) -> None:
        super().__init__()
        self.cond_dim, self.image_size = cond_dim, image_size
        self.linear = nn.Linear(cond_dim, 3 * image_size * image_size)

    def _draw(self, condition: Tensor) -> Tensor:
        return torch.sigmoid(self.linear(condition.mean(1))).view(-1, 3, self.image_size, self.image_size)

    def loss(self, images, condition, uncondition=None) -> Tensor:
        target = F.interpolate(images.float(), size=self.image_size, mode="area")
        return F.mse_loss(self._draw(condition), target)

    def sample(self, condition, uncondition=None, steps=50, guidance_scale=7.5, generator=None) -> Tensor:
        return self._draw(condition)


def build(**kwargs) -> EmuModel:
    torch.manual_seed(0)
    vision = PatchVision()
    kwargs.setdefault("tokenizer", TrainedBPE(shapesworld.corpus))
    return EmuModel(vision, MeanResampler(16, 16), GRULanguageModel(), LinearDecoder(16), max_length=96, **kwargs)


def fit(model: EmuModel, tmp_path, steps: int = 3) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, limit_val_batches=1, val_check_interval=steps, logger=False,
                        enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, ShapesWorldDataModule(image_size=16, batch_size=4, train_size=32, val_size=4))
    return trainer


def test_minimal_components_train_and_generate_inside_emu(tmp_path):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = fit(model, tmp_path / "pretrain")
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["val/loss"])
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert {"vision", "resampler", "llm"} <= changed
    images = torch.rand(2, 3, 16, 16)
    captions = model.caption(images, max_new_tokens=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert model.llm_max_positions() == 10**9  # the contract's default: no limit
    generated = model.generate_image(["a red circle.", [images[0], "the same in blue."]], steps=1)
    assert generated.shape == (2, 3, 8, 8) and 0 <= generated.min() and generated.max() <= 1
    cached = model.regress_image_embeddings(["a red circle."])
    assert torch.allclose(cached, model.regress_image_embeddings(["a red circle."], use_cache=False), atol=1e-5)

    decoder_stage = build(stage="decoder")
    decoder_stage.load_state_dict(model.state_dict())
    before = decoder_stage.decoder.linear.weight.clone()
    fit(decoder_stage, tmp_path / "decoder", steps=2)
    assert not torch.equal(decoder_stage.decoder.linear.weight, before)
