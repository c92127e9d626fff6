"""Bundled offline data sets built from WordNet 3.0 nouns.

``wordnet-supersense``: noun gloss -> one of 26 supersenses. ``wordnet-definitions``: the
instruction "Define the word X." -> the gloss's definition. Both come from Debian's
``wordnet-base`` (WordNet 3.0 in ``/usr/share/wordnet``). Each line of ``data.noun`` is a
synset: field 2 is its lexicographer file number (03 = noun.Tops ... 28 = noun.time),
field 5 its first lemma, and the text after `` | `` is its gloss.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from fedpeft.config import ScenarioError

WORDNET_DIR = Path("/usr/share/wordnet")
INSTALL_HINT = "install it with `apt-get install wordnet-base` (Debian/Ubuntu) or run ./setup.sh"

NOUN_SUPERSENSES = [
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
]
FIRST_NOUN_LEXFILE = 3  # lexicographer files 03..28 are the noun supersenses


def _noun_records(wordnet_dir: Path) -> Iterator[tuple[str, str, str, int, str | None]]:
    """Yield (offset, first lemma, gloss, supersense, first hypernym offset or None)."""
    path = wordnet_dir / "data.noun"
    if not path.is_file():
        raise ScenarioError(f"WordNet not found at {path}: {INSTALL_HINT}")
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            fields, _, gloss = line.partition(" | ")
            parts = fields.split()
            words = int(parts[3], 16)  # synset_offset lex_filenum ss_type w_cnt (word lex_id)*
            pointers = parts[4 + 2 * words + 1 :]  # p_cnt, then (symbol offset pos src/tgt)*
            hypernym = next(
                (pointers[i + 1] for i in range(0, len(pointers) - 3, 4) if pointers[i] == "@"),
                None,
            )
            yield parts[0], parts[4], gloss.strip(), int(parts[1]) - FIRST_NOUN_LEXFILE, hypernym


def noun_synsets(wordnet_dir: Path = WORDNET_DIR) -> Iterator[tuple[str, str, int]]:
    """Yield (first lemma, gloss, supersense label 0..25) for every noun synset."""
    for _, lemma, gloss, label, _ in _noun_records(wordnet_dir):
        yield lemma, gloss, label


def read_noun_glosses(wordnet_dir: Path = WORDNET_DIR) -> tuple[list[str], list[int]]:
    """Return (glosses, supersense labels 0..25) for every noun synset in ``data.noun``."""
    texts, labels = [], []
    for _, gloss, label in noun_synsets(wordnet_dir):
        texts.append(gloss)
        labels.append(label)
    return texts, labels


def definition_of(gloss: str) -> str:
    """The definition part of a gloss: the quoted example sentences after it are dropped.

    Examples (``; "the dog barked all night"``) are long and unpredictable; without them a
    response is a short definition, which an exact-match metric can score.
    """
    definition = gloss.split('; "', 1)[0].strip()
    return definition or gloss


def read_noun_definitions(
    wordnet_dir: Path = WORDNET_DIR,
) -> tuple[list[str], list[str], list[int]]:
    """Return (instructions, definitions, supersense labels) for every noun synset.

    The instruction names the synset's first lemma (underscores as spaces); a word with
    several senses appears once per sense, each with its own definition. So about 28% of
    the instructions (23k of 82k) have more than one right answer, some of them across the
    train/test split: exact match on this set has a ceiling below 1, and a model scores
    by learning the senses of a word, not by recalling one test answer.
    """
    instructions, responses, labels = [], [], []
    for lemma, gloss, label in noun_synsets(wordnet_dir):
        instructions.append(f"Define the word {lemma.replace('_', ' ')}.")
        responses.append(definition_of(gloss))
        labels.append(label)
    return instructions, responses, labels


def read_noun_conversations(wordnet_dir: Path = WORDNET_DIR) -> list[list[dict[str, str]]]:
    """A two-exchange conversation per noun synset: define a word, then a follow-up.

    The user asks for a definition, then for a broader word (the first lemma of the
    synset's first hypernym) or, for a synset without one, for its category (the
    supersense, e.g. "animal"). Only the second answer depends on the first turn's word.
    """
    records = list(_noun_records(wordnet_dir))
    lemma_at = {offset: lemma for offset, lemma, _, _, _ in records}
    conversations = []
    for _, lemma, gloss, label, hypernym in records:
        word = lemma.replace("_", " ")
        if hypernym in lemma_at:
            follow_up = ("Name a broader word.", lemma_at[hypernym].replace("_", " "))
        else:
            follow_up = ("Name its category.", NOUN_SUPERSENSES[label].removeprefix("noun."))
        conversations.append(
            [
                {"role": "user", "content": f"Define the word {word}."},
                {"role": "assistant", "content": definition_of(gloss)},
                {"role": "user", "content": follow_up[0]},
                {"role": "assistant", "content": follow_up[1]},
            ]
        )
    return conversations


def read_noun_preferences(seed: int = 2024) -> tuple[list[str], list[str], list[str], list[int]]:
    """Return (instructions, chosen, rejected, supersense labels): a preference per synset.

    Chosen is the synset's definition, as in ``wordnet-definitions``; rejected is the
    whole gloss of another noun, drawn with a fixed seed among the glosses that carry
    quoted example sentences: a wrong answer, and a rambling one. Wrong is what a capable
    model learns to avoid; rambling (quotes, semicolons) is what even a random tiny model
    can learn to avoid, so DPO's loss visibly falls offline.
    """
    import random

    rng = random.Random(seed)
    records = list(noun_synsets())
    rambling = [gloss for _, gloss, _ in records if '; "' in gloss]
    instructions, chosen, rejected, labels = [], [], [], []
    for lemma, gloss, label in records:
        other = gloss
        while other == gloss:
            other = rambling[rng.randrange(len(rambling))]
        instructions.append(f"Define the word {lemma.replace('_', ' ')}.")
        chosen.append(definition_of(gloss))
        rejected.append(other)
        labels.append(label)
    return instructions, chosen, rejected, labels
