import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from emu_lightning import shapesworld  # noqa: E402
from emu_lightning.components.llm import HFCausalLM  # noqa: E402
from emu_lightning.components.resampler import PreNormCausalTransformer  # noqa: E402
from emu_lightning.components.vision import TimmVisionBackbone  # noqa: E402
from emu_lightning.model import EmuModel  # noqa: E402
from emu_lightning.tokenizer import TrainedBPE  # noqa: E402

TINY_LLM = dict(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
)


@pytest.fixture(scope="session")
def tokenizer():
    return shapesworld.tokenizer()


def make_model(num_queries: int = 4, max_length: int = 64, lora=None, **kwargs) -> EmuModel:
    torch.manual_seed(0)
    vision = TimmVisionBackbone(
        "vit_base_patch16_224", image_size=16, model_kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)
    )
    resampler = PreNormCausalTransformer(in_dim=32, out_dim=32, num_queries=num_queries, width=32, depth=1, num_heads=2)
    llm = HFCausalLM(config=TINY_LLM, lora=lora)
    kwargs.setdefault("tokenizer", TrainedBPE(shapesworld.corpus))
    return EmuModel(vision, resampler, llm, max_length=max_length, **kwargs)


@pytest.fixture
def tiny_model():
    return make_model()
