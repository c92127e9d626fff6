"""Edge devices: precision, quantized loading, gradient checkpointing and node reports.

The CUDA-only paths (4/8-bit loading, fp16 with loss scaling) cannot run on a CPU: here
they are checked for their refusals and for what they hand to transformers and peft.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import datasets
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedpeft import models, records
from fedpeft.adapters import fold_base_delta, get_adapter_state
from fedpeft.clients.app import app as client_app
from fedpeft.config import ModelSection, PeftSection, Scenario, ScenarioError, load_scenario
from fedpeft.methods import build_peft_model
from fedpeft.models import check_quantization, load_base_model, load_tokenizer
from fedpeft.server.grid import CountingGrid
from fedpeft.server.inprocess import InProcessGrid
from fedpeft.server.run import run_federation
from fedpeft.strategies.testing import StaticGrid, train_reply
from fedpeft.tasks import get_task
from fedpeft.train import autocast_dtype, train_steps

CPU = torch.device("cpu")
SEQ_CLS = get_task("seq-cls")
WORDS = ["apple pear fruit", "hammer nail tool"]


def _data(n: int = 32) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "text": [WORDS[i % 2] + f" item {i}" for i in range(n)],
            "label": [i % 2 for i in range(n)],
        }
    )


def _model(**model_keys) -> torch.nn.Module:
    base = load_base_model(ModelSection(name="tiny-bert", **model_keys), num_labels=2)
    peft = PeftSection(r=4, dropout=0.0, target_modules=["query", "value"])
    return build_peft_model(base, peft, "seq-cls", 0)


@pytest.fixture(scope="module")
def collate():
    return SEQ_CLS.make_collate(load_tokenizer("tiny-bert"), max_length=16)


def _train(model: torch.nn.Module, collate, **kwargs: object):
    return train_steps(
        model, collate, _data(), steps=2, batch_size=8, lr=1e-2, seed=0, device=CPU, **kwargs
    )


# ---------------------------------------------------------------------------- scenario keys


def test_edge_keys_default_to_todays_behaviour() -> None:
    scenario = Scenario()
    assert scenario.model.quantization == "none"
    assert scenario.model.gradient_checkpointing is False
    assert scenario.train.precision == "auto"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model.quantization", '"3bit"'),
        ("model.quantization", "true"),
        ("model.gradient_checkpointing", '"yes"'),
        ("train.precision", '"fp8"'),
    ],
)
def test_bad_edge_values_are_refused_naming_the_key(key: str, value: str) -> None:
    with pytest.raises(ScenarioError, match=key.replace(".", r"\.")):
        load_scenario("smoke", [f"{key}={value}"])


def test_edge_keys_parse() -> None:
    scenario = load_scenario(
        "smoke",
        [
            'model.quantization="4bit"',
            "model.gradient_checkpointing=true",
            'train.precision="bf16"',
        ],
    )
    assert scenario.model.quantization == "4bit"
    assert scenario.model.gradient_checkpointing is True
    assert scenario.train.precision == "bf16"


# ---------------------------------------------------------------------------- quantization


def _one_line(err: pytest.ExceptionInfo[ScenarioError]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("device", ["cpu", "mps", "cuda"])
def test_quantization_off_cuda_is_refused_in_one_line(device: str, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "cuda": named, not there
    cfg = ModelSection(name="minilm", quantization="4bit", device=device)
    with pytest.raises(ScenarioError) as err:
        load_base_model(cfg, 2)  # the device comes from model.device
    text = _one_line(err)
    assert "model.quantization='4bit'" in text and "CUDA" in text and f"'{device}'" in text
    assert "model.quantization='none'" in text


def test_quantization_without_bitsandbytes_is_refused_in_one_line(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ScenarioError) as err:
        check_quantization(ModelSection(name="minilm", quantization="8bit"), torch.device("cuda:0"))
    text = _one_line(err)
    assert "pip install bitsandbytes" in text and "model.quantization='none'" in text


def test_quantizing_a_random_test_model_is_refused() -> None:
    with pytest.raises(ScenarioError, match="random test model"):
        load_base_model(ModelSection(name="tiny-bert", quantization="4bit"), 2)


def test_an_unquantized_pretrained_load_needs_neither_cuda_nor_bitsandbytes() -> None:
    """The real MiniLM on this CPU machine, where bitsandbytes is not installed."""
    import importlib.util

    assert importlib.util.find_spec("bitsandbytes") is None or torch.cuda.is_available()
    base = load_base_model(ModelSection(name="minilm"), 2, CPU)
    assert getattr(base.config, "quantization_config", None) is None
    assert not getattr(base, "is_loaded_in_4bit", False)
    assert not getattr(base, "is_loaded_in_8bit", False)
    assert {p.dtype for p in base.parameters()} == {torch.float32}
    assert {p.device.type for p in base.parameters()} == {"cpu"}


def test_a_quantized_load_asks_for_qlora_weights_on_the_node_device(monkeypatch) -> None:
    """What reaches ``from_pretrained`` and peft, with CUDA and bitsandbytes faked."""
    seen: dict[str, object] = {}

    def from_pretrained(self, source: str, num_labels: int, **kwargs: object):
        seen.update(kwargs)
        return self.model_from_config(models.ALIASES["tiny-bert"][0](), num_labels)

    def prepare(model, use_gradient_checkpointing=True, **kwargs):
        seen["prepared"] = use_gradient_checkpointing
        return model

    monkeypatch.setattr(models, "check_quantization", lambda cfg, device: None)
    monkeypatch.setattr(models, "native_bf16", lambda: True)
    monkeypatch.setattr(type(SEQ_CLS), "model_from_pretrained", from_pretrained)
    monkeypatch.setattr("peft.prepare_model_for_kbit_training", prepare)
    base = load_base_model(
        ModelSection(name="minilm", quantization="4bit"), 2, torch.device("cuda:1")
    )
    config = seen["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert seen["device_map"] == {"": 1}
    assert seen["prepared"] is False  # checkpointing is model.gradient_checkpointing's call
    assert not any(p.requires_grad for p in base.parameters())


def test_folding_a_base_delta_into_quantized_weights_is_refused() -> None:
    """FLoRA and FedEx-LoRA change the base weights: int8 codes cannot take that sum."""
    model = _model()
    name = next(n for n, m in model.named_modules() if n.endswith("layer.0.attention.self.query"))
    base = model.get_submodule(name).get_base_layer()
    base.weight = torch.nn.Parameter(base.weight.to(torch.int8), requires_grad=False)
    with pytest.raises(ScenarioError, match="model.quantization='none'"):
        fold_base_delta(model, {name: (torch.zeros(32, 2), torch.zeros(2, 32))})


# ---------------------------------------------------------------------------- precision


def test_precision_resolves_per_device() -> None:
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("auto", torch.device("mps")) is None  # no autocast on mps for auto
    assert autocast_dtype("bf16", CPU) == torch.bfloat16


def test_fp16_off_cuda_is_refused_in_one_line(collate) -> None:
    with pytest.raises(ScenarioError) as err:
        _train(_model(), collate, precision="fp16")
    text = _one_line(err)
    assert "train.precision='fp16'" in text and "CUDA" in text


def test_bf16_autocast_trains_on_cpu(collate) -> None:
    model = _model()
    before = get_adapter_state(model)
    dtypes: set[torch.dtype] = set()
    query = next(m for n, m in model.named_modules() if n.endswith("attention.self.query"))
    query.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype))
    result = _train(model, collate, precision="bf16")
    after = get_adapter_state(model)
    assert dtypes == {torch.bfloat16}  # the forward pass really ran in bf16
    assert torch.isfinite(torch.tensor(result.train_loss))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == torch.float32 for v in after.values())  # the adapter stays fp32


# ---------------------------------------------------------------------------- checkpointing


def _count_checkpoints(model: torch.nn.Module) -> list[int]:
    """Count the calls of each checkpointed layer's checkpoint function."""
    calls = [0]
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            inner = module._gradient_checkpointing_func

            def counted(*args, _inner=inner, **kwargs):
                calls[0] += 1
                return _inner(*args, **kwargs)

            module._gradient_checkpointing_func = counted
    return calls


def test_gradient_checkpointing_gives_the_same_training(collate) -> None:
    plain, checkpointed = _model(), _model(gradient_checkpointing=True)
    plain_calls, calls = _count_checkpoints(plain), _count_checkpoints(checkpointed)
    a, b = _train(plain, collate), _train(checkpointed, collate)
    assert plain_calls == [0] and calls == [2 * 2]  # 2 layers x 2 steps, recomputed
    assert b.train_loss == pytest.approx(a.train_loss, abs=1e-6)
    sa, sb = get_adapter_state(plain), get_adapter_state(checkpointed)
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    assert any(not torch.equal(sb[k], v) for k, v in get_adapter_state(_model()).items())


# ---------------------------------------------------------------------------- node reports


def test_train_result_reports_step_time_and_peak_memory(collate) -> None:
    result = _train(_model(), collate)
    assert result.step_seconds > 0 and result.peak_memory_mb > 0


def test_node_info_reaches_client_metrics(tmp_path: Path) -> None:
    scenario = load_scenario(
        "smoke",
        [
            "federation.rounds=1",
            "train.local_steps=1",
            "data.eval_examples=16",
            'model.device="cpu"',
        ],
    )
    run_federation(
        InProcessGrid(client_app, scenario.data.num_clients), scenario, tmp_path, "in-process"
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    clients = rows[0]["client_metrics"]
    assert len(clients) == 2
    for entry in clients:
        assert entry[records.INFO_DEVICE] == "cpu"
        assert entry[records.INFO_HOST] == socket.gethostname()
        assert entry[records.STEP_SECONDS] > 0 and entry[records.PEAK_MEMORY_MB] > 0


class _Replies(StaticGrid):
    def __init__(self, replies: list[Message]) -> None:
        super().__init__([1])
        self.replies = replies

    def send_and_receive(self, messages, *, timeout=None):
        return self.replies


def test_a_rejected_reply_leaves_the_tally_with_its_node_info() -> None:
    reply = train_reply({"w": torch.ones(2, 2)}, 4)
    reply.content[records.NODE_INFO] = ConfigRecord(
        {records.INFO_DEVICE: "cuda:0 (GPU)", records.INFO_HOST: "edge-1"}
    )
    grid = CountingGrid(_Replies([reply]))
    # a training instruction carries fedpeft's config (SecAgg+'s key stages do not)
    content = RecordDict({records.CONFIG: ConfigRecord({records.SERVER_ROUND: 1})})
    instruction = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    list(grid.send_and_receive([instruction]))  # the tally is complete once read
    assert grid.current.clients == [
        {records.NUM_EXAMPLES: 4, records.INFO_DEVICE: "cuda:0 (GPU)", records.INFO_HOST: "edge-1"}
    ]
    grid.reject(reply, "undecodable")
    assert grid.current.clients == []


def test_a_server_without_cuda_evaluates_on_an_unquantized_base():
    from fedpeft.server.run import server_side

    scenario = load_scenario("smoke", ["model.name=minilm", 'model.quantization="4bit"'])
    local = server_side(scenario, torch.device("cpu"))
    assert local.model.quantization == "none" and scenario.model.quantization == "4bit"
    assert local.to_dict() | {"model": None} == scenario.to_dict() | {"model": None}
    plain = load_scenario("smoke")
    assert server_side(plain, torch.device("cpu")) is plain
