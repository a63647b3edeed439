import pytest
import torch
import torch.nn.functional as F
from torch import nn

from emu_lightning.components.vision import TimmVisionBackbone
from emu_lightning.eval.rices import RICES, features_from_vision_backbone


def brute_force(support, queries, k):
    sims = F.normalize(queries, dim=1) @ F.normalize(support, dim=1).T
    return sims.topk(k, dim=1).indices.flip(1), sims


@pytest.mark.parametrize("use_faiss", [False, True])
def test_find_equals_brute_force_least_similar_first(use_faiss):
    g = torch.Generator().manual_seed(0)
    support, queries = torch.randn(500, 64, generator=g), torch.randn(50, 64, generator=g)
    rices = RICES.from_features(support, use_faiss=use_faiss)
    assert rices.backend == ("faiss" if use_faiss else "torch")
    found = rices.find(queries, k=8)
    expected, sims = brute_force(support, queries, 8)
    assert found.dtype == torch.long and found.shape == (50, 8)
    assert torch.equal(found, expected)
    picked = sims.gather(1, found)
    assert (picked.diff(dim=1) > 0).all()  # least similar first
    assert torch.equal(found[:, -1], sims.argmax(dim=1))  # the most similar sits last, next to the query


def test_backends_agree_and_default_is_torch_for_small_sets():
    g = torch.Generator().manual_seed(1)
    support, queries = torch.randn(300, 16, generator=g), torch.randn(40, 16, generator=g)
    small = RICES.from_features(support)
    assert small.backend == "torch"
    assert torch.equal(small.find(queries, 5), RICES.from_features(support, use_faiss=True).find(queries, 5))


@pytest.mark.parametrize("use_faiss", [False, True])
def test_ties_break_by_lower_index(use_faiss):
    g = torch.Generator().manual_seed(2)
    support = torch.randn(40, 33, generator=g)
    support[[11, 15, 30]] = support[3].clone()  # four identical images
    rices = RICES.from_features(support, use_faiss=use_faiss)
    query = support[3:4] * 2.0  # same direction
    assert rices.find(query, 2).tolist() == [[11, 3]]
    assert rices.find(query, 4).tolist() == [[30, 15, 11, 3]]
    # All equal: the k lowest indices, the lowest last; runs past the float32 candidates to the exact path.
    flat = RICES.from_features(torch.ones(30, 5), use_faiss=use_faiss)
    assert flat.find(torch.ones(2, 5), 4).tolist() == [[3, 2, 1, 0]] * 2
    assert torch.equal(rices.find(query, 4), rices.find(query, 4))


@pytest.mark.parametrize("use_faiss", [False, True])
def test_exclude_leaves_out_own_index(use_faiss):
    g = torch.Generator().manual_seed(3)
    support = torch.randn(200, 24, generator=g)
    rices = RICES.from_features(support, use_faiss=use_faiss)
    own = torch.arange(20)
    found = rices.find(support[:20], 6, exclude=own)
    sims = F.normalize(support[:20], dim=1) @ F.normalize(support, dim=1).T
    sims[own, own] = float("-inf")
    assert torch.equal(found, sims.topk(6, dim=1).indices.flip(1))
    assert not (found == own[:, None]).any()
    mixed = torch.tensor([0, -1])
    assert rices.find(support[:2], 3, exclude=mixed)[1, -1] == 1  # -1: nothing left out, finds itself


def test_bad_k_and_dims_raise():
    rices = RICES.from_features(torch.randn(10, 8))
    with pytest.raises(ValueError, match=r"k = 11 .* 10"):
        rices.find(torch.randn(2, 8), 11)
    with pytest.raises(ValueError, match=r"k = 0 .* 10"):
        rices.find(torch.randn(2, 8), 0)
    with pytest.raises(ValueError, match=r"k = 10 .* 9"):
        rices.find(torch.randn(1, 8), 10, exclude=torch.tensor([4]))
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        rices.find(torch.randn(2, 7), 3)
    with pytest.raises(ValueError, match="NaN"):
        rices.find(torch.full((1, 8), float("nan")), 3)
    with pytest.raises(ValueError, match="exclude"):
        rices.find(torch.randn(2, 8), 3, exclude=torch.tensor([0, 10]))


class CountingEncoder:
    """Features from pixel statistics; counts the images it sees."""

    def __init__(self):
        self.images = 0

    def __call__(self, images):
        self.images += images.shape[0]
        return images.flatten(2).mean(-1) + images.flatten(1)[:, :5].sum(-1, keepdim=True)


def vqa_like(num_images=10, per_image=3, size=8):
    g = torch.Generator().manual_seed(4)
    images = torch.rand(num_images, 3, size, size, generator=g)
    # Items interleave images (question q of every image, then q + 1), as a VQA questions file may.
    return [
        {"image_id": 100 + i, "image": images[i], "question": f"q{q}"}
        for q in range(per_image)
        for i in range(num_images)
    ]


def test_each_unique_image_is_encoded_once_and_cached(tmp_path):
    data = vqa_like()
    enc = CountingEncoder()
    first = RICES(data, enc, cache_dir=tmp_path, cache_key="counting-toy", batch_size=4)
    assert len(data) == 30 and first.num_images == 10
    assert first.encoder_calls == enc.images == 10
    assert not first.loaded_from_cache and first.cache_path.is_file()
    assert first.first_item.tolist() == list(range(10))
    assert torch.equal(first.item_image, torch.arange(30) % 10)

    enc2 = CountingEncoder()
    second = RICES(data, enc2, cache_dir=tmp_path, cache_key="counting-toy")
    assert second.loaded_from_cache and second.encoder_calls == enc2.images == 0
    assert torch.equal(second.features, first.features)

    other_ids = [dict(d, image_id=d["image_id"] + 1000) for d in data]  # other ids: another cache file
    third = RICES(other_ids, CountingEncoder(), cache_dir=tmp_path, cache_key="counting-toy")
    assert not third.loaded_from_cache and third.encoder_calls == 10
    assert third.cache_path != first.cache_path
    with pytest.raises(ValueError, match="cache_key"):
        RICES(data, enc, cache_dir=tmp_path)


def test_find_for_images_returns_dataset_items():
    data = vqa_like()
    rices = RICES(data, CountingEncoder())
    query = torch.stack([data[2]["image"], data[7]["image"]])
    found = rices.find_for_images(query, 3)
    assert rices.encoder_calls == 10 + 2
    assert found[:, -1].tolist() == [2, 7]  # each query's own image, its first item
    assert len({rices.item_image[i].item() for i in found[0]}) == 3  # three different images
    left_out = rices.find_for_images(rices.features[[2, 7]], 3, exclude_image_ids=[102, 107])
    assert not (rices.item_image[left_out] == torch.tensor([[2], [7]])).any()
    assert torch.equal(left_out[:, -1], found[:, -2])  # the runner-up moves last

    per_item = RICES(data, CountingEncoder(), distinct_images=False)
    items = per_item.find_for_images(query, 4)
    assert items[0, 1:].tolist() == [22, 12, 2]  # all three questions of the image, the first one last
    assert rices.item_image[items[0, 0]] != 2


class MeanBackbone(nn.Module):
    num_prefix_tokens = 0

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)  # (B, H*W, 3) tokens


def test_features_from_vision_backbone():
    torch.manual_seed(0)
    backbone = TimmVisionBackbone(
        "vit_base_patch16_224", image_size=16, model_kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)
    )
    backbone.train()
    encode = features_from_vision_backbone(backbone)
    images = torch.rand(3, 3, 16, 16)
    feats = encode(images)
    assert feats.shape == (3, 32) and not feats.requires_grad
    assert backbone.training and backbone.model.training  # modes restored
    backbone.eval()
    assert torch.allclose(feats, backbone(images)[:, 0])  # CLS token
    assert torch.allclose(features_from_vision_backbone(MeanBackbone())(images), images.mean((2, 3)))

    data = [{"image_id": i % 2, "image": images[i % 2]} for i in range(4)]
    rices = RICES(data, backbone)  # a VisionBackbone is pooled by default
    assert rices.features.shape == (2, 32) and rices.encoder_calls == 2
    assert rices.find_for_images(images[:2], 1).tolist() == [[0], [1]]
