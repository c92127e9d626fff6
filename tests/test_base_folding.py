"""Folding a factored update into frozen base weights, on real peft models (Linear and
GPT-2's transposed Conv1D): the folded model computes W0 + P @ Q exactly."""

import pytest
import torch

from fedpeft.adapters import (
    base_delta_from_state,
    base_delta_to_state,
    fold_base_delta,
)
from fedpeft.config import ModelSection, PeftSection
from fedpeft.methods import build_peft_model
from fedpeft.models import load_base_model

CASES = [("tiny-bert", ["query", "value"]), ("tiny-gpt2", ["c_attn"])]


def _model(alias, targets):
    base = load_base_model(ModelSection(name=alias), num_labels=3)
    return build_peft_model(base, PeftSection(r=2, target_modules=targets), "seq-cls", 0)


@pytest.mark.parametrize(("alias", "targets"), CASES)
def test_fold_sets_w0_plus_delta_in_peft_orientation_and_restores(alias, targets):
    model = _model(alias, targets)
    modules = [
        n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
    ]
    name = modules[0]
    layer = model.get_submodule(name)
    w0 = layer.get_base_layer().weight.detach().clone()
    out_f, in_f = layer.out_features, layer.in_features
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(out_f, 3, generator=g), torch.randn(3, in_f, generator=g)
    x = torch.randn(4, in_f, generator=g)
    before = layer.get_base_layer()(x)

    fold_base_delta(model, {name: (p, q)})
    after = layer.get_base_layer()(x)
    torch.testing.assert_close(after - before, x @ (p @ q).T, rtol=1e-4, atol=1e-4)
    fold_base_delta(model, {name: (2 * p, q)})  # a new fold replaces the old one
    torch.testing.assert_close(
        layer.get_base_layer()(x) - before, 2 * x @ (p @ q).T, rtol=1e-4, atol=1e-4
    )
    fold_base_delta(model, {})
    assert torch.equal(layer.get_base_layer().weight, w0)


def test_base_delta_round_trips_through_named_tensors():
    delta = {"a.b": (torch.ones(3, 2), torch.zeros(2, 4))}
    back = base_delta_from_state(base_delta_to_state(delta))
    assert set(back) == {"a.b"} and all(
        torch.equal(x, y) for x, y in zip(back["a.b"], delta["a.b"], strict=True)
    )
