"""The exact reference on a Fisher batch of its own (``reference_fisher_batch``, issue 15 item 7),
against explicit float64 constructions (kfac2l.dense): the same reference as before on the same
batch, the dense (F_ref + lambda I)^-1 g on another, the rank of that batch, a trajectory that
does not move, identities of committed runs that do not change, and bad values refused early."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

import kfac2l
import kfac2l.dense as dense
from kfac2l.config import ConfigError, optimizer_options, run_identity
from kfac2l.curvature.exact import gram_spectrum, natural_gradient
from kfac2l.curvature.fisher import group_layers
from kfac2l.curvature.likelihood import sample_targets, summed_nll
from kfac2l.optim import make_optimizer
from kfac2l.optim.step import get_task, training_step
from kfac2l.runs import identity_id
from kfac2l.train import train, validate

REPO = Path(__file__).resolve().parents[1]
LAM = 0.1
LIKELIHOOD = "categorical"
COMPARED = ("dist_kfac", "rel_dist_kfac", "cos_kfac", "dist_two_level", "rel_dist_two_level", "cos_two_level")


def _bn_mlp(seed: int = 0) -> nn.Module:
    """A small deep-linear-A-like network: Linear + BatchNorm (training mode couples the samples)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4),
                         nn.Linear(4, 3)).double()


MODELS = {"mlp": (dense.tiny_mlp, (5,)), "cnn": (dense.tiny_cnn, (2, 5, 5)), "bn": (_bn_mlp, (5,))}
PRECONDITIONERS = {
    "kfac": lambda model, **kw: kfac2l.KFAC(model, damping=LAM, exact_reference=True, **kw),
    "nicolaides": lambda model, **kw: kfac2l.TwoLevelKFAC(model, coarse_space="nicolaides", damping=LAM,
                                                          exact_reference=True, **kw),
    "krylov-nicolaides": lambda model, **kw: kfac2l.TwoLevelKFAC(model, coarse_space="krylov-nicolaides",
                                                                 damping=LAM, exact_reference=True, **kw),
}


class RefProblem:
    """A tiny float64 network, a Fisher batch (also the training batch) and a reference batch of
    its own size, each with fixed sampled targets."""

    def __init__(self, kind: str, batch: int = 6, reference: int = 9, seed: int = 0):
        build, shape = MODELS[kind]
        self.model = build(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn((batch, *shape), generator=gen, dtype=torch.float64)
        self.x_ref = torch.randn((reference, *shape), generator=gen, dtype=torch.float64)
        self.targets, self.t_ref, self.labels = self._targets(self.x), self._targets(self.x_ref), self._targets(self.x)

    def _targets(self, x):
        with torch.no_grad():
            return sample_targets(self.model(x), LIKELIHOOD, torch.Generator().manual_seed(x.shape[0]))

    def run(self, pre, reference=None) -> torch.Tensor:
        """update_curvature on the Fisher batch, update_reference on ``reference`` (inputs, targets)
        if given, backward of the training loss, pre.step(); the flat step."""
        self.model.zero_grad()
        out = self.model(self.x)
        pre.update_curvature(out, LIKELIHOOD, targets=self.targets)
        if reference is not None:
            pre.update_reference(self.model(reference[0]), LIKELIHOOD, targets=reference[1])
            self.model(self.x)  # the training pass is captured by neither batch
            assert all(o is None for o in pre.capture.outputs)
        (summed_nll(out, self.labels, LIKELIHOOD) / self.x.shape[0]).backward()
        pre.step()
        return dense.flat_grad(self.model)

    def fisher(self, x, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """(J, F_bullet) of a batch by explicit outer products (the BatchNorm pseudo-Fisher with BN)."""
        J = dense.pseudo_per_sample_jacobian(self.model, x, targets, LIKELIHOOD)
        return J, J.T @ J / J.shape[0] + LAM * torch.eye(J.shape[1], dtype=J.dtype)

    def dense_step_inputs(self):
        """(grad, F_bullet of the Fisher batch, F_bullet KFAC) by explicit construction."""
        self.model.zero_grad()
        (summed_nll(self.model(self.x), self.labels, LIKELIHOOD) / self.x.shape[0]).backward()
        grad = dense.flat_grad(self.model).clone()
        self.model.zero_grad()
        _, fisher = self.fisher(self.x, self.targets)
        kfac = dense.block_diag_kfac(dense.layer_data(self.model, self.x, self.targets, LIKELIHOOD), LAM, "pi")
        return grad, fisher, kfac


def test_pseudo_jacobian_is_the_per_sample_jacobian_without_batchnorm():
    p = RefProblem("cnn")
    J = dense.per_sample_jacobian(p.model, p.x, p.targets, LIKELIHOOD)
    assert torch.allclose(dense.pseudo_per_sample_jacobian(p.model, p.x, p.targets, LIKELIHOOD), J, rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", list(PRECONDITIONERS))
def test_a_reference_batch_equal_to_the_fisher_batch_gives_todays_reference_bit_for_bit(kind, method):
    today, own = RefProblem(kind), RefProblem(kind)
    pre_today = PRECONDITIONERS[method](today.model)
    pre_own = PRECONDITIONERS[method](own.model, reference_fisher_batch=own.x.shape[0])
    step_today = today.run(pre_today)
    step_own = own.run(pre_own, reference=(own.x, own.targets))
    assert torch.equal(step_today, step_own)
    assert set(pre_today.diagnostic_tensors) == set(pre_own.diagnostic_tensors)
    for key, value in pre_today.diagnostic_tensors.items():
        assert torch.equal(value, pre_own.diagnostic_tensors[key]), key


def test_a_given_spectrum_changes_nothing_in_the_natural_gradient():
    """The reference now reuses the Gram matrix's eigen-decomposition (for the rank): same bits."""
    p = RefProblem("mlp")
    data = dense.layer_data(p.model, p.x, p.targets, LIKELIHOOD)
    groups = group_layers([a for a, _ in data], [g for _, g in data])
    grads = [torch.randn(len(g.indices), 2, *g.shape, dtype=torch.float64) for g in groups]
    plain = natural_gradient(groups, grads, LAM)
    given = natural_gradient(groups, grads, LAM, gram_spectrum(groups))
    assert all(torch.equal(a, b) for a, b in zip(plain, given))


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", list(PRECONDITIONERS))
@pytest.mark.parametrize("reference", [3, 9])
def test_a_reference_batch_of_another_size_is_the_dense_natural_gradient_of_that_batch(kind, method, reference):
    """zeta = (F_ref + lambda I)^-1 g, distances and cosines in F_ref's metric, the rank of J_ref;
    the step and the gap (4.6) stay those of the optimiser's Fisher batch."""
    p = RefProblem(kind, reference=reference)
    grad, fisher, kfac = p.dense_step_inputs()
    J_ref, fisher_ref = p.fisher(p.x_ref, p.t_ref)
    pre = PRECONDITIONERS[method](p.model, reference_fisher_batch=reference)
    step = p.run(pre, reference=(p.x_ref, p.t_ref))
    d = pre.diagnostics
    zeta = torch.linalg.solve(fisher_ref, grad)
    ref_norm = zeta @ fisher_ref @ zeta
    zk = torch.linalg.solve(kfac, grad)
    candidates = {"kfac": zk} if method == "kfac" else {"kfac": zk, "two_level": step}
    for name, z in candidates.items():
        dist = (z - zeta) @ fisher_ref @ (z - zeta)
        assert abs(d[f"dist_{name}"] - dist.item()) < 1e-9 * dist.item()
        assert abs(d[f"rel_dist_{name}"] - (dist / ref_norm).item()) < 1e-9 * (dist / ref_norm).item()
        assert abs(d[f"cos_{name}"] - (z @ zeta / (z.norm() * zeta.norm())).item()) < 1e-9
    if method != "kfac":  # the gap is E(beta) - E(0) on the optimiser's own batch, not the reference's
        exact = torch.linalg.solve(fisher, grad)
        e0, e1 = (zk - exact) @ fisher @ (zk - exact), (step - exact) @ fisher @ (step - exact)
        assert abs(d["gap"] - (e1 - e0).item()) < 1e-9 * e0.item()
    assert d["reference_rank"] == torch.linalg.matrix_rank(J_ref).item() == reference  # generic: B_ref < p
    above = (torch.linalg.eigvalsh(J_ref @ J_ref.T / reference) > LAM).sum().item()
    assert d["reference_rank_above_damping"] == above


def _rank_of(p: RefProblem, x, targets) -> float:
    pre = PRECONDITIONERS["kfac"](p.model, reference_fisher_batch=x.shape[0])
    p.run(pre, reference=(x, targets))
    return pre.diagnostics["reference_rank"]


def test_rank_where_it_is_known():
    """Below p: B for distinct samples, B - 1 with one sample repeated (same target). Above p: the
    softmax is invariant to adding one vector to every row of the output layer, so every per-sample
    gradient is orthogonal to those I_last directions: rank p - I_last (48 - 4 for the tiny MLP)."""
    p = RefProblem("mlp", reference=60)
    J = dense.pseudo_per_sample_jacobian(p.model, p.x_ref, p.t_ref, LIKELIHOOD)
    last = dense.layer_slices(p.model)[-1][2]
    assert J.shape[1] == 48 and last == 4
    assert _rank_of(p, p.x_ref, p.t_ref) == torch.linalg.matrix_rank(J).item() == 48 - last
    x, t = p.x_ref[:7], p.t_ref[:7]
    assert _rank_of(p, x, t) == 7
    x, t = torch.cat([x, x[:1]]), torch.cat([t, t[:1]])
    assert _rank_of(p, x, t) == 7  # 8 samples, one twice
    p32 = RefProblem("mlp")
    p32.model.float()
    p32.x, p32.x_ref = p32.x.float(), p32.x_ref.float()
    assert _rank_of(p32, p32.x_ref, p32.t_ref) == 9  # float32: J's own tolerance
    repeated = torch.cat([p32.x_ref, p32.x_ref[:2]]), torch.cat([p32.t_ref, p32.t_ref[:2]])
    assert _rank_of(p32, *repeated) == 9


def _deep_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Linear(6, 6), nn.BatchNorm1d(6),
                         nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 4))


def _train(name: str, reference, steps: int = 6):
    model = _deep_bn()
    torch.manual_seed(1)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    opts = dict(damping=1e-3, kl_clip=1e-2, diagnostics=True, exact_reference=True, cov_interval=2, inv_interval=2)
    if reference is not None:
        opts["reference_fisher_batch"] = reference
    opt = make_optimizer(name, model, lr=1e-2, **opts)
    fisher_gen, reference_gen = torch.Generator(), torch.Generator()
    diags = []
    for it in range(steps):
        fisher_gen.manual_seed(100 + it)
        reference_gen.manual_seed(900 + it)
        training_step(model, opt, get_task("classification"), x, y, 0.25, fisher_gen, reference_generator=reference_gen)
        diags.append(opt.diagnostics)
    return model.state_dict(), diags


@pytest.mark.parametrize("name", ["kfac", "nico", "kry-nico"])
def test_the_trajectory_is_bit_identical_whatever_the_reference_batch(name):
    plain, plain_diag = _train(name, None)
    for reference in (3, 8, 50):
        state, diag = _train(name, reference)
        assert all(torch.equal(plain[k], state[k]) for k in plain), reference  # parameters and BN buffers
        assert [d["kl_scale"] for d in diag] == [d["kl_scale"] for d in plain_diag]
        assert [d["rel_dist_kfac"] for d in diag] != [d["rel_dist_kfac"] for d in plain_diag]  # another reference
        assert all(d["reference_rank"] <= reference for d in diag)


def test_library_misuse_is_refused_in_one_line():
    model = _deep_bn()
    for bad in (0, -3, 2.5, "64", True):
        with pytest.raises(ValueError, match=rf"reference_fisher_batch={bad!r} is not valid; choose an integer >= 1"):
            kfac2l.KFAC(model, exact_reference=True, reference_fisher_batch=bad)
    with pytest.raises(ValueError, match="reference_fisher_batch=4 applies to the exact reference only; valid"):
        kfac2l.KFAC(model, reference_fisher_batch=4)
    with pytest.raises(ValueError, match="does not apply to optimizer 'ngd'"):
        make_optimizer("ngd", model, lr=0.1, damping=1e-3, exact_reference=True, reference_fisher_batch=4)
    p = RefProblem("mlp")
    pre = PRECONDITIONERS["kfac"](p.model, reference_fisher_batch=9)
    with pytest.raises(RuntimeError, match="needs this step's reference batch from update_reference"):
        p.run(pre)
    plain = PRECONDITIONERS["kfac"](dense.tiny_mlp())
    with pytest.raises(RuntimeError, match="update_reference needs a preconditioner built with reference_fisher_batch"):
        plain.update_reference(plain.model(p.x))


def _cfg(overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("value,needle", [
    ("0", "reference_fisher_batch=0; valid: an integer >= 1"),
    ("-2", "reference_fisher_batch=-2; valid: an integer >= 1"),
    ("1.5", "reference_fisher_batch=1.5; valid: an integer >= 1"),
    ("abc", "reference_fisher_batch='abc'; valid: an integer >= 1"),
    ("true", "reference_fisher_batch=True; valid: an integer >= 1"),
])
def test_bad_config_values_stop_before_training(value, needle):
    cfg = _cfg(["optimizer=kfac", "diagnostics=true", "exact_reference=true", f"reference_fisher_batch={value}"])
    with pytest.raises(ConfigError, match=needle) as err:
        validate(cfg)
    assert "\n" not in str(err.value) and "null" in str(err.value)


def test_the_option_without_the_exact_reference_is_refused():
    for extra in (["optimizer=kfac"], ["optimizer=kfac", "diagnostics=true"], ["optimizer=sgd", "optimizer.damping=null"]):
        with pytest.raises(ConfigError, match="reference_fisher_batch=32 sizes the exact reference's own Fisher batch "
                                              "but exact_reference=false; valid: exact_reference=true"):
            validate(_cfg([*extra, "reference_fisher_batch=32"]))


def test_the_default_leaves_every_committed_identity_unchanged():
    """Each committed run's identity, recomputed from its config.yaml (which has no such key) and
    from the same config with the new default (null), is the one in its summary.json."""
    summaries = sorted((REPO / "results" / "final").glob("*/*/*/*/summary.json"))
    if not summaries:
        pytest.skip("no committed runs in this checkout")
    for path in summaries:
        summary = json.loads(path.read_text())
        cfg = OmegaConf.load(path.parent / "config.yaml")
        OmegaConf.update(cfg, "paths.tables", str(REPO / "results" / "tables"), force_add=True)
        ids = []
        for _ in range(2):
            lr, opts = optimizer_options(cfg)
            ids.append(identity_id(run_identity(cfg, lr, opts)))
            OmegaConf.update(cfg, "reference_fisher_batch", None, force_add=True)
        assert ids == [summary["identity_id"]] * 2, path


def test_a_run_with_its_own_reference_batch_trains_identically_and_records_the_rank(data_root, tmp_path):
    small = [f"dataset.root={data_root}", "dataset.download=false", "experiment.batch_size=32",
             "profile.train_subset=160", "profile.test_subset=16", "profile.max_epochs=2",
             "profile.curvature_interval=2", "optimizer=nico", "diagnostics=true", "exact_reference=true"]
    own = train(_cfg(small), tmp_path / "own")
    other = train(_cfg([*small, "reference_fisher_batch=5"]), tmp_path / "other")
    assert own["status"] == other["status"] == "completed"
    assert "reference_fisher_batch" not in own["identity"]["optimizer"]["options"]
    assert other["identity"]["optimizer"]["options"]["reference_fisher_batch"] == 5
    metrics = [pd.read_csv(tmp_path / r / "metrics.csv").drop(columns="wall_time") for r in ("own", "other")]
    assert metrics[0].equals(metrics[1])
    diags = [pd.read_csv(tmp_path / r / "diagnostics.csv") for r in ("own", "other")]
    assert diags[0]["gap"].equals(diags[1]["gap"])  # the optimiser's own batch
    assert not diags[0]["rel_dist_kfac"].equals(diags[1]["rel_dist_kfac"])
    assert (diags[1]["reference_rank"] <= 5).all() and (diags[0]["reference_rank"] <= 8).all()


def _write_run(root: Path, panel: str, opt: str, epochs: int, diag: pd.DataFrame, seed: int = 1) -> None:
    run = root / "final" / "paper" / panel / opt / f"lr=0.01,damping=0.001,seed={seed}"
    run.mkdir(parents=True)
    pd.DataFrame({"epoch": range(1, epochs + 1), "iterations": [10 * e for e in range(1, epochs + 1)],
                  "train_loss": 1.0, "test_loss": 1.0, "test_accuracy": 0.5, "wall_time": 1.0}
                 ).to_csv(run / "metrics.csv", index=False)
    (run / "summary.json").write_text(json.dumps({
        "complete": True, "status": "completed", "optimizer": opt, "seed": seed, "lr": 0.01, "damping": 0.001,
        "batch_size": 512, "identity": {"profile": {"fisher_fraction": 0.25}}}))
    diag.to_csv(run / "diagnostics.csv", index=False)


def test_refbatch_table_reads_the_first_epochs_of_seed_one_beside_the_own_batch(tmp_path):
    from kfac2l.evidence import refbatch_table

    assert "no runs yet" in refbatch_table(tmp_path, "paper")
    it = np.arange(1, 201)  # 20 epochs of 10 iterations; the table reads epochs 1-10 only
    early = it <= 100
    own = pd.DataFrame({"iteration": it, "dist_kfac": 2.0, "rel_dist_kfac": np.where(early, 1.5, 9.0),
                        "cos_kfac": 0.25, "reference_rank": np.where(early, 120.0, 1.0),
                        "reference_rank_above_damping": 100.0})
    _write_run(tmp_path, "deep_linear_a_matched_exactref", "kfac", 20, own)
    _write_run(tmp_path, "deep_linear_a_matched_exactref", "kfac", 20, own.assign(rel_dist_kfac=7.0), seed=2)
    it = np.arange(1, 101)
    two = pd.DataFrame({"iteration": it, "dist_kfac": 2.0, "dist_two_level": np.where(it <= 30, 1.0, 3.0),
                        "rel_dist_kfac": 1.25, "rel_dist_two_level": 0.75, "cos_kfac": 0.5, "cos_two_level": 0.5,
                        "gap": -1.0, "reference_rank": 32.0, "reference_rank_above_damping": 30.0})
    _write_run(tmp_path, "deep_linear_a_refbatch32", "nico", 10, two)
    _write_run(tmp_path, "deep_linear_a_refbatch32", "spectral", 10, two)  # not a method of the arm
    table = refbatch_table(tmp_path, "paper").splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:4]]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    kfac, nico = (dict(zip(header, r)) for r in rows)
    assert kfac["optimizer"] == "KFAC" and kfac["reference batch"] == "optimiser's own (128)"
    assert kfac["iterations"] == "100" and kfac["KFAC rel. distance"] == "1.5" and kfac["reference rank"] == "120"
    assert kfac["ratio two-level / KFAC"] == "-" and kfac["rank above damping"] == "100"
    assert nico["reference batch"] == "32 (own draw)" and nico["ratio two-level / KFAC"] == "1.5"
    assert nico["ratio < 1"] == "30 %" and nico["gap (4.6) < 0"] == "100 %" and nico["rank above damping"] == "30"
    assert not any("SPECTRAL" in line for line in table)
