"""AdaLoRA's federated rank budget: a cubic schedule over rounds, a global top-|E| mask
computed from the received adapter, and pruned entries that stay zero through training."""

import numpy as np
import torch

from fedpeft.config import load_scenario
from fedpeft.methods import before_round, build_peft_model
from fedpeft.methods.adalora import budget_mask, rank_budget, singular_values
from fedpeft.models import load_base_model


def test_rank_budget_follows_the_cubic_schedule_from_r_to_target():
    # 12 matrices, r = 8 -> 96 values in round 1, target 4 -> 48 in the last round
    got = [rank_budget(8, 4, 12, t, 5) for t in range(1, 6)]
    expected = [round(48 + 48 * (1 - (t - 1) / 4) ** 3) for t in range(1, 6)]
    assert got == expected and got[0] == 96 and got[-1] == 48
    assert rank_budget(8, 4, 12, 1, 1) == 48  # a single round goes straight to the target


def test_budget_mask_keeps_the_largest_magnitudes_over_all_matrices():
    values = [torch.tensor([[0.5], [-3.0], [0.1]]), torch.tensor([[2.0], [-0.2], [1.0]])]
    masks = budget_mask(values, 3)
    flat = np.abs(np.concatenate([v.numpy().ravel() for v in values]))
    keep = set(np.argsort(-flat, kind="stable")[:3])
    assert [i for i, m in enumerate(torch.cat([m.flatten() for m in masks])) if m] == sorted(keep)


def test_pruned_singular_values_stay_zero_through_local_training():
    scenario = load_scenario("smoke", ['peft.method="adalora"', "peft.adalora_target_r=2"])
    model = build_peft_model(load_base_model(scenario.model, 26), scenario.peft, "seq-cls", 0)
    with torch.no_grad():  # a trained global E with distinct magnitudes
        for i, e in enumerate(singular_values(model)):
            e.copy_(torch.linspace(0.1, 1.0, e.numel()).view_as(e) * (i + 1))
    undo = before_round(model, server_round=3, rounds=3)  # last round: the target budget
    values = singular_values(model)
    kept = sum(int((e != 0).sum()) for e in values)
    assert kept == rank_budget(4, 2, len(values), 3, 3) == 2 * len(values)

    pruned = [(e == 0).clone() for e in values]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(1000, 5000, (4, 8))
    model(
        input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 2, 3])
    ).loss.backward()
    optimizer.step()
    assert all(torch.all(e[m] == 0) for e, m in zip(values, pruned, strict=True))
    assert any(torch.any(e[~m] != 0) for e, m in zip(values, pruned, strict=True))

    undo()  # hooks removed: the cached model trains freely outside the round
    assert all(not e._backward_hooks for e in values)
