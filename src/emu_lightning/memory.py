"""Training memory per device, planned from a model's shapes: weights, master weights, gradients, DDP's buckets,
AdamW's state, FSDP's gathered units and activations per sequence length, at a given precision (:data:`ASSUMPTIONS`
states every formula). ``python -m emu_lightning.inspect`` prints the plan for a config; ``benchmarks/memory_plan.py``
checks it against the peak memory of a real DDP run."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

DEFAULT_DEVICES = 8
DEFAULT_PRECISION = "32-true"  # Lightning's default when the config sets none
GRAD_PATH = ("vision", "resampler", "llm")  # the forward order of the pretraining and instruction objectives
LOSS_BYTES_PER_LOGIT = 12  # see ASSUMPTIONS["activations"]


@dataclass(frozen=True)
class Precision:
    """How Lightning holds and computes with the weights at one ``trainer.precision``."""

    name: str
    weight_bytes: int  # parameters as held; their gradients and AdamW moments have the same dtype
    compute_bytes: int  # matmul inputs and outputs
    autocast: bool  # torch.autocast around the forward (the "-mixed" precisions)


PRECISIONS = {
    "32-true": Precision("32-true", 4, 4, False),
    "bf16-mixed": Precision("bf16-mixed", 4, 2, True),
    "16-mixed": Precision("16-mixed", 4, 2, True),
    "bf16-true": Precision("bf16-true", 2, 2, False),
}
PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}  # Lightning's older names
OPTIMIZER_IMPLS = ("fused", "foreach", "for-loop")

ASSUMPTIONS = {
    "scope": "bytes per device for one training step; GiB = bytes / 2**30. P = all parameters, T = trainable ones "
    "(requires_grad; frozen ones have no gradient and no optimizer state), w = bytes per weight as held, c = compute "
    "bytes. Not counted: the CUDA context and the caching allocator's fragmentation, communication buffers, the "
    "data loader, a few per-image tensors (pixels, patch embeddings) and the regression loss's (small) tensors.",
    "precision": "32-true: fp32 weights, w = c = 4. bf16-mixed / 16-mixed: fp32 weights (w = 4; they are the "
    "master weights themselves: Lightning keeps no second copy, so master_weights_bytes is 0) and torch.autocast to "
    "16-bit compute (c = 2). bf16-true: the module converted to bf16 (w = c = 2), AdamW updates the bf16 weights in "
    "place (no master copy; its moments are bf16 too).",
    "ddp": "every device holds P x w weights, T x w gradients and T x w more in DDP's gradient buckets (Lightning's "
    "DDPStrategy leaves gradient_as_bucket_view False, so the reducer's flat buckets are a second copy), AdamW's "
    "moments, and under autocast the 16-bit copies of the Linear/conv weights of the components in the gradient "
    "path (autocast caches a cast of each trainable weight until the forward ends, and every matmul saves its cast "
    "weight for the backward): autocast_params x c.",
    "fsdp": "full sharding over N devices, one unit per transformer block (the LLaMA decoder layers, the ViT blocks, "
    "the Causal Transformer layers, found by class on the model) and the rest (embeddings, LM and regression heads, "
    "the visual decoder, patch embeddings, ...) in the root unit. Sharded: weights P x w / N, gradients T x w / N "
    "(reduce-scattered, then held in the weights' dtype), AdamW state / N. Gathered in the compute dtype "
    "(param_dtype = c under the mixed precisions): the root unit for the whole forward and backward (FSDP does not "
    "reshard the root after the forward) plus its unsharded gradient when it trains (2 x root x c), and the largest "
    "block twice (the one computing and the one prefetched) plus its unsharded gradient before the reduce-scatter "
    "(3 x block x c). Activations as under DDP, except that the residual stream is held in c under the mixed "
    "precisions (the gathered weights are 16-bit) and there are no autocast weight copies.",
    "optimizer": "AdamW (the config's optimizer, whatever its class, is planned as AdamW): two moments per trainable "
    "parameter (three with amsgrad) in the parameter's dtype (torch.optim.AdamW's zeros_like), i.e. 8 B per "
    "trainable parameter except under bf16-true (4 B). The step's temporaries: foreach (torch's default for CUDA "
    "parameters): one more T x w (its sqrt of the second moments, a tensor list); for-loop (its default on CPU): "
    "two copies of the largest trainable parameter; fused: none. Under FSDP the step runs on shards (/ N).",
    "activations": "bytes autograd saves for the backward, per token and layer (tests/test_inspect.py checks the "
    "formulas against saved_tensors_hooks on CPU). r = bytes of the residual stream (w under DDP, c under FSDP), "
    "m = 4 under autocast (CUDA's autocast runs layer_norm in fp32) else r, s = attended length, a = heads, g = "
    "key/value heads, d = head width, h = width, i = MLP width, V = vocabulary. LLaMA decoder layer (transformers, "
    "SDPA): 2 x (4 (h + 1) + r h) for its two RMSNorms (input upcast to fp32, 1/rms, normalised), the projections' "
    "inputs 2 c h (5 c h under DDP autocast: one cast per q/k/v/gate/up projection), q/k/v c (h + 2 g d), the "
    "attention output c h and its fp32 log-sum-exp 4 a, SwiGLU 4 c i; eager attention instead of SDPA: a s (4 + c) "
    "for the fp32 probabilities and their cast (a s 4 at fp32) in place of 4 a. Once per token for the LLM: the "
    "rotary cos/sin 2 d r, the final norm and the LM head's input, and the loss: 12 V (the logits in c, their "
    "shifted copy, its fp32 copy and the log-softmax output; in the backward the log-softmax's output, gradient "
    "and input gradient). ViT block (timm, SDPA): 2 (m h + 2 m) for its LayerNorms (input, mean, rstd), c (6 h + 2 "
    "i) for the qkv and fc1 inputs, q/k/v, the attention output and the GELU MLP, and 4 a; per image, over its "
    "visual tokens. Resampler layer (Causal Transformer): the ViT block over the Q queries, plus a cross-attention "
    "(norm m h + 2 m, query input, queries and output 3 c h, under DDP autocast a second cast of the "
    "self-attention's input c h, 4 a) and the keys and values of the N visual tokens (2 N c h per image); T5's eager "
    "attention (the released resampler) adds a (Q + N) (4 + c) per query, and its dropout and unfused projections "
    "save about half again, not counted (the resampler's share is small). For comparison, the standard estimate "
    "for a GPT layer in half precision without flash attention is 34 s b h + 5 a s^2 b bytes; with SDPA the s^2 "
    "term becomes the 4 a s b bytes of the log-sum-exp.",
    "checkpointing": "with activation checkpointing every block keeps its input (tokens x h x r) and one block's "
    "full activations exist at a time (its recomputation in the backward); the loss's and the rotary tensors stay. "
    "as_configured: the components whose blocks checkpoint in the built model (transformers' gradient_checkpointing, "
    "timm's grad_checkpointing) are checkpointed, the others not.",
    "gradient_path": "activations are counted for vision, resampler and LLM from the first of them that has a "
    "trainable parameter on (a frozen vision tower first in line saves nothing); a LoRA-adapted LLM is counted as "
    "a trainable one (an over-estimate: frozen projections need not save their inputs). The visual decoder's "
    "activations (the decoder stage's UNet) are not modelled; in pretraining it is not run at all (its trainable "
    "parameters then get no gradient and no AdamW state in practice, but are counted here as trainable).",
    "peak": "peak = weights + master weights + AdamW state + DDP buckets + gradients + max(activations + autocast "
    "copies or gathered units, the optimizer step's temporaries): Lightning's automatic optimization zeroes the "
    "gradients after training_step and before the backward, so the previous step's gradients are still held when "
    "the forward ends with every activation saved (benchmarks/memory_plan.py measures this sum within a few % on "
    "CPU); the optimizer step comes after the backward has freed the activations.",
}


def param_counts(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())  # shared (tied) parameters are listed once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


# ---------------------------------------------------------------------------------------------- model facts
@dataclass(frozen=True)
class Stack:
    """A stack of transformer blocks (one FSDP unit each) and the shapes its activations depend on.

    ``kind``: ``llama`` (RMSNorms, rotary, SwiGLU: transformers' LLaMA-like decoder layers), ``vit`` (timm blocks:
    LayerNorms, fused qkv, GELU MLP) or ``cross`` (a resampler layer: a ViT-like block over the queries plus
    cross-attention to the visual tokens); ``None`` when the block is not one of these (its activations are not
    planned). ``tokens``: per image (vision: its visual tokens; resampler: its queries); 0 for the LLM, whose tokens
    are the sequence's. ``context``: visual tokens a cross-attention reads per image.
    """

    component: str
    block_class: str
    count: int
    block_params: int  # the largest block's parameters
    block_trainable: int  # ... and its trainable ones
    kind: str | None = None
    hidden: int = 0
    intermediate: int = 0
    heads: int = 1
    kv_heads: int = 1
    eager: bool = False  # attention probabilities materialised (no fused SDPA kernel)
    tokens: int = 0
    context: int = 0
    checkpointed: bool = False  # activation checkpointing on in the built model


@dataclass(frozen=True)
class ModelFacts:
    """What :func:`plan_memory` needs to know about a model; :func:`describe` reads it off a built one."""

    total_params: int
    trainable_params: int
    stacks: tuple[Stack, ...]
    root_params: int  # parameters outside every block: FSDP's root unit under per-block wrapping
    root_trainable: int
    autocast_params: int  # Linear/conv parameters of the components in the gradient path
    largest_trainable_param: int  # elements of the largest trainable parameter
    grad_path: tuple[str, ...]  # components whose activations are saved for the backward
    vocab_size: int = 0
    llm_hidden: int = 0
    llm_head_dim: int = 0  # the rotary tables' width (LLaMA-like LLMs), else 0
    max_length: int = 0
    optimizer: str = "foreach"  # AdamW's implementation: fused, foreach or for-loop
    amsgrad: bool = False


def _same_class_containers(module: nn.Module) -> list[nn.Module]:
    """The outermost ``ModuleList``/``Sequential`` under ``module`` whose children are all of one class with
    submodules of its own (transformer blocks: not a Sequential of a Linear and an activation)."""
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) > 0:
                first = child[0]
                if (
                    len({type(c) for c in child}) == 1
                    and next(first.children(), None) is not None
                    and next(first.parameters(), None) is not None
                ):
                    found.append(child)
                    continue
            visit(child)

    visit(module)
    return found


def _unique_params(modules: Iterable[nn.Module]) -> dict[int, nn.Parameter]:
    return {id(p): p for m in modules for p in m.parameters()}


def _checkpointed(module: nn.Module) -> bool:
    """Activation checkpointing switched on inside ``module`` (transformers' and timm's flags)."""
    return any(
        getattr(m, "gradient_checkpointing", False) is True or getattr(m, "grad_checkpointing", False) is True
        for m in module.modules()
    )


def _block_shape(component: str, block: nn.Module, model: nn.Module) -> dict[str, Any]:
    """The activation-relevant shape of one block, or ``{}`` when its kind is not planned."""
    vision_tokens = int(getattr(getattr(model, "vision", None), "num_tokens", 0) or 0)
    attn = getattr(block, "self_attn", None)
    config = getattr(attn, "config", None)
    mlp = getattr(block, "mlp", None)
    if config is not None and hasattr(config, "hidden_size"):  # a transformers decoder layer
        h = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        gated = mlp is not None and hasattr(mlp, "gate_proj")
        inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
        return {
            "kind": "llama" if gated else "vit",
            "hidden": h,
            "intermediate": int(inner),
            "heads": heads,
            "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
            "eager": getattr(config, "_attn_implementation", "sdpa") == "eager",
        }
    timm_attn = getattr(block, "attn", None)
    if hasattr(timm_attn, "qkv") and hasattr(mlp, "fc1"):  # timm ViT / EVA blocks
        return {
            "kind": "vit",
            "hidden": int(timm_attn.qkv.in_features),
            "intermediate": int(mlp.fc1.out_features),
            "heads": int(timm_attn.num_heads),
            "kv_heads": int(timm_attn.num_heads),
            "eager": not getattr(timm_attn, "fused_attn", True),
            "tokens": vision_tokens,
        }
    queries = int(getattr(getattr(model, "resampler", None), "num_queries", 0) or 0)
    layers = getattr(block, "layer", None)
    if isinstance(layers, nn.ModuleList) and hasattr(layers[0], "SelfAttention"):  # T5Block (CausalTransformer)
        t5 = layers[0].SelfAttention.config
        return {
            "kind": "cross",
            "hidden": int(t5.d_model),
            "intermediate": int(t5.d_ff),
            "heads": int(t5.num_heads),
            "kv_heads": int(t5.num_heads),
            "eager": True,  # T5's own attention: unscaled scores plus the relative position bias
            "tokens": queries,
            "context": vision_tokens,
        }
    norm = next((m for m in block.modules() if isinstance(m, nn.LayerNorm)), None)
    heads = next((int(m.num_heads) for m in block.modules() if hasattr(m, "num_heads")), None)
    first = next((m for m in (mlp or nn.Identity()).modules() if isinstance(m, nn.Linear)), None)
    if component == "resampler" and norm is not None and heads and first is not None:  # the pre-norm resamplers
        return {
            "kind": "cross",
            "hidden": int(norm.normalized_shape[0]),
            "intermediate": int(first.out_features),
            "heads": heads,
            "kv_heads": heads,
            "tokens": queries,
            "context": vision_tokens,
        }
    return {}


def _optimizer_impl(factory: Any, default: str) -> tuple[str, bool]:
    """``(implementation, amsgrad)`` of an optimizer factory (a ``functools.partial`` or LightningCLI's callable)."""
    kwargs: dict[str, Any] = {}
    for source in (getattr(factory, "keywords", None), getattr(factory, "kwargs", None)):
        if isinstance(source, dict):
            kwargs.update(source)
    if kwargs.get("fused"):
        impl = "fused"
    elif kwargs.get("foreach") is True:
        impl = "foreach"
    elif kwargs.get("foreach") is False:
        impl = "for-loop"
    else:
        impl = default
    return impl, bool(kwargs.get("amsgrad", False))


def describe(
    model: nn.Module, optimizer: str | None = None, amsgrad: bool | None = None, default_optimizer: str = "foreach"
) -> ModelFacts:
    """The facts :func:`plan_memory` needs about an :class:`~emu_lightning.model.EmuModel` (on any device, meta too).

    Blocks are found by class: in vision, resampler and LLM, the outermost ``ModuleList``/``Sequential`` whose
    children share one class (LLaMA's decoder layers, timm's ``blocks``, the resamplers' layers); each block is
    one FSDP unit and everything else the root unit. ``optimizer`` (``fused``, ``foreach``, ``for-loop``) and
    ``amsgrad`` default to what the model's optimizer factory says, else ``default_optimizer``.
    """
    total, trainable = param_counts(model)
    components = model.components() if hasattr(model, "components") else {"llm": model}
    stacks: list[Stack] = []
    in_blocks: dict[int, nn.Parameter] = {}
    for name in GRAD_PATH:
        component = components.get(name)
        if component is None:
            continue
        checkpointed = _checkpointed(component)
        for container in _same_class_containers(component):
            blocks = list(container)
            sizes = [param_counts(b) for b in blocks]
            largest = max(range(len(blocks)), key=lambda k: sizes[k][0])
            in_blocks.update(_unique_params(blocks))
            shape = _block_shape(name, blocks[0], model)
            stacks.append(
                Stack(
                    component=name,
                    block_class=type(blocks[0]).__name__,
                    count=len(blocks),
                    block_params=sizes[largest][0],
                    block_trainable=sizes[largest][1],
                    checkpointed=checkpointed,
                    **shape,
                )
            )
    everything = {id(p): p for p in model.parameters()}
    root = [p for k, p in everything.items() if k not in in_blocks]
    path: list[str] = []
    for name in GRAD_PATH:
        component = components.get(name)
        if component is not None and (path or any(p.requires_grad for p in component.parameters())):
            path.append(name)
    matmul_types: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    with contextlib.suppress(ImportError):
        from transformers.pytorch_utils import Conv1D

        matmul_types += (Conv1D,)
    matmuls = [m for n in path for m in components[n].modules() if isinstance(m, matmul_types)]
    trainables = [p.numel() for p in everything.values() if p.requires_grad]
    llm = components.get("llm")
    vocab = hidden = head_dim = 0
    if llm is not None:
        hidden = int(getattr(llm, "hidden_size", 0) or 0)
        vocab = int(getattr(llm, "vocab_size", 0) or 0)
        llama = next((s for s in stacks if s.component == "llm" and s.kind == "llama"), None)
        head_dim = llama.hidden // llama.heads if llama is not None else 0
    factory = getattr(model, "optimizer_factory", None)
    impl, ams = _optimizer_impl(factory, default_optimizer)
    return ModelFacts(
        total_params=total,
        trainable_params=trainable,
        stacks=tuple(stacks),
        root_params=sum(p.numel() for p in root),
        root_trainable=sum(p.numel() for p in root if p.requires_grad),
        autocast_params=sum(p.numel() for p in _unique_params(matmuls).values()),
        largest_trainable_param=max(trainables, default=0),
        grad_path=tuple(path),
        vocab_size=vocab,
        llm_hidden=hidden,
        llm_head_dim=head_dim,
        max_length=int(getattr(model, "max_length", 0) or 0),
        optimizer=optimizer or impl,
        amsgrad=ams if amsgrad is None else amsgrad,
    )


# ---------------------------------------------------------------------------------------------- activations
def _probs_bytes(heads: int, attended: int, c: int) -> int:
    """Eager attention, per token: the fp32 softmax probabilities and (below fp32) their cast to ``c``."""
    return heads * attended * (4 + (c if c != 4 else 0))


def llama_layer_bytes(
    hidden: int, intermediate: int, heads: int, kv_heads: int, r: int, c: int, casts: bool, attended: int = 0
) -> int:
    """Bytes a LLaMA-like decoder layer (transformers) saves for the backward, per token.

    ``r``: bytes of the residual stream, ``c``: compute bytes, ``casts``: autocast over fp32 weights (each of the
    q/k/v/gate/up projections saves its own 16-bit cast of its input), ``attended``: the attended length for eager
    attention (0: SDPA, which saves its output and a log-sum-exp instead of the probabilities).
    """
    h, d = hidden, hidden // heads
    norms = 2 * (4 * (h + 1) + r * h)
    inputs = c * h * (5 if casts else 2)
    qkv = c * (h + 2 * kv_heads * d)
    attention = c * h + (_probs_bytes(heads, attended, c) if attended else 4 * heads)
    return norms + inputs + qkv + attention + 4 * c * intermediate


def vit_layer_bytes(
    hidden: int, intermediate: int, heads: int, r: int, c: int, autocast: bool, attended: int = 0
) -> int:
    """Bytes a pre-norm ViT block (timm: LayerNorms, fused qkv, GELU MLP) saves for the backward, per token.

    Each LayerNorm saves its input and its mean and rstd: in fp32 under autocast (CUDA's autocast runs layer_norm in
    fp32, casting a 16-bit input up), else at the residual stream's ``r``.
    """
    m = 4 if autocast else r
    attention = _probs_bytes(heads, attended, c) if attended else 4 * heads
    return 2 * (m * hidden + 2 * m) + c * (6 * hidden + 2 * intermediate) + attention


def cross_layer_bytes(
    hidden: int,
    intermediate: int,
    heads: int,
    r: int,
    c: int,
    autocast: bool,
    casts: bool,
    queries: int,
    context: int,
    eager: bool,
) -> int:
    """Bytes a resampler layer saves for the backward, per image: a ViT-like block over the ``queries`` plus a
    cross-attention to ``context`` visual tokens (their keys and values included; the visual tokens themselves, the
    input of every layer's key/value projection, are one tensor shared by the layers and not counted)."""
    m = 4 if autocast else r
    cross = m * hidden + 2 * m + 3 * c * hidden + c * hidden * casts  # + a second cast of the self-attention's input
    if eager:
        per_query = vit_layer_bytes(hidden, intermediate, heads, r, c, autocast, attended=queries)
        per_query += cross + _probs_bytes(heads, context, c)
    else:
        per_query = vit_layer_bytes(hidden, intermediate, heads, r, c, autocast) + cross + 4 * heads
    return queries * per_query + 2 * context * c * hidden


def activation_bytes(
    facts: ModelFacts, seq_len: int, batch: int, images: int, r: int, c: int, autocast: bool, casts: bool
) -> dict[str, dict[str, int]]:
    """Activations of one step per component of the gradient path: ``{name: {"bytes", "checkpointed_bytes"}}``.

    ``llm_head`` holds what stays outside the LLM's blocks (rotary tables, final norm, LM head input, the loss).
    """
    out: dict[str, dict[str, int]] = {}

    def add(name: str, full: int, checkpointed: int) -> None:
        entry = out.setdefault(name, {"bytes": 0, "checkpointed_bytes": 0})
        entry["bytes"] += full
        entry["checkpointed_bytes"] += checkpointed

    tokens = seq_len * batch
    for s in facts.stacks:
        if s.component not in facts.grad_path or s.kind is None:
            continue
        if s.component == "llm":
            attended = seq_len if s.eager else 0
            if s.kind == "llama":
                layer = llama_layer_bytes(s.hidden, s.intermediate, s.heads, s.kv_heads, r, c, casts, attended)
            else:
                layer = vit_layer_bytes(s.hidden, s.intermediate, s.heads, r, c, autocast, attended)
            count, per_layer = tokens, layer
        elif s.kind == "cross":
            layer = cross_layer_bytes(
                s.hidden, s.intermediate, s.heads, r, c, autocast, casts, s.tokens, s.context, s.eager
            )
            count, per_layer = images, layer
        else:
            layer = vit_layer_bytes(s.hidden, s.intermediate, s.heads, r, c, autocast, s.tokens if s.eager else 0)
            count, per_layer = images * s.tokens, layer
        per_input = r * s.hidden * (tokens if s.component == "llm" else images * s.tokens)
        add(s.component, s.count * count * per_layer, s.count * per_input + count * per_layer)
    if "llm" in facts.grad_path and facts.vocab_size:
        h = facts.llm_hidden
        head = 2 * facts.llm_head_dim * r + 4 * (h + 1) + r * h + c * h + LOSS_BYTES_PER_LOGIT * facts.vocab_size
        add("llm_head", tokens * head, tokens * head)
    return out


# ---------------------------------------------------------------------------------------------- the plan
def _sharded(n_bytes: int, devices: int) -> int:
    return math.ceil(n_bytes / devices)


def plan_memory(
    facts: ModelFacts,
    precision: str = DEFAULT_PRECISION,
    devices: int = DEFAULT_DEVICES,
    seq_lens: Sequence[int] | None = None,
    batch: int = 1,
    images: int | None = None,
    checkpointed: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Training memory per device under DDP and under full sharding over ``devices`` (see ``ASSUMPTIONS``).

    ``seq_lens``: tokens per sequence (default: the model's ``max_length``); ``batch``: sequences per device and
    step; ``images``: images per device and step (default: one per sequence); ``checkpointed``: the components
    whose blocks checkpoint their activations "as configured" (default: those the built model checkpoints).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not planned; expected one of {list(PRECISIONS)}")
    if devices < 1 or batch < 1:
        raise ValueError(f"devices and batch must be >= 1, got {devices} and {batch}")
    if facts.optimizer not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer {facts.optimizer!r} must be one of {list(OPTIMIZER_IMPLS)}")
    seq_lens = list(seq_lens or [facts.max_length])
    if not seq_lens or min(seq_lens) < 1:
        raise ValueError(f"sequence lengths must be >= 1, got {seq_lens}")
    images = batch if images is None else images
    if images < 0:
        raise ValueError(f"images must be >= 0, got {images}")
    if checkpointed is None:
        checkpointed = sorted({s.component for s in facts.stacks if s.checkpointed})
    prec = PRECISIONS[precision]
    w, c = prec.weight_bytes, prec.compute_bytes
    total, trainable = facts.total_params, facts.trainable_params
    if not 0 <= trainable <= total:
        raise ValueError(f"need 0 <= trainable <= total, got trainable {trainable}, total {total}")
    moments = 3 if facts.amsgrad else 2
    step = {"fused": 0, "foreach": trainable * w, "for-loop": 2 * facts.largest_trainable_param * w}[facts.optimizer]

    ddp = {
        "weights_bytes": total * w,
        "master_weights_bytes": 0,
        "grads_bytes": trainable * w,
        "grad_buckets_bytes": trainable * w,
        "optimizer_bytes": moments * trainable * w,
        "optimizer_step_bytes": step,
        "autocast_copies_bytes": facts.autocast_params * c if prec.autocast else 0,
    }
    fsdp = {
        "weights_bytes": _sharded(total * w, devices),
        "master_weights_bytes": 0,
        "grads_bytes": _sharded(trainable * w, devices),
        "grad_buckets_bytes": 0,
        "optimizer_bytes": _sharded(moments * trainable * w, devices),
        "optimizer_step_bytes": _sharded(step, devices),
        "gathered_root_bytes": c * facts.root_params * (2 if facts.root_trainable else 1),
        "gathered_block_bytes": max(
            (c * s.block_params * (3 if s.block_trainable else 2) for s in facts.stacks), default=0
        ),
    }
    fsdp["gathered_bytes"] = fsdp["gathered_root_bytes"] + fsdp["gathered_block_bytes"]
    # The residual stream is in the weights' dtype as used: as held under DDP, gathered in c under FSDP.
    plans = {
        "ddp": (ddp, w, prec.autocast and w != c, ddp["autocast_copies_bytes"]),
        "fsdp": (fsdp, c, False, fsdp["gathered_bytes"]),
    }
    out: dict[str, Any] = {}
    for name, (parts, r, casts, transient) in plans.items():
        states = sum(
            parts[k] for k in ("weights_bytes", "master_weights_bytes", "optimizer_bytes", "grad_buckets_bytes")
        )
        per_seq = []
        for seq_len in seq_lens:
            acts = activation_bytes(facts, seq_len, batch, images, r, c, prec.autocast, casts)
            full = sum(a["bytes"] for a in acts.values())
            ckpt = sum(a["checkpointed_bytes"] for a in acts.values())
            configured = sum(a["checkpointed_bytes" if k in checkpointed else "bytes"] for k, a in acts.items())
            # llm_head follows the LLM: it is the same with and without checkpointing
            entry: dict[str, Any] = {
                "seq_len": seq_len,
                "activations": {**{k: a["bytes"] for k, a in acts.items()}, "bytes": full},
                "activations_checkpointed": {**{k: a["checkpointed_bytes"] for k, a in acts.items()}, "bytes": ckpt},
                "activations_as_configured_bytes": configured,
            }
            for key, act in (("peak", full), ("peak_checkpointed", ckpt), ("peak_as_configured", configured)):
                peak = states + parts["grads_bytes"] + max(act + transient, parts["optimizer_step_bytes"])
                entry[f"{key}_bytes"], entry[f"{key}_gib"] = peak, _gib(peak)
            per_seq.append(entry)
        out[name] = {**parts, "states_bytes": states, "states_gib": _gib(states), "per_seq_len": per_seq}
    blocks = [
        {"component": s.component, "class": s.block_class, "count": s.count, "params": s.block_params, "kind": s.kind}
        for s in facts.stacks
    ]
    not_planned = sorted({s.block_class for s in facts.stacks if s.kind is None})
    return {
        "devices": devices,
        "precision": precision,
        "optimizer": f"AdamW ({facts.optimizer}{', amsgrad' if facts.amsgrad else ''})",
        "seq_lens": seq_lens,
        "batch": batch,
        "images": images,
        "checkpointed_as_configured": list(checkpointed),
        "gradient_path": list(facts.grad_path),
        **({"blocks_without_activation_plan": not_planned} if not_planned else {}),
        "assumptions": ASSUMPTIONS,
        "units": {
            "blocks": blocks,
            "root_params": facts.root_params,
            "root_trainable": facts.root_trainable,
            "autocast_params": facts.autocast_params,
        },
        **out,
    }
