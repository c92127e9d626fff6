"""Tasks: what the model is asked to do, from its ``AutoModelFor...`` class to its score.

One :class:`Task` per task (``seq-cls``, ``causal-lm``, ``image-cls``), each in its own
module, registered here by name with :func:`register_task` and looked up with
:func:`get_task`; nothing else branches on the task's name. A task knows

* which ``AutoModelFor...`` class loads its base model, and which freshly initialised
  head modules must train (and travel) with the adapter;
* its input processor (a tokenizer, or an :class:`ImagePrep` for images);
* how a list of rows becomes a batch (:meth:`Task.make_collate`), and
* how a model is scored on a split (:meth:`Task.evaluate`): at least ``eval_loss`` and
  ``eval_accuracy``, the task's main metric.
"""

from __future__ import annotations

from typing import Any

from fedpeft.config import ModelSection, Scenario, ScenarioError
from fedpeft.data import load_task_data
from fedpeft.tasks.base import IGNORE_INDEX, Batch, Collate, Rows, Task
from fedpeft.tasks.causal_lm import (
    PLAIN_PROMPT,
    CausalLanguageModeling,
    encode_example,
    exact_match,
    generate_responses,
    normalise_text,
    prompt_and_completion,
    prompt_ids,
)
from fedpeft.tasks.dpo import DirectPreferenceOptimization
from fedpeft.tasks.image_cls import (
    ImageClassification,
    ImagePrep,
    image_prep_for,
    image_tensor,
    prepare_images,
)
from fedpeft.tasks.seq_cls import SequenceClassification

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Register a task under its name; a duplicate or unnamed task fails loudly."""
    if not getattr(task, "name", ""):
        raise ValueError(f"task {type(task).__name__} has no name")
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """Look a task up by name; an unknown name raises a one-line ScenarioError."""
    if name not in TASKS:
        raise ScenarioError(f"unknown model.task {name!r}; accepted: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def check_scenario(scenario: Scenario) -> None:
    """Fail early, in one line, if the task cannot read the scenario's data or model inputs."""
    task = get_task(scenario.model.task)
    task.check_data(load_task_data(scenario.data).train, scenario.data)
    load_processor(scenario.model)


_PROCESSORS: dict[tuple[str, str], Any] = {}


def forget_processors() -> None:
    """Drop this process's loaded tokenizers and image processors."""
    _PROCESSORS.clear()


def load_processor(cfg: ModelSection) -> Any:
    """The task's input processor for ``cfg.name`` (a tokenizer, or an image preparation).

    Loaded once per process: clients call this every round.
    """
    key = (cfg.task, cfg.name)
    if key not in _PROCESSORS:
        _PROCESSORS[key] = get_task(cfg.task).load_processor(cfg.name)
    return _PROCESSORS[key]


register_task(SequenceClassification())
register_task(CausalLanguageModeling())
register_task(DirectPreferenceOptimization())
register_task(ImageClassification())

__all__ = [
    "IGNORE_INDEX",
    "PLAIN_PROMPT",
    "TASKS",
    "Batch",
    "CausalLanguageModeling",
    "DirectPreferenceOptimization",
    "Collate",
    "ImageClassification",
    "ImagePrep",
    "Rows",
    "SequenceClassification",
    "Task",
    "check_scenario",
    "encode_example",
    "exact_match",
    "generate_responses",
    "get_task",
    "image_prep_for",
    "image_tensor",
    "load_processor",
    "normalise_text",
    "prepare_images",
    "prompt_and_completion",
    "prompt_ids",
    "register_task",
]
