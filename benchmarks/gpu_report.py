"""The outputs of ``benchmarks/gpu.py``: versions, the device, gpu.json, gpu.md, RESULTS.md."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gpu_common import TITLE


def versions() -> dict[str, str]:
    """Versions of Python and of every package a part uses ('not installed' where absent)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "flwr",
        "datasets",
        "flwr-datasets",
    ):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    found["cuda"] = str(torch.version.cuda)
    return found


def device_record(device: torch.device) -> dict[str, Any]:
    """The device as measured on: name, compute capability, memory."""
    from fedpeft.models import device_label

    record: dict[str, Any] = {"device": device_label(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record.update(
            capability=f"{props.major}.{props.minor}",
            memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
        )
    return record


def part_status(part: dict[str, Any]) -> list[str]:
    """A part that did not run, as one line (empty for a part that ran)."""
    if "skipped" in part:
        return [f"Skipped: {part['skipped']}."]
    if "error" in part:
        return [f"Failed: `{part['error']}`."]
    return []


def clients_md(part: dict[str, Any], label: str) -> list[str]:
    """LoRA or QLoRA clients: one row per (model, base, precision)."""
    lines = [
        f"{label} Step time leaves out the first third of the steps (warm-up); peak "
        "memory is the device's allocated peak in training.",
        "",
    ]
    if part_status(part):
        return lines + part_status(part)
    lines += [
        "| model | weights | base | precision | trainable / total | step ms | peak MiB | "
        "train loss by thirds | held-out loss | held-out accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in part["runs"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['weights']} | failed: `{r['error']}` |")
            continue
        base = {"none": "fp32"}.get(r["quantization"], r["quantization"])
        losses, (e0, e1), (a0, a1) = r["losses"], r["eval_loss"], r["eval_accuracy"]
        lines.append(
            f"| {r['model']} | {r['weights']} | {base} | {r['precision']} | "
            f"{r['trainable']:,} / {r['params']:,} | {r['step_ms']:.1f} | "
            f"{r['peak_memory_mb']:.0f} | {' -> '.join(f'{x:.3f}' for x in losses)} | "
            f"{e0:.3f} -> {e1:.3f} | {a0:.3f} -> {a1:.3f} |"
        )
    return lines


def lora_md(part: dict[str, Any]) -> list[str]:
    return clients_md(
        part,
        "**LoRA clients**, fp32 base weights; bf16 and fp16 are autocast, "
        "fp16 with a gradient scaler.",
    )


def qlora_md(part: dict[str, Any]) -> list[str]:
    return clients_md(
        part,
        "**QLoRA clients**, the base loaded by bitsandbytes in 4 bits "
        "(NF4) or 8 bits; train.precision=auto.",
    )


def federation_md(part: dict[str, Any]) -> list[str]:
    """Each setting's round time and client figures, and the ratios between them."""
    lines = [
        "**Several clients sharing one GPU**: the in-process Grid runs the real ServerApp "
        "and ClientApp, the clients in turn on one shared base model.",
        "",
    ]
    if part_status(part):
        return lines + part_status(part)
    which = "the rounds after the first" if part["rounds"] > 1 else "round 1 (warm-up included)"
    lines += [
        f"{part['clients']} clients, {part['rounds']} rounds of {part['local_steps']} local "
        f"steps; round time is the mean of {which}.",
        "",
        "| clients a round | round s | client step ms | client peak MiB | process peak MiB |",
        "|---|---|---|---|---|",
    ]
    for run in part["runs"]:
        peak = run.get("process_peak_memory_mb")
        lines.append(
            f"| {run['clients_per_round']} | {run['mean_round_seconds']:.2f} | "
            f"{run['client_step_ms']:.1f} | {run['client_peak_memory_mb']:.0f} | "
            f"{'-' if peak is None else f'{peak:.0f}'} |"
        )
    return lines + [
        "",
        f"All clients a round against one: round time x{part['round_time_ratio']:.2f}, "
        f"client step time x{part['client_step_ratio']:.2f}, client peak memory "
        f"x{part['client_peak_ratio']:.2f}.",
    ]


def aggregation_md(part: dict[str, Any]) -> list[str]:
    """Seconds per rule and client count on each device, and how far the results differ."""
    if part_status(part):
        return ["**Aggregation on the GPU against the CPU.**", "", *part_status(part)]
    shape, dev = part["shape"], part["device"]
    lines = [
        f"**Aggregation on the GPU against the CPU**: {shape['layers']} layers x (query, "
        f"value), d = {shape['d']}, r = {shape['r']} (the {shape['name']} updates of "
        f"benchmarks/aggregation.py); {part['note']}. Relative difference: of the first "
        "matrix's aggregate B @ A, between the two devices.",
        "",
        f"| rule | clients | cpu s | {dev} s | copy to {dev} s | speed-up | relative difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in part["rows"]:
        lines.append(
            f"| {r['rule']} | {r['clients']} | {r['cpu_s']:.3f} | {r['device_s']:.4f} | "
            f"{r['transfer_s']:.3f} | {r['speedup']:.1f}x | {r['rel_diff']:.1e} |"
        )
    return lines


#: part name -> its lines in gpu.md
PART_MD: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "lora": lora_md,
    "qlora": qlora_md,
    "federation": federation_md,
    "aggregation": aggregation_md,
}


def markdown(record: dict[str, Any]) -> str:
    """gpu.md: the command, device and versions, then each part that was asked for."""
    dev = record["device"]
    where = dev["device"]
    if "memory_gib" in dev:
        where += f" ({dev['memory_gib']:.0f} GiB, compute capability {dev['capability']})"
    found = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    lines = [
        f"# {TITLE}",
        "",
        f"`{record['command']}` on {where}, {record['date']}, {record['seconds']:.0f} s in "
        f"all; {found}.",
        "",
    ]
    for name, part in record["parts"].items():
        lines += [*PART_MD[name](part), ""]
    return "\n".join(lines)


def replace_section(text: str, section: str) -> str:
    """``text`` (RESULTS.md) with its GPU section replaced by ``section``, or it appended.

    The section runs from its ``## GPU`` heading to the next ``## `` heading; the parts
    inside it use bold labels, not headings, for that reason.
    """
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("## GPU")), None)
    new = section.strip("\n").splitlines()
    if start is None:
        return "\n".join([*lines, *([""] if lines and lines[-1] else []), *new]) + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = lines[end:]
    return "\n".join([*lines[:start], *new, *([""] + tail if tail else [])]) + "\n"


def write_outputs(record: dict[str, Any], out_dir: Path, results_md: Path) -> None:
    """``gpu.json`` and ``gpu.md`` in ``out_dir``, and the GPU section of ``results_md``.

    The section is gpu.md one heading level down, as ``fedpeft bench`` nests each
    benchmark's results in RESULTS.md.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(record)
    (out_dir / "gpu.json").write_text(json.dumps(record, indent=2) + "\n")
    (out_dir / "gpu.md").write_text(text)
    old = results_md.read_text() if results_md.is_file() else ""
    results_md.write_text(replace_section(old, "#" + text))
    print(f"wrote {out_dir / 'gpu.json'}, {out_dir / 'gpu.md'} and the GPU section of {results_md}")
