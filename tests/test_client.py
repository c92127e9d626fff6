"""The ClientApp's train function, called directly with real Messages: what a client
trains, sends and keeps follows the server's instructions, and personal state persists."""

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedpeft import records
from fedpeft.adapters import factor_of, get_adapter_state
from fedpeft.clients.app import _prepare
from fedpeft.clients.app import train as client_train
from fedpeft.clients.instructions import Instructions
from fedpeft.codecs import arrayrecord_to_state, state_to_arrayrecord
from fedpeft.config import load_scenario
from fedpeft.data import load_task_data
from fedpeft.models import initial_adapter_state
from fedpeft.state import ClientStateStore
from fedpeft.strategies.testing import ensure_task_identity

SCENARIO = load_scenario("smoke", ["train.local_steps=3", "train.lr=0.05"])


def _message(global_state, instructions, state_dir):
    ensure_task_identity()
    config = ConfigRecord(
        {
            records.SCENARIO: SCENARIO.to_json(),
            records.STATE_DIR: str(state_dir),
            records.SERVER_ROUND: 1,
            **instructions,
        }
    )
    content = RecordDict(
        {records.ARRAYS: state_to_arrayrecord(global_state), records.CONFIG: config}
    )
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context(pid):
    config = {records.NODE_PARTITION_ID: pid, records.NODE_NUM_PARTITIONS: 2}
    return Context(run_id=1, node_id=1, node_config=config, state=RecordDict(), run_config={})


def _initial():
    labels = load_task_data(SCENARIO.data).num_labels
    return initial_adapter_state(SCENARIO.model, SCENARIO.peft_for_rank(4), labels, SCENARIO.seed)


def test_the_initial_adapter_survives_a_caller_that_edits_its_copy():
    # a caller (such as the HetLoRA test below) replaces entries of the dict it gets
    first = _initial()
    key = next(iter(first))
    original = first[key].clone()
    first[key] = torch.full_like(original, 7.0)
    assert torch.equal(_initial()[key], original)  # every later caller sees the real one


FEDSA = {
    records.TRAIN_FACTORS: "head,lora_A,lora_B",
    records.SEND_FACTORS: "head,lora_A",
    records.PERSONAL_FACTORS: "lora_B",
}


def test_personal_b_stays_with_its_client_and_newcomers_start_from_the_initial_b(tmp_path):
    initial = _initial()
    shared = {k: v for k, v in initial.items() if factor_of(k) != "lora_B"}
    reply = client_train(_message(shared, FEDSA, tmp_path), _context(0))
    sent = arrayrecord_to_state(reply.content.array_records[records.ARRAYS])
    assert sent and not any(factor_of(k) == "lora_B" for k in sent)  # B never leaves

    kept = ClientStateStore(tmp_path).load(0)
    assert kept and all(factor_of(k) == "lora_B" for k in kept)
    assert any(v.abs().sum() > 0 for v in kept.values())  # it trained away from zero

    again = get_adapter_state(_prepare(_message(shared, FEDSA, tmp_path), _context(0)).model)
    for key, value in kept.items():
        assert torch.equal(again[key], value)  # the owner gets its own B back
    newcomer = get_adapter_state(_prepare(_message(shared, FEDSA, tmp_path), _context(1)).model)
    for key in kept:
        assert torch.equal(newcomer[key], initial[key])  # first time: the initial B


def test_a_node_may_state_its_own_rank(tmp_path):
    initial = _initial()
    context = _context(0)
    context.node_config[records.NODE_RANK] = 3
    job = _prepare(_message(initial, {}, tmp_path), context)
    assert job.rank == 3
    a_shapes = {
        v.shape[0] for k, v in get_adapter_state(job.model).items() if factor_of(k) == "lora_A"
    }
    assert a_shapes == {3}


def test_ffa_clients_share_the_seeded_a_and_never_send_it(tmp_path):
    ffa = {
        records.TRAIN_FACTORS: "head,lora_B",
        records.SEND_FACTORS: "head,lora_B",
        records.PERSONAL_FACTORS: "",
    }
    initial = _initial()
    only_b = {k: v for k, v in initial.items() if factor_of(k) != "lora_A"}
    replies = [client_train(_message(only_b, ffa, tmp_path), _context(pid)) for pid in (0, 1)]
    for reply in replies:
        sent = arrayrecord_to_state(reply.content.array_records[records.ARRAYS])
        assert not any(factor_of(k) == "lora_A" for k in sent)
    a_seen = [
        {
            k: v
            for k, v in get_adapter_state(
                _prepare(_message(only_b, ffa, tmp_path), _context(pid)).model
            ).items()
            if factor_of(k) == "lora_A"
        }
        for pid in (0, 1)
    ]
    for key, value in a_seen[0].items():
        assert torch.equal(value, a_seen[1][key]) and torch.equal(value, initial[key])


def test_fit_rank_keeps_the_update_under_per_rank_scaling():
    from fedpeft.clients.app import fit_rank

    g = torch.Generator().manual_seed(0)
    a8, b8 = torch.randn(8, 5, generator=g), torch.randn(6, 8, generator=g)
    like = {"m.lora_A.weight": torch.zeros(4, 5), "m.lora_B.weight": torch.zeros(6, 4)}
    sent = {"m.lora_A.weight": a8, "m.lora_B.weight": b8}
    got = fit_rank(sent, like)
    alpha = 16.0
    # a rank-4 client applies alpha/4; the sender's leading 4 components had alpha/8
    expected = (alpha / 8) * b8[:, :4] @ a8[:4, :]
    torch.testing.assert_close(
        (alpha / 4) * got["m.lora_B.weight"] @ got["m.lora_A.weight"], expected
    )
    shared = fit_rank(sent, like, per_rank_scaling=False)  # HetLoRA: one scaling for all
    torch.testing.assert_close(shared["m.lora_B.weight"], b8[:, :4])


def test_fit_rank_keeps_the_update_under_rslora():
    from fedpeft.clients.app import fit_rank

    g = torch.Generator().manual_seed(0)
    a8, b8 = torch.randn(8, 5, generator=g), torch.randn(6, 8, generator=g)
    like = {"m.lora_A.weight": torch.zeros(4, 5), "m.lora_B.weight": torch.zeros(6, 4)}
    got = fit_rank({"m.lora_A.weight": a8, "m.lora_B.weight": b8}, like, use_rslora=True)
    alpha = 16.0
    # rsLoRA: a rank-4 client applies alpha/sqrt(4); the sender's components had alpha/sqrt(8)
    expected = (alpha / 8**0.5) * b8[:, :4] @ a8[:4, :]
    torch.testing.assert_close(
        (alpha / 4**0.5) * got["m.lora_B.weight"] @ got["m.lora_A.weight"], expected
    )


def test_equal_client_ranks_are_not_heterogeneous():
    assert not load_scenario("smoke", ["peft.client_ranks=[16,16]"]).heterogeneous_ranks
    assert load_scenario("smoke", ["peft.client_ranks=[4,16]"]).heterogeneous_ranks


def test_a_node_trains_on_its_own_file_or_its_cached_partition(tmp_path):
    from fedpeft.clients.app import local_data
    from fedpeft.data import client_split

    job = _prepare(_message(_initial(), {}, tmp_path), _context(1))
    names = load_task_data(SCENARIO.data).label_names
    own = tmp_path / "own.jsonl"
    own.write_text("".join(f'{{"text": "word {i}", "label": "{names[2]}"}}\n' for i in range(20)))
    context = _context(1)
    context.node_config[records.NODE_DATA_PATH] = str(own)
    train, holdout = local_data(job, context)
    assert len(train) + len(holdout) == 20 and set(train["label"]) == {2}
    reply = client_train(_message(_initial(), {}, tmp_path), context)  # trains on it
    assert not reply.has_error() and reply.content.metric_records[records.METRICS]["train_loss"]

    context = _context(1)
    context.node_config[records.NODE_STATE_DIR] = str(tmp_path / "node")
    expected = client_split(SCENARIO.data, SCENARIO.seed, 1)
    for _ in range(2):  # written on the first message, read back on the next
        got = local_data(job, context)
        assert [p["text"] for p in got] == [p["text"] for p in expected]
    assert len(list((tmp_path / "node" / "cache").glob("partition-1-*"))) == 1


HETLORA = load_scenario(
    "smoke", ["train.local_steps=3", "train.lr=0.05", 'strategy.name="hetlora"']
)
PRUNE = {
    records.TRAIN_FACTORS: "head,lora_A,lora_B",
    records.SEND_FACTORS: "head,lora_A,lora_B",
    records.ALPHA_MODE: "shared-scaling",
    records.PRUNE_GAMMA: 0.01,
    records.PRUNE_THRESHOLD: 0.1,
}


def _hetlora_message(global_state, state_dir):
    message = _message(global_state, PRUNE, state_dir)
    config = message.content.config_records[records.CONFIG]
    config[records.SCENARIO] = HETLORA.to_json()
    return message


def test_a_hetlora_client_with_a_dead_tail_prunes_its_rank_and_keeps_it(tmp_path):
    # Arrange: rank-4 factors whose components 2 and 3 are zero; B's head is non-zero
    torch.manual_seed(0)
    state = _initial()
    for key, value in state.items():
        if factor_of(key) == "lora_B":
            state[key] = torch.randn_like(value)
            state[key][:, 2:] = 0
        elif factor_of(key) == "lora_A":
            state[key] = value.clone()
            state[key][2:, :] = 0
    # Act: one round of training through the HetLoRA client hook, then the next message
    reply = client_train(_hetlora_message(state, tmp_path), _context(0))
    sent = arrayrecord_to_state(reply.content.array_records[records.ARRAYS])
    job = _prepare(_hetlora_message(_initial(), tmp_path), _context(0))
    # Assert: a zero tail gets no gradient, so it stays negligible: the client sends rank 2
    metrics = reply.content.metric_records[records.METRICS]
    assert metrics[records.CLIENT_RANK] == 2
    assert {v.shape[0] for k, v in sent.items() if factor_of(k) == "lora_A"} == {2}
    assert {v.shape[1] for k, v in sent.items() if factor_of(k) == "lora_B"} == {2}
    # and from then on trains at rank 2 from factors whose tail is zero
    assert (job.rank, job.current_rank) == (4, 2)
    live = get_adapter_state(job.model)
    for key, value in live.items():
        if factor_of(key) == "lora_A":
            assert torch.count_nonzero(value[2:, :]) == 0
        elif factor_of(key) == "lora_B":
            assert torch.count_nonzero(value[:, 2:]) == 0


def test_other_strategies_keep_their_rank_and_send_every_component(tmp_path):
    reply = client_train(_message(_initial(), {}, tmp_path), _context(0))
    sent = arrayrecord_to_state(reply.content.array_records[records.ARRAYS])
    assert reply.content.metric_records[records.METRICS][records.CLIENT_RANK] == 4
    assert {v.shape[0] for k, v in sent.items() if factor_of(k) == "lora_A"} == {4}
    assert ClientStateStore(tmp_path).load(0) == {}


def test_instructions_parse_every_entry_once_with_defaults():
    config = ConfigRecord(
        {
            records.SCENARIO: SCENARIO.to_json(),
            records.SERVER_ROUND: 3,
            records.TRAIN_FACTORS: "lora_A,lora_B",
            records.PROXIMAL_MU: 0.5,
        }
    )
    asked = Instructions.parse(config)
    assert asked.server_round == 3 and asked.proximal_mu == 0.5
    assert asked.train_factors == {"lora_A", "lora_B"} and asked.personal_factors == set()
    assert not asked.shared_scaling and asked.prune_gamma == 0.0
    assert asked.scenario == SCENARIO


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({records.ALPHA_MODE: "weird"}, "alpha-mode='weird' is not known"),
        ({records.PRUNE_GAMMA: "lots"}, "prune-gamma='lots' is not a number"),
    ],
)
def test_instructions_refuse_a_malformed_entry_in_one_line(entry, message):
    config = ConfigRecord({records.SCENARIO: SCENARIO.to_json(), **entry})
    with pytest.raises(ValueError, match=message):
        Instructions.parse(config)
    with pytest.raises(ValueError, match=f"hold no '{records.SCENARIO}'"):
        Instructions.parse(ConfigRecord({records.SERVER_ROUND: 1}))
