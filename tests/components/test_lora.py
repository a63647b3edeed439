import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from emu_lightning.components.llm import HFCausalLM, LoRA

CFG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
# 2 layers x 4 projections x r=4 x (32 in + 32 out)
NUM_LORA = 2 * 4 * 4 * (32 + 32)


def build(lora=None, seed=0, **kwargs):
    """Same seed, same base weights: the adapters are created after everything else."""
    torch.manual_seed(seed)
    return HFCausalLM(config=CFG, lora=lora, **kwargs)


def logits(llm, ids=IDS):
    with torch.no_grad():
        return llm(llm.embed(ids), torch.ones_like(ids)).logits


def perturb(llm, seed=3):
    """Non-zero adapters (lora_B starts at zero), so they change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in llm.lora_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def test_only_target_projections_get_trainable_adapters():
    llm = build(LoRA(r=4))
    layers = sorted(n for n, m in llm.model.named_modules() if isinstance(m, LoraLayer))
    assert layers == sorted(f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS)
    expected = sum(
        4 * (m.base_layer.in_features + m.base_layer.out_features)
        for m in llm.model.modules()
        if isinstance(m, LoraLayer)
    )
    trainable = {n for n, p in llm.named_parameters() if p.requires_grad}
    assert expected == NUM_LORA == llm.num_lora_parameters
    assert sum(p.numel() for p in llm.parameters() if p.requires_grad) == NUM_LORA
    assert trainable == {"model." + n for n, p in llm.model.named_parameters() if ".lora_" in n}
    assert {id(p) for p in llm.lora_parameters()} == {id(p) for n, p in llm.named_parameters() if n in trainable}
    assert not llm.regression_head.weight.requires_grad and llm.has_lora and llm.lora == LoRA(r=4)
    llm.resize_token_embeddings(80)  # EmuModel adds its special tokens after building the LLM
    assert sum(p.numel() for p in llm.parameters() if p.requires_grad) == NUM_LORA
    assert build().lora is None and not build().has_lora


def test_fresh_adapters_leave_the_output_unchanged():
    base, llm = build().eval(), build(LoRA(r=4)).eval()
    assert all(not m.lora_B["default"].weight.any() for m in llm.model.modules() if isinstance(m, LoraLayer))
    assert torch.equal(logits(llm), logits(base))


def test_one_step_changes_only_the_adapters():
    llm = build(LoRA(r=4)).train()
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    opt = torch.optim.AdamW([p for p in llm.parameters() if p.requires_grad], lr=1e-2)
    out = llm(llm.embed(IDS), torch.ones_like(IDS))
    loss = nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 64), IDS[:, 1:].reshape(-1))
    (loss + llm.regress(out.hidden).pow(2).mean()).backward()
    opt.step()
    after = llm.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_b = {k for k in before if ".lora_B." in k}
    assert len(lora_b) == 8 and lora_b <= changed  # lora_A gets no gradient while lora_B is zero
    assert all(".lora_" in k for k in changed)
    assert llm.regression_head.weight.grad is None and llm.model.get_input_embeddings().weight.grad is None


def test_save_and_load_lora(tmp_path):
    src = build(LoRA(r=4)).eval()
    perturb(src)
    src.save_lora(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert len(saved) == 16 and all(k.startswith("base_model.model.model.layers.") for k in saved)
    assert set(src.lora_state_dict()) == {k.removeprefix("base_model.model.") for k in saved}
    dst = build(LoRA(r=4)).eval()
    assert not torch.allclose(logits(dst), logits(src), atol=1e-3)
    dst.load_lora(tmp_path)
    assert torch.allclose(logits(dst), logits(src), atol=1e-5)
    # a model without adapters gets them from the folder's config
    plain = build().eval()
    plain.load_lora(str(tmp_path))
    assert plain.lora == LoRA(r=4, target_modules=sorted(TARGETS)) and plain.num_lora_parameters == NUM_LORA
    assert torch.allclose(logits(plain), logits(src), atol=1e-5)


def test_merge_lora():
    llm = build(LoRA(r=4)).eval()
    perturb(llm)
    before = logits(llm)
    assert not torch.allclose(before, logits(build().eval()), atol=1e-3)
    assert llm.merge_lora() is llm
    assert torch.allclose(logits(llm), before, atol=1e-5)
    assert not llm.has_lora and llm.lora is None and llm.num_lora_parameters == 0
    assert not any(isinstance(m, LoraLayer) for m in llm.modules())
    assert set(llm.state_dict()) == set(build().state_dict())
    assert not any(p.requires_grad for p in llm.parameters())


def test_peft_loads_the_saved_adapters(tmp_path):
    build().model.save_pretrained(tmp_path / "base")
    llm = HFCausalLM(pretrained_path=str(tmp_path / "base"), lora=LoRA(r=4)).eval()
    perturb(llm)
    llm.save_lora(tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base") and config["task_type"] == "CAUSAL_LM"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = PeftModel.from_pretrained(plain, tmp_path / "lora").eval()
    with torch.no_grad():
        expected = peft_model(input_ids=IDS).logits
    assert torch.allclose(logits(llm), expected, atol=1e-5)


def test_base_state_dict_loads_strictly_and_keeps_adapters():
    base = build(seed=1)
    llm = build(LoRA(r=4))
    perturb(llm)
    adapters = {k: v.clone() for k, v in llm.lora_state_dict().items()}
    llm.load_state_dict(base.state_dict(), strict=True)
    q = llm.model.model.layers[0].self_attn.q_proj
    assert torch.equal(q.base_layer.weight, base.model.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(llm.regression_head.weight, base.regression_head.weight)
    assert all(torch.equal(v, adapters[k]) for k, v in llm.lora_state_dict().items())
    # as a child of a bigger module, under a prefix
    parent = nn.ModuleDict({"llm": build(LoRA(r=4), seed=2)})
    parent.load_state_dict({"llm." + k: v for k, v in base.state_dict().items()}, strict=True)
    assert torch.equal(
        parent["llm"].model.model.layers[1].self_attn.v_proj.base_layer.weight,
        base.model.model.layers[1].self_attn.v_proj.weight,
    )
    # a LoRA checkpoint (resuming) loads as is, adapters included
    resumed = build(LoRA(r=4), seed=2)
    resumed.load_state_dict(llm.state_dict(), strict=True)
    assert torch.equal(logits(resumed.eval()), logits(llm.eval()))
    incomplete = {k: v for k, v in base.state_dict().items() if k != "model.model.layers.1.self_attn.v_proj.weight"}
    with pytest.raises(RuntimeError, match=r"layers\.1\.self_attn\.v_proj\.base_layer\.weight"):
        llm.load_state_dict(incomplete, strict=True)


def test_bad_lora_settings(tmp_path):
    with pytest.raises(ValueError, match=r"\['qkv'\].*gate_proj"):
        build(LoRA(target_modules=["q_proj", "qkv"]))
    for kwargs, bad in [
        ({"r": 0}, "0"),
        ({"alpha": 0.0}, "0.0"),
        ({"dropout": 1.0}, "1.0"),
        ({"target_modules": []}, r"\[\]"),
    ]:
        with pytest.raises(ValueError, match=bad):
            LoRA(**kwargs)
    with pytest.raises(ValueError, match="rank"):
        build({"r": 4, "rank": 8})
    assert build({"r": 2}).lora == LoRA(r=2)
    with pytest.raises(ValueError, match="freeze"):
        build(LoRA(), freeze=True)
    with pytest.raises(RuntimeError, match="save_lora"):
        build().save_lora(tmp_path)
    build(LoRA(r=4)).save_lora(tmp_path)
    with pytest.raises(ValueError, match=r"\(4, 16.0.*this model has \(8, 16.0"):
        build(LoRA(r=8, alpha=16.0)).load_lora(tmp_path)
    with pytest.raises(FileNotFoundError, match="no/such/folder"):
        build(LoRA(r=4)).load_lora("no/such/folder")
    weights = load_file(tmp_path / "adapter_model.safetensors")
    dropped = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.1\.self_attn\.o_proj\.lora_B\.weight'\]"):
        build(LoRA(r=4)).load_lora(tmp_path)


def test_lora_dropout_only_in_training():
    llm = build(LoRA(r=4, dropout=0.5))
    perturb(llm)
    llm.train()
    assert llm.training
    first, second = logits(llm), logits(llm)
    assert not torch.allclose(first, second, atol=1e-3)
    llm.eval()
    assert torch.equal(logits(llm), logits(llm))


def test_meta_device_build():
    with torch.device("meta"):
        llm = HFCausalLM(config=CFG, lora=LoRA(r=4))
        plain = HFCausalLM(config=CFG)
    assert llm.has_lora and all(p.is_meta for p in llm.lora_parameters())
    assert llm.num_lora_parameters == NUM_LORA
    count = sum(p.numel() for p in llm.parameters())
    assert count == sum(p.numel() for p in plain.parameters()) + NUM_LORA


def test_adapters_of_a_pretrained_model_with_a_resized_vocabulary_round_trip(tmp_path):
    """Emu's tokens always resize a real LLM's vocabulary; peft would then save the embeddings with the adapters."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(HFCausalLM(config=CFG).model.config).save_pretrained(tmp_path / "base")

    def pretrained():
        torch.manual_seed(1)
        llm = HFCausalLM(pretrained_path=str(tmp_path / "base"), lora=LoRA(r=4))
        llm.resize_token_embeddings(CFG["vocab_size"] + 6)
        return llm.eval()  # no LoRA dropout

    llm = pretrained()
    perturb(llm)
    llm.save_lora(tmp_path / "lora")
    saved = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert len(saved) == 2 * 4 * 2 and all(".lora_" in k for k in saved)  # adapters only, no embeddings
    again = pretrained()
    again.load_lora(tmp_path / "lora")
    torch.testing.assert_close(logits(again), logits(llm), rtol=0, atol=1e-5)
    # a folder that also holds the embeddings (as peft writes it) loads its adapters, with a warning
    save_file({**saved, "base_model.model.model.embed_tokens.weight": torch.zeros(70, 32)},
              tmp_path / "lora" / "adapter_model.safetensors")  # fmt: skip
    with pytest.warns(UserWarning, match="ignoring 1 non-adapter"):
        pretrained().load_lora(tmp_path / "lora")
