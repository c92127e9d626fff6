"""One table of (model, PEFT method) cases run through the same adapter checks."""

import pytest
import torch

from fedpeft.adapters import (
    AdapterMismatchError,
    count_trainable,
    get_adapter_state,
    set_adapter_state,
)
from fedpeft.codecs import (
    arrayrecord_to_state,
    payload_nbytes,
    state_to_arrayrecord,
    tensors_nbytes,
)
from fedpeft.config import ModelSection, PeftSection, ScenarioError
from fedpeft.methods import build_peft_model
from fedpeft.models import load_base_model

TEST_CASES = [
    # (case id, model alias, peft section)
    ("lora-tiny-bert", "tiny-bert", PeftSection(r=4, target_modules=["query", "value"])),
    ("lora-tiny-llama", "tiny-llama", PeftSection(r=2, target_modules=["q_proj", "v_proj"])),
    ("lora-default-targets", "tiny-bert", PeftSection(r=2)),
]


def _model(alias, peft, seed=0):
    base = load_base_model(ModelSection(name=alias), num_labels=5)
    return build_peft_model(base, peft, "seq-cls", seed)


@pytest.mark.parametrize(("case", "alias", "peft"), TEST_CASES, ids=[c[0] for c in TEST_CASES])
class TestAdapterTable:
    def test_round_trip_through_arrayrecord_is_exact(self, case, alias, peft):
        model = _model(alias, peft)
        state = get_adapter_state(model)
        back = arrayrecord_to_state(state_to_arrayrecord(state))
        assert list(back) == list(state)
        for k in state:
            assert torch.equal(back[k], state[k])

    def test_only_trainable_tensors_travel(self, case, alias, peft):
        model = _model(alias, peft)
        state = get_adapter_state(model)
        assert sum(t.numel() for t in state.values()) == count_trainable(model)
        assert all(("lora_" in k) or ("classifier" in k) or ("score" in k) for k in state)

    def test_loading_a_state_into_another_model_copies_it_exactly(self, case, alias, peft):
        source, target = _model(alias, peft, seed=1), _model(alias, peft, seed=2)
        state = {k: v + 0.5 for k, v in get_adapter_state(source).items()}
        set_adapter_state(target, state)
        for k, v in get_adapter_state(target).items():
            assert torch.equal(v, state[k])

    def test_identical_updates_aggregate_to_that_update(self, case, alias, peft):
        from fedpeft.strategies.testing import aggregate_with

        state = get_adapter_state(_model(alias, peft))
        out = aggregate_with("fedavg", [state, state, state], [3, 1, 5])
        for k in state:
            torch.testing.assert_close(out[k], state[k].double(), rtol=0, atol=1e-7)


def test_wrong_keys_and_shapes_are_rejected():
    model = _model("tiny-bert", TEST_CASES[0][2])
    state = get_adapter_state(model)
    key = next(iter(state))
    with pytest.raises(AdapterMismatchError, match="1 missing"):
        set_adapter_state(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(AdapterMismatchError, match="unexpected"):
        set_adapter_state(model, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(AdapterMismatchError, match="shape"):
        set_adapter_state(model, {**state, key: torch.zeros(1, 1)})


def test_target_modules_that_do_not_exist_are_a_scenario_error():
    with pytest.raises(ScenarioError, match="peft.target_modules"):
        _model("tiny-bert", PeftSection(target_modules=["q_proj"]))


def test_unreachable_hub_model_is_a_scenario_error():
    with pytest.raises(ScenarioError, match="cannot load model.name='nobody/no-such-model'"):
        load_base_model(ModelSection(name="nobody/no-such-model"), 2)


def test_tiny_random_models_are_identical_in_every_process():
    a = load_base_model(ModelSection(name="tiny-bert"), 5)
    torch.manual_seed(999)
    b = load_base_model(ModelSection(name="tiny-bert"), 5)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)


def test_byte_count_matches_flower_serialization():
    state = get_adapter_state(_model("tiny-bert", TEST_CASES[0][2]))
    assert tensors_nbytes(state) == payload_nbytes(state_to_arrayrecord(state))
    raw = sum(t.numel() * t.element_size() for t in state.values())
    assert raw < payload_nbytes(state_to_arrayrecord(state)) < raw + 600 * len(state)
