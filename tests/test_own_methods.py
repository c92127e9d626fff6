"""fedpeft's hand-written methods (bitfit, sparse, adapter) applied to tiny frozen models.

The apply functions are called directly on a frozen base, as the registry calls them; the
numbers they must reach (bias counts, masks, adapter sizes) are computed independently.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.pytorch_utils import Conv1D

import fedpeft.methods.bitfit  # noqa: F401  (registers the methods)
import fedpeft.methods.bottleneck  # noqa: F401
import fedpeft.methods.full  # noqa: F401
import fedpeft.methods.sparse  # noqa: F401
from fedpeft.config import PeftSection, ScenarioError
from fedpeft.methods import METHODS, MethodContext
from fedpeft.methods.bitfit import apply_bitfit
from fedpeft.methods.bottleneck import BottleneckAdapter, apply_adapter
from fedpeft.methods.sparse import SparseDelta, apply_sparse, sparse_masks

H, L, LABELS = 32, 2, 3


def _frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    model.eval()
    return model


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=H,
        num_hidden_layers=L,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=LABELS,
    )
    return _frozen(BertForSequenceClassification(config))


def llama(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=H,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        attention_bias=bias,
        pad_token_id=0,
        num_labels=LABELS,
    )
    return _frozen(LlamaForSequenceClassification(config))


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=100,
        n_embd=H,
        n_layer=L,
        n_head=2,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        num_labels=LABELS,
    )
    return _frozen(GPT2ForSequenceClassification(config))


def vit() -> nn.Module:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=H,
        num_hidden_layers=L,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=LABELS,
    )
    return _frozen(ViTForImageClassification(config))


MODELS = {"bert": bert, "llama": llama, "gpt2": gpt2, "vit": vit}
HEADS = {"bert": ("classifier",), "llama": ("score",), "gpt2": ("score",), "vit": ("classifier",)}


def ctx_for(kind: str, seed: int = 0) -> MethodContext:
    return MethodContext(
        task="image-cls" if kind == "vit" else "seq-cls",
        peft_task_type=None if kind == "vit" else "SEQ_CLS",
        head_modules=HEADS[kind],
        model_type=kind,
        seed=seed,
        hybrid=False,
    )


def inputs(kind: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}
    ids = torch.randint(1, 100, (2, 7), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(kind)).logits


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_the_methods_are_registered_with_their_kind_and_family() -> None:
    got = {n: (METHODS[n].kind, METHODS[n].family) for n in ("bitfit", "sparse", "adapter", "full")}

    assert got == {
        "bitfit": ("fedpeft", "selective"),
        "sparse": ("fedpeft", "selective"),
        "adapter": ("fedpeft", "additive"),
        "full": ("full", "full"),
    }


# ------------------------------------------------------------------------------- bitfit


@pytest.mark.parametrize("kind", MODELS)
def test_bitfit_trains_exactly_the_biases_of_the_base(kind: str) -> None:
    model = MODELS[kind]()
    head = HEADS[kind][0]
    biases = {
        n for n, _ in model.named_parameters() if n.endswith(".bias") and not n.startswith(head)
    }

    apply_bitfit(model, PeftSection(method="bitfit"), ctx_for(kind))

    assert biases and set(trainable(model)) == biases
    if kind in ("bert", "gpt2", "vit"):  # LayerNorm biases count too (Zaken et al.)
        assert any("LayerNorm" in n or "ln_" in n or "layernorm" in n for n in biases)


def test_bitfit_refuses_a_model_without_bias_terms_in_one_line() -> None:
    model = llama(bias=False)

    with pytest.raises(ScenarioError) as err:
        apply_bitfit(model, PeftSection(method="bitfit"), ctx_for("llama"))

    message = str(err.value)
    assert "no bias terms" in message and "'lora'" in message and "\n" not in message
    assert not trainable(model)


# ------------------------------------------------------------------------------- sparse


def sparse(kind: str = "bert", seed: int = 0, **peft: object) -> nn.Module:
    model = MODELS[kind]()
    apply_sparse(model, PeftSection(method="sparse", **peft), ctx_for(kind, seed))  # type: ignore[arg-type]
    return model


def linear_layers(model: nn.Module, head: str) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | Conv1D) and not n.startswith(head)
    }


@pytest.mark.parametrize("kind", MODELS)
def test_sparse_masks_every_matrix_and_trains_only_the_values(kind: str) -> None:
    base = MODELS[kind]()
    layers = linear_layers(base, HEADS[kind][0])
    originals = {n: m.weight for n, m in layers.items()}

    apply_sparse(base, PeftSection(method="sparse", sparse_fraction=0.1), ctx_for(kind))

    masks = sparse_masks(base)
    assert set(masks) == set(layers)
    for name, layer in layers.items():  # the base's own Parameter, frozen, not copied
        assert layer.parametrizations.weight.original is originals[name]
        assert not originals[name].requires_grad
        assert masks[name].dtype == torch.int64
        assert torch.equal(masks[name], masks[name].sort().values)
        assert masks[name].numel() == round(0.1 * originals[name].numel())
    assert set(trainable(base)) == {f"{n}.parametrizations.weight.0.values" for n in layers}
    assert sum(p.numel() for p in trainable(base).values()) == sum(
        m.numel() for m in masks.values()
    )
    assert all(p.dtype == torch.float32 and not p.any() for p in trainable(base).values())


def test_sparse_random_mask_is_identical_for_a_seed_and_differs_for_another() -> None:
    first = sparse_masks(sparse(seed=7))
    again = sparse_masks(sparse(seed=7))
    other = sparse_masks(sparse(seed=8))

    assert all(torch.equal(first[n], again[n]) for n in first)
    assert all(not torch.equal(first[n], other[n]) for n in first)
    # the modules of one model get different masks too (the name is part of the seed)
    q, k = (first[f"bert.encoder.layer.0.attention.self.{m}"] for m in ("query", "key"))
    assert not torch.equal(q, k)


def test_sparse_magnitude_mask_is_the_largest_base_weights() -> None:
    base = bert()
    expected = {}
    for name, layer in linear_layers(base, "classifier").items():
        w = layer.weight.detach().numpy().reshape(-1)
        nnz = round(0.05 * w.size)
        expected[name] = np.sort(np.argsort(-np.abs(w), kind="stable")[:nnz])

    masks = sparse_masks(sparse(sparse_fraction=0.05, sparse_selection="magnitude"))

    assert set(masks) == set(expected)
    assert all(np.array_equal(masks[n].numpy(), expected[n]) for n in masks)


def test_sparse_magnitude_ties_go_to_the_lower_index() -> None:
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, -2.0, 2.0, 0.5] * 4).view(4, 4))
    model = _frozen(nn.Sequential(layer))
    ctx = ctx_for("bert")

    apply_sparse(
        model, PeftSection(method="sparse", sparse_fraction=0.25, sparse_selection="magnitude"), ctx
    )

    # the 8 entries of |w| = 2 tie; the lowest four flat positions win
    assert sparse_masks(model)["0"].tolist() == [1, 2, 5, 6]


def test_sparse_target_modules_match_by_suffix_like_peft() -> None:
    model = sparse(target_modules=["query", "attention.output.dense"], sparse_fraction=0.1)

    assert sorted(sparse_masks(model)) == [
        f"bert.encoder.layer.{i}.attention.{m}"
        for i in range(L)
        for m in ("output.dense", "self.query")
    ]


def test_sparse_refuses_targets_that_match_nothing_in_one_line() -> None:
    with pytest.raises(ScenarioError) as err:
        sparse(target_modules=["nope"])

    assert "peft.target_modules" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_sparse_gradient_reaches_only_values_and_a_step_moves_only_masked_entries(kind) -> None:
    model = sparse(kind, sparse_fraction=0.1)
    model.train()
    layers = linear_layers(model, HEADS[kind][0])
    before = {n: m.weight.detach().clone() for n, m in layers.items()}  # W_eff = W0 + delta
    masks = sparse_masks(model)
    optimizer = torch.optim.SGD(trainable(model).values(), lr=0.5)

    model(**inputs(kind)).logits.square().sum().backward()
    optimizer.step()

    for p in model.parameters():
        assert (p.grad is not None) == p.requires_grad
    with torch.no_grad():
        for name, layer in layers.items():
            changed = (layer.weight != before[name]).reshape(-1).nonzero().flatten()
            assert changed.numel() > 0
            assert set(changed.tolist()) <= set(masks[name].tolist())
            assert torch.equal(layer.parametrizations.weight.original, before[name])


def test_sparse_travelling_floats_scale_with_the_fraction() -> None:
    floats = {}
    for fraction in (0.01, 0.04, 0.16):
        model = sparse(sparse_fraction=fraction)
        floats[fraction] = sum(p.numel() for p in trainable(model).values())
    matrix_entries = sum(m.weight.numel() for m in linear_layers(bert(), "classifier").values())

    for fraction, count in floats.items():
        assert abs(count - fraction * matrix_entries) <= len(sparse_masks(model))  # rounding
    assert floats[0.16] > 3.9 * floats[0.04] > 15 * floats[0.01]


def test_a_sparse_model_survives_deepcopy_and_keeps_its_state_dict_keys() -> None:
    model = sparse(sparse_fraction=0.1)
    with torch.no_grad():
        for p in trainable(model).values():
            p.normal_()

    twin = copy.deepcopy(model)

    keys = list(model.state_dict())
    name = "bert.encoder.layer.0.attention.self.query.parametrizations.weight"
    assert {f"{name}.original", f"{name}.0.values", f"{name}.0.indices"} <= set(keys)
    assert isinstance(twin.get_submodule(f"{name}.0"), SparseDelta)
    assert torch.equal(logits(twin, "bert"), logits(model, "bert"))


# ------------------------------------------------------------------------------ adapter

POSITIONS = {
    "bert": ["attention.output.dense", "output.dense"],
    "llama": ["self_attn.o_proj", "mlp.down_proj"],
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
    "vit": ["attention.o_proj", "mlp.fc2"],
}
LAYERS = {"bert": "bert.encoder.layer", "llama": "model.layers", "gpt2": "transformer.h"}


@pytest.mark.parametrize("kind", MODELS)
def test_adapter_sits_at_houlsbys_two_positions_and_starts_as_the_base(kind: str) -> None:
    model = MODELS[kind]()
    expected = logits(model, kind)
    prefix = LAYERS.get(kind, "vit.layers")
    where = [f"{prefix}.{i}.{p}" for i in range(L) for p in POSITIONS[kind]]
    originals = {n: model.get_submodule(n) for n in where}
    r = 4

    apply_adapter(model, PeftSection(method="adapter", r=r), ctx_for(kind))

    wrappers = {n for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}
    assert wrappers == set(where)
    for name, layer in originals.items():
        assert model.get_submodule(name).base_layer is layer
    if kind == "gpt2":
        assert all(isinstance(layer, Conv1D) for layer in originals.values())
    assert sum(p.numel() for p in trainable(model).values()) == 2 * L * (2 * H * r + r + H)
    assert all(".down." in n or ".up." in n for n in trainable(model))
    assert torch.equal(logits(model, kind), expected)  # up = 0: exactly the base model


@pytest.mark.parametrize("kind", MODELS)
def test_a_trained_adapter_changes_the_output(kind: str) -> None:
    model = MODELS[kind]()
    expected = logits(model, kind)
    apply_adapter(model, PeftSection(method="adapter", r=4), ctx_for(kind))

    for name, module in model.named_modules():  # each wrapper is really called
        if isinstance(module, BottleneckAdapter):
            with torch.no_grad():
                module.up.weight.fill_(0.1)
            assert not torch.equal(logits(model, kind), expected), name
            with torch.no_grad():
                module.up.weight.zero_()


def test_adapter_modules_override_the_default_positions() -> None:
    model = bert()

    apply_adapter(
        model, PeftSection(method="adapter", r=4, adapter_modules=["query"]), ctx_for("bert")
    )

    wrappers = [n for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)]
    assert wrappers == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(L)]


def test_adapter_on_an_unknown_model_type_asks_for_adapter_modules() -> None:
    ctx = MethodContext("seq-cls", "SEQ_CLS", ("classifier",), "mystery", 0, False)

    with pytest.raises(ScenarioError) as err:
        apply_adapter(bert(), PeftSection(method="adapter"), ctx)

    assert "peft.adapter_modules" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------- through the registry


@pytest.mark.parametrize("method", ["bitfit", "sparse", "adapter", "full", ["sparse", "bitfit"]])
def test_build_peft_model_travels_what_the_methods_train_plus_the_head(method) -> None:
    from fedpeft.methods import TRAVEL_ATTR, build_peft_model

    cfg = PeftSection(method=method)
    alone = bert()
    for name in cfg.methods:
        if METHODS[name].apply is not None:
            METHODS[name].apply(alone, cfg, ctx_for("bert"))  # type: ignore[misc]
        else:
            alone.requires_grad_(True)

    model = build_peft_model(bert(), cfg, "seq-cls", seed=0)

    travel = getattr(model, TRAVEL_ATTR)
    assert travel == list(trainable(model))
    assert set(travel) == set(trainable(alone)) | {"classifier.weight", "classifier.bias"}
