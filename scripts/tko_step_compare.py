"""Step for step: Tselepidis et al.'s KFAC or SGD (their optimizers/kfac.py, run from an exported
checkout of github.com/ntselepidis/KFAC-Pytorch at 2ff652f, never copied here) beside ours under
convention=tko, on identical mini-batches and identical sampled Fisher targets, from the same
initial weights (model.init=kaiming). Their training loop (train_toy.py:61-86) is mirrored; ours
is ``kfac2l.optim.step.training_step``'s order (Fisher pass on the mini-batch with the BatchNorm
running statistics kept, then the loss pass).

Compared after every reported step, separately: the Linear weights, BatchNorm's affine parameters
(gamma, beta: the plain-gradient parameters) and BatchNorm's running mean and variance.

- default: both trajectories run free; per tensor max |ours - theirs| / max(1, max |theirs|)
  (absolute for entries of order 1 and below, relative for the larger running variances);
- ``--sync``: before every step our weights, BatchNorm buffers and momentum buffers are set to
  theirs, so each step is compared from the same state (the one-step map; no chaos), and the
  difference is reported relative to the size of their step. This is the check that reaches
  depth 62 and hundreds of steps (inverse refreshes every 100, the moving average's cap 0.95
  from the 20th statistics step, kfac.py:205).

    PYTHONPATH=$PWD python scripts/tko_step_compare.py --their /tmp/tko-KFAC-Pytorch --depth 4 --steps 121
    PYTHONPATH=$PWD python scripts/tko_step_compare.py --their /tmp/tko-KFAC-Pytorch --depth 62 --steps 400 --sync
"""
import argparse
import contextlib
import io
import sys

import torch

from kfac2l.data.core import tko_toy
from kfac2l.models import build_model
from kfac2l.optim import make_optimizer
from kfac2l.optim.step import batchnorm_statistics_kept

SETTINGS = {"lr": 0.01, "momentum": 0.9, "weight_decay": 3e-3}   # their defaults, utils/get_args.py:46-51
KFAC_SETTINGS = {"damping": 1e-3, "kl_clip": 1e-2, "TCov": 10, "TInv": 100}


def build(their_root: str, optimizer: str, depth: int, seed: int):
    """(their model, their optimiser, our model, our optimiser), from the same initial weights."""
    sys.path.insert(0, their_root)
    from models.cifar import SimpleMLP
    from optimizers import KFAC as TheirKFAC

    theirs = SimpleMLP(10, 1, d_h=10, n_h=depth, bias=False, batch_norm=True, activation=None, seed=seed)
    ours = build_model("tko_mlp", init="kaiming", seed=seed, depth=depth)
    ours.load_state_dict(our_state(theirs))
    if optimizer == "sgd":  # their utils/optim_utils.py:5-9
        return theirs, torch.optim.SGD(theirs.parameters(), **SETTINGS), ours, make_optimizer(
            "sgd", ours, lr=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"])
    with contextlib.redirect_stdout(io.StringIO()):  # their constructor prints the model
        t_opt = TheirKFAC(theirs, **SETTINGS, **KFAC_SETTINGS, solver="approx")
    o_opt = make_optimizer("kfac", ours, lr=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"], damping=1e-3,
                           kl_clip=1e-2, kl_clip_form="lr_squared", cov_interval=10, inv_interval=100,
                           damping_mode="pi", ema_count="refreshes", warn_skipped=False)
    return theirs, t_opt, ours, o_opt


def our_state(theirs) -> dict:
    """Their state dict under our module names (their ``layers.k`` is our ``k``)."""
    return {k.removeprefix("layers."): v.clone() for k, v in theirs.state_dict().items()}


def sync(theirs, t_opt, ours, o_opt) -> None:
    """Our weights, BatchNorm buffers and momentum buffers := theirs."""
    ours.load_state_dict(our_state(theirs))
    for a, b in zip(theirs.parameters(), ours.parameters()):
        buffer = t_opt.state.get(a, {}).get("momentum_buffer")
        if buffer is not None:
            o_opt.base.state[b]["momentum_buffer"] = buffer.clone()


def their_step(net, opt, crit, x, y, gen):
    """train_toy.py:61-86: one forward; on statistics steps targets ~ Bernoulli(sigmoid(out)) and a
    second backward through the same graph with their hooks armed; the loss backward; step."""
    opt.zero_grad()
    out = net(x)
    loss = crit(out, y)
    targets = None
    if hasattr(opt, "TCov") and opt.steps % opt.TCov == 0:
        targets = torch.bernoulli(torch.sigmoid(out.detach()), generator=gen)
        opt.acc_stats = True
        crit(out, targets).backward(retain_graph=True)
        opt.acc_stats = False
        opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach(), targets


def our_step(net, opt, crit, x, y, targets):
    if opt.needs_curvature():
        with batchnorm_statistics_kept(net):
            opt.update_curvature(net(x), "bernoulli", targets=targets)
    opt.zero_grad()
    loss = crit(net(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def kinds(theirs, ours):
    """Pairs (name, their tensor, our tensor) grouped as linear / bn_affine / bn_running."""
    ob = dict(ours.named_buffers())
    groups = {"linear": [], "bn_affine": [], "bn_running": []}
    for a, b in zip(theirs.parameters(), ours.parameters()):
        groups["linear" if a.dim() == 2 else "bn_affine"].append((a, b))
    for name, a in theirs.named_buffers():
        if "running" in name:
            groups["bn_running"].append((a, ob[name.removeprefix("layers.")]))
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--their", required=True, help="an exported checkout of their repository at 2ff652f")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=121)
    parser.add_argument("--seed", type=int, default=0, help="their --seed: data from seed + 1, student from seed")
    parser.add_argument("--optimizer", choices=["kfac", "sgd"], default="kfac")
    parser.add_argument("--sync", action="store_true", help="start every step from their state (see above)")
    parser.add_argument("--every", type=int, default=20, help="report every this many steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = tko_toy(args.seed)
    theirs, t_opt, ours, o_opt = build(args.their, args.optimizer, args.depth, args.seed)
    crit = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(5)
    worst = {"linear": 0.0, "bn_affine": 0.0, "bn_running": 0.0}
    for step in range(args.steps):
        if args.sync:
            sync(theirs, t_opt, ours, o_opt)
        before = [a.detach().clone() for a in theirs.parameters()] + [b.clone() for _, b in theirs.named_buffers()]
        idx = torch.randint(0, data.x_train.shape[0], (64,), generator=gen)
        x, y = data.x_train[idx], data.y_train[idx]
        loss_t, targets = their_step(theirs, t_opt, crit, x, y, gen)
        loss_o = our_step(ours, o_opt, crit, x, y, targets)
        moved = dict(zip([id(a) for a in [*theirs.parameters(), *theirs.buffers()]], before))
        for kind, pairs in kinds(theirs, ours).items():
            if args.sync:  # |ours - theirs| / |their step|, per tensor
                diff = max(((a - b).norm() / (a - moved[id(a)]).norm().clamp_min(1e-30)).item() for a, b in pairs)
            else:
                diff = max(((a - b).abs().max() / a.abs().max().clamp_min(1.0)).item() for a, b in pairs)
            worst[kind] = max(worst[kind], diff)
        if step % args.every == 0 or step == args.steps - 1:
            label = "max |ours - theirs| / |their step|" if args.sync else "max |ours - theirs| / max(1, max |theirs|)"
            print(f"step {step:4d} loss theirs {loss_t.item():.6f} ours {loss_o.item():.6f}  {label} so far: "
                  + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()), flush=True)


if __name__ == "__main__":
    main()
