"""The instruct stage (Emu-I): LoRA adapters train and nothing else, chained from an earlier stage's checkpoint,
saved, loaded and merged; and the assistant, ``EmuModel.chat``."""

import lightning as L
import pytest
import torch
from conftest import make_model
from torch.utils.data import DataLoader

from emu_lightning.components.llm import LoRA
from emu_lightning.conversation import ConversationError, conversation_items
from emu_lightning.model import EmuModel
from emu_lightning.shapesworld.world import ShapesWorld

WORLD = ShapesWorld(image_size=16)
SMALL_LORA = LoRA(r=4, alpha=8, dropout=0.0)


def instruct_model(lora: LoRA | None = SMALL_LORA, **kwargs) -> EmuModel:
    return make_model(num_queries=4, max_length=96, lora=lora, stage="instruct", **kwargs)


def conversations(n: int, split: str = "train") -> list[list]:
    out = []
    for i in range(n):
        qa = WORLD.questions(split, i)[0]
        turns = [{"role": "user", "content": [WORLD.image(split, i), qa.question]},
                 {"role": "assistant", "content": f"{qa.answer}."}]  # fmt: skip
        out.append(conversation_items(turns))
    return out


def fit(model: EmuModel, steps: int = 3) -> None:
    loader = DataLoader(conversations(4 * steps), batch_size=4, collate_fn=model.sequencer)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(model, train_dataloaders=loader)


def test_the_instruct_stage_trains_only_the_lora_adapters():
    model = instruct_model()
    assert set(model.frozen) == {"vision", "resampler"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = model.configure_optimizers().param_groups
    assert {g["name"].removesuffix("_no_decay") for g in groups} == {"llm"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 2 layers x q/k/v/o, each r x (32 + 32)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 4 * 4 * (32 + 32)
    fit(model)
    after = model.state_dict()
    changed = sorted(k for k, v in before.items() if not torch.equal(v, after[k]))
    assert changed and all("lora_" in k for k in changed), changed
    assert any("lora_B" in k for k in changed)  # B starts at zero: the adapters really learned something


def test_the_instruct_loss_is_the_cross_entropy_alone():
    model = instruct_model(regression_weight=1.0)  # ignored by the stage: the loss is on the answers only
    batch = model.sequencer(conversations(2))
    losses = model.stage_losses(batch)
    assert losses["mse"] > 0 and torch.equal(losses["loss"], losses["ce"])


def test_without_lora_the_instruct_stage_fine_tunes_the_whole_language_model():
    model = instruct_model(lora=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, steps=1)
    changed = {k.split(".")[0] for k, v in before.items() if not torch.equal(v, model.state_dict()[k])}
    assert changed == {"llm"}
    assert sum(p.numel() for p in model.llm.parameters() if p.requires_grad) == sum(
        p.numel() for p in model.llm.parameters()
    )


def _logits(model: EmuModel) -> torch.Tensor:
    model.eval()
    batch = model.sequencer(conversations(3, "val"))
    with torch.no_grad():
        return model.llm(model.embed(batch["input_ids"], batch["images"]), batch["attention_mask"]).logits


def test_a_stage_chains_from_the_previous_checkpoint_and_adapters_save_load_and_merge(tmp_path):
    base = make_model(num_queries=4, max_length=96)
    path = tmp_path / "pretrained.ckpt"
    # an EmuModel checkpoint holds its tokenizer: write it the way Lightning does
    checkpoint = {"state_dict": base.state_dict()}
    base.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)

    model = instruct_model(init_checkpoint=str(path))
    # the same weights without adapters (and, as the model, with Emu-I's [USER] and [ASSISTANT] added)
    plain = instruct_model(init_checkpoint=str(path), lora=None)
    assert len(model.tokenizer) == len(base.tokenizer) + 2
    torch.testing.assert_close(_logits(model), _logits(plain), rtol=0, atol=0)  # fresh adapters change nothing
    fit(model)
    tuned = _logits(model)
    assert (tuned - _logits(plain)).abs().max() > 1e-3

    model.llm.save_lora(tmp_path / "lora")
    again = instruct_model(init_checkpoint=str(path))
    again.llm.load_lora(tmp_path / "lora")
    torch.testing.assert_close(_logits(again), tuned, rtol=0, atol=1e-5)

    model.merge_lora()
    assert not model.llm.has_lora and not any("lora_" in k for k in model.state_dict())
    torch.testing.assert_close(_logits(model), tuned, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        model.merge_lora()


def test_chat_streams_the_answer_and_keeps_to_the_context():
    model = instruct_model()
    fit(model, steps=2)
    image = WORLD.image("val", 0)
    pieces = []
    answer = model.chat([{"role": "user", "content": [image, "how many shapes are there?"]}], max_new_tokens=6,
                        stream=pieces.append)  # fmt: skip
    assert "".join(pieces).strip() == answer
    assert model.last_chat == {"dropped_turns": 0, "prompt_tokens": model.last_chat["prompt_tokens"]}

    # A long history: the oldest exchanges are dropped until the prompt fits max_length (96) with the answer.
    history = []
    for _ in range(6):
        history += [{"role": "user", "content": "what colour is the shape in the top left?"},
                    {"role": "assistant", "content": "red."}]  # fmt: skip
    history.append({"role": "user", "content": "how many shapes are there?"})
    with pytest.warns(UserWarning, match="dropped the"):
        model.chat(history, max_new_tokens=6)
    assert model.last_chat["dropped_turns"] > 0 and model.last_chat["dropped_turns"] % 2 == 0
    assert model.last_chat["prompt_tokens"] <= 96

    with pytest.raises(ConversationError, match="last user turn"):
        model.chat([{"role": "user", "content": "red " * 200}])
    with pytest.raises(ConversationError, match="end with a user turn"):
        model.chat(history[:2])
    with pytest.raises(ConversationError, match="image tag"):
        model.chat([{"role": "user", "content": "<image> what is this?"}])
