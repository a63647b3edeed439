"""Emu-I's conversation template: item order, the loss mask on assistant turns, and bad conversations."""

import pytest
import torch

from emu_lightning import shapesworld
from emu_lightning.conversation import (
    ASSISTANT_TAG,
    SYSTEM,
    USER_TAG,
    ConversationError,
    conversation_items,
    split_image_tags,
)
from emu_lightning.eval.tasks import PromptTemplate, render
from emu_lightning.sequence import END_OF_CHUNK, IGNORE_INDEX, SequenceBuilder
from emu_lightning.tokenizer import add_emu_tokens

Q = 4


@pytest.fixture(scope="module")
def tokenizer():
    """Conversations are Emu-I's: its tokenizer holds [USER] and [ASSISTANT] as tokens."""
    tokenizer = shapesworld.tokenizer()
    add_emu_tokens(tokenizer, instruct=True)
    return tokenizer


def _turns(image):
    return [
        {"role": "user", "content": [image, "what colour is the circle?"]},
        {"role": "assistant", "content": "red."},
        {"role": "user", "content": "how many shapes are there?"},
        {"role": "assistant", "content": "two."},
    ]


def test_items_follow_the_template():
    image = torch.rand(3, 16, 16)
    items = conversation_items(_turns(image), system="be brief.")
    assert items[:3] == [{"text": "be brief.", "loss": False}, {"text": USER_TAG, "loss": False}, image]
    assert items[3:] == [
        {"text": " what colour is the circle?", "loss": False},
        {"text": ASSISTANT_TAG, "loss": False},
        " red.",
        END_OF_CHUNK,
        {"text": USER_TAG, "loss": False},
        {"text": " how many shapes are there?", "loss": False},
        {"text": ASSISTANT_TAG, "loss": False},
        " two.",
        END_OF_CHUNK,
    ]
    prompt = conversation_items(_turns(image)[:3], system=None, generation_prompt=True)
    assert prompt[0] == {"text": USER_TAG, "loss": False} and prompt[-1] == {"text": ASSISTANT_TAG, "loss": False}


def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer):
    builder = SequenceBuilder(tokenizer, num_queries=Q, max_length=256)
    batch = builder([conversation_items(_turns(torch.rand(3, 16, 16)))])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = labels != IGNORE_INDEX
    assert torch.equal(labels[trained], ids[trained])
    eos = tokenizer.eos_token_id
    # The trained tokens are the two answers, each followed by the EOS that ends the turn, and nothing else.
    expected = tokenizer(" red.", add_special_tokens=False)["input_ids"] + [eos]
    expected += tokenizer(" two.", add_special_tokens=False)["input_ids"] + [eos]
    assert ids[trained].tolist() == expected
    # and they sit right after each [ASSISTANT]: tag
    text = tokenizer.decode(ids[: int(batch["attention_mask"][0].sum())])
    assert text.count("[USER]") == 2 and text.count("[ASSISTANT]") == 2
    assistant = tokenizer.convert_tokens_to_ids("[ASSISTANT]")
    positions = (ids == assistant).nonzero().flatten().tolist()
    starts = [int(k) for k in trained.nonzero().flatten() if not trained[k - 1]]
    assert starts == [p + 2 for p in positions]  # "[ASSISTANT]", ":", then the answer
    # the system message, the tags, the image block and the questions are context only
    assert int(trained.sum()) == len(expected)
    assert batch["images"].shape == (1, 3, 16, 16)


def test_split_image_tags_places_images_at_their_tags():
    a, b = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    items = split_image_tags("<image>\ncompare with <image> please", [a, b])
    assert items[0] is a and items[1] == "compare with" and items[2] is b and items[3] == "please"
    assert split_image_tags("no image here", []) == ["no image here"]
    with pytest.raises(ConversationError, match="1 <image> tag"):
        split_image_tags("<image> what is it?", [])
    with pytest.raises(ConversationError, match="0 <image> tag"):
        split_image_tags("what is it?", [a])


@pytest.mark.parametrize(
    "turns, message",
    [
        ([], "no turns"),
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
            "ends with a user turn",
        ),
        ([{"role": "assistant", "content": "hi"}], "user turn was expected"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "assistant turn was expected"),
        ([{"role": "robot", "content": "a"}], "role 'robot'"),
        ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}], "is empty"),
        ([{"role": "user", "content": "<image> what?"}, {"role": "assistant", "content": "b"}], "image tag"),
        ([{"role": "user", "content": "[ASSISTANT]: hi"}, {"role": "assistant", "content": "b"}], "role tag"),
        ("hello", "list of turns"),
        ([{"content": "a"}], "must be a dict"),
    ],
)
def test_bad_conversations_are_clear_errors(turns, message):
    with pytest.raises(ConversationError, match=message):
        conversation_items(turns)


def test_generation_prompt_must_end_with_the_user():
    with pytest.raises(ConversationError, match="end with a user turn"):
        conversation_items(_turns(torch.rand(3, 16, 16)), generation_prompt=True)


def test_the_instruct_vqa_prompt_tokenises_like_the_assistant_prompt(tokenizer):
    """configs/stages/instruct.yaml's VQA template gives the same tokens as chat() builds for one question."""
    image = torch.rand(3, 16, 16)
    question = "what colour is the shape in the top left?"
    template = PromptTemplate(demo="", query=" [USER]:{image} {question} [ASSISTANT]:", prefix=SYSTEM)
    evaluated = [template.prefix] + render(template.query, image, question=question)
    chat = conversation_items([{"role": "user", "content": [image, question]}], generation_prompt=True)
    builder = SequenceBuilder(tokenizer, num_queries=Q, max_length=256, add_eos=False)
    assert builder.encode(evaluated).ids == builder.encode(chat).ids
