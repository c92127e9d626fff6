import datasets
import pytest
import torch

from fedpeft.adapters import get_adapter_state
from fedpeft.config import ModelSection, PeftSection
from fedpeft.methods import build_peft_model
from fedpeft.models import load_base_model, load_tokenizer
from fedpeft.tasks import get_task
from fedpeft.train import train_steps

SEQ_CLS = get_task("seq-cls")

WORDS = ["apple pear fruit", "hammer nail tool"]


def _toy_data(n=64):
    return datasets.Dataset.from_dict(
        {
            "text": [WORDS[i % 2] + f" item {i}" for i in range(n)],
            "label": [i % 2 for i in range(n)],
        }
    )


def _model():
    base = load_base_model(ModelSection(name="tiny-bert"), num_labels=2)
    return build_peft_model(base, PeftSection(r=4, target_modules=["query", "value"]), "seq-cls", 0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-bert")


def evaluate(model, tokenizer, data, batch_size, max_length):
    return SEQ_CLS.evaluate(
        model,
        tokenizer,
        data,
        batch_size=batch_size,
        max_length=max_length,
        device=torch.device("cpu"),
    )


def _collate(tokenizer):
    return SEQ_CLS.make_collate(tokenizer, max_length=16)


def _distance(a, b):
    return sum(((a[k] - b[k]) ** 2).sum().item() for k in a) ** 0.5


def test_local_training_learns_a_separable_toy_task(tokenizer):
    model, data = _model(), _toy_data()
    before = evaluate(model, tokenizer, data, batch_size=32, max_length=16)
    result = train_steps(model, _collate(tokenizer), data, steps=40, batch_size=16, lr=1e-2, seed=0)
    after = evaluate(model, tokenizer, data, batch_size=32, max_length=16)
    assert result.num_examples == 40 * 16 and result.steps == 40
    assert after["eval_loss"] < before["eval_loss"] - 0.2
    assert after["eval_accuracy"] == 1.0


def test_proximal_term_keeps_the_adapter_near_the_global_one(tokenizer):
    data = _toy_data()
    distances = {}
    for mu in (0.0, 100.0):
        model = _model()
        start = get_adapter_state(model)
        train_steps(
            model,
            _collate(tokenizer),
            data,
            steps=15,
            batch_size=16,
            lr=1e-2,
            seed=0,
            proximal_mu=mu,
        )
        distances[mu] = _distance(get_adapter_state(model), start)
    assert distances[100.0] < 0.5 * distances[0.0]


def test_evaluate_matches_a_hand_computed_accuracy_and_loss(tokenizer):
    model, data = _model(), _toy_data(10)
    got = evaluate(model, tokenizer, data, batch_size=3, max_length=16)
    enc = tokenizer(
        list(data["text"]), padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**enc).logits
    labels = torch.tensor(data["label"])
    assert got["eval_accuracy"] == (logits.argmax(-1) == labels).float().mean().item()
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert got["eval_loss"] == pytest.approx(expected_loss, rel=1e-4)


def test_same_seed_same_training(tokenizer):
    states = []
    for _ in range(2):
        model = _model()
        train_steps(model, _collate(tokenizer), _toy_data(), steps=5, batch_size=8, lr=1e-2, seed=3)
        states.append(get_adapter_state(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_tracked_gradient_is_the_mean_of_each_steps_gradient(tokenizer):
    """track_gradient averages the gradient of every step's loss (what top-k ranks by),
    checked against gradients computed by hand on the same batches."""
    from fedpeft.adapters import adapter_parameters
    from fedpeft.train import batches

    def without_dropout(model):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model

    data, collate = _toy_data(), _collate(tokenizer)
    model = without_dropout(_model())
    start = get_adapter_state(model)
    result = train_steps(
        model, collate, data, steps=3, batch_size=8, lr=1e-2, seed=5, track_gradient=True
    )
    params = adapter_parameters(model)
    assert len(result.mean_gradients) == len(params)
    assert all(p in result.mean_gradients for p in params.values())

    # by hand: replay the three steps (the same batches, the same AdamW moves)
    replay = without_dropout(_model())
    replay.load_state_dict(model.state_dict(), strict=False)
    replay_params = adapter_parameters(replay)
    with torch.no_grad():
        for key, value in start.items():
            replay_params[key].copy_(value)
    trainable = [p for p in replay.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    sums = {key: torch.zeros_like(p) for key, p in replay_params.items()}
    stream = batches(data, 8, 5)
    replay.train()
    for _ in range(3):
        loss = replay(**collate(next(stream))).loss
        loss.backward()
        for key, p in replay_params.items():
            sums[key] += p.grad
        optimizer.step()
        optimizer.zero_grad()
    for key, p in params.items():
        torch.testing.assert_close(result.mean_gradients[p], sums[key] / 3, rtol=1e-4, atol=1e-6)
    untracked = train_steps(_model(), collate, data, steps=1, batch_size=8, lr=1e-2, seed=5)
    assert untracked.mean_gradients == {}
