import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from emu_lightning.components.vision import TimmVisionBackbone

TINY = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
VIT = {"model_name": "vit_base_patch16_224", "image_size": 32, "model_kwargs": TINY}
CLIP = {"model_name": "vit_base_patch16_clip_224", "image_size": 32, "model_kwargs": TINY}  # pre_norm, no conv bias


def _timm(model_name, image_size, model_kwargs):
    """The unpruned timm model (with its final norm) that a checkpoint would come from."""
    return timm.create_model(model_name, pretrained=False, num_classes=0, img_size=image_size, **model_kwargs)


def _pixels(size=32, batch=2):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("kwargs", "tokens", "dim", "prefix"),
    [
        (VIT, 4 * 4 + 1, 32, 1),
        ({"model_name": "eva02_tiny_patch14_224", "image_size": 32, "model_kwargs": TINY}, 4 * 4 + 1, 32, 1),
        ({"model_name": "test_convnext", "image_size": 64}, 2 * 2, 64, 0),  # stride 32
    ],
)
def test_shapes_and_no_unused_parameters(kwargs, tokens, dim, prefix):
    torch.manual_seed(0)
    backbone = TimmVisionBackbone(**kwargs)
    assert (backbone.num_tokens, backbone.out_dim, backbone.num_prefix_tokens) == (tokens, dim, prefix)
    size = kwargs["image_size"]
    assert backbone.image_size == size
    out = backbone(_pixels(size))
    assert out.shape == (2, tokens, dim)
    out.square().sum().backward()
    # DDP fails on parameters that get no gradient, e.g. a final norm or head left in place.
    assert [n for n, p in backbone.named_parameters() if p.grad is None] == []


def test_features_are_last_block_before_final_norm_with_cls_first():
    torch.manual_seed(0)
    backbone = TimmVisionBackbone(**VIT)
    captured = []
    backbone.model.blocks[-1].register_forward_hook(lambda mod, args, out: captured.append(out))
    pixels = _pixels()
    out = backbone(pixels)
    assert captured[0].shape == (2, 17, 32)
    torch.testing.assert_close(out, backbone.ln(captured[0]), atol=1e-6, rtol=0)
    # Independent path: vit_base_patch16_224 normalises with mean = std = 0.5, and its final norm is pruned.
    assert isinstance(backbone.model.norm, torch.nn.Identity)
    manual = backbone.ln(backbone.model.forward_features((pixels - 0.5) / 0.5))
    torch.testing.assert_close(out, manual, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 0], backbone.ln(captured[0][:, 0]), atol=1e-6, rtol=0)


def test_wrong_input_size():
    backbone = TimmVisionBackbone(**VIT)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 32, 32\), got shape \(1, 3, 48, 48\)"):
        backbone(torch.rand(1, 3, 48, 48))


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    source = _timm(**VIT)
    save_file(source.state_dict(), tmp_path / "vit.safetensors")
    from_st = TimmVisionBackbone(**VIT, checkpoint_path=str(tmp_path / "vit.safetensors"))
    for name, tensor in from_st.model.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name
    # A pruned backbone's own weights (no final norm) in a DDP-style container also load.
    wrapped = {"state_dict": {f"module.{k}": v for k, v in from_st.model.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "vit.pt")
    from_pt = TimmVisionBackbone(**VIT, checkpoint_path=str(tmp_path / "vit.pt"))
    pixels = _pixels()
    assert torch.equal(from_st(pixels), from_pt(pixels))
    assert not torch.allclose(from_st(pixels), TimmVisionBackbone(**VIT)(pixels))


def _to_open_clip(timm_state):
    """Inverse of timm's ``_convert_openai_clip``: a timm CLIP ViT as an open_clip/OpenAI ``visual.`` tower."""
    swaps = [
        (r"^patch_embed\.proj\.", "conv1."),
        (r"^norm_pre\.", "ln_pre."),
        (r"^norm\.", "ln_post."),
        (r"^blocks\.", "transformer.resblocks."),
        (r"\.norm([12])\.", r".ln_\1."),
        (r"\.attn\.qkv\.", ".attn.in_proj_"),
        (r"\.attn\.proj\.", ".attn.out_proj."),
        (r"\.mlp\.fc1\.", ".mlp.c_fc."),
        (r"\.mlp\.fc2\.", ".mlp.c_proj."),
    ]
    out = {}
    for key, value in timm_state.items():
        if key == "cls_token":
            key, value = "class_embedding", value.reshape(-1)
        elif key == "pos_embed":
            key, value = "positional_embedding", value[0]
        for pattern, repl in swaps:
            key = re.sub(pattern, repl, key)
        out[f"visual.{key}"] = value
    out["visual.proj"] = torch.randn(32, 16)  # becomes timm's head, which num_classes=0 drops
    # The text tower reuses the vision key names without the prefix: loading them would clash.
    text = {
        "positional_embedding": torch.randn(8, 16),
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(48, 16),
    }
    return {**out, **text, "token_embedding.weight": torch.randn(10, 16), "logit_scale": torch.ones(())}


def test_open_clip_layout(tmp_path):
    torch.manual_seed(0)
    source = _timm(**CLIP)
    assert "patch_embed.proj.bias" not in source.state_dict()  # CLIP's conv1 has no bias
    save_file(source.state_dict(), tmp_path / "timm.safetensors")
    open_clip = _to_open_clip(source.state_dict())
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in open_clip and "visual.ln_pre.weight" in open_clip
    torch.save(open_clip, tmp_path / "open_clip.pt")
    reference = TimmVisionBackbone(**CLIP, checkpoint_path=str(tmp_path / "timm.safetensors"))
    loaded = TimmVisionBackbone(**CLIP, checkpoint_path=str(tmp_path / "open_clip.pt"))
    pixels = _pixels()
    torch.testing.assert_close(loaded(pixels), reference(pixels), atol=1e-6, rtol=0)


def test_eva_clip_layout(tmp_path):
    # EVA-CLIP keeps timm's names under "visual." next to a text tower; the paper's g/14 shape, shrunk.
    kwargs = {"model_name": "eva_giant_patch14_clip_224", "image_size": 32, "model_kwargs": TINY}
    torch.manual_seed(0)
    source = _timm(**kwargs)
    eva_clip = {f"visual.{k}": v for k, v in source.state_dict().items()}
    eva_clip |= {"visual.head.weight": torch.randn(16, 32), "text.token_embedding.weight": torch.randn(10, 16)}
    save_file(eva_clip, tmp_path / "eva_clip.safetensors")
    loaded = TimmVisionBackbone(**kwargs, checkpoint_path=str(tmp_path / "eva_clip.safetensors"))
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name
    assert loaded(_pixels()).shape == (2, 17, 32)


def test_mismatched_checkpoints_raise_with_key_names(tmp_path):
    state = _timm(**VIT).state_dict()
    missing = {k: v for k, v in state.items() if k != "blocks.0.mlp.fc1.bias"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(RuntimeError, match=r"1 missing keys \['blocks\.0\.mlp\.fc1\.bias'\]") as err:
        TimmVisionBackbone(**VIT, checkpoint_path=str(tmp_path / "missing.safetensors"))
    assert str(tmp_path / "missing.safetensors") in str(err.value)
    torch.save({**state, "blocks.0.extra_gamma": torch.ones(32)}, tmp_path / "extra.pt")
    with pytest.raises(RuntimeError, match=r"1 unexpected keys \['blocks\.0\.extra_gamma'\]"):
        TimmVisionBackbone(**VIT, checkpoint_path=str(tmp_path / "extra.pt"))
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        TimmVisionBackbone(**VIT, checkpoint_path=str(tmp_path / "nowhere.safetensors"))


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="image_size 36 is not a multiple of patch size 8"):
        TimmVisionBackbone("vit_base_patch16_224", image_size=36, model_kwargs=TINY)
    with pytest.raises(ValueError, match="image_size 225 is not a multiple of patch size 14"):
        TimmVisionBackbone("eva_giant_patch14_clip_224", image_size=225)  # raised before building 1B params
    with pytest.raises(ValueError, match="not_a_timm_model"):
        TimmVisionBackbone("not_a_timm_model")


def test_freeze_keeps_eval_mode():
    backbone = TimmVisionBackbone(**VIT, freeze=True)
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not any(m.training for m in backbone.modules())
    trainable = TimmVisionBackbone(**VIT).train()
    assert all(m.training for m in trainable.modules())
    assert all(p.requires_grad for p in trainable.parameters())


def test_the_feature_layernorm_has_the_released_epsilon():
    backbone = TimmVisionBackbone(**VIT)
    assert backbone.ln.eps == 1e-6  # the released ln_visual: LayerNorm(1408, eps=1e-6)
    features = torch.randn(2, 5, backbone.out_dim)
    expected = torch.nn.functional.layer_norm(features, (backbone.out_dim,), backbone.ln.weight, backbone.ln.bias, 1e-6)
    torch.testing.assert_close(backbone.ln(features), expected, rtol=0, atol=0)


def test_meta_device_builds():
    with torch.device("meta"):
        eva = TimmVisionBackbone("eva_giant_patch14_clip_224", image_size=224, checkpoint_path="/absent/eva.pt")
        convnext = TimmVisionBackbone("test_convnext", image_size=64)  # shape found by a forward on meta tensors
    assert (eva.out_dim, eva.num_tokens, eva.image_size) == (1408, 257, 224)
    # EVA-CLIP g/14 tower: 1,011,146,112 with timm 1.0.31 (final norm swapped for our LayerNorm of equal size).
    assert 0.95e9 < sum(p.numel() for p in eva.parameters()) < 1.05e9
    assert eva.ln.weight.is_meta
    assert (convnext.num_tokens, convnext.out_dim) == (4, 64)
    assert convnext(torch.empty(1, 3, 64, 64, device="meta")).shape == (1, 4, 64)
