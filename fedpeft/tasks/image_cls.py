"""``image-cls``: image classification (e.g. a ViT), scored by cross-entropy and accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel

from fedpeft.config import ScenarioError
from fedpeft.model_sources import ALIASES, model_source
from fedpeft.tasks.base import Batch, Collate, Rows, Task, classify, collated


@dataclass(frozen=True)
class ImagePrep:
    """How raw images become ``pixel_values``: size, channels and normalisation."""

    height: int
    width: int
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)


def image_tensor(image: Any) -> torch.Tensor:
    """One image as a float (C, H, W) tensor in [0, 1].

    PIL images and integer arrays are 0..255; float arrays (e.g. ``digits``) are taken
    as already in [0, 1]. A 2-D array is one grey channel; channels-last is transposed.
    """
    if hasattr(image, "convert"):  # PIL.Image
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    scale = 255.0 if np.issubdtype(array.dtype, np.integer) else 1.0
    tensor = torch.as_tensor(array.astype(np.float32) / scale)
    if tensor.ndim == 2:
        return tensor.unsqueeze(0)
    if tensor.shape[-1] in (1, 3, 4) and tensor.shape[0] not in (1, 3, 4):
        tensor = tensor.permute(2, 0, 1)
    return tensor


def prepare_images(images: Sequence[Any], prep: ImagePrep) -> torch.Tensor:
    """``pixel_values`` (B, C, H, W): resized (bilinear), channel-matched and normalised."""
    out = []
    for image in images:
        x = image_tensor(image)
        if x.shape[0] != prep.channels:  # grey -> RGB by repetition; RGBA -> RGB
            x = x[:1].expand(prep.channels, -1, -1) if x.shape[0] == 1 else x[: prep.channels]
        x = F.interpolate(
            x.unsqueeze(0), size=(prep.height, prep.width), mode="bilinear", align_corners=False
        )
        out.append(x[0])
    pixels = torch.stack(out) if out else torch.zeros(0, prep.channels, prep.height, prep.width)
    mean = torch.tensor(prep.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels - mean) / std


def image_prep_for(name: str) -> ImagePrep:
    """The image preparation for model ``name``.

    A bundled random model's comes from its config (size, channels; mean = std = 0.5);
    a pretrained model's from its ``AutoImageProcessor``.
    """
    make_config = ALIASES[name][0] if name in ALIASES else None
    if make_config is not None:
        config = make_config()
        side = int(getattr(config, "image_size", 224))
        channels = int(getattr(config, "num_channels", 3))
        return ImagePrep(side, side, channels, (0.5,) * channels, (0.5,) * channels)
    try:
        processor = AutoImageProcessor.from_pretrained(model_source(name))
    except (OSError, ValueError) as err:
        raise ScenarioError(
            f"cannot load an image processor for model.name={name!r}: {str(err).splitlines()[0]}"
        ) from None
    size: dict[str, int] = dict(getattr(processor, "size", None) or {})
    crop: dict[str, int] = dict(getattr(processor, "crop_size", None) or {})
    edge = size.get("shortest_edge", 224)
    height = int(crop.get("height", size.get("height", edge)))
    width = int(crop.get("width", size.get("width", edge)))
    mean = tuple(float(m) for m in (getattr(processor, "image_mean", None) or (0.5,) * 3))
    std = tuple(float(s) for s in (getattr(processor, "image_std", None) or (0.5,) * 3))
    if not getattr(processor, "do_normalize", True):
        mean, std = (0.0,) * len(mean), (1.0,) * len(std)
    return ImagePrep(height, width, len(mean), mean, std)


class ImageClassification(Task):
    """``image`` -> one of ``label``'s classes, scored by cross-entropy and accuracy."""

    name = "image-cls"
    description = "image classification (AutoModelForImageClassification, e.g. a ViT)"
    peft_task_type = None  # peft has no image task type: the head is named explicitly
    head_modules = ("classifier",)  # ViT, DeiT, ConvNeXt, ...
    has_token_embeddings = False
    auto_model = AutoModelForImageClassification
    columns = ("image", "label")

    def model_from_pretrained(self, source: str, num_labels: int, **kwargs: Any) -> PreTrainedModel:
        """Pretrained weights; the head is replaced when its class count differs."""
        return AutoModelForImageClassification.from_pretrained(
            source, num_labels=num_labels, ignore_mismatched_sizes=True, **kwargs
        )

    def load_processor(self, name: str) -> ImagePrep:
        """How this model wants its images (see :func:`image_prep_for`)."""
        return image_prep_for(name)

    def make_collate(self, processor: Any, max_length: int) -> Collate:
        """Images upscaled or resized to the model's size and normalised; ``max_length`` unused."""
        prep: ImagePrep = processor

        def collate(rows: Rows) -> Batch:
            return {
                "pixel_values": prepare_images(rows["image"], prep),
                "labels": torch.as_tensor(rows["label"], dtype=torch.long),
            }

        return collate

    def evaluate(
        self,
        model: torch.nn.Module,
        processor: Any,
        data: datasets.Dataset,
        *,
        batch_size: int,
        max_length: int,
        device: torch.device,
        generate: int = 0,
        max_new_tokens: int = 32,
        dpo_beta: float = 0.1,
    ) -> dict[str, float]:
        """Mean cross-entropy and accuracy, in data order."""
        collate = self.make_collate(processor, max_length)
        batches = collated(data, range(len(data)), collate, batch_size)
        return classify(model, batches, len(data), device)
