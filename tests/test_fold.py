"""Replies folded as they arrive: exact sums, memory that does not grow with the clients.

The references are dense: the example-weighted mean of the replies in float64, and for
FlexLoRA's streaming SVD the optimal truncation of ``sum p_i s_i B_i A_i`` (Eckart-Young).
"""

from collections.abc import Iterator

import pytest
import torch
from flwr.app import ConfigRecord, Message
from lora_helpers import product_sum

from fedpeft.adapters import lora_pairs
from fedpeft.codecs import arrayrecord_to_state, state_to_arrayrecord
from fedpeft.config import load_scenario
from fedpeft.strategies import STRATEGIES, AggregationError, build_strategy
from fedpeft.strategies.adapter_strategy import HeldState, lora_factors
from fedpeft.strategies.flexlora import FlexLoRA
from fedpeft.strategies.streaming_svd import BATCH_FACTOR, KEEP_FACTOR, StreamingSVD
from fedpeft.strategies.testing import StaticGrid, ensure_task_identity, train_reply

STREAMING = sorted(name for name, spec in STRATEGIES.items() if spec.streams_replies)
PREFIX = "base_model.model.layer.{}.attn.{}"


def _adapter(seed: int, d: int = 24, k: int = 20, r: int = 4, layers: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(layers):
        for module in ("query", "value"):
            name = PREFIX.format(layer, module)
            state[f"{name}.lora_A.weight"] = torch.randn(r, k, generator=g)
            state[f"{name}.lora_B.weight"] = torch.randn(d, r, generator=g)
    return state


def _strategy(name: str, clients: int, *sets: str):
    ensure_task_identity()
    scenario = load_scenario(
        "smoke",
        [f'strategy.name="{name}"', f"data.num_clients={clients}", *sets],
    )
    strategy = build_strategy(scenario)
    grid = StaticGrid(range(1, clients + 1))
    list(strategy.configure_train(1, state_to_arrayrecord(_adapter(999)), ConfigRecord(), grid))
    return strategy


def _replies(states: list[dict], weights: list[int]) -> Iterator[Message]:
    for i, (state, n) in enumerate(zip(states, weights, strict=True)):
        yield train_reply(state, n, i + 1)


def test_the_streaming_rules_are_the_weighted_sum_ones():
    assert STREAMING == ["fedavg", "fedit", "fedprox", "fedsa_lora", "ffa_lora", "rolora"]
    assert all(STRATEGIES[name].weighted_sum for name in STREAMING)


@pytest.mark.parametrize("name", STREAMING)
def test_a_stream_of_replies_gives_the_bits_of_a_list_and_the_exact_mean(name):
    states = [_adapter(seed) for seed in range(5)]
    weights = [3, 1, 4, 1, 5]
    from_list, _ = _strategy(name, 5).aggregate_train(1, list(_replies(states, weights)))
    from_stream, metrics = _strategy(name, 5).aggregate_train(1, _replies(states, weights))
    assert from_list is not None and from_stream is not None and metrics is not None
    got, listed = arrayrecord_to_state(from_stream), arrayrecord_to_state(from_list)
    assert all(torch.equal(got[k], listed[k]) for k in listed)
    # what the rule averages (FFA-LoRA: B only) is the float64 weighted mean, to float32
    sent = {k for k in got if not torch.equal(got[k], _adapter(999)[k])}
    assert sent, "nothing was aggregated"
    for key in sent:
        mean = sum(w * s[key].double() for s, w in zip(states, weights, strict=True)) / 14
        assert torch.equal(got[key], mean.float()), key


@pytest.mark.parametrize("name", STREAMING)
def test_a_bad_reply_mid_stream_raises_and_leaves_the_global_adapter(name):
    strategy = _strategy(name, 4)
    states = [_adapter(seed) for seed in range(4)]
    states[2][PREFIX.format(0, "value") + ".lora_B.weight"][0, 0] = float("nan")
    before = {k: v.clone() for k, v in getattr(strategy, "global_state", {}).items()}
    with pytest.raises(AggregationError, match="node 3: tensor .* holds NaN or inf"):
        strategy.aggregate_train(1, _replies(states, [1, 1, 1, 1]))
    after = getattr(strategy, "global_state", {})
    assert all(torch.equal(after[k], v) for k, v in before.items())


def _held_mib(obj: object) -> float:
    """MiB of the tensors reachable from ``obj``'s attributes (what a strategy keeps)."""
    seen, storages, stack = set(), {}, [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            storages[item.untyped_storage().data_ptr()] = item.untyped_storage().nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif hasattr(item, "__dict__") and type(item).__module__.startswith("fedpeft"):
            stack.extend(vars(item).values())
    return sum(storages.values()) / 2**20


#: 40 replies of 2 MiB each (2 layers x query, value; d = k = 2048, r = 32): 80 MiB held
SHAPE = {"d": 2048, "k": 2048, "r": 32, "layers": 2}
REPLY_MIB = 2 * 2 * 2 * 2048 * 32 * 4 / 2**20


def _held_while_streaming(name: str, *sets: str, count: int = 40) -> list[float]:
    """What the strategy holds as each of ``count`` replies arrives (before it is folded)."""
    strategy = _strategy(name, count, "peft.r=32", "peft.alpha=64", *sets)
    strategy.global_state = arrayrecord_to_state(state_to_arrayrecord(_adapter(0, **SHAPE)))
    held = []

    def replies() -> Iterator[Message]:
        for i in range(count):
            held.append(_held_mib(strategy))
            yield train_reply(_adapter(i, **SHAPE), 1 + i % 3, i + 1)

    arrays, _ = strategy.aggregate_train(1, replies())
    assert arrays is not None
    return held


@pytest.mark.parametrize("name", STREAMING)
def test_a_weighted_sum_rule_holds_its_sums_not_the_replies(name):
    """The global adapter and its float64 sums (three replies' worth), whatever the replies."""
    assert max(_held_while_streaming(name)) <= 3 * REPLY_MIB + 0.1


def test_flexlora_streaming_holds_a_short_stack_not_the_replies():
    """At most (4 + 4) r kept and new columns, plus a reply's r, per module, in float32
    (24 replies: 5 cuts)."""
    held = _held_while_streaming("flexlora", 'strategy.flexlora_svd="streaming"', count=24)
    stack_mib = 4 * (KEEP_FACTOR + BATCH_FACTOR + 1) * 32 * (2048 + 2048) * 4 / 2**20
    assert max(held) <= REPLY_MIB + stack_mib + 0.1 < 20 * REPLY_MIB


def test_a_rule_that_needs_every_reply_holds_them_all():
    """The measure's control: FLoRA keeps every reply's factors until the round's last."""
    held = _held_while_streaming("flora", count=12)
    assert held[-1] >= held[0] + 11 * REPLY_MIB


def _spectrum(kind: str, clients: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d, k, r = 96, 80, 4
    bs = [torch.randn(d, r, generator=g, dtype=torch.float64) for _ in range(clients)]
    as_ = [torch.randn(r, k, generator=g, dtype=torch.float64) for _ in range(clients)]
    if kind == "subspace":  # every B in one 6-dimensional column space: rank <= 6
        basis = torch.randn(d, 6, generator=g, dtype=torch.float64)
        bs = [basis @ torch.randn(6, r, generator=g, dtype=torch.float64) for _ in bs]
    if kind == "shared":  # the clients agree on a rank-4 change, each with its own noise
        b0 = torch.randn(d, r, generator=g, dtype=torch.float64)
        a0 = torch.randn(r, k, generator=g, dtype=torch.float64)
        bs = [b0 + 0.05 * b for b in bs]
        as_ = [a0 + 0.05 * a for a in as_]
    return bs, as_


def _streamed(bs, as_, weights, scalings, rank: int):
    streaming = StreamingSVD(rank)
    for b, a, w, s in zip(bs, as_, weights, scalings, strict=True):
        streaming.add("m", b, a, w * s)
    return streaming.top_svd("m", 1.0 / sum(weights))


#: (spectrum, clients, bound on the residual's excess over the optimal one): exact while
#: the sum's rank fits the components kept (40 clients in a rank-6 subspace: 10 cuts, 3e-12
#: measured); within 1e-4 where the clients agree on a direction (4e-6 measured); about 1%
#: on independent random updates, a flat spectrum (8.5e-3 measured: what one pass can do)
SPECTRA = [("subspace", 40, 1e-8), ("shared", 40, 1e-4), ("independent", 40, 2e-2)]


@pytest.mark.parametrize(("kind", "clients", "bound"), SPECTRA)
def test_the_streaming_svd_truncates_nearly_as_well_as_the_optimal_one(kind, clients, bound):
    bs, as_ = _spectrum(kind, clients)
    weights = [float(i % 4 + 1) for i in range(clients)]
    scalings = [2.0] * clients
    dense = product_sum(bs, as_, weights, scalings)
    sigma = torch.linalg.svdvals(dense)
    rank = 4
    u, s, v = _streamed(bs, as_, weights, scalings, rank)
    residual = float(torch.linalg.matrix_norm(dense - u @ torch.diag(s) @ v.mT))
    optimal = float(sigma[rank:].square().sum().sqrt())
    assert (residual - optimal) / optimal <= bound, (residual, optimal)
    assert u.shape == (96, rank) and s.shape == (rank,) and v.shape == (80, rank)
    torch.testing.assert_close(u.mT @ u, torch.eye(rank, dtype=torch.float64), atol=1e-5, rtol=0)


def test_flexlora_streams_when_the_round_would_not_fit_and_says_so(monkeypatch):
    monkeypatch.setattr("fedpeft.strategies.flexlora.HELD_FACTORS_BYTES", 1000)
    states = [_adapter(seed) for seed in range(6)]
    strategy = _strategy("flexlora", 6, "federation.clients_per_round=6")
    assert isinstance(strategy, FlexLoRA) and strategy.method() == "streaming"
    arrays, _ = strategy.aggregate_train(1, _replies(states, [1, 2, 3, 1, 2, 3]))
    assert arrays is not None
    assert strategy.svd_methods == {"streaming": 4}  # 2 layers x (query, value)
    assert "streaming for 4 matrices" in strategy.settings()["SVD"]
    # 6 clients of rank 4 (rank 20 at most) fit what it keeps: the exact path's truncation
    exact = _strategy("flexlora", 6, 'strategy.flexlora_svd="exact"')
    exact_arrays, _ = exact.aggregate_train(1, _replies(states, [1, 2, 3, 1, 2, 3]))
    assert exact_arrays is not None
    got, want = arrayrecord_to_state(arrays), arrayrecord_to_state(exact_arrays)
    for module, (u, s, v) in strategy.svd.items():
        eu, es, ev = exact.svd[module]
        want_product = (eu * es) @ ev.mT
        gap = ((u * s) @ v.mT - want_product).norm() / want_product.norm()
        assert gap <= 1e-4, module  # the streaming SVD computes in float32
    assert got.keys() == want.keys()


def test_held_replies_give_up_each_modules_factors_once_read():
    """FLoRA's result replaces the held factors module by module (plain dicts are left)."""
    held = [HeldState(_adapter(seed)) for seed in range(3)]
    given = [_adapter(seed) for seed in range(3)]
    modules = list(lora_pairs(list(held[0])))
    for step, (module, a_key, b_key, bs, _) in enumerate(lora_factors(held)):
        assert module == modules[step] and len(bs) == 3
        assert all(a_key in s and b_key in s for s in held)  # still there while it is read
        if step:  # the module read before is gone
            previous = lora_pairs(list(given[0]))[modules[step - 1]]
            assert not any(key in s for s in held for key in previous)
    assert all(not s for s in held)  # only LoRA factors were held: nothing is left
    list(lora_factors(given))
    assert all(len(s) == 2 * len(modules) for s in given)


def test_flora_holds_no_factor_after_the_round():
    strategy = _strategy("flora", 4, "federation.clients_per_round=4")
    states = [_adapter(seed) for seed in range(4)]
    arrays, _ = strategy.aggregate_train(1, _replies(states, [1, 2, 3, 4]))
    assert arrays is not None and not strategy._held[0]
    merged = sum(t.nbytes for pair in strategy.base_delta.values() for t in pair) / 2**20
    adapter = sum(t.nbytes for t in strategy.global_state.values()) / 2**20
    assert merged > 0
    assert _held_mib(strategy) <= merged + adapter + 0.01  # nothing of the replies is left


def test_the_server_aggregates_where_federation_server_device_says():
    """``model`` follows model.device, ``auto`` takes CUDA where there is one; a CUDA server
    without CUDA is one line at build time; the sums come back on the CPU either way."""
    from fedpeft.config import ScenarioError
    from fedpeft.strategies.fold import WeightedSums, aggregation_device

    def device(*sets: str) -> torch.device:
        return aggregation_device(load_scenario("smoke", list(sets)))

    cuda = torch.cuda.is_available()
    here = torch.device("cuda") if cuda else torch.device("cpu")
    assert device('federation.server_device="cpu"') == torch.device("cpu")
    assert device('model.device="cpu"') == torch.device("cpu")  # the default follows the model
    assert device('model.device="mps"') == torch.device("cpu")  # MPS has no float64 sums
    assert device('federation.server_device="auto"', 'model.device="cpu"') == here
    assert device() == here  # model.device = auto
    with pytest.raises(ScenarioError, match=r"federation.server_device.*model, auto, cpu, cuda"):
        load_scenario("smoke", ['federation.server_device="tpu"'])
    asked = ['federation.server_device="cuda:0"']
    for name in ("fedavg", "fedit", "flexlora"):
        if cuda:
            assert device(*asked) == torch.device("cuda:0")
        else:
            with pytest.raises(ScenarioError, match="'cuda:0' means cuda:0, and this server"):
                _strategy(name, 4, *asked)

    sums = WeightedSums(here)
    sums.add({"w": torch.tensor([1.0, 2.0])}, 1.0)
    sums.add({"w": torch.tensor([4.0, 8.0])}, 3.0)
    mean = sums.mean()["w"]
    assert mean.device == torch.device("cpu") and mean.dtype == torch.float32
    assert mean.tolist() == [(1.0 + 12.0) / 4, (2.0 + 24.0) / 4]
