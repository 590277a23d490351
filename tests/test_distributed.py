"""Data-parallel training (kfac2l.distributed) against one process: 2 gloo processes on the CPU,
float64, BatchNorm-free networks (MLP, CNN, the auto-encoder architecture of kfac2l.models, a net
of shared modules); training also with the mini-batch as Fisher batch and under autocast.

Each process computes the single-process reference itself (the whole batch, no reduction) and the
data-parallel result (its shards, all-reduced), and writes the largest relative difference per
optimiser; the test reads both processes' files."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kfac2l.curvature.spaces import COARSE_SPACES
from kfac2l.dense import tiny_cnn, tiny_inputs, tiny_mlp, tiny_tied
from kfac2l.distributed import DataParallel, Placement, first_host, placement_from_env, rendezvous_env
from kfac2l.models.autoencoders import autoencoder
from kfac2l.optim import make_optimizer
from kfac2l.optim.preconditioner import PreviousKFAC
from kfac2l.optim.step import get_task, training_step

WORLD = 2
TOL = 1e-10
CURVATURE = dict(damping=1e-2, kl_clip=1e-2, cov_interval=1, inv_interval=1)


def _tiny_ae(seed: int = 0):
    torch.manual_seed(seed)
    return autoencoder([12, 6, 3]).double()  # the CURVES/MNIST/FACES builder, narrow


NETS = {  # name: (builder, input shape, task)
    "mlp": (tiny_mlp, None, "classification"),
    "cnn": (tiny_cnn, None, "classification"),
    "ae": (_tiny_ae, (12,), "bernoulli_autoencoder"),
    "tied": (tiny_tied, None, "classification"),  # shared modules: a Conv2d and a Linear called twice
}


def _optimizers():
    """(label, registry name, options): KFAC, every registered coarse space, PREVIOUS (both
    corrections), a static space with the additive correction, the eigenbasis frame."""
    cases = [("kfac", "kfac", {})]
    cases += [(f"two-level/{s}", "two-level", {"coarse_space": s}) for s in COARSE_SPACES]
    cases += [("two-level/krylov-residual/raw", "two-level", {"coarse_space": "krylov-residual", "krylov_start": "raw"}),
              ("two-level/nicolaides/additive", "two-level", {"coarse_space": "nicolaides", "correction": "additive"}),
              ("two-level/taylor/eigenbasis", "two-level", {"coarse_space": "taylor", "eigenbasis": "always"}),
              ("previous", "previous", {}),
              ("previous/multiplicative", PreviousKFAC, {"correction": "multiplicative"})]
    return cases


def _preconditioner(name, model, reduce, opts):
    if isinstance(name, str):
        return make_optimizer(name, model, lr=0.1, reduce=reduce, **CURVATURE, **opts).preconditioner
    return name(model, reduce=reduce, **CURVATURE, **opts)  # a class (an option a registry name fixes)


def _inputs(net: str, batch: int, seed: int) -> torch.Tensor:
    shape = NETS[net][1]
    if shape is None:
        return tiny_inputs(net, batch, seed)
    return torch.rand((batch, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _targets(net: str, out: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if NETS[net][2] == "classification":
        return torch.randint(0, out.shape[1], (out.shape[0],), generator=gen)
    return torch.bernoulli(torch.full_like(out, 0.5), generator=gen)


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = max((x - y).abs().max().item() for x, y in zip(a, b))
    return num / max(y.abs().max().item() for y in b)


def _step(model, net, pre, x, xf, tf, par=None):
    """One preconditioner step on (mini-batch x, Fisher batch xf with targets tf); ``par``: the
    DataParallel whose shards this process takes (None: the whole batches). Returns the .grads."""
    task = get_task(NETS[net][2])
    whole = slice(None)
    mine, rows = (whole, whole) if par is None else (par.shard(xf.shape[0]), par.shard(x.shape[0]))
    fisher_model, forward = (model, model) if par is None else (par.module, par.ddp)
    pre.update_curvature(fisher_model(xf[mine]), task.likelihood, targets=tf[mine],
                         batch=None if par is None else xf.shape[0])
    xs = x[rows]
    loss = task.loss(forward(xs), xs if task.autoencoder else _labels(xs))
    weight = 1.0 if par is None else xs.shape[0] / x.shape[0] * par.world  # DDP averages over processes
    for p in model.parameters():
        p.grad = None
    (loss * weight).backward()
    pre.step()
    return [p.grad.clone() for p in model.parameters()]


def _labels(x: torch.Tensor) -> torch.Tensor:
    return (x.flatten(1).sum(1) * 7).long() % 3


def _compare_steps(par: DataParallel) -> dict:
    """Max relative difference of the preconditioned .grad (2 steps) per optimiser, and the
    (optimiser, network) pairs left out (the spectral space where an eigenvalue is repeated)."""
    worst: dict[str, float] = {}
    skipped: set[str] = set()
    for net in NETS:
        builder = NETS[net][0]
        for label, name, opts in _optimizers():
            single, parallel = builder(0), builder(0)
            par.wrap(parallel)
            pre1, pre2 = _preconditioner(name, single, None, opts), _preconditioner(name, parallel, par.reduce, opts)
            for it in range(2):  # the second step runs on averaged factors (EMA)
                x, xf = _inputs(net, 12, 10 + it), _inputs(net, 9, 20 + it)  # 9: unequal shards 5 + 4
                with torch.no_grad():
                    tf = _targets(net, single(xf), 30 + it)
                g1 = _step(single, net, pre1, x, xf, tf)
                g2 = _step(parallel, net, pre2, x, xf, tf, par)
                if name == "two-level" and opts["coarse_space"] == "spectral" and not _simple_smallest(pre1):
                    skipped.add(f"{label}@{net}")  # its basis is not a function of the factors there
                    continue
                worst[label] = max(worst.get(label, 0.0), _rel(g2, g1))
            pre1.remove()
            pre2.remove()
    return worst, sorted(skipped)


def _simple_smallest(pre) -> bool:
    """Whether the smallest eigenvalue of every Kronecker factor is simple (gap > 1e-6 of the
    largest): only then is the spectral vector (3.25-3.28) determined by the factors; otherwise any
    vector of the eigenspace is, and two sums of the same samples in another order pick another."""
    for f in pre.factors:
        for m in (f.A, f.G):
            ev = torch.linalg.eigvalsh(m)
            if not ((ev[..., 1] - ev[..., 0]) > 1e-6 * ev[..., -1].abs().clamp_min(1e-300)).all():
                return False
    return True


TRAINING = (  # (label, optimiser, training_step options)
    ("kfac", "kfac", {}), ("residu", "residu", {}), ("previous", "previous", {}), ("sgd", "sgd", {}),
    # convention.fisher_batch=minibatch: each process's Fisher pass on its shard of the mini-batch
    ("kfac/minibatch", "kfac", {"resample": False}), ("residu/minibatch", "residu", {"resample": False}),
    # mixed precision plumbing: autocast leaves float64 ops alone, the outputs are cast to float32
    ("kfac/autocast", "kfac", {"autocast": torch.bfloat16}),
)


def _compare_training(par: DataParallel) -> dict:
    """Max relative difference of the parameters over 4 training steps (sampled targets, the
    Fisher batch drawn from the mini-batch or the mini-batch itself, base SGD step) per case."""
    worst: dict[str, float] = {}
    task = get_task("classification")
    for label, name, kwargs in TRAINING:
        single, parallel = tiny_mlp(0), tiny_mlp(0)
        par.wrap(parallel)
        curv = {} if name == "sgd" else dict(CURVATURE, cov_interval=2, inv_interval=2)
        opt1 = make_optimizer(name, single, lr=0.1, **curv)
        opt2 = make_optimizer(name, parallel, lr=0.1, reduce=par.reduce, **curv)
        gen1, gen2 = torch.Generator(), torch.Generator()
        for it in range(4):
            x = _inputs("mlp", 12, 40 + it)
            gen1.manual_seed(it)
            gen2.manual_seed(it)
            l1 = training_step(single, opt1, task, x, _labels(x), 0.75, gen1, **kwargs)
            l2 = par.training_step(opt2, task, x, _labels(x), 0.75, gen2, **kwargs)
            worst[f"{label}/loss"] = max(worst.get(f"{label}/loss", 0.0), abs((l2 - l1) / l1).item())
            worst[label] = max(worst.get(label, 0.0), _rel(list(parallel.parameters()), list(single.parameters())))
    return worst


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        par = DataParallel()
        step, skipped = _compare_steps(par)
        result = {"step": step, "skipped": skipped, "training": _compare_training(par)}
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_two_processes_give_the_single_process_step_for_every_optimiser(results):
    expected = {label for label, _, _ in _optimizers()}
    print("max relative difference, distributed vs single-process step:", results[0]["step"])
    for r in results:
        assert set(r["step"]) == expected
        bad = {k: v for k, v in r["step"].items() if not v <= TOL}
        assert not bad, f"distributed step differs from the single-process step: {bad}"
        # the spectral space is compared on the MLP and the CNN (the auto-encoder's ReLU units and
        # 13 > 9 inputs leave repeated zero eigenvalues)
        assert set(r["skipped"]) <= {"two-level/spectral@ae"}


def _training_tolerance(key: str) -> float:
    """TOL in float64; the float32 loss of an autocast step (its float64 outputs cast to float32)
    is a sum of 12 non-negative float32 terms in another order and grouping: each side is within
    (12 - 1) eps32 of the exact sum (plus one rounding of the all-reduce), so the two within twice 12 eps32."""
    if key.endswith("autocast/loss"):
        return 2 * 12 * torch.finfo(torch.float32).eps
    return TOL


def test_two_processes_train_like_one(results):
    for r in results:
        assert set(r["training"]) >= {label for label, _, _ in TRAINING}
        bad = {k: v for k, v in r["training"].items() if not v <= _training_tolerance(k)}
        assert not bad, f"distributed training differs from single-process training: {bad}"


def test_launch_environments():
    assert placement_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == Placement(3, 8, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NODELIST": "gpu[03-05,09],cpu1"}
    assert placement_from_env(slurm) == Placement(5, 8, 1)
    assert placement_from_env({}) is None
    assert rendezvous_env(slurm) == {"MASTER_ADDR": "gpu03", "MASTER_PORT": str(15000 + 4242)}
    assert first_host("node7") == "node7" and first_host("a1,b2") == "a1"


def _compose(overrides):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        return compose("train", overrides=["dataset.root=/tmp/kfac2l-unused", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["distributed=ddp"], "started neither by torchrun"),
    (["distributed=ddp", "optimizer=ngd", "optimizer.damping=0.1"], "optimizer=ngd needs the whole Fisher batch"),
    (["distributed=ddp", "distributed.backend=mpi"], "unknown distributed.backend 'mpi'; valid: auto, gloo, nccl"),
])
def test_bad_distributed_settings_stop_with_one_line(overrides, message, monkeypatch):
    from kfac2l.train import ConfigError, validate

    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    if "optimizer=ngd" in overrides or "distributed.backend=mpi" in overrides:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=message):
        validate(_compose(overrides))


def test_identity_gains_the_world_size_only_when_distributed(monkeypatch):
    from kfac2l.train import run_identity, validate

    single = _compose([])
    assert "distributed" not in run_identity(single, *validate(single))  # single-process identities unchanged
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    ddp = _compose(["distributed=ddp"])
    assert run_identity(ddp, *validate(ddp))["distributed"] == {"world_size": 4, "sync_batchnorm": False}
