import pytest
import torch

from emu_lightning.sequence import END_OF_CHUNK, IGNORE_INDEX, SequenceBuilder
from emu_lightning.tokenizer import IMAGE, IMG_END, IMG_START


def img():
    return torch.rand(3, 16, 16)


@pytest.fixture
def builder(tokenizer):
    return SequenceBuilder(tokenizer, num_queries=3, max_length=32)


def test_image_block_layout_and_labels(builder, tokenizer):
    text = "a red circle."
    batch = builder([[img(), text]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    v = tokenizer.get_vocab()
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = [tokenizer.bos_token_id, v[IMG_START], v[IMAGE], v[IMAGE], v[IMAGE], v[IMG_END], *text_ids]
    expected.append(tokenizer.eos_token_id)
    assert ids == expected
    # Cross-entropy never targets BOS, [IMG], <image> or [/IMG]; text and EOS are targets.
    assert labels == [IGNORE_INDEX] * 6 + text_ids + [tokenizer.eos_token_id]
    assert batch["images"].shape == (1, 3, 16, 16)
    assert batch["attention_mask"].sum() == len(expected)


def test_padding_sides_and_image_order(builder):
    a, b, c = img(), img(), img()
    samples = [["red", a], ["a large red square and a small blue circle", b, "and", c]]
    right = builder(samples)
    left = builder.with_options(padding_side="left")(samples)
    for batch in (right, left):
        assert torch.equal(batch["images"], torch.stack([a, b, c]))  # sample-major, block order
        assert batch["image_counts"].tolist() == [1, 2]
    n0 = int(right["attention_mask"][0].sum())
    assert right["attention_mask"][0, :n0].all() and not right["attention_mask"][0, n0:].any()
    assert left["attention_mask"][0, -n0:].all() and not left["attention_mask"][0, :-n0].any()
    assert torch.equal(right["input_ids"][0, :n0], left["input_ids"][0, -n0:])
    assert (right["labels"][0, n0:] == IGNORE_INDEX).all()


def test_video_is_one_block_per_frame(builder, tokenizer):
    video = torch.rand(4, 3, 16, 16)
    b = builder.with_options(max_length=64)([["clip:", video]])
    assert b["images"].shape[0] == 4
    assert int((b["input_ids"] == tokenizer.get_vocab()[IMG_START]).sum()) == 4
    assert torch.equal(b["images"], video)
    framelist = builder.with_options(max_length=64)([["clip:", list(video)]])
    assert torch.equal(framelist["input_ids"], b["input_ids"])


def test_truncation_never_cuts_an_image_block(tokenizer):
    builder = SequenceBuilder(tokenizer, num_queries=4, max_length=12)  # bos + block(6) = 7, then 5 left
    batch = builder([["a", img(), img(), "tail"]])
    ids = batch["input_ids"][0]
    v = tokenizer.get_vocab()
    assert batch["truncated"].tolist() == [True]
    assert int((ids == v[IMG_START]).sum()) == int((ids == v[IMG_END]).sum()) == 1
    assert int((ids == v[IMAGE]).sum()) == 4
    assert batch["images"].shape[0] == 1
    assert ids.shape[0] <= 12
    # Text is truncated at a token boundary.
    long = builder([["a small red circle " * 10]])
    assert long["input_ids"].shape[1] == 12 and long["truncated"].item()
    assert builder.num_truncated == 2


def test_loss_switch_on_text_items(builder, tokenizer):
    b = builder([[{"text": "question: what?", "loss": False}, "yes."]])
    prompt = tokenizer("question: what?", add_special_tokens=False)["input_ids"]
    labels = b["labels"][0].tolist()
    assert labels[1 : 1 + len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[1 + len(prompt)] != IGNORE_INDEX


def test_end_of_chunk_is_a_trained_eos_between_examples(builder, tokenizer):
    eos = tokenizer.eos_token_id
    ids = builder([["a.", END_OF_CHUNK, "b."]])["input_ids"][0].tolist()
    labels = builder([["a.", END_OF_CHUNK, "b."]])["labels"][0].tolist()
    a, b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("a.", "b."))
    assert ids == [tokenizer.bos_token_id, *a, eos, *b, eos]
    assert labels == [IGNORE_INDEX, *a, eos, *b, eos]
    # prompts (no final EOS) keep the EOS that ends each demonstration
    prompt = builder.with_options(add_eos=False)([["a.", END_OF_CHUNK, "b."]])["input_ids"][0].tolist()
    assert prompt == [tokenizer.bos_token_id, *a, eos, *b]


def test_bad_input(builder):
    with pytest.raises(ValueError, match="zero samples"):
        builder([])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        builder([[torch.rand(1, 16, 16)]])
    with pytest.raises(TypeError, match="int"):
        builder([[3]])
    with pytest.raises(ValueError, match="share a size"):
        builder([[img()], [torch.rand(3, 8, 8)]])
    with pytest.raises(ValueError, match="max_length 4"):
        builder.with_options(max_length=4)


def test_uint8_images_stay_uint8_until_the_model_scales_them():
    from conftest import make_model

    model = make_model().eval()
    u8 = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    batch = model.sequencer([[u8, "a red circle."], [torch.stack([u8, u8]), "a clip."]])
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (3, 3, 16, 16)  # a quarter the bytes
    mixed = model.sequencer([[u8, "a."], [u8.float() / 255, "b."]])  # with float images: all scaled to [0, 1]
    assert mixed["images"].dtype == torch.float32
    torch.testing.assert_close(mixed["images"][0], u8.float() / 255)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_images(batch["images"]), model.encode_images(mixed["images"][[0, 0, 0]])
        )
        torch.testing.assert_close(
            model.losses(batch)["loss"], model.losses({**batch, "images": batch["images"] / 255})["loss"]
        )
