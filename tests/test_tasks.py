"""Tasks: batches, loss masking, metrics, bundled data, and learning on each new task."""

import math

import datasets
import numpy as np
import pytest
import torch

from fedpeft.config import DataSection, ModelSection, PeftSection, ScenarioError
from fedpeft.data import load_task_data
from fedpeft.methods import build_peft_model
from fedpeft.models import load_base_model, load_processor, load_tokenizer
from fedpeft.tasks import (
    IGNORE_INDEX,
    TASKS,
    ImagePrep,
    exact_match,
    get_task,
    prepare_images,
)
from fedpeft.train import train_steps

CPU = torch.device("cpu")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")  # MiniLM's uncased WordPiece: no chat template, no EOS


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _instructions(n):
    words = ["dog", "cat", "oak", "rum"]
    return datasets.Dataset.from_dict(
        {
            "text": [f"Define the word {words[i % 4]}." for i in range(n)],
            "response": [f"a kind of {words[i % 4]} thing" for i in range(n)],
        }
    )


# ---------------------------------------------------------------------------- registry


def test_every_task_is_registered_and_an_unknown_one_is_one_line():
    assert set(TASKS) == {"seq-cls", "causal-lm", "dpo", "image-cls"}
    assert get_task("causal-lm").peft_task_type == "CAUSAL_LM"
    assert get_task("image-cls").peft_task_type is None
    assert not get_task("image-cls").has_token_embeddings
    with pytest.raises(ScenarioError, match="unknown model.task 'speech'") as err:
        get_task("speech")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "model,task,heads",
    [
        ("tiny-bert", "seq-cls", ["classifier"]),
        ("tiny-llama", "seq-cls", ["score"]),
        ("tiny-llama", "causal-lm", []),
        ("tiny-vit", "image-cls", ["classifier"]),
    ],
)
def test_head_modules_are_found_on_the_loaded_model(model, task, heads):
    base = load_base_model(ModelSection(name=model, task=task), num_labels=3)
    assert get_task(task).head_module_names(base) == heads
    assert not any(p.requires_grad for p in base.parameters())


def test_tiny_llama_is_a_causal_lm_with_attention_biases():
    base = load_base_model(ModelSection(name="tiny-llama", task="causal-lm"), num_labels=26)
    assert type(base).__name__ == "LlamaForCausalLM"
    assert base.model.layers[0].self_attn.q_proj.bias is not None
    again = load_base_model(ModelSection(name="tiny-llama", task="causal-lm"), num_labels=26)
    assert all(
        torch.equal(a, b) for a, b in zip(base.parameters(), again.parameters(), strict=True)
    )


def test_a_task_reading_a_missing_column_is_refused_in_one_line():
    cfg = DataSection(name="wordnet-supersense")
    with pytest.raises(ScenarioError, match="data.response_column='response'") as err:
        get_task("causal-lm").check_data(load_task_data(cfg).train, cfg)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- causal-lm


def test_loss_falls_on_response_tokens_only_in_the_plain_format(tokenizer):
    collate = get_task("causal-lm").make_collate(tokenizer, max_length=64)
    rows = {
        "text": ["Define the word dog.", "Define the word oak."],
        "response": ["a pet", "a tree"],
    }
    batch = collate(rows)
    prompt = _ids(tokenizer, "Instruction: Define the word dog.\nResponse: ")
    completion = _ids(tokenizer, "a pet") + [tokenizer.sep_token_id]  # SEP ends a response
    n = len(prompt) + len(completion)
    assert batch["input_ids"][0, :n].tolist() == prompt + completion
    assert batch["labels"][0, :n].tolist() == [IGNORE_INDEX] * len(prompt) + completion
    assert batch["attention_mask"][0].sum().item() == n
    # padding (right) is masked out of attention and loss
    longest = batch["input_ids"].shape[1]
    assert batch["labels"][0, n:].tolist() == [IGNORE_INDEX] * (longest - n)
    assert batch["input_ids"][0, n:].tolist() == [tokenizer.pad_token_id] * (longest - n)


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tokenizer = load_tokenizer("tiny-llama")
    tokenizer.chat_template = CHAT_TEMPLATE
    batch = get_task("causal-lm").make_collate(tokenizer, max_length=64)(
        {"text": ["Define the word dog."], "response": ["a pet"]}
    )
    prompt = _ids(tokenizer, "<|user|>Define the word dog.<|end|><|assistant|>")
    completion = _ids(tokenizer, "a pet<|end|>")  # the template's end-of-turn ends it
    assert batch["input_ids"][0].tolist() == prompt + completion
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * len(prompt) + completion


def test_truncation_keeps_a_response_token(tokenizer):
    collate = get_task("causal-lm").make_collate(tokenizer, max_length=6)
    batch = collate({"text": ["Define the word hippopotamus."], "response": ["a big animal"]})
    assert batch["input_ids"].shape == (1, 6)
    assert (batch["labels"][0] != IGNORE_INDEX).sum().item() == 1


class _Parrot(torch.nn.Module):
    """A 'model' whose greedy generations are fixed: the given token ids, in order."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        taken, self.outputs = self.outputs[: len(input_ids)], self.outputs[len(input_ids) :]
        new = torch.tensor([(o + [0] * max_new_tokens)[:max_new_tokens] for o in taken])
        return torch.cat([input_ids, new], dim=1)


def test_exact_match_compares_normalised_text_up_to_the_stop_token(tokenizer):
    data = datasets.Dataset.from_dict(
        {
            "text": ["Define the word dog.", "Define the word oak.", "Define the word rum."],
            # uncased tokenizer: the reference is compared as the tokenizer can write it
            "response": ["A  domestic   Dog ", "a tree", "liquor"],
        }
    )
    sep = tokenizer.sep_token_id
    outputs = [
        _ids(tokenizer, "a domestic dog") + [sep] + _ids(tokenizer, "ignored after the stop"),
        _ids(tokenizer, "a tree of life") + [sep],
        _ids(tokenizer, "liquor"),  # no stop token within max_new_tokens: still a match
    ]
    score = exact_match(_Parrot(outputs), tokenizer, data, 2, 32, 8, CPU)
    assert score == pytest.approx(2 / 3)


def test_causal_lm_evaluation_is_the_models_own_response_loss(tokenizer):
    task = get_task("causal-lm")
    base = load_base_model(ModelSection(name="tiny-llama", task="causal-lm"), num_labels=0)
    data = _instructions(6)
    got = task.evaluate(base, tokenizer, data, batch_size=4, max_length=32, device=CPU)
    with torch.no_grad():
        expected = base(**task.make_collate(tokenizer, 32)(data[:])).loss.item()
    assert got["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert got["eval_perplexity"] == pytest.approx(math.exp(got["eval_loss"]))
    assert 0.0 <= got["eval_accuracy"] <= 1.0 and "eval_exact_match" not in got


# ---------------------------------------------------------------------------- image-cls


def test_digits_are_upscaled_to_the_models_image_size():
    prep = load_processor(ModelSection(name="tiny-vit", task="image-cls"))
    assert prep == ImagePrep(32, 32, 3, (0.5,) * 3, (0.5,) * 3)
    rows = load_task_data(DataSection(name="digits")).train[:5]
    batch = get_task("image-cls").make_collate(prep, max_length=64)(rows)
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert batch["labels"].tolist() == rows["label"]
    assert batch["pixel_values"].min() >= -1.0 and batch["pixel_values"].max() <= 1.0


def test_images_of_any_layout_become_normalised_pixel_values():
    prep = ImagePrep(4, 4, 3, (0.5,) * 3, (0.5,) * 3)
    white_uint8_hwc = np.full((2, 2, 3), 255, dtype=np.uint8)
    black_grey = np.zeros((8, 8), dtype=np.float32)
    pixels = prepare_images([white_uint8_hwc, black_grey], prep)
    assert pixels.shape == (2, 3, 4, 4)
    assert torch.allclose(pixels[0], torch.ones(3, 4, 4))
    assert torch.allclose(pixels[1], -torch.ones(3, 4, 4))


# ---------------------------------------------------------------------------- data


def test_wordnet_definitions_columns_and_fixed_split():
    data = load_task_data(DataSection(name="wordnet-definitions"))
    assert data.train.column_names == ["text", "response", "label"]
    assert (len(data.train), len(data.test)) == (80115, 2000)
    assert data.num_labels == 26
    rows = data.train.filter(lambda r: r["text"] == "Define the word dog.")
    dog = [r for r in rows["response"] if r.startswith("a member of the genus Canis")]
    assert dog and '"' not in dog[0]  # the example sentence after the definition is dropped
    again = load_task_data(DataSection(name="wordnet-definitions", text_column="text"))
    assert again.test["text"][:50] == data.test["text"][:50]
    supersense = load_task_data(DataSection(name="wordnet-supersense"))
    assert data.test["label"] == supersense.test["label"]  # same stratified split scheme


def test_digits_columns_and_fixed_stratified_split():
    data = load_task_data(DataSection(name="digits"))
    assert data.train.column_names == ["image", "label"]
    assert (len(data.train), len(data.test)) == (1437, 360)
    assert data.label_names == [str(d) for d in range(10)]
    counts = np.bincount(data.test["label"], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    image = np.asarray(data.test[0]["image"])
    assert image.shape == (8, 8) and 0.0 <= image.min() and image.max() <= 1.0


# ---------------------------------------------------------------------------- learning


@pytest.mark.parametrize(
    "model,task,targets,data_name,steps",
    [
        # a random LM's frozen output layer needs LoRA on lm_head to move the loss quickly
        ("tiny-llama", "causal-lm", ["q_proj", "v_proj", "lm_head"], "wordnet-definitions", 15),
        ("tiny-vit", "image-cls", ["q_proj", "v_proj"], "digits", 45),
    ],
)
def test_local_training_lowers_the_held_in_loss(model, task, targets, data_name, steps):
    model_cfg = ModelSection(name=model, task=task)
    data = load_task_data(DataSection(name=data_name))
    rows = data.train.select(range(64))
    base = load_base_model(model_cfg, data.num_labels)
    adapted = build_peft_model(base, PeftSection(r=4, alpha=8, target_modules=targets), task, 0)
    processor, spec = load_processor(model_cfg), get_task(task)
    kwargs = {"batch_size": 32, "max_length": 32, "device": CPU}
    before = spec.evaluate(adapted, processor, rows, **kwargs)
    result = train_steps(
        adapted,
        spec.make_collate(processor, 32),
        rows,
        steps=steps,
        batch_size=16,
        lr=2e-2,
        seed=0,
    )
    after = spec.evaluate(adapted, processor, rows, **kwargs)
    assert result.num_examples == steps * 16
    assert after["eval_loss"] < before["eval_loss"] - 0.5


def test_seq_cls_scores_the_same_with_its_batches_kept_and_tokenises_once(monkeypatch):
    """Held-out text is tokenised once per process; a new data set is tokenised afresh."""
    from fedpeft.tasks import base

    model_cfg = ModelSection(name="tiny-bert", task="seq-cls")
    task = get_task("seq-cls")
    tokenizer = load_processor(model_cfg)
    torch.manual_seed(0)
    model = load_base_model(model_cfg, num_labels=3)
    rng = np.random.default_rng(0)
    words = ["tree", "river", "a small stone", "the tall mountain", "sky"]
    rows = {
        "text": [" ".join(rng.choice(words, size=rng.integers(1, 6))) for _ in range(37)],
        "label": [int(x) for x in rng.integers(0, 3, size=37)],
    }
    data = datasets.Dataset.from_dict(rows)
    calls = []
    real = task.make_collate

    def counted(processor, max_length):
        calls.append(max_length)
        return real(processor, max_length)

    monkeypatch.setattr(task, "make_collate", counted)
    settings = {"batch_size": 8, "max_length": 16, "device": torch.device("cpu")}
    first = task.evaluate(model, tokenizer, data, **settings)
    again = task.evaluate(model, tokenizer, data, **settings)
    assert first == again and calls == [16]  # the second evaluation tokenised nothing
    # by hand: every example alone, no padding, no cache
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for text, label in zip(rows["text"], rows["label"], strict=True):
            enc = tokenizer(text, truncation=True, max_length=16, return_tensors="pt")
            logits = model(**enc).logits.float()
            loss += float(torch.nn.functional.cross_entropy(logits, torch.tensor([label])))
            correct += int(logits.argmax(-1).item() == label)
    assert math.isclose(first["eval_loss"], loss / 37, rel_tol=1e-4)
    assert first["eval_accuracy"] == correct / 37
    task.evaluate(model, tokenizer, data, **{**settings, "max_length": 8})  # other settings
    other = datasets.Dataset.from_dict({"text": rows["text"][:5], "label": rows["label"][:5]})
    task.evaluate(model, tokenizer, other, **settings)  # another data set
    assert calls == [16, 8, 16]
    assert len(base._KEPT) <= base._KEPT_SETS
