"""Compression inside real federations: the ClientApp's mod, the server's CodecGrid, the books.

Every federation here runs the real ServerApp code, strategy and ClientApp (with its
compression mod) through the in-process grid; only the transport is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file

from fedpeft import records
from fedpeft.adapter_files import load_adapter
from fedpeft.clients.app import app as client_app
from fedpeft.clients.app import describe_node, evaluate_personal, train
from fedpeft.clients.compression import HELD, RESIDUAL, compression_mod
from fedpeft.codecs import (
    arrayrecord_to_state,
    blob_of,
    coded_record,
    payload_nbytes,
    state_to_arrayrecord,
)
from fedpeft.codecs.compression import CodecError, Pipeline, decode_update, encode_update
from fedpeft.config import ScenarioError, load_scenario
from fedpeft.server.compression import CodecGrid
from fedpeft.server.grid import CountingGrid
from fedpeft.server.inprocess import InProcessGrid
from fedpeft.server.outputs import ADAPTER_DIR
from fedpeft.server.run import run_federation
from fedpeft.strategies import STRATEGIES, build_strategy
from fedpeft.tools.compare import parse_vary, plan_cells, validate_cells

SMALL = ["train.local_steps=2", "data.eval_examples=32"]
COMPRESSED = [
    'compression.uplink=["topk","int8"]',
    "compression.error_feedback=true",
    'compression.downlink=["int8"]',
    "compression.downlink_delta=true",
]


def _run(tmp: Path, *sets: str, app: ClientApp = client_app) -> dict:
    scenario = load_scenario("smoke", [*SMALL, *sets])
    grid = InProcessGrid(app, scenario.data.num_clients)
    return run_federation(grid, scenario, tmp, "in-process")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    model = load_adapter(out / ADAPTER_DIR)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lossless_coding_changes_nothing_but_the_bytes(tmp_path) -> None:
    """Downlink deltas (XOR of the float bits, deflated) rebuild every global adapter
    exactly: the run ends with the bit-identical adapter of an uncoded run."""
    plain = _run(tmp_path / "plain", "federation.rounds=3")
    coded = _run(tmp_path / "coded", "federation.rounds=3", "compression.downlink_delta=true")
    a, b = _adapter(tmp_path / "plain"), _adapter(tmp_path / "coded")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert plain["final"]["eval_loss"] == coded["final"]["eval_loss"]
    # rounds 2 and 3 send changes to copies the clients hold: fewer bytes than whole adapters
    later = [r["bytes_down"] for r in _rows(tmp_path / "coded")[1:]]
    plain_later = [r["bytes_down"] for r in _rows(tmp_path / "plain")[1:]]
    assert all(c < p for c, p in zip(later, plain_later, strict=True))
    assert coded["compression"]["ratio_down_vs_uncompressed"] > 1


def test_uplink_bytes_are_the_coded_payloads_and_the_ratio_is_against_the_same_traffic_uncoded(
    tmp_path,
) -> None:
    """Per-tensor top-k, so that every decoded tensor differs from every other: Flower
    sends identical arrays once, and a tiny model's update under a global threshold can
    leave whole tensors unchanged (then uncoded size is counted deduplicated, smaller)."""
    coding = ['compression.uplink=["topk","int8"]', 'compression.topk_scope="tensor"']
    plain = _run(tmp_path / "plain")
    coded = _run(tmp_path / "coded", *coding)
    plain_rows, coded_rows = _rows(tmp_path / "plain"), _rows(tmp_path / "coded")
    # what the coded replies would have weighed uncoded = what the uncoded run really sent
    assert [r["bytes_up_uncompressed"] for r in coded_rows] == [r["bytes_up"] for r in plain_rows]
    # the downlink is uncoded; its messages differ only by the scenario text they carry
    longer = len(load_scenario("smoke", [*SMALL, *coding]).to_json())
    extra = longer - len(load_scenario("smoke", SMALL).to_json())
    assert [r["bytes_down"] for r in coded_rows] == [
        r["bytes_down"] + extra * r["clients_sampled"] for r in plain_rows
    ]
    ratio = coded["compression"]["ratio_up_vs_uncompressed"]
    assert ratio == plain["bytes_up_total"] / coded["bytes_up_total"] and ratio > 3
    full = coded["full_model_bytes"] * sum(r["clients_sampled"] for r in coded_rows)
    assert coded["compression"]["ratio_up_vs_full"] == full / coded["bytes_up_total"]


def test_client_and_server_hold_bit_identical_copies_after_lossy_downlink(tmp_path) -> None:
    _run(
        tmp_path,
        *COMPRESSED,
        "federation.rounds=3",
        "data.num_clients=3",
        "federation.clients_per_round=2",
    )
    server = tmp_path / "server_state" / "copies"
    clients = tmp_path / "client_state" / "codec"
    checked = 0
    for path in clients.glob("*.safetensors"):
        mine = {k.removeprefix(HELD): v for k, v in load_file(str(path)).items() if HELD in k}
        theirs = load_file(str(server / f"partition-{path.stem}.safetensors"))
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
        checked += 1
    assert checked >= 2


def _client_message(state: dict[str, torch.Tensor], scenario_json: str, server_round: int):
    config = ConfigRecord(
        {
            records.SCENARIO: scenario_json,
            records.SERVER_ROUND: server_round,
            records.STATE_DIR: "",
        }
    )
    content = RecordDict({records.ARRAYS: state_to_arrayrecord(state), records.CONFIG: config})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_error_feedback_books_balance_across_rounds_the_client_skips(tmp_path) -> None:
    """Through the real mod: what the server decodes plus the residual on the client's
    disk equals the sum of the client's raw updates, with a round the client sat out."""
    scenario = load_scenario(
        "smoke", ['compression.uplink=["topk","int4"]', "compression.error_feedback=true"]
    )
    g = torch.Generator().manual_seed(0)
    shapes = {"m.lora_A.weight": (4, 32), "m.lora_B.weight": (32, 4), "head.bias": (5,)}
    context = Context(
        run_id=7,
        node_id=1,
        state=RecordDict(),
        run_config={},
        node_config={records.NODE_PARTITION_ID: 0, records.NODE_STATE_DIR: str(tmp_path)},
    )
    raw_sum = {k: torch.zeros(s) for k, s in shapes.items()}
    decoded_sum = {k: torch.zeros(s) for k, s in shapes.items()}
    for server_round in (1, 2, 4, 5):  # round 3: not sampled
        received = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        update = {k: torch.randn(s, generator=g) for k, s in shapes.items()}

        def handler(msg: Message, ctx: Context, update=update) -> Message:
            got = arrayrecord_to_state(msg.content.array_records[records.ARRAYS])
            out = {k: got[k] + update[k] for k in got}
            reply = RecordDict({records.ARRAYS: state_to_arrayrecord(out)})
            return Message(reply, reply_to=msg)

        msg = _client_message(received, scenario.to_json(), server_round)
        reply = compression_mod(msg, context, handler)
        sent, _ = decode_update(blob_of(reply.content.array_records[records.COMPRESSED]), received)
        for k in shapes:
            raw_sum[k] += update[k]
            decoded_sum[k] += sent[k] - received[k]
    saved = load_file(str(tmp_path / "codec" / "0.safetensors"))
    for k in shapes:
        residual = saved[RESIDUAL + k]
        assert residual.abs().sum() > 0
        torch.testing.assert_close(decoded_sum[k] + residual, raw_sum[k], rtol=0, atol=1e-5)


def test_a_node_that_lost_its_copy_gets_the_whole_adapter_next_time(tmp_path) -> None:
    scenario = load_scenario(
        "smoke", [*SMALL, "compression.downlink_delta=true", 'compression.downlink=["int8"]']
    )
    counting = CountingGrid(InProcessGrid(client_app, 2))
    grid = CodecGrid(counting, scenario.compression, tmp_path / "copies", seed=0)
    strategy = build_strategy(scenario)
    initial = state_to_arrayrecord(_initial_state(scenario))
    state_dir = tmp_path / "clients"
    config = ConfigRecord({records.SCENARIO: scenario.to_json(), records.STATE_DIR: str(state_dir)})

    def round_of(server_round: int) -> list[Message]:
        msgs = strategy.configure_train(server_round, initial, ConfigRecord(dict(config)), grid)
        return list(grid.send_and_receive(msgs))

    assert not any(r.has_error() for r in round_of(1))
    (state_dir / "codec" / "0.safetensors").unlink()  # node 0 forgets its copy
    second = round_of(2)
    failed = [r for r in second if r.has_error()]
    assert len(failed) == 1 and "does not hold" in failed[0].error.reason
    assert not (tmp_path / "copies" / "node-101.safetensors").exists()  # node 101: partition 0
    third = round_of(3)  # node 0 gets the whole adapter again and answers
    assert not any(r.has_error() for r in third)


def _initial_state(scenario) -> dict[str, torch.Tensor]:
    from fedpeft.data import load_task_data
    from fedpeft.models import initial_adapter_state

    num_labels = load_task_data(scenario.data).num_labels
    return initial_adapter_state(scenario.model, scenario.peft, num_labels, scenario.seed)


def _corrupt_uplink(msg: Message, context: Context, call_next) -> Message:
    """Outermost mod of a hostile client: flips bytes of its coded reply."""
    reply = call_next(msg, context)
    if records.COMPRESSED in reply.content.array_records:
        blob = blob_of(reply.content.array_records[records.COMPRESSED]).copy()
        blob[len(blob) // 2 :] ^= 0x5A
        reply.content[records.COMPRESSED] = coded_record(blob)
    return reply


def test_an_undecodable_update_is_rejected_and_the_run_goes_on(tmp_path) -> None:
    hostile = ClientApp(mods=[_corrupt_uplink, compression_mod])
    hostile.train()(train)
    hostile.query()(describe_node)
    hostile.evaluate()(evaluate_personal)
    summary = _run(tmp_path, 'compression.uplink=["int8"]', app=hostile)
    rows = _rows(tmp_path)
    assert summary["rounds_completed"] == 2
    assert all(r["clients_failed"] == r["clients_sampled"] for r in rows)
    assert all("undecodable compressed update" in f for r in rows for f in r["failures"])
    # nothing of a rejected update is reported as if it had been aggregated
    assert all(r["train_loss"] is None and r["client_metrics"] == [] for r in rows)
    assert all(r["bytes_up"] > 0 and r["bytes_up_uncompressed"] == r["bytes_up"] for r in rows)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_trains_on_decoded_updates(name: str, tmp_path) -> None:
    spec = STRATEGIES[name]
    ranks = ["peft.client_ranks=[2,4]"] if spec.heterogeneous_ranks else []
    ef = ["compression.error_feedback=false"] if name in ("flora", "flexlora") else []
    summary = _run(tmp_path, f'strategy.name="{name}"', *ranks, *COMPRESSED, *ef)
    rows = _rows(tmp_path)
    assert summary["rounds_completed"] == 2 and all(r["clients_failed"] == 0 for r in rows)
    assert summary["compression"]["ratio_up_vs_uncompressed"] > 1
    adapter = _adapter(tmp_path)
    assert all(torch.isfinite(v).all() for v in adapter.values())


def test_flora_refuses_error_feedback_in_one_line() -> None:
    scenario = load_scenario("smoke", ['strategy.name="flora"', *COMPRESSED])
    with pytest.raises(ScenarioError, match="restarts LoRA every round") as err:
        build_strategy(scenario)
    assert "\n" not in str(err.value)


def test_compare_varies_the_uplink_stages() -> None:
    vary = parse_vary(['compression.uplink=[],["int8"],["topk","int8"]'])
    assert vary == {"compression.uplink": ["[]", '["int8"]', '["topk","int8"]']}
    cells = plan_cells(["fedavg"], vary, [0], [], Path("/nonexistent"))
    validate_cells("quickstart", cells)
    assert [c.error for c in cells] == [None, None, None]
    bad = plan_cells(
        ["fedavg"], parse_vary(['compression.uplink=["zip"]']), [0], [], Path("/nonexistent")
    )
    validate_cells("quickstart", bad)
    assert "unknown stage 'zip'" in (bad[0].error or "")


def test_a_coded_payload_is_one_array(tmp_path) -> None:
    state = {f"k{i}": torch.randn(8, 16) for i in range(26)}
    reference = {k: torch.zeros_like(v) for k, v in state.items()}  # a change: top-k applies
    coded = encode_update(state, Pipeline(("topk", "int8")), reference)
    record = coded_record(coded.blob)
    assert len(record) == 1
    assert payload_nbytes(record) < payload_nbytes(state_to_arrayrecord(state)) / 10
    with pytest.raises(CodecError):
        decode_update(coded.blob[:-8], reference)
    assert isinstance(record, ArrayRecord)


STEP = 0.01


def _step_train(msg: Message, context: Context) -> Message:
    """A client whose training adds STEP to every tensor it received."""
    got = arrayrecord_to_state(msg.content.array_records[records.ARRAYS])
    reply = RecordDict(
        {records.ARRAYS: state_to_arrayrecord({k: v + STEP for k, v in got.items()})}
    )
    return Message(reply, reply_to=msg)


@pytest.mark.parametrize("uplink", [[], ["int8"]], ids=["plain-uplink", "int8-uplink"])
def test_downlink_error_stays_out_of_what_the_server_aggregates(uplink, tmp_path) -> None:
    """Clients train from a lossy copy (top-k + int8 downlink deltas); the server applies
    their change to its exact adapter, so the replies it hands the strategy are
    exact + step (up to the uplink's own error), not the lossy copy + step."""
    sets = [
        'compression.downlink=["topk","int8"]',
        "compression.downlink_delta=true",
        f"compression.uplink={json.dumps(uplink)}",
    ]
    scenario = load_scenario("smoke", sets)
    stepper = ClientApp(mods=[compression_mod])
    stepper.train()(_step_train)
    grid = CodecGrid(
        CountingGrid(InProcessGrid(stepper, 2)), scenario.compression, tmp_path / "copies", seed=0
    )
    config = {records.SCENARIO: scenario.to_json(), records.STATE_DIR: str(tmp_path / "c")}
    g = torch.Generator().manual_seed(0)
    exact = {"m.lora_A.weight": torch.randn(4, 64, generator=g), "head.bias": torch.randn(6)}
    for server_round in (1, 2, 3):
        exact = {k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in exact.items()}
        round_config = ConfigRecord({**config, records.SERVER_ROUND: server_round})
        content = {records.ARRAYS: state_to_arrayrecord(exact), records.CONFIG: round_config}
        messages = [
            Message(RecordDict(dict(content)), dst_node_id=node, message_type=MessageType.TRAIN)
            for node in (101, 102)
        ]
        for reply in grid.send_and_receive(messages):
            got = arrayrecord_to_state(reply.content.array_records[records.ARRAYS])
            for k, v in exact.items():
                tolerance = 1e-6 if not uplink else STEP / 127 / 2 * 1.001 + 1e-6
                assert (got[k] - (v + STEP)).abs().max() <= tolerance
    # ... while the clients' copies really were lossy (top-k deltas from round 2 on)
    held = load_file(str(tmp_path / "copies" / "node-101.safetensors"))
    assert not torch.equal(held["m.lora_A.weight"], exact["m.lora_A.weight"])


def test_flexlora_refuses_error_feedback_in_one_line() -> None:
    scenario = load_scenario("smoke", ['strategy.name="flexlora"', *COMPRESSED])
    with pytest.raises(ScenarioError, match="new basis") as err:
        build_strategy(scenario)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("sets", "tracked"),
    [
        ([], True),
        (["compression.topk_score='magnitude'"], False),
        (['privacy.dp="local"', "privacy.noise_multiplier=0.1"], False),  # see scores_by_gradient
    ],
    ids=["loss-score", "magnitude-score", "local-dp"],
)
def test_the_mean_gradient_reaches_the_codec_and_never_the_wire(sets, tracked, tmp_path) -> None:
    """The training handler attaches its mean gradient (one tensor per sent tensor) when
    top-k ranks by it; the real ClientApp's reply carries only the coded update."""
    from fedpeft.strategies.testing import ensure_task_identity

    scenario = load_scenario("smoke", [*SMALL, 'compression.uplink=["topk","int8"]', *sets])
    ensure_task_identity()
    node = {records.NODE_PARTITION_ID: 0, records.NODE_NUM_PARTITIONS: 2}
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={}, node_config=node)
    msg = _client_message(_initial_state(scenario), scenario.to_json(), 1)
    bare = train(msg, context)  # the handler alone, without the mods
    if tracked:
        sent = arrayrecord_to_state(bare.content.array_records[records.ARRAYS])
        gradient = arrayrecord_to_state(bare.content.array_records[records.GRADIENT])
        assert {k: v.shape for k, v in gradient.items()} == {k: v.shape for k, v in sent.items()}
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in gradient.values())
    else:
        assert records.GRADIENT not in bare.content.array_records
    reply = client_app(_client_message(_initial_state(scenario), scenario.to_json(), 1), context)
    assert set(reply.content.array_records) == {records.COMPRESSED}
