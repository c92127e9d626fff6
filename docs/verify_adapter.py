"""Load a fedpeft run's adapter with plain transformers + peft and re-measure its accuracy.

Usage: python docs/verify_adapter.py RUN_DIR

Deliberately imports nothing from fedpeft: it proves the adapter in RUN_DIR/adapter is a
standard peft checkpoint. It checks that every tensor in the checkpoint was loaded and
that no adapter tensor of the model was left unloaded, then evaluates on the held-out
split that summary.json names and prints the accuracy next to the one fedpeft reported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main(run_dir: Path) -> int:
    summary = json.loads((run_dir / "summary.json").read_text())
    ev = summary["eval_data"]
    adapter_dir = run_dir / "adapter"
    base_path = json.loads((adapter_dir / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    base = AutoModelForSequenceClassification.from_pretrained(
        base_path, num_labels=len(summary["label_names"])
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    missing, unexpected = sorted(set(loaded) - set(saved)), sorted(set(saved) - set(loaded))
    if missing or unexpected:
        print(f"FAIL: missing adapter keys {missing}, unexpected keys {unexpected}")
        return 1
    differ = [k for k in saved if not torch.equal(saved[k], loaded[k].cpu())]
    if differ:
        print(f"FAIL: {len(differ)} adapter tensors differ from the checkpoint, e.g. {differ[0]}")
        return 1

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    test = datasets.load_from_disk(ev["path"])[ev["split"]].select(range(ev["examples"]))
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 64):
            rows = test[start : start + 64]
            enc = tokenizer(
                rows["text"],
                truncation=True,
                max_length=ev["max_length"],
                padding=True,
                return_tensors="pt",
            )
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor(rows["label"])).sum())
    accuracy = correct / len(test)
    reported = summary["final"]["eval_accuracy"]
    print(json.dumps({"adapter_keys": len(saved), "accuracy": accuracy, "reported": reported}))
    return 0 if abs(accuracy - reported) < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
