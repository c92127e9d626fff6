"""Secure aggregation: SecAgg+ sums exactly what the clients sent (up to its quantization),
survives clients that drop after sharing keys, and shows the server no single update."""

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from safetensors.torch import load_file

from fedpeft import records
from fedpeft.clients.app import app as client_app
from fedpeft.clients.secagg import secagg_mod
from fedpeft.codecs import arrayrecord_to_state, message_state, state_to_arrayrecord
from fedpeft.config import ScenarioError, load_scenario
from fedpeft.server.grid import CountingGrid, DelegatingGrid
from fedpeft.server.inprocess import InProcessGrid
from fedpeft.server.run import run_federation
from fedpeft.server.secagg import QUANTIZATION_RANGE, SecAggGrid
from fedpeft.tools.cli import main

NODES = 5
SHAPES = {"m.lora_A.weight": (4, 16), "m.lora_B.weight": (16, 4), "head.bias": (6,)}


def change_of(partition: int) -> dict[str, torch.Tensor]:
    """Client ``partition``'s known update (change from what it received)."""
    g = torch.Generator().manual_seed(100 + partition)
    return {k: torch.randn(shape, generator=g) * 0.05 for k, shape in SHAPES.items()}


def examples_of(partition: int) -> int:
    return 8 * (partition + 1)  # unequal weights, all at most steps x batch (2 x 8 x 5)


def _train(msg: Message, context: Context) -> Message:
    partition = int(str(context.node_config[records.NODE_PARTITION_ID]))
    if partition in context.run_config.get("crash", []):  # type: ignore[operator]
        raise RuntimeError("client lost after sharing its keys")
    given = message_state(msg)
    sent = {k: given[k] + d for k, d in change_of(partition).items()}
    metrics = MetricRecord(
        {records.NUM_EXAMPLES: examples_of(partition), records.TRAIN_LOSS: float(partition)}
    )
    return Message(
        RecordDict({records.ARRAYS: state_to_arrayrecord(sent), records.METRICS: metrics}),
        reply_to=msg,
    )


class Spy(DelegatingGrid):
    """Notes what every training reply held when it reached the server."""

    def __init__(self, grid) -> None:  # type: ignore[no-untyped-def]
        super().__init__(grid)
        self.seen: list[dict[str, object]] = []

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if not r.has_error() and records.METRICS in r.content.metric_records:
                self.seen.append(
                    {
                        "tensors": sum(len(a) for a in r.content.array_records.values()),
                        "masked": RECORD_KEY_CONFIGS in r.content.config_records,
                    }
                )
        return replies


def secure_round(crash: list[int]) -> tuple[list[Message], Spy, CountingGrid]:
    """One SecAgg+ round of 5 clients with known updates; ``crash`` fail after sharing keys."""
    scenario = load_scenario("smoke", ["privacy.secure_aggregation=true", "train.local_steps=5"])
    app = ClientApp(mods=[secagg_mod])
    app.train()(_train)
    inner = InProcessGrid(app, NODES)
    for context in inner._contexts.values():
        context.run_config["crash"] = crash  # type: ignore[index]
    counting = CountingGrid(inner)
    counting.partitions = {101 + i: i for i in range(NODES)}
    spy = Spy(counting)
    grid = SecAggGrid(spy, counting, scenario)
    g = torch.Generator().manual_seed(7)
    global_state = {k: torch.randn(shape, generator=g) for k, shape in SHAPES.items()}
    config = ConfigRecord({records.SCENARIO: scenario.to_json(), records.SERVER_ROUND: 1})
    content = RecordDict(
        {records.ARRAYS: state_to_arrayrecord(global_state), records.CONFIG: config}
    )
    messages = [
        Message(content, dst_node_id=101 + i, message_type=MessageType.TRAIN) for i in range(NODES)
    ]
    return list(grid.send_and_receive(messages, timeout=60)), spy, counting


def expected_mean(partitions: list[int]) -> dict[str, torch.Tensor]:
    """The independent formula: sum n_i d_i / sum n_i, in float64."""
    total = sum(examples_of(p) for p in partitions)
    return {
        k: sum(examples_of(p) * change_of(p)[k].double() for p in partitions) / total
        for k in SHAPES
    }


@pytest.mark.parametrize("crash", [[], [2], [0, 3]], ids=["all", "one-drops", "two-drop"])
def test_the_sum_is_the_weighted_mean_of_the_survivors_updates(crash: list[int]) -> None:
    replies, _, counting = secure_round(crash)
    survivors = [p for p in range(NODES) if p not in crash]
    assert sorted(r.metadata.src_node_id - 101 for r in replies) == survivors
    mean = expected_mean(survivors)
    # each client's values, scaled by n_i / max_weight, are rounded stochastically to a
    # step of 2c/Q (c = secagg_clipping_range), so the mean is off by at most
    # k 2c / Q / sum(n_i / max_weight)
    max_weight = 5 * 8
    share = sum(examples_of(p) for p in survivors) / max_weight
    tolerance = len(survivors) * 2 * 8.0 / QUANTIZATION_RANGE / share * 1.01 + 1e-7
    first = None
    for reply in replies:
        got = arrayrecord_to_state(reply.content.array_records[records.ARRAYS])
        first = first or got
        for key in SHAPES:
            assert torch.equal(got[key], first[key])  # every survivor carries the same update
    g = torch.Generator().manual_seed(7)
    start = {k: torch.randn(shape, generator=g) for k, shape in SHAPES.items()}
    for key in SHAPES:
        error = (first[key].double() - start[key].double() - mean[key]).abs().max().item()
        assert error <= tolerance, (key, error, tolerance)
    assert counting.current.clients_sampled == NODES
    assert counting.current.clients_failed == len(crash)
    losses = sorted(loss for loss, _ in counting.current.losses)
    assert losses == [float(p) for p in survivors]  # metrics stay per client


def test_the_server_never_holds_a_single_update() -> None:
    _, spy, _ = secure_round([])
    assert spy.seen == [{"tensors": 0, "masked": True}] * NODES  # only masked integers came


def test_too_few_shares_fails_the_round_and_counts_every_client() -> None:
    # 4 of 5 drop after sharing keys: the one survivor's neighbours cannot rebuild secrets
    replies, _, counting = secure_round([0, 1, 2, 3])
    assert replies == []
    assert counting.current.clients_failed == NODES
    assert any("secure aggregation failed" in f for f in counting.current.failures)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (['strategy.name="flexlora"'], "weighted sum"),
        (['privacy.dp="central"'], "privacy.dp='central'"),
        (['compression.uplink=["int8"]'], "compression.uplink"),
        (["federation.clip_update_norm=1.0"], "federation.clip_update_norm"),
        (["federation.clients_per_round=1"], "federation.clients_per_round"),
    ],
)
def test_combinations_that_cannot_work_are_refused_in_one_line(sets, message) -> None:
    from fedpeft.strategies import build_strategy

    with pytest.raises(ScenarioError, match="secure_aggregation") as err:
        build_strategy(load_scenario("smoke", ["privacy.secure_aggregation=true", *sets]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_ffa_lora_federation_with_secagg_ends_where_plain_aggregation_does(tmp_path: Path) -> None:
    sets = ['strategy.name="ffa_lora"', "data.num_clients=4", "federation.clients_per_round=4"]
    runs = {}
    for name, extra in (("plain", []), ("secure", ["privacy.secure_aggregation=true"])):
        scenario = load_scenario("smoke", [*sets, *extra])
        summary = run_federation(
            InProcessGrid(client_app, 4), scenario, tmp_path / name, "in-process"
        )
        runs[name] = (summary, load_file(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    (plain, a), (secure, b) = runs["plain"], runs["secure"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert secure["privacy"]["secure_aggregation"] is True
    assert secure["bytes_up_total"] > plain["bytes_up_total"]  # masked integers, key shares


def test_secagg_runs_with_fedavg_on_engine_sized_node_ids_and_the_cli_refuses_flexlora(
    tmp_path: Path, capsys, quiet_env
) -> None:
    """Flower's engines give nodes random 64-bit ids (above 2**63 too); the masks use them."""
    out = tmp_path / "run"
    scenario = load_scenario("smoke", ["privacy.secure_aggregation=true"])
    ids = [14043475851371219612, 9123372036854775807]
    run_federation(InProcessGrid(client_app, 2, node_ids=ids), scenario, out, "in-process")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_sampled"] - r["clients_failed"] for r in rows] == [2, 2]
    capsys.readouterr()  # the run's own console lines
    refused = main(
        [
            "run",
            "smoke",
            "--set",
            "privacy.secure_aggregation=true",
            "--set",
            'strategy.name="flexlora"',
        ]
    )
    err = capsys.readouterr().err
    assert refused == 2
    assert err.count("\n") == 1 and "flexlora" in err
