"""Explicit dense float64 constructions: the oracles of the tests and of ``kfac2l.verify``.

Everything here is built the slow, obvious way on tiny networks: the full per-sample Jacobian J
(B x p) by ``torch.func.vmap(grad)``, the explicit Fisher F = J^T J / B, explicit Kronecker blocks
from patches extracted with Python loops, explicit R0 (p x m) and dense solves. Vectors use the
row-major vec of each layer's (O, I) matrix (see ``kfac2l.curvature.layers``), so the paper's
A (x) G is ``torch.kron(G, A)`` here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from kfac2l.curvature.layers import matrix_shape, preconditioned_layers
from kfac2l.curvature.likelihood import sample_targets, summed_nll


def layer_slices(model: nn.Module) -> list[tuple[slice, int, int]]:
    """(slice into the flat vector, O, I) for each preconditioned layer."""
    out, start = [], 0
    for _, m in preconditioned_layers(model):
        O, I = matrix_shape(m)
        out.append((slice(start, start + O * I), O, I))
        start += O * I
    return out


def flatten_layer_grads(model: nn.Module, grads: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
    """Concatenate per-layer [W | b] matrices (row-major) from a name -> gradient dict."""
    parts = []
    for name, m in preconditioned_layers(model):
        prefix = f"{name}." if name else ""
        w = grads[prefix + "weight"]
        lead = w.shape[:batch_dims]
        mat = w.reshape(*lead, w.shape[batch_dims], -1)
        if m.bias is not None:
            mat = torch.cat([mat, grads[prefix + "bias"].unsqueeze(-1)], dim=-1)
        parts.append(mat.reshape(*lead, -1))
    return torch.cat(parts, dim=-1)


def per_sample_jacobian(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, likelihood: str) -> torch.Tensor:
    """J^T: (B, p), row b = gradient of l_b = -log p(t_b | f(x_b)) w.r.t. the layer parameters."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def nll(p, xb, tb):
        out = functional_call(model, (p, buffers), (xb.unsqueeze(0),))
        return summed_nll(out, tb.unsqueeze(0), likelihood)

    per_sample = vmap(grad(nll), in_dims=(None, 0, 0))(params, x, targets)
    return flatten_layer_grads(model, per_sample, batch_dims=1)


def to_layered(groups, slices, flat: torch.Tensor) -> list[torch.Tensor]:
    """k flat vectors (k, p) -> a layered vector ((L, k, O, I) per group, see ``kfac2l.curvature.fisher``)."""
    k = flat.shape[0]
    return [torch.stack([flat[:, slices[i][0]].reshape(k, slices[i][1], slices[i][2]) for i in g.indices])
            for g in groups]


def from_layered(groups, slices, layered: list[torch.Tensor], p: int) -> torch.Tensor:
    """A layered vector with k columns -> (k, p) flat vectors."""
    k = layered[0].shape[1]
    flat = torch.zeros(k, p, dtype=layered[0].dtype)
    for g, part in zip(groups, layered):
        for row, i in enumerate(g.indices):
            flat[:, slices[i][0]] = part[row].reshape(k, -1)
    return flat


def basis_matrix(groups, slices, basis: list[torch.Tensor], p: int) -> torch.Tensor:
    """The explicit R0^T (p x m) of a block-diagonal basis, columns in the library's order."""
    cols = []
    for g, v in zip(groups, basis):
        v = v.dense() if hasattr(v, "dense") else v  # RankOne factors
        for row, i in enumerate(g.indices):
            for k in range(v.shape[1]):
                c = torch.zeros(p, dtype=v.dtype)
                c[slices[i][0]] = v[row, k].reshape(-1)
                cols.append(c)
    return torch.stack(cols, 1)


def flat_grad(model: nn.Module) -> torch.Tensor:
    """The current ``.grad`` of the preconditioned layers as one flat vector."""
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in model.named_parameters()}
    return flatten_layer_grads(model, grads)


def explicit_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """abar by explicit loops over output locations (B, T, I): the oracle of ``layer_inputs``."""
    if isinstance(module, nn.Linear):
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    else:
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        ph, pw = (0, 0) if module.padding == "valid" else module.padding
        xp = torch.zeros(x.shape[0], x.shape[1], x.shape[2] + 2 * ph, x.shape[3] + 2 * pw, dtype=x.dtype)
        xp[:, :, ph : ph + x.shape[2], pw : pw + x.shape[3]] = x
        H = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
        W = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
        cols = []
        for i in range(H):
            for j in range(W):
                patch = xp[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
                cols.append(patch.reshape(x.shape[0], -1))
        a = torch.stack(cols, dim=1)
    if module.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], a.shape[1], 1, dtype=a.dtype)], dim=2)
    return a


def layer_data(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, likelihood: str):
    """Per layer (abar, g) with explicit patches: (B, T, I), (B, T, O). A module called several
    times (shared) has the locations of all its calls, in call order, each call's inputs with the
    gradient of its own output."""
    mods = [m for _, m in preconditioned_layers(model)]
    calls: dict[int, list] = {k: [] for k in range(len(mods))}
    handles = [m.register_forward_hook(lambda mod, i, o, k=k: calls[k].append((i[0], o))) for k, m in enumerate(mods)]
    out = model(x)
    for h in handles:
        h.remove()
    outs = [o for k in range(len(mods)) for _, o in calls[k]]
    gs = iter(torch.autograd.grad(summed_nll(out, targets, likelihood), outs))
    data = []
    for k, m in enumerate(mods):
        a_parts, g_parts = [], []
        for x_in, _ in calls[k]:
            go = next(gs)
            a_parts.append(explicit_patches(m, x_in.detach()))
            g_parts.append(go.flatten(2).transpose(1, 2) if isinstance(m, nn.Conv2d)
                           else go.reshape(go.shape[0], -1, go.shape[-1]))
        data.append((torch.cat(a_parts, dim=1), torch.cat(g_parts, dim=1)))
    return data


def pseudo_per_sample_jacobian(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, likelihood: str) -> torch.Tensor:
    """J^T (B, p) with row b = sum_t g_{b,t} abar_{b,t}^T per layer (eqs. 2.4, 2.7), g the derivative
    of the *batch's* summed negative log-likelihood with respect to sample b's layer output, by
    explicit outer products of ``layer_data``. Without sample coupling it is ``per_sample_jacobian``;
    with BatchNorm in training mode it is the pseudo per-sample gradient of the batch-coupled forward
    pass, whose Gram matrix gives the pseudo-Fisher the library forms."""
    rows = [torch.einsum("bto,bti->boi", g, a).reshape(a.shape[0], -1)
            for a, g in layer_data(model, x, targets, likelihood)]
    return torch.cat(rows, dim=1)


def explicit_factors(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A = (1/B) sum_b sum_t abar abar^T, G = (1/(B T)) sum_b sum_t g g^T by explicit sums (2.27)."""
    B, T = a.shape[:2]
    A = sum(torch.outer(a[b, t], a[b, t]) for b in range(B) for t in range(T)) / B
    G = sum(torch.outer(g[b, t], g[b, t]) for b in range(B) for t in range(T)) / (B * T)
    return A, G


def damped_block(A: torch.Tensor, G: torch.Tensor, damping: float, mode: str) -> torch.Tensor:
    """[F_bullet KFAC]_{i,i} in row-major order: kron(G', A') (2.30) or kron(G, A) + lambda I."""
    if mode == "exact":
        return torch.kron(G, A) + damping * torch.eye(A.shape[0] * G.shape[0], dtype=A.dtype)
    if mode == "pi":
        pi = ((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0])).sqrt()
        sa, sg = pi * damping**0.5, damping**0.5 / pi
    else:
        sa = sg = damping
    return torch.kron(G + sg * torch.eye(G.shape[0], dtype=G.dtype), A + sa * torch.eye(A.shape[0], dtype=A.dtype))


def block_diag_kfac(data, damping: float, mode: str) -> torch.Tensor:
    """F_bullet KFAC = diag of the damped blocks (2.31b), p x p."""
    return torch.block_diag(*[damped_block(*explicit_factors(a, g), damping, mode) for a, g in data])


def explicit_coarse_basis(space: str, model, data, kfac: torch.Tensor, fisher_b: torch.Tensor, grad: torch.Tensor,
                          damping: float, mode: str, taylor_order: int = 2, **options) -> torch.Tensor:
    """R0^T (p x m) for a registered coarse space, built densely from its definition: each layer's
    columns come from the space's ``explicit`` construction on explicit matrices (3.21-3.38)."""
    from kfac2l.curvature.spaces import COARSE_SPACES, DenseLayerContext, make_coarse_space

    accepted = COARSE_SPACES[space].options
    options = {k: v for k, v in {"taylor_order": taylor_order, **options}.items() if k in accepted}
    coarse = make_coarse_space(space, **options)
    slices = layer_slices(model)
    p = grad.shape[0]
    r = grad - fisher_b @ torch.linalg.solve(kfac, grad)
    w1 = torch.linalg.solve(kfac, r)
    cols = []
    for sl, O, I in slices:
        ctx = DenseLayerContext(kfac[sl, sl], kfac, fisher_b, grad, r, w1, sl, (O, I), options)
        vs = coarse.explicit(ctx)
        if vs is None:
            raise ValueError(f"coarse space {space!r} has no explicit (dense) construction")
        for v in vs:
            col = torch.zeros(p, dtype=grad.dtype)
            col[sl] = v
            cols.append(col)
    return torch.stack(cols, dim=1)


def two_level_step(kfac, fisher_b, grad, basis, correction: str = "multiplicative", coarse_op=None) -> torch.Tensor:
    """zeta_KFAC + R0^T beta with beta from (3.11) or (4.7b), all dense."""
    zeta_kfac = torch.linalg.solve(kfac, grad)
    op = basis.T @ fisher_b @ basis if coarse_op is None else coarse_op
    rhs = basis.T @ (grad - fisher_b @ zeta_kfac) if correction == "multiplicative" else basis.T @ grad
    beta = torch.linalg.lstsq(op, rhs.unsqueeze(1)).solution.squeeze(1)
    return zeta_kfac + basis @ beta


def previous_coarse_operator(data, damping: float, mode: str) -> torch.Tensor:
    """R0 Fbar_bullet R0^T of Tselepidis et al. (3.18) for Nicolaides vectors: explicit Kronecker
    cross blocks E[abar_i abar_j^T] (x) E[g_i g_j^T] contracted with ones; for convolutions abar_i
    is the spatial mean of the patches and g_i the spatial sum of the gradients over sqrt(T_i)
    (the convention of ``kfac2l.curvature.coarse.nicolaides_sums``)."""
    n = len(data)
    op = torch.zeros(n, n, dtype=data[0][0].dtype)
    B = data[0][0].shape[0]
    for i, (ai, gi) in enumerate(data):
        for j, (aj, gj) in enumerate(data):
            if i == j:
                block = damped_block(*explicit_factors(ai, gi), damping, mode)
            else:
                Ti, Tj = ai.shape[1], aj.shape[1]
                Aij = ai.mean(1).T @ aj.mean(1) / B
                Gij = gi.sum(1).T @ gj.sum(1) / (B * (Ti * Tj) ** 0.5)
                block = torch.kron(Gij, Aij)
            op[i, j] = block.sum()
    return op


# --------------------------------------------------------------------------- tiny problems


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False), nn.Tanh(), nn.Linear(3, 3)
    ).double()


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, bias=False, dilation=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).double()


def tiny_seq(seed: int = 0) -> nn.Module:
    """Linear layers on (batch, 3 positions, features) inputs, as in sequence models: each
    position is a location sharing the weight (the "expand" setting of Eschenhagen et al. 2023)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(9, 3)
    ).double()


class TiedNet(nn.Module):
    """Shared modules: a Conv2d applied twice (on 6x6, then 4x4 maps: its locations are those of
    both calls), a Linear applied twice (weight tying: head(tanh(lin(tanh(lin(h)))))) and a head
    called once. The per-sample gradient of a shared weight is the sum over its calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1)
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(h)))))


def tiny_tied(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TiedNet().double()


TINY = {"mlp": (tiny_mlp, (5,)), "cnn": (tiny_cnn, (2, 5, 5)), "seq": (tiny_seq, (3, 5)), "tied": (tiny_tied, (2, 6, 6))}


def tiny_inputs(kind: str, batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *TINY[kind][1]), generator=g, dtype=torch.float64)


class Problem:
    """A tiny network, a Fisher batch with fixed sampled targets and a training gradient."""

    def __init__(self, kind: str = "mlp", batch: int = 6, likelihood: str = "categorical", seed: int = 0):
        self.model = TINY[kind][0](seed)
        self.x = tiny_inputs(kind, batch, seed + 1)
        self.likelihood = likelihood
        gen = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            out = self.model(self.x)
        self.targets = sample_targets(out, likelihood, gen)
        self.labels = sample_targets(out, likelihood, torch.Generator().manual_seed(seed + 3))

    def run(self, pre) -> torch.Tensor:
        """update_curvature, backward of the mean training loss, pre.step(); returns flat step."""
        self.model.zero_grad()
        out = self.model(self.x)
        pre.update_curvature(out, self.likelihood, targets=self.targets)
        loss = summed_nll(out, self.labels, self.likelihood) / self.x.shape[0]
        loss.backward()
        self.grad = flat_grad(self.model).clone()
        pre.step()
        return flat_grad(self.model)

    def dense(self, damping: float, mode: str = "pi"):
        """(grad, F_bullet, F_bullet KFAC, layer data) by explicit construction."""
        self.model.zero_grad()
        out = self.model(self.x)
        (summed_nll(out, self.labels, self.likelihood) / self.x.shape[0]).backward()
        grad = flat_grad(self.model).clone()
        self.model.zero_grad()
        J = per_sample_jacobian(self.model, self.x, self.targets, self.likelihood)
        fisher = J.T @ J / J.shape[0] + damping * torch.eye(J.shape[1], dtype=J.dtype)
        data = layer_data(self.model, self.x, self.targets, self.likelihood)
        kfac = block_diag_kfac(data, damping, mode)
        return grad, fisher, kfac, data
