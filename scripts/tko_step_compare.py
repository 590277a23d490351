"""Step for step: Tselepidis et al.'s KFAC (their optimizers/kfac.py, run from an exported
checkout of github.com/ntselepidis/KFAC-Pytorch at 2ff652f, never copied here) beside our kfac
under convention=tko, on identical mini-batches and identical sampled Fisher targets, from the
same initial weights (model.init=kaiming). Their training loop (train_toy.py:61-86) is mirrored.

    PYTHONPATH=$PWD python scripts/tko_step_compare.py --their /tmp/tko-KFAC-Pytorch --depth 4 --steps 121
"""
import argparse
import contextlib
import io
import sys

import torch

from kfac2l.data.core import tko_toy
from kfac2l.models import build_model
from kfac2l.optim import make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--their", required=True)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=121)
    args = parser.parse_args()
    sys.path.insert(0, args.their)
    from models.cifar import SimpleMLP
    from optimizers import KFAC as TheirKFAC

    torch.set_num_threads(1)
    depth, steps = args.depth, args.steps
    data = tko_toy(0)
    theirs = SimpleMLP(10, 1, d_h=10, n_h=depth, bias=False, batch_norm=True, activation=None, seed=0)
    ours = build_model("tko_mlp", init="kaiming", seed=0, depth=depth)
    with contextlib.redirect_stdout(io.StringIO()):
        t_opt = TheirKFAC(theirs, lr=0.01, momentum=0.9, damping=1e-3, kl_clip=1e-2, weight_decay=3e-3, TCov=10,
                          TInv=100, solver="approx")
    o_opt = make_optimizer("kfac", ours, lr=0.01, damping=1e-3, kl_clip=1e-2, kl_clip_form="lr_squared",
                           weight_decay=3e-3, cov_interval=10, inv_interval=100, damping_mode="pi", ema_count="refreshes")
    crit = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(5)
    for step in range(steps):
        idx = torch.randint(0, 25000, (64,), generator=gen)
        x, y = data.x_train[idx], data.y_train[idx]
        # theirs: train_toy.py:61-86
        t_opt.zero_grad()
        out = theirs(x)
        loss_t = crit(out, y)
        targets = None
        if t_opt.steps % t_opt.TCov == 0:
            targets = torch.bernoulli(torch.sigmoid(out.detach()), generator=gen)
            t_opt.acc_stats = True
            crit(out, targets).backward(retain_graph=True)
            t_opt.acc_stats = False
            t_opt.zero_grad()
        loss_t.backward()
        t_opt.step()
        # ours: the Fisher pass on the mini-batch itself with the same targets
        if o_opt.needs_curvature():
            o_opt.update_curvature(ours(x), "bernoulli", targets=targets)
        o_opt.zero_grad()
        loss_o = crit(ours(x), y)
        loss_o.backward()
        o_opt.step()
        if step % 20 == 0 or step == steps - 1:
            diff = max((a - b).abs().max().item() for a, b in zip(theirs.parameters(), ours.parameters()))
            scale = max(a.abs().max().item() for a in theirs.parameters())
            print(f"step {step:4d} loss theirs {loss_t.item():.6f} ours {loss_o.item():.6f}  "
                  f"max|param diff| {diff:.2e} (max|param| {scale:.2f})")


if __name__ == "__main__":
    main()
