"""fedpeft's CUDA paths on one GPU: LoRA in bf16 and fp16, QLoRA, clients sharing one card.

    python benchmarks/gpu.py [--device cuda:0] [--parts lora,qlora,federation,aggregation]

On a machine without CUDA it exits 2 with one line. It needs no hub and no network: the
models are built from configs (and the MiniLM wheel where it is installed) and the data
is synthetic. Each part is a function of the device:

1. ``lora``: a random Llama causal LM (4 layers, hidden size 512, a 4,000-word synthetic
   vocabulary; built from a ``LlamaConfig``, saved in fp32 to a temporary folder) and the
   MiniLM classifier, each loaded by fedpeft (``fedpeft.models.load_base_model``), given
   LoRA by ``fedpeft.methods`` and trained by ``fedpeft.train.train_steps`` in fp32, bf16
   autocast and fp16 autocast with a gradient scaler: step time, peak GPU memory, the
   mean training loss of each third of the steps (fresh batches and optimizer each third,
   as in a new round; the first third also warms the GPU up and is left out of the step
   time) and the task's held-out loss before and after (``Task.evaluate``).
2. ``qlora``: the same Llama loaded in 4 bits (NF4) and in 8 bits through bitsandbytes
   (``model.quantization``), LoRA on top, trained at ``train.precision=auto``. Without
   bitsandbytes it is recorded as skipped, with the reason.
3. ``federation``: ``--clients`` clients sharing the GPU through the in-process Grid
   (``server/inprocess.py``: the real ServerApp and ClientApp code, no Ray), all of them
   in every round, against one client a round: per-client peak memory and step time
   (what each client reports) and round time. The in-process Grid runs clients one after
   another on one shared base model.
4. ``aggregation``: the 7B-shaped updates of ``benchmarks/aggregation.py`` (32 layers x
   query and value, d = 4096, r = 16; its own generator) aggregated by the functions of
   ``strategies/lora_math.py`` on the GPU against the CPU. fedpeft's strategies aggregate
   on the CPU (``aggregate_train`` takes no device), so this times the maths they call,
   on cuda tensors, plus the copy of the updates to the GPU.

The parts live in ``gpu_clients.py`` (lora, qlora), ``gpu_federation.py`` and
``gpu_aggregate.py``, the sizes, synthetic data and models in ``gpu_common.py``, the
outputs in ``gpu_report.py``; this file is the command.

It writes ``benchmarks/results/gpu.{json,md}`` and the GPU section of
``benchmarks/RESULTS.md``. A part or client setting that fails is recorded with its error,
the others still run, and the script exits 1. ``--device cpu --tiny --out DIR`` is a dry run of the
script itself on the CPU (the tests run it); its figures are not GPU figures.

Running it on a GPU machine. Where fedpeft is installed (``./setup.sh`` with
``TORCH_SPEC=torch``, then ``.venv/bin/pip install bitsandbytes``), run
``.venv/bin/python benchmarks/gpu.py``. On a GPU machine with no network whose Python
has torch (CUDA), transformers, peft, accelerate, pandas, pyarrow, matplotlib and psutil
but not Flower or bitsandbytes, carry the rest as wheels (51 MB, 43 of them
bitsandbytes's). On a machine with network, in the repository root (``wheels/`` is
git-ignored; set ``--python-version`` to the GPU machine's Python):

    pip download --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 -d wheels/ bitsandbytes==0.50.2 flwr==1.42.0 \
        flwr-datasets==0.6.1 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 \
        cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 pycryptodome==3.24.1 \
        grpcio-health-checking==1.81.1 iterators==0.0.2

then copy the repository with its ``wheels/`` to the GPU machine and run, in its root:

    python3 -m pip install --no-deps --no-index --target /tmp/fedpeft-site wheels/*.whl
    PYTHONPATH=/tmp/fedpeft-site python3 benchmarks/gpu.py

Its default sizes are meant to finish well under 8 minutes on one recent GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]
from gpu_aggregate import RULES, aggregation_part  # noqa: E402
from gpu_clients import client_run, lora_client, lora_part, qlora_part  # noqa: E402
from gpu_common import (  # noqa: E402
    CLASSES,
    MINILM_SHAPE,
    NOT_RUN,
    QUIET_ENV,
    RESULTS_DIR,
    RESULTS_MD,
    TITLE,
    Sizes,
    Skip,
    classification_rows,
    instruction_rows,
    minilm_source,
    precisions,
    synthetic_words,
    thirds,
)
from gpu_federation import federation_part  # noqa: E402
from gpu_report import (  # noqa: E402
    device_record,
    federation_md,
    lora_md,
    replace_section,
    versions,
    write_outputs,
)

#: what the tests reach through this script (it is loaded from its file, not imported)
__all__ = [
    "CLASSES",
    "MINILM_SHAPE",
    "NOT_RUN",
    "RULES",
    "TITLE",
    "Sizes",
    "classification_rows",
    "client_run",
    "failed",
    "federation_md",
    "federation_part",
    "instruction_rows",
    "lora_client",
    "lora_md",
    "main",
    "minilm_source",
    "parse_args",
    "precisions",
    "replace_section",
    "sizes_from",
    "synthetic_words",
    "thirds",
]


#: part name -> the function that runs it on a device
PARTS: dict[str, Callable[[torch.device, Sizes, Path], dict[str, Any]]] = {
    "lora": lora_part,
    "qlora": qlora_part,
    "federation": federation_part,
    "aggregation": aggregation_part,
}


def run_part(name: str, device: torch.device, sizes: Sizes, work: Path) -> dict[str, Any]:
    """Run one part; a missing prerequisite is a skip, any other failure an error entry."""
    started = time.perf_counter()
    try:
        result = PARTS[name](device, sizes, work)
    except Skip as why:
        result = {"skipped": str(why)}
    except ModuleNotFoundError as err:
        result = {
            "skipped": f"{err.name} is not installed here (carry its wheel: see the docstring)"
        }
    except Exception as err:  # noqa: BLE001 - one failing part must not lose the others
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {err}"}
    result["seconds"] = time.perf_counter() - started
    status = result.get("skipped") or result.get("error") or "done"
    print(f"== {name}: {status} ({result['seconds']:.0f} s)", flush=True)
    return result


# ---------------------------------------------------------------------------- command


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 10,100, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 10,100, got {text!r}")
    return values


def _device(text: str) -> torch.device:
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cuda:0)") from None


def _parts(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {', '.join(unknown) or text!r}; known: {', '.join(PARTS)}"
        )
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; sizes left unset keep :class:`Sizes`' defaults (or ``--tiny``'s)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--device", type=_device, default=torch.device("cuda"), help="torch device (default: cuda)"
    )
    parser.add_argument(
        "--parts",
        type=_parts,
        default=list(PARTS),
        help=f"comma-separated parts to run (default: {','.join(PARTS)})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for gpu.json and gpu.md (default: benchmarks/results)",
    )
    parser.add_argument(
        "--results-md",
        type=Path,
        default=None,
        help="RESULTS.md whose GPU section is written (default: "
        "benchmarks/RESULTS.md, or OUT/RESULTS.md with --out)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny sizes: a dry run of the script (with --device cpu)",
    )
    parser.add_argument("--steps", type=int, help="local steps of each LoRA and QLoRA client")
    parser.add_argument("--clients", type=int, help="clients sharing the GPU in the federation")
    parser.add_argument("--rounds", type=int, help="federated rounds")
    parser.add_argument(
        "--agg-clients",
        type=_int_list,
        help="client counts of the aggregation part (default: 10,100)",
    )
    parser.add_argument("--no-minilm", action="store_true", help="train the Llama only")
    args = parser.parse_args(argv)
    for key in ("steps", "clients", "rounds"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key} must be a positive integer, got {value}")
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    """:class:`Sizes` (tiny with ``--tiny``) with the command line's overrides."""
    sizes = Sizes.tiny() if args.tiny else Sizes()
    for key in ("steps", "clients", "rounds", "agg_clients"):
        if getattr(args, key) is not None:
            setattr(sizes, key, getattr(args, key))
    sizes.minilm = sizes.minilm and not args.no_minilm
    return sizes


def main(argv: list[str] | None = None) -> int:
    """Run the parts on the device, write the results; 2 without the device, 1 on a failure."""
    args = parse_args(argv)
    device: torch.device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"benchmarks/gpu.py: no CUDA device here (torch {torch.__version__} sees none); "
            "run it on a machine with an NVIDIA GPU, as its docstring says",
            file=sys.stderr,
        )
        return 2
    if device.type != "cuda" and args.out is None:
        print(
            f"benchmarks/gpu.py: --device {device} is a dry run; give --out DIR, so that it "
            "cannot replace the GPU results in benchmarks/",
            file=sys.stderr,
        )
        return 2
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes
    out_dir = args.out or RESULTS_DIR
    results_md = args.results_md or (out_dir / "RESULTS.md" if args.out else RESULTS_MD)
    sizes = sizes_from(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedpeft-gpu-") as tmp:
        parts = {name: run_part(name, device, sizes, Path(tmp)) for name in args.parts}
    record = {
        "command": " ".join(
            ["python benchmarks/gpu.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": time.strftime("%Y-%m-%d"),
        "device": device_record(device),
        "versions": versions(),
        "sizes": asdict(sizes),
        "parts": parts,
        "seconds": time.perf_counter() - started,
    }
    write_outputs(record, out_dir, results_md)
    return 1 if failed(parts) else 0


def failed(parts: dict[str, dict[str, Any]]) -> bool:
    """Whether a part, or one client run of a part, ended in an error."""
    return any(
        "error" in part or any("error" in run for run in part.get("runs", []))
        for part in parts.values()
    )


if __name__ == "__main__":
    sys.exit(main())
