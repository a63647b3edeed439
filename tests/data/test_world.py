import numpy as np
import pytest
import torch

from emu_lightning import shapesworld
from emu_lightning.shapesworld.world import COLOURS, ShapesWorld
from emu_lightning.tokenizer import (
    EMU_TOKENS,
    PRETRAIN_TOKENS,
    add_emu_tokens,
    load_tokenizer,
    tokenizer_from_state,
    tokenizer_to_state,
)


def test_scenes_are_a_pure_function_of_seed_split_index():
    a, b = ShapesWorld(seed=3), ShapesWorld(seed=3)
    assert a.scene("train", 11) == b.scene("train", 11)
    assert torch.equal(a.image("train", 11), b.image("train", 11))
    train = {ShapesWorld(seed=3).scene("train", i) for i in range(200)}
    val = [ShapesWorld(seed=3).scene("val", i) for i in range(200)]
    assert sum(s in train for s in val) < 40  # other seed streams: mostly unseen scenes
    assert a.scene("train", 0) != ShapesWorld(seed=4).scene("train", 0) or a.scene("train", 1) != ShapesWorld(
        seed=4
    ).scene("train", 1)


def test_scene_statistics_and_captions():
    w = ShapesWorld(min_shapes=1, max_shapes=3)
    scenes = [w.scene("train", i) for i in range(300)]
    counts = {len(s.shapes) for s in scenes}
    assert counts == {1, 2, 3}
    for s in scenes[:50]:
        cells = [x.cell for x in s.shapes]
        assert cells == sorted(set(cells))  # distinct cells, reading order
        caps = w.captions(s)
        assert len(caps) == 5 and len(set(caps)) == 5
        assert all(w.caption_correct(c, s) for c in caps)


def test_rendered_pixels_show_the_colours():
    w = ShapesWorld(image_size=32, jitter=0.0)
    s = w.scene("train", 5)
    img = w.image("train", 5)
    assert img.shape == (3, 32, 32) and 0 <= img.min() and img.max() <= 1
    for shape in s.shapes:
        row, col = divmod(shape.cell, 2)
        centre = img[:, row * 16 + 8, col * 16 + 8]
        assert np.allclose(centre.numpy() * 255, COLOURS[shape.colour], atol=1)


def test_mentioned_parses_colour_shape_pairs():
    text = "a small red circle, a large red circle and two blue squares."
    assert ShapesWorld.mentioned(text) == {("red", "circle"): 2, ("blue", "square"): 1}
    s = ShapesWorld().scene("train", 0)
    assert not ShapesWorld.caption_correct("nothing here", s)


def test_bad_world_arguments():
    with pytest.raises(ValueError, match="max_shapes"):
        ShapesWorld(max_shapes=5, grid=2)
    with pytest.raises(ValueError, match="grid 4"):
        ShapesWorld(grid=4)
    with pytest.raises(ValueError, match="split 'tset'"):
        ShapesWorld().scene("tset", 0)


def test_default_tokenizer_has_emu_tokens_and_round_trips(tmp_path):
    tok = shapesworld.tokenizer()
    vocab = tok.get_vocab()
    assert all(t in vocab for t in PRETRAIN_TOKENS) and tok.pad_token_id is not None
    tok.save_pretrained(tmp_path)  # the same tokenizer from a folder, with the instruction-tuning tokens
    assert "[USER]" not in vocab and all(t in load_tokenizer(tmp_path, instruct=True).get_vocab() for t in EMU_TOKENS)
    caption = "a small red circle in the top left."
    ids = tok(caption, add_special_tokens=False)["input_ids"]
    assert len(ids) <= 10  # words are whole tokens
    assert tok.decode(ids) == caption
    again = tokenizer_from_state(tokenizer_to_state(tok))
    assert again.get_vocab() == vocab and again(caption)["input_ids"] == tok(caption)["input_ids"]
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        load_tokenizer("no/such/dir")


def test_emu_tokens_take_the_released_ids_after_a_vocabulary_without_pad():
    """As the released code adds them to LLaMA's 32,000 tokens: [PAD] 32000, [IMG] 32001, [/IMG] 32002, <image> 32003
    (pretraining, 32,004 rows), then [USER] 32004 and [ASSISTANT] 32005 (Emu-I, 32,006)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["a red circle", "a blue square"], trainers.BpeTrainer(
        vocab_size=40, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    n = len(tok)
    assert tok.pad_token is None and add_emu_tokens(tok) == 4
    assert tok.convert_tokens_to_ids(["[PAD]", "[IMG]", "[/IMG]", "<image>"]) == [n, n + 1, n + 2, n + 3]
    assert tok.pad_token == "[PAD]" and len(tok) == n + 4
    assert add_emu_tokens(tok, instruct=True) == 2 and len(tok) == n + 6
    assert tok.convert_tokens_to_ids(["[USER]", "[ASSISTANT]"]) == [n + 4, n + 5]


def test_emu_tags_tokenise_as_the_released_llama_tokenizer_does():
    """The released slow LLaMA tokenizer strips the whitespace around special tokens and encodes the text between them
    on its own (each piece with SentencePiece's leading ``▁``): ``{system} [USER]: {text} [ASSISTANT]:`` gives
    ``▁sys [USER] ▁: ▁q [ASSISTANT] ▁:`` (it gave ``▁sys ▁ [USER] : ...`` here before: 86 tokens against the
    released 83 for the VQA prompt). A LLaMA-style tokenizer in the legacy layout (a normalizer that prepends ``▁``
    and turns spaces into ``▁``), with a tiny vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "▁", ":", "▁:", "▁sys", "▁q"])}
    for layout in ("legacy", "metaspace"):  # the older and the newer tokenizer.json layouts of LLaMA
        model = models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="", max_input_chars_per_word=99)
        raw = Tokenizer(model)
        if layout == "legacy":
            raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        add_emu_tokens(tok, instruct=True)
        ids = tok("sys [USER]: q [ASSISTANT]:", add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == ["▁sys", "[USER]", "▁:", "▁q", "[ASSISTANT]", "▁:"], layout
