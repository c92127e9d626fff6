"""Bundled offline data set ``wordnet-supersense``: noun gloss -> one of 26 supersenses.

Built from Debian's ``wordnet-base`` (WordNet 3.0 in ``/usr/share/wordnet``). Each line of
``data.noun`` is a synset: field 2 is its lexicographer file number (03 = noun.Tops ...
28 = noun.time) and the text after `` | `` is its gloss.
"""

from __future__ import annotations

from pathlib import Path

from fedpeft.config import ScenarioError

WORDNET_DIR = Path("/usr/share/wordnet")
INSTALL_HINT = "install it with `apt-get install wordnet-base` (Debian/Ubuntu) or run ./setup.sh"

NOUN_SUPERSENSES = [
    "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body",
    "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food",
    "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity",
    "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
]  # fmt: skip
FIRST_NOUN_LEXFILE = 3  # lexicographer files 03..28 are the noun supersenses


def read_noun_glosses(wordnet_dir: Path = WORDNET_DIR) -> tuple[list[str], list[int]]:
    """Return (glosses, supersense labels 0..25) for every noun synset in ``data.noun``."""
    path = wordnet_dir / "data.noun"
    if not path.is_file():
        raise ScenarioError(f"WordNet not found at {path}: {INSTALL_HINT}")
    texts, labels = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            fields, _, gloss = line.partition(" | ")
            lexfile = int(fields.split(" ", 3)[1])
            texts.append(gloss.strip())
            labels.append(lexfile - FIRST_NOUN_LEXFILE)
    return texts, labels
