"""Failing clients and unsound updates: validation, injected faults, min_fit_clients."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import datasets
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from safetensors.torch import load_file

from fedpeft import records
from fedpeft.clients.app import app as client_app
from fedpeft.clients.faults import fault_mod
from fedpeft.codecs import arrayrecord_to_state, state_to_arrayrecord
from fedpeft.config import ScenarioError, load_scenario
from fedpeft.data import client_split, client_train_size
from fedpeft.faults import faults_of, strikes
from fedpeft.server.grid import CountingGrid
from fedpeft.server.inprocess import InProcessGrid
from fedpeft.server.reliability import ExampleBound, ValidatingGrid, check_examples, check_update
from fedpeft.server.run import example_bound, run_federation
from fedpeft.strategies.testing import StaticGrid, ensure_task_identity
from fedpeft.train import batches, examples_seen

A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"
REF = {A: torch.zeros(4, 6), B: torch.zeros(5, 4), "head.weight": torch.zeros(3, 5)}


def _update(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in REF.items()}
    state.update({{"a": A, "b": B, "head": "head.weight"}[k]: v for k, v in changes.items()})
    return state


def test_a_sound_update_passes_and_a_factor_may_have_a_lower_rank() -> None:
    assert check_update(_update(), REF, set(), {}) is None
    assert check_update(_update(a=torch.ones(2, 6), b=torch.ones(5, 2)), REF, set(), {}) is None
    wide = {k: v.double() for k, v in REF.items()}  # a server optimiser sent float64
    assert check_update(wide, REF, set(), wide) is None


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({k: v for k, v in REF.items() if k != B}, "missing tensors"),
        ({**REF, "m.extra": torch.zeros(1)}, "unexpected tensors"),
        (_update(a=torch.zeros(4, 6, dtype=torch.float64)), "is torch.float64, expected"),
        (_update(a=torch.zeros(8, 6)), "has shape (8, 6), expected (4, 6)"),  # rank above r_max
        (_update(a=torch.zeros(4, 7)), "has shape (4, 7)"),
        (_update(b=torch.zeros(6, 4)), "has shape (6, 4)"),
        (_update(head=torch.zeros(3, 4)), "has shape (3, 4)"),
        (_update(head=torch.tensor([[math.inf] * 5] * 3)), "non-finite"),
        (_update(b=torch.full((5, 4), math.nan)), "non-finite"),
    ],
)
def test_an_unsound_update_is_refused_with_its_reason(update, reason) -> None:
    assert reason in (check_update(update, REF, set(), {}) or "")


def test_only_the_factors_a_client_was_told_to_send_are_expected() -> None:
    only_b = {B: torch.zeros(5, 4)}
    assert check_update(only_b, REF, {"lora_B"}, {}) is None
    assert "unexpected tensors" in (check_update(_update(), REF, {"lora_B"}, {}) or "")


def test_the_norm_bound_is_on_the_change_from_what_the_client_was_sent() -> None:
    sent = {k: torch.full_like(v, 2.0) for k, v in REF.items()}
    update = {k: v.clone() for k, v in sent.items()}
    update["head.weight"][0, :2] += torch.tensor([3.0, 4.0])  # the change has norm 5
    assert check_update(update, REF, set(), sent, max_norm=5.0001) is None
    reason = check_update(update, REF, set(), sent, max_norm=4.999)
    assert reason is not None and "update norm 5 exceeds" in reason


def test_fault_draws_are_reproducible_and_have_their_rate() -> None:
    draws = [strikes(3, r, p, "nan", 0.2) for r in range(100) for p in range(100)]
    assert abs(sum(draws) / len(draws) - 0.2) < 0.02
    assert draws == [strikes(3, r, p, "nan", 0.2) for r in range(100) for p in range(100)]
    assert not any(strikes(3, r, 0, "nan", 0.0) for r in range(100))
    assert all(strikes(3, r, 0, "nan", 1.0) for r in range(100))
    with pytest.raises(ScenarioError, match="faults.nan_rate"):
        load_scenario("smoke", ["faults.nan_rate=1.5"])
    with pytest.raises(ScenarioError, match="federation.min_fit_clients"):
        load_scenario("smoke", ["federation.min_fit_clients=3"])


def test_a_slow_client_sleeps_before_it_trains(tmp_path: Path) -> None:
    scenario = load_scenario(
        "smoke", ["faults.slow_rate=1.0", "faults.slow_seconds=0.4", "federation.rounds=1"]
    )
    ensure_task_identity()  # Flower's messages read the running app's identity
    config = ConfigRecord({records.SCENARIO: scenario.to_json(), records.SERVER_ROUND: 1})
    msg = Message(
        RecordDict({records.CONFIG: config}), dst_node_id=1, message_type=MessageType.TRAIN
    )
    context = Context(
        run_id=1,
        node_id=1,
        node_config={records.NODE_PARTITION_ID: 0},
        state=RecordDict(),
        run_config={},
    )
    started = time.perf_counter()
    reply = fault_mod(msg, context, lambda m, c: Message(RecordDict(), reply_to=m))
    assert time.perf_counter() - started >= 0.4 and not reply.has_error()


def _run(tmp_path: Path, *sets: str) -> tuple[dict, list[dict]]:
    scenario = load_scenario(
        "smoke",
        ["data.num_clients=5", "federation.clients_per_round=5", "federation.rounds=3", *sets],
    )
    out = tmp_path / "out"
    summary = run_federation(InProcessGrid(client_app, 5), scenario, out, "in-process")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def test_failing_clients_are_counted_with_reasons_and_never_reach_the_aggregate(tmp_path) -> None:
    sets = ["faults.drop_rate=0.3", "faults.crash_rate=0.1", "faults.nan_rate=0.3"]
    summary, rows = _run(tmp_path, *sets)
    scenario = load_scenario(
        "smoke",
        ["data.num_clients=5", "federation.clients_per_round=5", "federation.rounds=3", *sets],
    )
    assert summary["rounds_completed"] == 3
    for row in rows:
        hits = [faults_of(scenario, row["round"], p) for p in range(5)]
        lost = sum("drop" in h for h in hits)
        crashed = sum("crash" in h and "drop" not in h for h in hits)
        poisoned = sum("nan" in h and not {"drop", "crash"} & h for h in hits)
        assert row["clients_sampled"] == 5
        assert row["clients_failed"] == lost + crashed + poisoned == len(row["failures"])
        assert row["updates_rejected"] == poisoned == len(row["rejections"])
        assert sum("instruction lost" in f for f in row["failures"]) == lost
        assert sum("injected crash" in f for f in row["failures"]) == crashed
        assert all("holds non-finite values" in r for r in row["rejections"])
        assert len(row["client_metrics"]) == 5 - row["clients_failed"]
    assert sum(r["updates_rejected"] for r in rows) > 0 and sum(r["clients_failed"] for r in rows)
    adapter = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in adapter.values())


def test_a_round_with_too_few_valid_replies_keeps_the_global_adapter(tmp_path) -> None:
    summary, rows = _run(tmp_path, "faults.nan_rate=1.0", "federation.min_fit_clients=1")
    assert all(r["aggregated"] is False and r["updates_rejected"] == 5 for r in rows)
    assert len({r["eval_loss"] for r in rows} | {summary["initial"]["eval_loss"]}) == 1
    _, rows = _run(tmp_path, "federation.max_update_norm=1e-9")
    assert all(r["updates_rejected"] == 5 and r["aggregated"] is False for r in rows)
    assert all("exceeds federation.max_update_norm" in r["rejections"][0] for r in rows)


def test_a_poisoner_sends_its_change_flipped_and_scaled(tmp_path) -> None:
    scenario = load_scenario(
        "smoke", ['faults.poison="sign_flip"', "faults.poison_scale=3", "faults.poison_clients=[1]"]
    )
    ensure_task_identity()
    sent = {"w": torch.ones(2, 2), "v": torch.zeros(3)}
    config = ConfigRecord({records.SCENARIO: scenario.to_json(), records.SERVER_ROUND: 1})
    msg = Message(
        RecordDict({records.CONFIG: config, records.ARRAYS: state_to_arrayrecord(sent)}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    trained = {"w": torch.full((2, 2), 1.5), "v": torch.tensor([0.0, 1.0, -2.0])}

    def handler(m, c):
        return Message(RecordDict({records.ARRAYS: state_to_arrayrecord(trained)}), reply_to=m)

    def context(pid):
        return Context(
            run_id=1,
            node_id=1,
            node_config={records.NODE_PARTITION_ID: pid},
            state=RecordDict(),
            run_config={},
        )

    def reply_of(pid):
        return arrayrecord_to_state(fault_mod(msg, context(pid), handler).content["arrays"])

    out = reply_of(1)
    assert torch.equal(out["w"], torch.full((2, 2), 1.0 - 3 * 0.5))  # sent - 3 x change
    assert torch.equal(out["v"], torch.tensor([0.0, -3.0, 6.0]))
    honest = arrayrecord_to_state(
        fault_mod(msg, context(0), handler).content.array_records["arrays"]
    )
    assert all(torch.equal(honest[k], trained[k]) for k in trained)


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg"])
def test_robust_rules_aggregate_adapters_and_ignore_one_poisoner(name, tmp_path) -> None:
    """Three clients, one sending -50x its change: the robust rule stays near the honest."""
    base = [
        "data.num_clients=3",
        "federation.clients_per_round=3",
        "federation.rounds=1",
        f'strategy.name="{name}"',
        "strategy.trim_beta=0.34",
    ]
    poison = ['faults.poison="sign_flip"', "faults.poison_scale=50", "faults.poison_clients=[2]"]
    moved = {}
    for label, sets in {
        "robust": base + poison,
        "plain": base,
        "fedavg": [*base[:-2], *poison],
    }.items():
        scenario = load_scenario("smoke", sets)
        out = tmp_path / label
        run_federation(InProcessGrid(client_app, 3), scenario, out, "in-process")
        moved[label] = load_file(out / "adapter" / "adapter_model.safetensors")
    distance = {
        k: math.sqrt(sum(float((moved[k][n] - moved["plain"][n]).square().sum()) for n in moved[k]))
        for k in ("robust", "fedavg")
    }
    assert distance["robust"] < distance["fedavg"] / 5, distance


def test_norm_clipping_bounds_each_update_before_any_strategy(tmp_path, moved_from_initial):
    sets = ["federation.clip_update_norm=0.01", "federation.rounds=1", "train.lr=0.05"]
    _, rows = _run(tmp_path, *sets)
    assert rows[0]["clients_failed"] == 0
    scenario = load_scenario(
        "smoke", ["data.num_clients=5", "federation.clients_per_round=5", *sets]
    )
    assert 0 < moved_from_initial(scenario, tmp_path / "out") <= 0.01 * (1 + 1e-4)


def test_a_reply_to_no_instruction_is_counted_rejected_and_left_out() -> None:
    from fedpeft.strategies.testing import train_reply

    good = {k: v.clone() for k, v in REF.items()}

    class Unsolicited(StaticGrid):  # answers node 1, and node 9 replies unasked
        def send_and_receive(self, messages, *, timeout=None):
            return [train_reply(good, 4, node_id=1), train_reply(good, 4, node_id=9)]

    ensure_task_identity()
    counting = CountingGrid(Unsolicited([1]))
    grid = ValidatingGrid(counting, counting, REF, load_scenario("smoke"))
    instruction = Message(
        RecordDict({records.ARRAYS: state_to_arrayrecord(REF)}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    replies = list(grid.send_and_receive([instruction]))
    assert [r.metadata.src_node_id for r in replies] == [1] and not replies[0].has_error()
    assert counting.current.rejections == [
        "node 9: update rejected: a reply to no instruction of this round"
    ]


# --- example counts ------------------------------------------------------------------------
NOT_COUNTS = [math.nan, math.inf, -math.inf, -3, 0, 0.0, 2.5, True, [4]]


@pytest.mark.parametrize("count", NOT_COUNTS, ids=repr)
def test_a_count_that_is_not_a_finite_positive_integer_is_refused(count) -> None:
    assert check_examples(count) == f"num-examples={count!r} is not a finite positive integer"


def test_a_whole_count_within_the_limit_passes_and_one_above_it_is_refused() -> None:
    assert check_examples(16) is None and check_examples(16.0, 16, "why") is None
    assert check_examples(None) == "no num-examples in the reply's metrics"
    assert check_examples(17, 16, "why") == "num-examples=17 exceeds 16, why"
    assert check_examples(1.6e13, 16, "why") == "num-examples=1.6e+13 exceeds 16, why"


@pytest.mark.parametrize("size", [1, 7, 8, 9, 20, 79, 80, 81, 1000])
def test_examples_seen_is_what_the_batches_yield(size: int) -> None:
    data = datasets.Dataset.from_dict({"x": list(range(size))})
    stream = batches(data, 8, seed=0)
    assert examples_seen(size, 10, 8) == sum(len(next(stream)["x"]) for _ in range(10))


def test_the_bound_is_steps_x_batch_or_max_examples_or_what_the_partition_gives() -> None:
    scenario = load_scenario("smoke", ["train.local_steps=10", "train.batch_size=8"])
    cap = "train.local_steps x train.batch_size (10 x 8; federation.max_examples unset)"
    assert ExampleBound(scenario).of(0) == (80, cap)
    capped = load_scenario("smoke", ["federation.max_examples=500"])
    assert ExampleBound(capped).of(3) == (500, "federation.max_examples=500")
    sized = ExampleBound(scenario, {0: 20, 1: 1000}.__getitem__)
    # 20 examples are 3 batches a pass (8, 8, 4): 3 passes and 1 more batch in 10 steps
    assert sized.of(0) == (
        68,
        "what partition 0's 20 training examples give in train.local_steps=10 batches of 8",
    )
    assert sized.of(1) == (80, cap) and sized.of(None) == (80, cap)


def test_accumulated_batches_raise_the_bound_with_them() -> None:
    sets = ["train.local_steps=5", "train.grad_accum_steps=2", "train.batch_size=8"]
    scenario = load_scenario("smoke", sets)
    cap = (
        "train.local_steps x train.grad_accum_steps x train.batch_size (5 x 2 x 8; "
        "federation.max_examples unset)"
    )
    assert ExampleBound(scenario).of(0) == (80, cap)
    sized = ExampleBound(scenario, {0: 20}.__getitem__)
    assert sized.of(0) == (
        68,
        "what partition 0's 20 training examples give in "
        "train.local_steps x train.grad_accum_steps=5 x 2 batches of 8",
    )


def test_simulation_sizes_the_partitions_and_a_deployment_uses_the_cap() -> None:
    scenario = load_scenario("smoke", ["train.local_steps=100000", "data.client_holdout=0.2"])
    size = client_train_size(scenario.data, scenario.seed, 1)
    assert size == len(client_split(scenario.data, scenario.seed, 1)[0])
    limit, why = example_bound(scenario, "in-process").of(1)
    assert limit == examples_seen(size, 100000, 8) < 800000 and "partition 1's" in why
    assert example_bound(scenario, "deployment").of(1)[0] == 800000


def _counted_reply(count: object, node: int) -> Message:
    metrics = MetricRecord({records.TRAIN_LOSS: 0.5})
    if count is not None:
        metrics[records.NUM_EXAMPLES] = count  # type: ignore[assignment]
    content = RecordDict({records.ARRAYS: state_to_arrayrecord(REF), records.METRICS: metrics})
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content, reply_to=instruction)


def _validate(counts: dict[int, object], *sets: str, bound: ExampleBound | None = None):
    """One training exchange with nodes answering ``counts``, through the validating layer."""

    class Replying(StaticGrid):
        def send_and_receive(self, messages, *, timeout=None):
            return [_counted_reply(c, n) for n, c in counts.items()]

    ensure_task_identity()
    counting = CountingGrid(Replying(list(counts)))
    counting.partitions.update({n: n - 1 for n in counts})
    scenario = load_scenario("smoke", list(sets))
    grid = ValidatingGrid(counting, counting, REF, scenario, bound)
    config = ConfigRecord({records.SCENARIO: scenario.to_json(), records.SERVER_ROUND: 1})
    instructions = [
        Message(
            RecordDict({records.CONFIG: config, records.ARRAYS: state_to_arrayrecord(REF)}),
            dst_node_id=n,
            message_type=MessageType.TRAIN,
        )
        for n in counts
    ]
    return list(grid.send_and_receive(instructions)), counting.take()


SMOKE_CAP = "train.local_steps x train.batch_size (2 x 8; federation.max_examples unset)"


@pytest.mark.parametrize(
    ("count", "reason"),
    [
        *(
            (c, f"num-examples={c!r} is not a finite positive integer")
            for c in NOT_COUNTS
            if c is not True
        ),  # a MetricRecord holds no bool
        (None, "no num-examples in the reply's metrics"),
        (17, f"num-examples=17 exceeds 16, {SMOKE_CAP}"),
        (10**12, f"num-examples=1e+12 exceeds 16, {SMOKE_CAP}"),
    ],
)
def test_the_validating_grid_rejects_a_bad_count_and_keeps_it_out_of_the_tally(
    count, reason
) -> None:
    replies, tally = _validate({1: 16, 2: count})
    good, bad = replies
    assert not good.has_error() and bad.error.reason == f"update rejected: {reason}"
    assert tally.rejections == [f"node 2: update rejected: {reason}"]
    assert tally.clients_failed == 1 and tally.train_loss == 0.5
    assert [c[records.NUM_EXAMPLES] for c in tally.clients] == [16]


def test_a_sound_count_leaves_the_reply_untouched() -> None:
    (reply,), tally = _validate({1: 16})
    assert not reply.has_error() and tally.rejections == []
    assert reply.content.metric_records[records.METRICS][records.NUM_EXAMPLES] == 16
    assert all(
        torch.equal(v, REF[k])
        for k, v in arrayrecord_to_state(reply.content[records.ARRAYS]).items()
    )


def test_the_partition_and_max_examples_bounds_reject_what_exceeds_them() -> None:
    scenario = load_scenario("smoke", ["train.local_steps=10"])
    sized = ExampleBound(scenario, {0: 20, 1: 1000}.__getitem__)  # node 1: partition 0
    replies, tally = _validate({1: 69, 2: 80}, "train.local_steps=10", bound=sized)
    assert [r.has_error() for r in replies] == [True, False]
    assert tally.rejections == [
        "node 1: update rejected: num-examples=69 exceeds 68, what "
        "partition 0's 20 training examples give in "
        "train.local_steps=10 batches of 8"
    ]
    replies, tally = _validate({1: 500, 2: 501}, "federation.max_examples=500")
    assert [r.has_error() for r in replies] == [False, True]
    assert tally.rejections == [
        "node 2: update rejected: num-examples=501 exceeds 500, federation.max_examples=500"
    ]


def test_an_inflating_client_claims_scale_times_its_count_and_keeps_its_tensors() -> None:
    poison = [
        'faults.poison="inflate_examples"',
        "faults.poison_scale=1000",
        "faults.poison_clients=[1]",
    ]
    scenario = load_scenario("smoke", poison)
    ensure_task_identity()
    config = ConfigRecord({records.SCENARIO: scenario.to_json(), records.SERVER_ROUND: 1})
    msg = Message(
        RecordDict({records.CONFIG: config, records.ARRAYS: state_to_arrayrecord(REF)}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    trained = _update(a=torch.ones(4, 6))

    def handler(m, c):
        metrics = MetricRecord({records.NUM_EXAMPLES: 16, records.TRAIN_LOSS: 0.5})
        return Message(
            RecordDict({records.ARRAYS: state_to_arrayrecord(trained), records.METRICS: metrics}),
            reply_to=m,
        )

    def reply_of(pid: int) -> tuple[object, dict[str, torch.Tensor]]:
        context = Context(
            run_id=1,
            node_id=1,
            node_config={records.NODE_PARTITION_ID: pid},
            state=RecordDict(),
            run_config={},
        )
        content = fault_mod(msg, context, handler).content
        count = content.metric_records[records.METRICS][records.NUM_EXAMPLES]
        return count, arrayrecord_to_state(content.array_records[records.ARRAYS])

    (lied, lied_state), (honest, honest_state) = reply_of(1), reply_of(0)
    assert (lied, type(lied), honest) == (16000, int, 16)
    assert all(torch.equal(lied_state[k], trained[k]) for k in trained)
    assert all(torch.equal(honest_state[k], trained[k]) for k in trained)
    with pytest.raises(ScenarioError, match="'inflate_examples'"):
        load_scenario("smoke", ['faults.poison="inflate"'])
    with pytest.raises(ScenarioError, match="federation.max_examples"):
        load_scenario("smoke", ["federation.max_examples=-1"])


def test_inflated_counts_are_rejected_in_a_federation_with_their_reason(tmp_path) -> None:
    """Partitions 0 and 1 claim 1000x their 16 examples in every round: both refused."""
    poison = [
        'faults.poison="inflate_examples"',
        "faults.poison_scale=1000",
        "faults.poison_clients=[0,1]",
        "federation.rounds=2",
    ]
    summary, rows = _run(tmp_path, *poison)
    assert summary["rounds_completed"] == 2
    for row in rows:
        assert row["updates_rejected"] == 2 and row["aggregated"] is True
        assert sorted(c[records.PARTITION_ID] for c in row["client_metrics"]) == [2, 3, 4]
        assert all(
            r.endswith(f"update rejected: num-examples=16000 exceeds 16, {SMOKE_CAP}")
            for r in row["rejections"]
        )
        assert math.isfinite(row["train_loss"])


def test_under_epochs_the_bound_is_what_the_partition_gives_and_a_deployment_needs_a_cap() -> None:
    from fedpeft.config import ScenarioError
    from fedpeft.server.run import example_bound

    scenario = load_scenario("smoke", ["train.epochs=2", "train.batch_size=8"])
    assert scenario.train.steps_for(20) == 6 and scenario.train.batches_per_round is None
    sized = ExampleBound(scenario, {0: 20}.__getitem__)
    assert sized.of(0) == (
        40,
        "what partition 0's 20 training examples give in train.epochs=2 passes: 6 batches of 8",
    )
    assert ExampleBound(scenario).of(3)[0] == 0  # nothing sizes it: refused, not trusted
    with pytest.raises(ScenarioError, match="train.epochs in a deployment needs federation"):
        example_bound(scenario, "deployment")
    capped = load_scenario("smoke", ["train.epochs=2", "federation.max_examples=64"])
    assert example_bound(capped, "deployment").of(None) == (64, "federation.max_examples=64")
    with pytest.raises(ScenarioError, match="'federation.max_examples'"):
        load_scenario("smoke", ["train.epochs=1", "privacy.secure_aggregation=true"])
