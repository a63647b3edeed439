import pytest
import torch
from conftest import TINY_LLM
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from emu_lightning.components.llm import HFCausalLM


def saved_model(path, **overrides):
    cfg = AutoConfig.for_model("llama", **{**TINY_LLM, **overrides})
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    return model


def test_interface_shapes():
    llm = HFCausalLM(config=TINY_LLM)
    ids = torch.randint(0, 512, (2, 7))
    emb = llm.embed(ids)
    out = llm(emb, torch.ones(2, 7, dtype=torch.long))
    assert emb.shape == (2, 7, 32) and out.logits.shape == (2, 7, 512) and out.hidden.shape == (2, 7, 32)
    assert llm.regress(out.hidden).shape == (2, 7, 32) and llm.regression_head.bias is None


def test_kv_cache_matches_full_forward():
    llm = HFCausalLM(config=TINY_LLM).eval()
    emb = llm.embed(torch.randint(0, 512, (1, 9)))
    mask = torch.ones(1, 9, dtype=torch.long)
    with torch.no_grad():
        full = llm(emb, mask)
        first = llm(emb[:, :6], mask[:, :6], use_cache=True)
        rest = llm(emb[:, 6:], mask, past_key_values=first.past_key_values)
    assert torch.allclose(rest.hidden, full.hidden[:, 6:], atol=1e-5)


def test_loads_a_local_folder_with_and_without_config(tmp_path):
    ref = saved_model(tmp_path).eval()
    ids = torch.randint(0, 512, (1, 5))
    expected = ref(ids).logits
    for llm in (HFCausalLM(pretrained_path=str(tmp_path)), HFCausalLM(config=TINY_LLM, pretrained_path=str(tmp_path))):
        llm.eval()
        got = llm(llm.embed(ids), torch.ones_like(ids)).logits
        assert torch.allclose(got, expected, atol=1e-6)


def test_strict_loading_names_the_problem(tmp_path):
    saved_model(tmp_path)
    with pytest.raises(RuntimeError, match="mismatched_keys|size mismatch"):
        HFCausalLM(config={**TINY_LLM, "intermediate_size": 48}, pretrained_path=str(tmp_path))
    weights = load_file(tmp_path / "model.safetensors")
    dropped = "model.layers.1.mlp.up_proj.weight"
    save_file(
        {k: v for k, v in weights.items() if k != dropped}, tmp_path / "model.safetensors", metadata={"format": "pt"}
    )
    with pytest.raises(RuntimeError, match="up_proj"):
        HFCausalLM(pretrained_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no/such/folder"):
        HFCausalLM(pretrained_path="no/such/folder")
    with pytest.raises(ValueError, match="config"):
        HFCausalLM()


def test_any_causal_lm_family():
    llm = HFCausalLM(model_type="gpt2", config=dict(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    out = llm(llm.embed(torch.randint(0, 300, (1, 4))), torch.ones(1, 4, dtype=torch.long))
    assert out.logits.shape == (1, 4, 300) and llm.hidden_size == 32


def test_freeze_keeps_eval_mode():
    llm = HFCausalLM(config=TINY_LLM, freeze=True)
    llm.train()
    assert not llm.training and not any(p.requires_grad for p in llm.parameters())


def test_a_pretrained_language_model_needs_its_own_tokenizer(tmp_path):
    """Never the ShapesWorld tokenizer's ids on pretrained weights: `tokenizer` must be the folder it was trained
    with, neither left out nor a BPE trained from scratch."""
    from conftest import make_model

    from emu_lightning import shapesworld
    from emu_lightning.model import EmuModel
    from emu_lightning.tokenizer import TrainedBPE

    saved_model(tmp_path)
    plain = make_model()
    expected = "pretrained weights from .*: give the tokenizer folder it was trained with"
    with pytest.raises(ValueError, match=f"{expected} \\(model.tokenizer\\), not None"):
        EmuModel(plain.vision, plain.resampler, HFCausalLM(pretrained_path=str(tmp_path)))
    with pytest.raises(ValueError, match=f"{expected} \\(model.tokenizer\\), not TrainedBPE"):
        EmuModel(plain.vision, plain.resampler, HFCausalLM(pretrained_path=str(tmp_path)),
                 tokenizer=TrainedBPE(shapesworld.corpus))  # fmt: skip
