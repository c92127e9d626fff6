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


# ------------------------------------------------------------ schedules and accumulation


@pytest.mark.parametrize(
    "schedule,warmup,min_lr",
    [("constant", 3, 0.0), ("linear", 0, 0.0), ("linear", 4, 0.0), ("cosine", 5, 1e-4)],
)
def test_the_learning_rate_follows_transformers_own_schedulers(schedule, warmup, min_lr):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    from fedpeft.config import TrainSection
    from fedpeft.train import learning_rate

    train = TrainSection(lr=1e-3, lr_schedule=schedule, warmup_steps=warmup, min_lr=min_lr)
    total = 24  # e.g. 4 rounds of 6 local steps
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    reference = {
        "constant": lambda: get_constant_schedule_with_warmup(optimizer, warmup),
        "linear": lambda: get_linear_schedule_with_warmup(optimizer, warmup, total),
        "cosine": lambda: get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, total, min_lr=min_lr
        ),
    }[schedule]()
    for step in range(total):
        assert learning_rate(train, step, total) == pytest.approx(
            reference.get_last_lr()[0], rel=1e-12, abs=1e-15
        ), step
        optimizer.step()
        reference.step()


def test_a_min_lr_above_the_peak_is_refused_in_one_line():
    from fedpeft.config import ScenarioError, TrainSection

    with pytest.raises(ScenarioError, match=r"'train.min_lr': expected a number <= train.lr=0.001"):
        TrainSection(lr=1e-3, min_lr=1e-2)


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_accumulated_batches_make_the_step_of_their_union(tokenizer):
    """Two batches of 8 accumulated: the same update as one batch of their 16 rows."""
    data, collate = _toy_data(), _collate(tokenizer)
    whole, split = _no_dropout(_model()), _no_dropout(_model())
    one = train_steps(whole, collate, data, steps=3, batch_size=16, lr=1e-2, seed=0)
    two = train_steps(
        split, collate, data, steps=3, batch_size=8, lr=1e-2, seed=0, grad_accum_steps=2
    )
    # the batches come from one seeded order, so the 3 x 2 halves are the 3 wholes' rows
    assert (one.num_examples, two.num_examples, two.steps) == (48, 48, 3)
    assert two.train_loss == pytest.approx(one.train_loss, rel=1e-5)
    a, b = get_adapter_state(whole), get_adapter_state(split)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_each_step_runs_at_the_learning_rate_it_is_given(tokenizer):
    seen = []

    def lr_at(step):
        seen.append(step)
        return 0.0 if step else 1e-2  # only the first step moves anything

    model = _no_dropout(_model())
    after_one = _no_dropout(_model())
    train_steps(
        model, _collate(tokenizer), _toy_data(), steps=4, batch_size=8, lr=1, seed=0, lr_at=lr_at
    )
    train_steps(after_one, _collate(tokenizer), _toy_data(), steps=1, batch_size=8, lr=1e-2, seed=0)
    assert seen == [0, 1, 2, 3]
    a, b = get_adapter_state(model), get_adapter_state(after_one)
    # AdamW at lr 0 leaves the weights exactly (weight decay is lr-scaled too)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_epochs_count_passes_in_batches_and_accumulated_steps():
    from fedpeft.config import TrainSection

    assert TrainSection(local_steps=7).steps_for(1000) == 7  # epochs unset: local_steps
    assert TrainSection(epochs=1, batch_size=8).steps_for(20) == 3  # 8 + 8 + 4
    assert TrainSection(epochs=1, batch_size=8, grad_accum_steps=2).steps_for(20) == 2
    assert TrainSection(epochs=0.5, batch_size=8).steps_for(20) == 2  # half of 3 batches, up
    assert TrainSection(epochs=2, batch_size=8).batches_for(20) == 6
