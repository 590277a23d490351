"""Per-step time and peak memory of every optimiser on the paper's architectures.

    python -m kfac2l.bench [--problems mnist_ae cuda_convnet] [--optimizers ...] [--rounds 3]
                           [--schedules paper every-step] [--json]

For each problem and schedule it times full training steps (Fisher pass when due, forward,
backward, preconditioning, base step) with synthetic inputs of the problem's shape, and prints
the median step time after warm-up and its ratios to SGD and to KFAC at the same schedule.

Schedules:
  paper       T_cov = T_inv = 100 (KFAC refreshes every 100 steps; the two-level coarse
              correction is computed every step from a fresh Fisher batch of B/4 samples). The
              median step is a non-refresh step; ``amortised`` adds 1/100 of a refresh step.
  every-step  T_cov = T_inv = 1 (everything refreshed every step).

Each (problem, optimiser) runs in its own process (``--rounds`` times, pooled): first alone
(refresh step, warm-up, peak memory), then step by step in turn with fresh SGD and KFAC models, so
that every ratio compares steps timed seconds apart (a shared machine's slow drifts cancel).
Peak memory is the process's own, read after the first phase: CUDA peak
allocated memory on a GPU, peak resident set size (whole process, incl. model and data) on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from tqdm import tqdm

from kfac2l.models import MODELS, build_model
from kfac2l.names import NO_CURVATURE
from kfac2l.optim import OPTIMIZERS, make_optimizer
from kfac2l.optim.step import get_task, training_step

PROBLEMS = {
    # name: (model, task, batch size, classes)
    "mnist_ae": ("mnist_ae", "bernoulli_autoencoder", 512),
    "curves_ae": ("curves_ae", "bernoulli_autoencoder", 256),
    "faces_ae": ("faces_ae", "gaussian_autoencoder", 1024),
    "cuda_convnet": ("cuda_convnet", "classification", 256),
    "resnet18": ("resnet18", "classification", 128),
    "resnet34": ("resnet34", "classification", 512),
    "deep_linear_a": ("deep_linear_a", "classification", 512),
    "deep_linear_b": ("deep_linear_b", "classification", 512),
}
SCHEDULES = {"paper": 100, "every-step": 1}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


REFERENCES = ("sgd", "kfac")


def _build(model_name: str, optimizer: str, interval: int, dev: torch.device):
    model = build_model(model_name, seed=0).to(dev)
    opts = {}
    if optimizer.startswith("space:"):  # any registered coarse space, e.g. space:gradient
        optimizer, opts["coarse_space"] = "two-level", optimizer.split(":", 1)[1]
    if optimizer not in NO_CURVATURE:
        opts["damping"] = 1e-1
        if optimizer != "ngd":
            opts.update(cov_interval=interval, inv_interval=interval)
    return model, make_optimizer(optimizer, model, lr=1e-3, **opts)


def _timed_step(model, opt, task, x, y, dev) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    training_step(model, opt, task, x, y)
    _sync(dev)
    return time.perf_counter() - t0


def run_worker(
    problem: str, optimizer: str, device: str, steps: int, warmup: int, batch: int | None,
    schedules: tuple[str, ...] = tuple(SCHEDULES), versus: str | None = None,
) -> dict:
    """Measure one optimiser on one problem (in this process), in two phases per schedule.

    1. Alone: step 0 (the refresh of factors and inverses) and the warm-up; peak memory is read
       after this phase, so it is the optimiser's own.
    2. Paired timing: fresh SGD and KFAC models run next to the optimiser's, one step of each in
       turn (rotating order) for ``steps`` rounds; every ratio is then taken between steps timed
       seconds apart, so slow drifts of a shared machine cancel. ``versus``: a third reference
       optimiser stepped alongside (e.g. ``residu``), for ratios to it paired the same way.
    """
    dev = torch.device(device)
    model_name, task_name, default_batch = PROBLEMS[problem]
    batch = batch or default_batch
    task = get_task(task_name)
    spec = MODELS[model_name]
    torch.manual_seed(0)
    x = torch.rand(batch, *spec.input_shape, device=dev)
    y = None if task.autoencoder else torch.randint(0, spec.num_outputs, (batch,), device=dev)
    result = {"problem": problem, "optimizer": optimizer, "batch": batch, "device": device, "solves": 0}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for schedule in schedules:  # phase 1
        interval = SCHEDULES[schedule]
        model, opt = _build(model_name, optimizer, interval, dev)
        refresh = _timed_step(model, opt, task, x, y, dev)  # step 0 refreshes (incl. first-call overheads)
        # read after a step: the eigenbasis route of the polynomial spaces is chosen in the first one
        result["solves"] = getattr(opt.preconditioner, "kronecker_solves", 0)
        result[schedule] = {"refresh_s": [refresh], "interval": interval}
        del model, opt
    if dev.type == "cuda":
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    references = (*REFERENCES, versus) if versus and versus not in REFERENCES else REFERENCES
    names = list(dict.fromkeys([optimizer, *references]))
    for schedule in schedules:  # phase 2
        interval = SCHEDULES[schedule]
        runs = {name: _build(model_name, name, interval, dev) for name in names}
        times: dict[str, list[float]] = {name: [] for name in names}
        for k in range(warmup + steps):
            for j in range(len(names)):
                name = names[(j + k) % len(names)]
                dt = _timed_step(*runs[name], task, x, y, dev)
                if k >= warmup:
                    times[name].append(dt)
        result[schedule]["times_s"] = times[optimizer]
        result[schedule]["ref_times_s"] = {ref: times[ref] for ref in references}
        del runs
    return result


def summarise(runs: list[dict]) -> dict:
    """Pool the timed steps of several rounds of one (problem, optimiser): median step time,
    median refresh step, the amortised step (median + 1/interval of the refresh's excess) and
    the medians of the SGD and KFAC steps timed alongside."""
    row = {k: runs[0][k] for k in ("problem", "optimizer", "batch", "device", "solves")}
    row["rounds"] = len(runs)
    row["peak_mem_mb"] = max(r["peak_mem_mb"] for r in runs)
    for schedule in SCHEDULES:
        if schedule not in runs[0]:
            continue
        times = [t for r in runs for t in r[schedule]["times_s"]]
        refresh = statistics.median([t for r in runs for t in r[schedule]["refresh_s"]])
        interval = runs[0][schedule]["interval"]
        median = statistics.median(times)
        row[schedule] = {
            "median_s": median,
            "refresh_s": refresh,
            "amortised_s": median + max(refresh - median, 0.0) / interval if interval > 1 else median,
            "steps": len(times),
            "ref_median_s": {
                ref: statistics.median([t for r in runs for t in r[schedule]["ref_times_s"][ref]])
                for ref in runs[0][schedule]["ref_times_s"]
            },
        }
    return row


def _spawn(problem, optimizer, args) -> dict:
    cmd = [sys.executable, "-m", "kfac2l.bench", "--worker", problem, optimizer, "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--schedules", *args.schedules]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    if args.imports:
        cmd += ["--import", *args.imports]
    if args.versus:
        cmd += ["--versus", args.versus]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(f"bench worker {problem}/{optimizer} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(rows: list[dict]) -> list[dict]:
    """Add step-time ratios to SGD and to KFAC, each against the reference steps timed alongside
    (same worker), and the paper schedule's arithmetic floor of the ratio to KFAC:

        floor = (t_SGD + n (t_KFAC - t_SGD)) / t_KFAC,

    n being the optimiser's dense Kronecker solves per step (``kronecker_solves``); KFAC's own
    extra time over SGD is one solve. The floor ignores the Fisher pass and the coarse work, so
    a measured ratio can approach it but not beat it (up to noise). The amortised ratio adds to
    each side 1/interval of its refresh step's excess (KFAC's from KFAC's own row)."""
    by = {(r["problem"], r["optimizer"]): r for r in rows}
    for r in rows:
        for schedule in SCHEDULES:
            if schedule not in r:
                continue
            s = r[schedule]
            ref = s["ref_median_s"]
            s["vs_sgd"] = s["median_s"] / ref["sgd"]
            s["vs_kfac"] = s["median_s"] / ref["kfac"]
            for extra in set(ref) - set(REFERENCES):  # --versus NAME, paired in the same worker
                s[f"vs_{extra}"] = s["median_s"] / ref[extra]
            kfac = by.get((r["problem"], "kfac"), {}).get(schedule)
            excess = max(kfac["refresh_s"] - kfac["median_s"], 0.0) if kfac else 0.0
            interval = SCHEDULES[schedule]
            s["amortised_vs_kfac"] = s["amortised_s"] / (ref["kfac"] + (excess / interval if interval > 1 else 0.0))
            if schedule == "paper" and r.get("solves"):
                s["floor_vs_kfac"] = (ref["sgd"] + r["solves"] * (ref["kfac"] - ref["sgd"])) / ref["kfac"]
    return rows


def print_table(rows: list[dict]) -> None:
    dev = rows[0]["device"] if rows else "?"
    name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; synthetic inputs of each problem's real shape; median step after warm-up")
    head = (f"{'problem':13} {'batch':>5} {'optimizer':10} | {'paper ms':>9} {'/SGD':>5} {'/KFAC':>6} {'amort/KFAC':>10}"
            f" {'floor':>5}"
            f" | {'every ms':>9} {'/SGD':>5} {'/KFAC':>6} | {'peak MB':>8}")
    print(head)
    print("-" * len(head))
    footer = ("floor: lowest /KFAC ratio the optimiser's dense Kronecker solves per step allow at the paper "
              "schedule, (t_SGD + n (t_KFAC - t_SGD)) / t_KFAC")
    nan = {"median_s": float("nan")}
    versus = sorted({k for r in rows for s in (r.get("paper", {}), r.get("every-step", {})) for k in s
                     if k.startswith("vs_") and k not in ("vs_sgd", "vs_kfac")})
    for r in rows:
        p, e = r.get("paper", nan), r.get("every-step", nan)
        extra = "".join(f" | paper /{k[3:].upper()} {p.get(k, float('nan')):5.2f}"
                        f" every /{k[3:].upper()} {e.get(k, float('nan')):5.2f}" for k in versus)
        print(f"{r['problem']:13} {r['batch']:5d} {r['optimizer']:10} | {1e3 * p['median_s']:9.1f} "
              f"{p.get('vs_sgd', float('nan')):5.2f} {p.get('vs_kfac', float('nan')):6.2f} "
              f"{p.get('amortised_vs_kfac', float('nan')):10.2f} {p.get('floor_vs_kfac', float('nan')):5.2f} "
              f"| {1e3 * e['median_s']:9.1f} "
              f"{e.get('vs_sgd', float('nan')):5.2f} {e.get('vs_kfac', float('nan')):6.2f} | {r['peak_mem_mb']:8.0f}"
              f"{extra}")
    print(footer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="kfac2l step-time benchmark")
    parser.add_argument("--problems", nargs="+", default=["mnist_ae", "cuda_convnet"], choices=list(PROBLEMS))
    parser.add_argument("--optimizers", nargs="+", default=[o for o in OPTIMIZERS if o != "two-level"],
                        help=f"registry names ({', '.join(OPTIMIZERS)}) or space:NAME for any registered coarse space")
    parser.add_argument("--import", dest="imports", nargs="*", default=[], metavar="MODULE",
                        help="modules to import first (where your coarse spaces are registered)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=8, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="override the problem's batch size")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every optimiser's worker this many times and pool the steps")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--versus", default=None, metavar="OPTIMIZER",
                        help="also step this optimiser in every worker and print ratios to it, paired like "
                             "those to SGD and KFAC (e.g. --versus residu)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="also write the rows as JSON with the command, git commit and machine (a result file)")
    parser.add_argument("--worker", nargs=2, metavar=("PROBLEM", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import importlib

    from kfac2l.curvature.spaces import COARSE_SPACES

    for module in args.imports:
        importlib.import_module(module)
    for opt in args.optimizers:
        name = opt.split(":", 1)[1] if opt.startswith("space:") else None
        if (name is None and opt not in OPTIMIZERS) or (name is not None and name not in COARSE_SPACES):
            parser.error(f"unknown optimizer {opt!r}; valid: {', '.join(OPTIMIZERS)}, or space:NAME with NAME one "
                         f"of {', '.join(COARSE_SPACES)}")
    if args.versus is not None and args.versus not in OPTIMIZERS:
        parser.error(f"unknown --versus optimizer {args.versus!r}; valid: {', '.join(OPTIMIZERS)}")
    if args.rounds < 1 or args.steps < 1 or args.warmup < 1:
        parser.error(f"--rounds, --steps and --warmup must be >= 1, got {args.rounds}, {args.steps}, {args.warmup}")
    if args.worker:
        result = run_worker(*args.worker, args.device, args.steps, args.warmup, args.batch, tuple(args.schedules),
                            args.versus)
        print(json.dumps(result))
        return 0
    optimizers = list(dict.fromkeys(["sgd", "kfac", *args.optimizers]))
    rows = []
    for problem in args.problems:
        runs: dict[str, list[dict]] = {opt: [] for opt in optimizers}
        for k in tqdm(range(args.rounds * len(optimizers)), desc=f"bench {problem}", file=sys.stderr):
            opt = optimizers[k % len(optimizers)]
            runs[opt].append(_spawn(problem, opt, args))
        rows.extend(summarise(runs[opt]) for opt in optimizers)
    rows = ratios(rows)
    if args.out:
        write_record(args.out, rows, argv if argv is not None else sys.argv[1:])
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0


def write_record(path: str, rows: list[dict], argv: list[str]) -> None:
    """The benchmark rows as a result file: with the command, the code's commit and the machine."""
    from kfac2l.io import atomic_write_json, git_commit, machine

    threads = os.environ.get("OMP_NUM_THREADS")
    command = " ".join([*([f"OMP_NUM_THREADS={threads}"] if threads else []), "python -m kfac2l.bench", *argv])
    atomic_write_json(path, {"command": command, "git_commit": git_commit(), "machine": machine(), "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
