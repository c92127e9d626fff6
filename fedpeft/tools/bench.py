"""``fedpeft bench``: run the benchmarks in ``benchmarks/`` and regenerate RESULTS.md.

Each benchmark is a script that writes ``benchmarks/results/<name>.{json,md}``, so it can
be run on its own too. This runs them in turn (``--quick``: smaller sizes, under 15
minutes on a 2-core CPU), then writes ``benchmarks/RESULTS.md``: the machine, a table
of every target with its measured number (met, or the gap), and each benchmark's own
tables, with the command and date that produced them. Benchmarks are measurements, not
tests: nothing here asserts on time.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]  # fedpeft/tools/bench.py -> the repository
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"

#: name -> (arguments of the full run, arguments of --quick, or None to reuse the last result)
PLAN: dict[str, tuple[list[str], list[str] | None]] = {
    "aggregation": ([], ["--quick"]),
    "scale_memory": (
        ["--clients", "10,100,1000,10000"],
        ["--clients", "10,100,1000", "--variants", "fedavg"],
    ),
    "overhead": (["--scenario", "quickstart"], ["--scenario", "quickstart", "--rounds", "3"]),
    "baselines": ([], ["--quick"]),
    "accuracy": ([], ["--quick"]),
    "deploy_latency": ([], None),  # a deployment on 127.0.0.1: minutes; full runs only
    "ranking": ([], None),  # three 6-round compare-noniid runs, ~10 minutes: full runs only
}
#: benchmarks run by hand on other machines (gpu.py needs CUDA); RESULTS.md keeps their results
ELSEWHERE = ("gpu",)


def run_bench(quick: bool, only: list[str] | None = None) -> int:
    """Run the planned benchmarks (or ``only`` these) and regenerate RESULTS.md."""
    if not BENCH.is_dir():
        print(
            f"fedpeft: no benchmarks/ folder at {BENCH} (run from a clone of the repository)",
            file=sys.stderr,
        )
        return 2
    unknown = sorted(set(only or []) - PLAN.keys())
    if unknown:
        print(
            f"fedpeft: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(PLAN)}",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    ran: dict[str, str] = {}
    for name, (full, fast) in PLAN.items():
        if only and name not in only:
            continue
        args = fast if quick else full
        if args is None:
            ran[name] = "reused: --quick does not rerun it"
            print(f"== {name}: skipped in --quick (its last results are kept)", flush=True)
            continue
        print(f"== {name} {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        env = {**os.environ, "FEDPEFT_BENCH_QUICK": "1" if quick else "0"}
        proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args], cwd=ROOT, env=env)
        ran[name] = (
            f"{'ok' if proc.returncode == 0 else 'FAILED'} in {time.perf_counter() - t0:.0f} s"
        )
        print(f"== {name}: {ran[name]}", flush=True)
    # the latest run of each benchmark, kept across invocations (``--only`` reruns one)
    log = RESULTS / f"runs{'.quick' if quick else ''}.json"
    runs = json.loads(log.read_text()) if log.is_file() else {}
    runs.update(
        {
            k: f"{v} ({time.strftime('%Y-%m-%d')})"
            for k, v in ran.items()
            if not v.startswith("reused")
        }
    )
    RESULTS.mkdir(exist_ok=True)
    log.write_text(json.dumps(runs, indent=2) + "\n")
    write_results(quick, {**ran, **runs}, time.perf_counter() - started)
    print(f"wrote {BENCH / 'RESULTS.md'} in {time.perf_counter() - started:.0f} s")
    return 0 if all(v.startswith(("ok", "reused")) for v in ran.values()) else 1


#: set by :func:`write_results`: a quick run's report prefers the quick results
_PREFER_QUICK = [False]


def _result(name: str, ext: str) -> Path | None:
    """A benchmark's results file: the quick one first in a quick report, else the full one."""
    names = [f"{name}.quick", name] if _PREFER_QUICK[0] else [name, f"{name}.quick"]
    return next((p for n in names if (p := RESULTS / f"{n}.{ext}").is_file()), None)


def _load(name: str) -> dict[str, Any] | None:
    path = _result(name, "json")
    return json.loads(path.read_text()) if path else None


Row = tuple[str, str, str, str]  # (target, goal, measured, verdict)


def targets() -> list[Row]:
    """(target, goal, measured, verdict) for every target of the benchmarks issue."""
    return [
        *_overhead_rows(),
        *_aggregation_rows(),
        *_streaming_rows(),
        *_memory_rows(),
        *_deploy_rows(),
        *_baseline_rows(),
        *_accuracy_rows(),
        *_ranking_rows(),
    ]


def _overhead_rows() -> list[Row]:
    """Fedpeft's time against plain Flower's: end to end, and per round after the first."""
    over = _load("overhead")
    if not over:
        return [("framework overhead", "<= 1.25x, <= 5%/round", "not measured", "gap")]
    e2e, later = over["end_to_end_ratio"], over["later_round_ratio"]
    scen = over["command"].split("--scenario ")[-1]
    return [
        (
            "framework overhead, end to end",
            "<= 1.25x",
            f"{e2e:.2f}x ({scen})",
            "met" if e2e <= 1.25 else "gap",
        ),
        (
            "framework overhead, rounds after the first",
            "<= 1.05x",
            f"{later:.3f}x ({scen})",
            "met" if later <= 1.05 else "gap",
        ),
    ]


def _aggregation_rows() -> list[Row]:
    """The factored SVD's speed-up over the dense one, and aggregation cost per strategy."""
    agg = _load("aggregation")
    if not (agg and agg.get("svd")):
        return []
    speeds = ", ".join(f"{r['flexlora_speedup']:.1f}x at K={r['clients']}" for r in agg["svd"])
    diff = max(r["flexlora_rel_diff"] for r in agg["svd"])
    slow = [r for r in agg["svd"] if r["flexlora_speedup"] < 10]
    verdict = "met" if not slow and diff < 1e-6 else "gap"
    if slow and diff < 1e-6:  # the result agrees; say what limits the speed
        k, stacked = slow[0]["clients"], slow[0]["clients"] * slow[0]["r"]
        verdict = (
            f"gap at K={k}: the stacked factors' rank K*r = {stacked} is "
            f"{stacked / slow[0]['d']:.2f} of d; the factored QR and SVD "
            "grow as (K*r)^2 d, the dense SVD stays d^3"
        )
    sizes = sorted({(r["shape"], r["clients"]) for r in agg["strategies"]})
    return [
        (
            "factored vs dense SVD at d = 4096 (FlexLoRA)",
            ">= 10x, same result",
            f"{speeds}; relative difference {diff:.0e}",
            verdict,
        ),
        (
            "aggregation cost per strategy",
            "10/100/1000 updates, MiniLM and 7B",
            ", ".join(f"{s} K={k}" for s, k in sizes),
            "met"
            if ("7b", 1000) in sizes
            else "gap: 1000 7B-shaped updates are 33 GB, more than this machine's memory",
        ),
    ]


def _streaming_rows() -> list[Row]:
    """Issue 22's targets: replies folded as they arrive, 100 and 1,000 7B-shaped updates."""
    agg = _load("aggregation")
    cells = {
        (r["clients"], r["strategy"]): r
        for r in (agg or {}).get("streaming", [])
        if r["shape"] == "7b"
    }
    if not cells:
        return []

    def show(k: int, name: str) -> str:
        r = cells.get((k, name))
        if r is None:
            return f"{name} not run"
        if "error" in r:
            return f"{name} failed"
        return f"{name} {r['seconds']:.1f} s (+{r['peak_extra_mib'] / 1024:.1f} GiB)"

    limits = {"flexlora": 10.0, "flora": 30.0, "fedex_lora": 30.0}
    hundred = [
        n for n in ("fedavg", "fedit", "flexlora", "flora", "fedex_lora") if (100, n) in cells
    ]
    late = [
        n
        for n in hundred
        if "error" in cells[(100, n)]
        or cells[(100, n)]["seconds"] > limits.get(n, float("inf"))
        or cells[(100, n)]["peak_extra_mib"] > 1.5 * 1024
    ]
    thousand = [n for n in ("fedavg", "fedit", "flexlora") if (1000, n) in cells]
    heavy = [
        n
        for n in thousand
        if "error" in cells[(1000, n)] or cells[(1000, n)]["peak_rss_mb"] > 16 * 1024
    ]
    missing = [n for n in ("fedavg", "fedit", "flexlora") if (1000, n) not in cells]
    return [
        (
            "100 7B-shaped updates folded as they arrive",
            "FlexLoRA <= 10 s, FLoRA and FedEx-LoRA <= 30 s; <= 1.5 GB above the start",
            "; ".join(show(100, n) for n in hundred),
            "met" if not late else f"gap: {', '.join(late)}",
        ),
        (
            "1,000 7B-shaped updates",
            "fedavg, fedit and flexlora complete, peak < 16 GB",
            "; ".join(
                f"{n} {cells[(1000, n)].get('peak_rss_mb', 0) / 1024:.1f} GB peak" for n in thousand
            ),
            "met" if not heavy and not missing else f"gap: {', '.join(heavy + missing)}",
        ),
    ]


def _memory_rows() -> list[Row]:
    """The server's peak memory as the federation grows 100-fold (FedAvg, 10 per round)."""
    fedavg: dict[int, float] = {}  # clients -> peak MiB: the preferred run first, then the other
    stems = ("scale_memory.quick", "scale_memory")
    for stem in stems if _PREFER_QUICK[0] else stems[::-1]:
        if (path := RESULTS / f"{stem}.json").is_file():
            for r in json.loads(path.read_text())["results"].get("fedavg", []):
                fedavg.setdefault(r["clients"], r["server_peak_memory_mb"])
    rows: list[Row] = []
    for name, base, top in (("1,000 vs 10 clients", 10, 1000), ("10,000 vs 100", 100, 10000)):
        if base in fedavg and top in fedavg:
            ratio = fedavg[top] / fedavg[base]
            rows.append(
                (
                    f"server memory, {name} (10 per round)",
                    "<= 1.2x",
                    f"{ratio:.3f}x",
                    "met" if ratio <= 1.2 else "gap",
                )
            )
    return rows


def _deploy_rows() -> list[Row]:
    """A deployed round's extra seconds over a simulated one's, and the model loads per node."""
    deploy = _load("deploy_latency")
    if not deploy:
        return []
    extra, loads = deploy.get("extra_seconds_per_round"), deploy.get("model_loads_per_node")
    if not isinstance(extra, float):  # results from before the node trainer
        latency = deploy.get("round_ratio")
        shown = f"{latency:.1f}x" if isinstance(latency, float) else "see below"
        return [("deployment round latency vs simulation", "reported", shown, "reported")]
    variants = deploy["deployments"]
    others = [
        f"+{variants[name]['extra_seconds_per_round']:.2f} s {label}"
        for name, label in (
            ("trainer, --forwarder", "with --forwarder"),
            ("--no-trainer", "without the trainer"),
        )
        if name in variants
    ]
    measured = f"+{extra:.2f} s" + (f" ({', '.join(others)})" if others else "")
    return [
        (
            "deployed round, extra seconds over simulation (MiniLM, 2 nodes)",
            "<= 3 s",
            measured,
            "met" if extra <= 3 else "gap",
        ),
        ("model loads per deployed node and run", "1", str(loads), "met" if loads == 1 else "gap"),
    ]


def _baseline_rows() -> list[Row]:
    """LoRA's uplink bytes and accuracy against full fine-tuning's."""
    baselines = _load("baselines")
    if not baselines:
        return [
            (
                "full fine-tuning baseline (plain Flower FedAvg)",
                "bytes, accuracy, time",
                "not measured",
                "gap",
            )
        ]
    by = {r["variant"]: r for r in baselines["results"]}
    full, lora = by.get("full fine-tuning, FedAvg"), by.get("LoRA, FedIT")
    if not (full and lora):
        return []
    saving = full["bytes_up_per_client_round"] / lora["bytes_up_per_client_round"]
    return [
        (
            f"LoRA against full fine-tuning, uplink bytes ({baselines['scenario']})",
            "about 300x less",
            f"{saving:.0f}x less; accuracy "
            f"{lora['final_accuracy']:.4f} vs {full['final_accuracy']:.4f}",
            "reported",
        )
    ]


def _accuracy_rows() -> list[Row]:
    """Federated IID LoRA's accuracy as a share of centralised LoRA's."""
    acc = _load("accuracy")
    if not acc:
        return [("federated vs centralised LoRA", "IID >= 0.95", "not measured", "gap")]
    by = {r["setting"]: r for r in acc["results"]}
    iid = by["federated IID"]["vs_centralised"]
    label = "quick: 2 rounds" if acc["command"].endswith("--quick") else "6 rounds"
    why = (
        "gap: at equal examples, 5 clients' 20 steps averaged are 20 sequential steps "
        "a round (a 5x larger batch), centralised takes 100; ratios by round below"
    )
    return [
        (
            "federated IID against centralised LoRA",
            ">= 0.95",
            f"{iid:.3f} ({label})",
            "met" if iid >= 0.95 else why,
        )
    ]


def _ranking_rows() -> list[Row]:
    """The strategies' order under non-IID data with heterogeneous ranks."""
    ranked = "strategies ranked under non-IID data with heterogeneous ranks"
    ranking = _load("ranking")
    if not (ranking and ranking["results"]):
        return [(ranked, "a ranking", "not measured (python benchmarks/ranking.py)", "gap")]
    order = " > ".join(f"{r['strategy']} {r['final_accuracy']:.3f}" for r in ranking["results"])
    return [(ranked, "a ranking", f"{order} (Dirichlet 0.1, ranks 4/8/16)", "reported")]


def write_results(quick: bool, ran: dict[str, str], seconds: float) -> None:
    """Regenerate ``benchmarks/RESULTS.md`` from every results file present.

    A quick run reports the quick results where there are any, and the full ones
    otherwise; each section names the command that produced it.
    """
    _PREFER_QUICK[0] = quick
    memory = psutil.virtual_memory().total / 2**30
    machine = (
        f"{platform.platform()}, {psutil.cpu_count()} CPUs, {memory:.0f} GiB, "
        f"Python {platform.python_version()}"
    )
    lines = [
        "# fedpeft benchmarks",
        "",
        f"Regenerated by `fedpeft bench{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d')} (this invocation: {seconds / 60:.1f} minutes), on "
        f"{machine}. Each ratio is measured within one run of its benchmark.",
        "",
        "Latest run of each benchmark: " + "; ".join(f"{k} {v}" for k, v in ran.items()) + ".",
        "",
        "## Targets",
        "",
        "| target | goal | measured | verdict |",
        "|---|---|---|---|",
        *(f"| {t} | {g} | {m} | {v} |" for t, g, m, v in targets()),
        "",
    ]
    for name in (*PLAN, *ELSEWHERE):
        md = _result(name, "md")
        if md:
            text = md.read_text().strip().splitlines()
            lines += ["#" + text[0], *text[1:], ""]  # one level down
    (BENCH / "RESULTS.md").write_text("\n".join(lines))
