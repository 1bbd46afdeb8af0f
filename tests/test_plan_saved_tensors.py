"""kimitune plan's activation terms against what the model keeps for its backward, measured on the CPU.

``torch.autograd.graph.saved_tensors_hooks`` sees every tensor an op saves for the backward (autograd's saved
tensors and custom Functions' ``save_for_backward``). A saved tensor counts while the graph still holds it (a weak
reference to the packed handle: the MoE's balance loss, unused, lets its own go), each storage once (q, k and v are
views of one conv output; a shared input is one tensor for six linears), parameters' storages never. Each forward
runs at two lengths and the difference per token is compared: what is fixed per step (the adapters' bf16 copies,
the router's float32 weight copy, the short conv's per-sequence corrections, the expert offsets) cancels.

Measured, in bf16 on the tiny architecture (examples/models/tiny.json; and with a low-rank query for MLA's second
latent norm), with LoRA on every linear (the joint shared-input node), with LoRA dropout (each linear alone) and on
the experts, held exact (no tolerance: every term is an exact count of bytes per token):

- the attention blocks: KDA (its projections' LoRA, the gate's sigmoid, PyTorch's short conv and chunk algorithm,
  the decay, the gated norm) and MLA (LoRA, the latent norms, sdpa's CPU flash kernel);
- the feed-forward blocks: dense SwiGLU and MoE (router, sort indices, the expert SwiGLU's PyTorch reference, the
  shared expert);
- whole decoder layers (their two RMS norms);
- the whole model with the fused loss, and with the balance loss (embeddings, final norm, the loss's gradient, and
  nothing kept before the first trained parameter).

One case is held as a bound, not exactly: when the first trained parameter is not among the first ops of its block
(LoRA on o_proj only, or on the experts only), the plan counts that block whole, above the measurement by less
than that block.

These are the terms of ``activations.CPU``. Not measured here: the CUDA terms (``activations.Kernels()``: fla's
fused norms, SwiGLU and KDA kernel, kimitune's Triton short conv and expert SwiGLU, CUDA sdpa, and the MoE's 4 * C
measured on the GPU and not attributed), which the GPU census calibrates (tests/test_plan.py holds the measured
peaks); full fine-tuning; packed batches; recomputed layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kimitune.adapters import apply_lora
from kimitune.config import parse_config
from kimitune.model import KimiLinearConfig, KimiLinearForCausalLM
from kimitune.plan import activations
from kimitune.plan.activations import CPU
from kimitune.plan.shapes import adapter_settings, model_shapes

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = (128, 256)  # whole chunks of KDA's chunk algorithm (64 tokens)
B = 2  # bf16

pytestmark = pytest.mark.usefixtures("one_thread")


class _Held:
    """What autograd holds in place of a saved tensor, so that a weak reference tells whether it still does."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedTensors:
    """Records the tensors a forward saves for its backward; ``bytes()``: the storages the graph still holds."""

    def __init__(self, exclude: list[torch.Tensor]):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.held: list[weakref.ref] = []

    def _pack(self, tensor: torch.Tensor) -> _Held:
        held = _Held(tensor)
        self.held.append(weakref.ref(held))
        return held

    @contextlib.contextmanager
    def recording(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor):
            yield

    def bytes(self) -> int:
        storages = {}
        for ref in self.held:
            held = ref()
            if held is not None:
                storage = held.tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(n for ptr, n in storages.items() if ptr not in self.exclude)


def saved_per_token(model: torch.nn.Module, forward: Callable[[int], object]) -> float:
    """Bytes per token that ``forward(tokens)`` leaves saved for the backward (while its result is alive)."""
    exclude = [*model.parameters(), *model.buffers()]
    saved = []
    for tokens in LENGTHS:
        record = SavedTensors(exclude)
        with record.recording():
            result = forward(tokens)  # noqa: F841  (holds the graph until measured)
        saved.append(record.bytes())
        del result
    return (saved[1] - saved[0]) / (LENGTHS[1] - LENGTHS[0])


def tiny(**changes) -> KimiLinearConfig:
    config = KimiLinearConfig.from_pretrained(ROOT / "examples/models/tiny.json")
    return dataclasses.replace(config, **changes)


def train_config(**keys):
    raw = {"init_from_config": "unused", "adapter": "lora", "lora_r": 8, "lora_alpha": 16,
           "lora_target_linear": True} | keys
    return parse_config(raw)[0]


def adapted_model(config: KimiLinearConfig, train) -> KimiLinearForCausalLM:
    """The model as training builds it on a GPU: bf16 weights, frozen, LoRA (float32) on the run's targets."""
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(config).to(torch.bfloat16)
    for param in model.parameters():
        param.requires_grad_(False)
    apply_lora(model, adapter_settings(train))
    return model


def hidden(tokens: int, width: int) -> torch.Tensor:
    """A block's input [1, T, C], needing a gradient as it does after the first trained parameter."""
    return torch.randn(1, tokens, width, dtype=torch.bfloat16, requires_grad=True)


def fed_a_gradient(shape):
    """``shape`` as a layer whose input needs a gradient (``hidden``'s), whatever its place in the model."""
    return dataclasses.replace(shape, gradient_from="input")


ADAPTERS = {
    "lora": {},
    "lora with dropout": {"lora_dropout": 0.1},
    "lora on the experts": {"lora_target_experts": True},
}


@pytest.fixture(scope="module", params=list(ADAPTERS))
def run(request):
    train = train_config(**ADAPTERS[request.param])
    config = tiny()
    return adapted_model(config, train), model_shapes(train, config)


@pytest.mark.parametrize("index, kind", [(0, "KDA"), (3, "MLA")])
def test_attention_keeps_what_the_plan_counts(run, index, kind):
    model, shapes = run
    layer, shape = model.model.layers[index], fed_a_gradient(shapes.layers[index])
    C = shape.hidden_size
    measured = saved_per_token(model, lambda T: layer.self_attn(hidden(T, C))[0])
    assert measured == activations.total(activations.attention(shape, B, CPU)), kind


@pytest.mark.parametrize("index, kind", [(0, "dense MLP"), (1, "MoE")])
def test_feed_forward_keeps_what_the_plan_counts(run, index, kind):
    model, shapes = run
    layer, shape = model.model.layers[index], fed_a_gradient(shapes.layers[index])
    C = shape.hidden_size

    def forward(T):
        out = layer.mlp(hidden(T, C))
        return out if isinstance(out, torch.Tensor) else out.hidden  # the unused balance loss lets its own go

    measured = saved_per_token(model, forward)
    assert measured == activations.total(activations.feed_forward(shape, B, CPU, aux_loss=False)), kind


@pytest.mark.parametrize("index", [0, 1, 3])  # KDA + dense, KDA + MoE, MLA + MoE
def test_decoder_layer_keeps_what_the_plan_counts(run, index):
    model, shapes = run
    shape = fed_a_gradient(shapes.layers[index])
    measured = saved_per_token(model, lambda T: model.model.layers[index](hidden(T, shape.hidden_size))[0])
    assert measured == activations.layer(shape, B, CPU).total


@pytest.mark.parametrize("aux_loss", [False, True])
def test_the_whole_model_with_its_loss_keeps_what_the_plan_counts(run, aux_loss):
    model, shapes = run
    model.config.router_aux_loss_coef = 0.01 if aux_loss else 0.0

    def forward(T):
        ids = torch.randint(0, shapes.vocab_size, (1, T))
        out = model(ids, labels=ids, return_logits=False)
        return out.loss, out.aux_loss

    measured = saved_per_token(model, forward)
    model.config.router_aux_loss_coef = 0.0
    layers = sum(activations.layer(layer, B, CPU, aux_loss).total for layer in shapes.layers)
    planned = layers + activations.rms_norm(shapes.final_norm, B, CPU) + activations.loss(shapes.hidden_size, B)
    assert measured == planned


def test_mla_with_a_low_rank_query_counts_both_latent_norms():
    train = train_config()
    config = tiny(q_lora_rank=32)
    model, shapes = adapted_model(config, train), model_shapes(train, config)
    shape = shapes.layers[3]
    assert shape.attention_norms == (32, config.kv_lora_rank)
    measured = saved_per_token(model, lambda T: model.model.layers[3].self_attn(hidden(T, shape.hidden_size))[0])
    assert measured == activations.total(activations.attention(shape, B, CPU))


def test_the_measurement_counts_shared_storage_once_and_only_what_the_graph_holds():
    weight = torch.randn(8, 8)  # a frozen parameter: never counted
    x = torch.randn(64, 8, requires_grad=True)
    record = SavedTensors([weight])
    with record.recording():
        y = x.sin()  # saves x
        z = (y * y).sum()  # saves y twice: one storage
        w = (x.cos() @ weight).sum()  # saves x and the weight (cos(x) only for a weight gradient)
        del w  # and lets go of this graph's tensors
    assert record.bytes() == 2 * 64 * 8 * 4  # x and y; the dropped graph's tensors are gone
    del z


@pytest.mark.parametrize("targets", [{"lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                                     {"lora_target_modules": ["o_proj"]}, {"lora_target_experts": True}])
def test_where_the_gradient_starts_inside_a_block_the_plan_counts_that_block_whole(targets):
    """Ops that read no tensor needing a gradient keep nothing: with frozen embeddings, everything before the first
    trained parameter. The plan drops the blocks before the one that holds it and counts that block whole: an upper
    bound, by less than that block (exact when its first ops are adapted, as with all-linear above)."""
    train = train_config(lora_target_linear=False, **targets)
    config = tiny()
    model, shapes = adapted_model(config, train), model_shapes(train, config)

    def forward(T):
        ids = torch.randint(0, shapes.vocab_size, (1, T))
        return model(ids, labels=ids, return_logits=False).loss

    measured = saved_per_token(model, forward)
    layers = [activations.layer(layer, B, CPU) for layer in shapes.layers]
    planned = (sum(layer.total for layer in layers) + activations.rms_norm(shapes.final_norm, B, CPU)
               + activations.loss(shapes.hidden_size, B))
    first = next(i for i, layer in enumerate(shapes.layers) if layer.gradient_from != "nothing")
    block = layers[first].attention if shapes.layers[first].gradient_from == "attention" else layers[first].feed_forward
    assert measured <= planned < measured + activations.total(block)
