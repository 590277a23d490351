"""The mini-batch Fisher F = (1/B) J J^T and its products, from captured per-sample quantities.

Appendix A of the paper: F u = (1/B) J (J^T u) (A3) where J in R^{p x B} has the per-sample
gradients as columns. J^T u (A4-A6) and J v (A7-A14) are computed from the layer inputs abar and
output gradients g only; neither the per-sample gradients of a convolution nor any (B T) x (B T)
matrix is formed.

Layers of equal shape are stacked in *groups* so that one batched GEMM serves all of them (the
64 identical 10x10 layers of the deep linear net A are one group). A "layered vector" u in R^p is a
list over groups of tensors of shape (L, k, O, I): k vectors at once, each layer's part as its
(O, I) matrix MAT(u[i]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kfac2l.curvature.basis import Basis, RankOne, block_gram
from kfac2l.curvature.layers import conv_padding, layer_inputs, layer_output_grads, matrix_shape


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class FisherShard:
    """Where a layer group's samples sit in the Fisher batch. On one process (the default) they are
    all of it. In data-parallel training each process holds a shard: ``total`` is the size of the
    whole batch and ``reduce`` completes, in place, a sum over this process's samples into the sum
    over all of them (an all-reduce; ``kfac2l.distributed``). Every sum over samples below (the
    Kronecker factors, J v in F u, P^T P in F_coarse) goes through ``reduce``; divisors use ``total``."""

    total: int | None = None
    reduce: Callable[[torch.Tensor], torch.Tensor] = _local


WHOLE = FisherShard()


class LayerGroup:
    """Layers of one shape: their positions in the model and stacked per-sample quantities.

    a: (L, B, T, I) augmented inputs, g: (L, B, T, O) pre-activation derivatives; ``shard``: the
    part of the Fisher batch they are (``FisherShard``; all of it by default).
    """

    def __init__(self, indices: list[int], a: torch.Tensor, g: torch.Tensor, shard: FisherShard = WHOLE):
        self.indices = indices
        self.a = a
        self.g = g
        self.shard = shard

    @property
    def shape(self) -> tuple[int, int]:
        return self.g.shape[-1], self.a.shape[-1]

    @property
    def batch(self) -> int:
        """This process's samples (all of the Fisher batch on one process)."""
        return self.a.shape[1]

    @property
    def total(self) -> int:
        """Samples of the whole Fisher batch, over all processes: the divisor of every mean."""
        return self.batch if self.shard.total is None else self.shard.total

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """A sum over this process's samples completed, in place, into the sum over all of them."""
        return self.shard.reduce(t)

    @property
    def locations(self) -> int:
        """T: spatial locations (or extra leading positions) sharing the weight."""
        return self.a.shape[2]

    def project(self, u: torch.Tensor) -> torch.Tensor:
        """See ``project``; the contraction goes through the smaller of O and I."""
        L, B, T, I = self.a.shape
        O = self.g.shape[-1]
        a = self.a.reshape(L, 1, B * T, I)
        g = self.g.reshape(L, 1, B * T, O)
        if O <= I:
            gu = torch.matmul(g, u)  # (L, k, BT, I)
            out = (gu * a).sum(-1)
        else:
            ua = torch.matmul(a, u.transpose(-1, -2))  # (L, k, BT, O)
            out = (ua * g).sum(-1)
        return out.reshape(L, u.shape[1], B, T).sum(-1)

    def project_rank_one(self, basis: RankOne) -> torch.Tensor:
        """See ``project_rank_one``."""
        L, B, T, I = self.a.shape
        O = self.g.shape[-1]
        ga = torch.matmul(self.g.reshape(L, B * T, O), basis.left.transpose(1, 2))  # (L, BT, k)
        aa = torch.matmul(self.a.reshape(L, B * T, I), basis.right.transpose(1, 2))
        return (ga * aa).reshape(L, B, T, -1).sum(2).transpose(1, 2)

    def combine(self, v: torch.Tensor) -> torch.Tensor:
        """See ``combine``; v: (L, k, B)."""
        L, B, T, I = self.a.shape
        O = self.g.shape[-1]
        k = v.shape[1]
        weighted = self.g.unsqueeze(1) * v.reshape(L, k, B, 1, 1)  # (L, k, B, T, O)
        weighted = weighted.reshape(L, k, B * T, O)
        return torch.matmul(weighted.transpose(-1, -2), self.a.reshape(L, 1, B * T, I))


class ConvGroup(LayerGroup):
    """Conv2d layers of one shape, kept as their raw inputs x (B, C, H, W) and output gradients
    (B, O, H', W'). The patches abar (eq. 2.5) are unfolded only when needed (factor refresh,
    exact natural gradient); per-sample projections (A5-A6) go through convolutions of x with
    MAT(u) as a kernel, sum_t g_t^T MAT(u) abar_t = <g, conv(x, MAT(u))>, and J v (A8-A13) is the
    convolution's weight gradient for output gradients v_b g_b, so no step between refreshes
    unfolds (no B T x I patch matrix: large for ResNets). ``modules`` give the geometry only.

    ``inputs[l]`` and ``output_grads[l]`` are the lists of layer l's calls (one entry unless the
    module is shared, called several times in the forward pass): its locations are those of all
    calls, of any spatial sizes, and every product sums over the calls.
    """

    def __init__(self, indices: list[int], modules: list, inputs: list, output_grads: list,
                 shard: FisherShard = WHOLE):
        self.indices = indices
        self.shard = shard
        self.modules = modules
        self.inputs = [_calls(x) for x in inputs]
        self.output_grads = [_calls(go) for go in output_grads]
        self._a = self._g = None
        self._conv_inputs: dict[tuple[int, int], tuple] = {}

    @property
    def a(self) -> torch.Tensor:
        if self._a is None:
            self._a = _stack([_cat_locations([layer_inputs(m, x) for x in xs])
                              for m, xs in zip(self.modules, self.inputs)])
        return self._a

    @property
    def g(self) -> torch.Tensor:
        if self._g is None:
            self._g = _stack([_cat_locations([layer_output_grads(m, go) for go in gos])
                              for m, gos in zip(self.modules, self.output_grads)])
        return self._g

    @property
    def shape(self) -> tuple[int, int]:
        return matrix_shape(self.modules[0])

    @property
    def batch(self) -> int:
        return self.inputs[0][0].shape[0]

    @property
    def locations(self) -> int:
        return sum(go[0, 0].numel() for go in self.output_grads[0])

    def _calls_of(self, layer: int):
        """(call index, output gradient) of each call of ``layer``."""
        return enumerate(self.output_grads[layer])

    def _conv_input(self, layer: int, call: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
        """The input of a call of the layer (explicitly padded if its padding is asymmetric) and
        the symmetric padding left for the convolution."""
        if (layer, call) not in self._conv_inputs:
            module, x = self.modules[layer], self.inputs[layer][call]
            left, right, top, bottom = conv_padding(module, x.shape[-2], x.shape[-1])
            if left == right and top == bottom:
                padding = (top, left)
            else:
                x, padding = torch.nn.functional.pad(x, (left, right, top, bottom)), (0, 0)
            self._conv_inputs[layer, call] = (x.contiguous(memory_format=torch.channels_last), padding)
        return self._conv_inputs[layer, call]

    def _convolve(self, layer: int, call: int, kernels: torch.Tensor) -> torch.Tensor:
        """conv(x, kernels) for a call's input x with the layer's stride, dilation and padding: (B, n, H', W')."""
        x, padding = self._conv_input(layer, call)
        module = self.modules[layer]
        return torch.nn.functional.conv2d(x, kernels, None, module.stride, padding, module.dilation)

    def _kernels(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n, I) matrix rows -> (n, C, kh, kw) kernels and the bias column (n,) or None."""
        weight = self.modules[layer].weight
        n_w = weight[0].numel()
        bias = rows[:, n_w] if self.modules[layer].bias is not None else None
        return rows[:, :n_w].reshape(rows.shape[0], *weight.shape[1:]), bias

    def project(self, u: torch.Tensor) -> torch.Tensor:
        """``project`` for conv layers: <g_b, conv(x_b, MAT(u))> without unfolding. (L, k, B)"""
        L, k, O, I = u.shape
        out = []
        for layer in range(L):
            kernels, bias = self._kernels(layer, u[layer].reshape(k * O, I))
            parts = []
            for call, go in self._calls_of(layer):
                y = self._convolve(layer, call, kernels)  # (B, k O, H', W')
                B = y.shape[0]
                go = go.reshape(B, 1, O, -1)
                p = (y.reshape(B, k, O, -1) * go).sum((2, 3))
                if bias is not None:
                    p = p + go.sum(-1)[:, 0] @ bias.reshape(k, O).T
                parts.append(p.T)
            out.append(_sum_calls(parts))
        return torch.stack(out)

    def combine(self, v: torch.Tensor) -> torch.Tensor:
        """``combine`` for conv layers (v: (L, k, B)): the weight gradient of the convolution for output
        gradients g_b scaled by v_b, one kernel set per vector, without unfolding. (L, k, O, I)"""
        L, k, _ = v.shape
        O, I = self.shape
        out = []
        for layer in range(L):
            module = self.modules[layer]
            parts = []
            for call, go in self._calls_of(layer):
                x, padding = self._conv_input(layer, call)
                B = go.shape[0]
                scaled = (go.unsqueeze(1) * v[layer].T.reshape(B, k, 1, 1, 1)).reshape(B, k * O, *go.shape[2:])
                size = (k * O, *module.weight.shape[1:])
                dw = torch.nn.grad.conv2d_weight(x, size, scaled, module.stride, padding, module.dilation)
                dw = dw.reshape(k, O, -1)
                if module.bias is not None:
                    db = v[layer] @ go.sum((2, 3))  # (k, O)
                    dw = torch.cat([dw, db.unsqueeze(-1)], dim=-1)
                parts.append(dw)
            out.append(_sum_calls(parts))
        return torch.stack(out)

    def project_rank_one(self, basis: "RankOne") -> torch.Tensor:
        """``project_rank_one`` for conv layers: sum_t (g_t . left) conv(x, right)_t. (L, k, B)"""
        out = []
        for layer in range(len(self.modules)):
            kernels, bias = self._kernels(layer, basis.right[layer])
            parts = []
            for call, go in self._calls_of(layer):
                y = self._convolve(layer, call, kernels).flatten(2)  # (B, k, T)
                if bias is not None:
                    y = y + bias.reshape(1, -1, 1)
                gl = torch.matmul(basis.left[layer], go.flatten(2))  # (B, k, T)
                parts.append((gl * y).sum(-1).T)
            out.append(_sum_calls(parts))
        return torch.stack(out)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].unsqueeze(0).contiguous() if len(tensors) == 1 else torch.stack(tensors)


def _calls(captured) -> list[torch.Tensor]:
    """A layer's captured calls as a list: a tensor (one call) or a list of per-call tensors."""
    return list(captured) if isinstance(captured, (list, tuple)) else [captured]


def _cat_locations(per_call: list[torch.Tensor]) -> torch.Tensor:
    """The (B, T_c, n) tensors of a layer's calls as one (B, sum_c T_c, n): the calls of a shared
    module are more locations of the same layer (no copy for a single call)."""
    return per_call[0] if len(per_call) == 1 else torch.cat(per_call, dim=1)


def _sum_calls(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum over a layer's calls (the single call itself, untouched, when there is one)."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _locations(module, output_grads: list[torch.Tensor]) -> int:
    """T of a layer: its output locations summed over its calls."""
    if isinstance(module, torch.nn.Conv2d):
        return sum(go[0, 0].numel() for go in output_grads)
    return sum(go.numel() // (go.shape[0] * go.shape[-1]) for go in output_grads)


def capture_groups(modules: list, inputs: list, output_grads: list, shard: FisherShard = WHOLE) -> list[LayerGroup]:
    """Layer groups from the captured inputs and output gradients of Linear/Conv2d layers.

    ``inputs[i]``, ``output_grads[i]``: layer i's tensors, or lists of them, one per call of a
    module called several times in the forward pass (a shared module: its calls are more
    locations of the one layer, the "expand" view of Eschenhagen et al. 2023; a module called
    twice on a batch is a Linear on a sequence of length 2). Linear layers become ``LayerGroup``s
    of (abar, g), the calls concatenated along the locations; Conv2d layers ``ConvGroup``s
    (patches unfolded lazily). Layers are grouped by (kind, O, I, T), keeping first-appearance order.
    ``shard``: the part of the Fisher batch the captured samples are (all of it by default).
    """
    inputs = [_calls(x) for x in inputs]
    output_grads = [_calls(go) for go in output_grads]
    keys: dict[tuple, list[int]] = {}
    for i, (m, gos) in enumerate(zip(modules, output_grads)):
        conv = isinstance(m, torch.nn.Conv2d)
        keys.setdefault((conv, *matrix_shape(m), _locations(m, gos)), []).append(i)
    groups: list[LayerGroup] = []
    for (conv, *_), idx in keys.items():
        mods = [modules[i] for i in idx]
        if conv:
            groups.append(ConvGroup(idx, mods, [inputs[i] for i in idx], [output_grads[i] for i in idx], shard))
        else:
            a = _stack([_cat_locations([layer_inputs(m, x) for x in inputs[i]]) for m, i in zip(mods, idx)])
            g = _stack([_cat_locations([layer_output_grads(m, go) for go in output_grads[i]]) for m, i in zip(mods, idx)])
            groups.append(LayerGroup(idx, a, g, shard))
    return groups


def group_layers(a_list: list[torch.Tensor], g_list: list[torch.Tensor]) -> list[LayerGroup]:
    """Stack layers with identical (O, I, T) into groups, keeping first-appearance order."""
    keys: dict[tuple[int, int, int], list[int]] = {}
    for i, (a, g) in enumerate(zip(a_list, g_list)):
        keys.setdefault((g.shape[-1], a.shape[-1], a.shape[1]), []).append(i)
    return [
        LayerGroup(idx, _stack([a_list[i] for i in idx]), _stack([g_list[i] for i in idx])) for idx in keys.values()
    ]


def project(group: LayerGroup, u: torch.Tensor) -> torch.Tensor:
    """Per-layer J_i^T u[i] for k vectors: <vec(DW_i^(b)), u[i]> (A5, A6).

    u: (L, k, O, I). Returns (L, k, B) = sum_t g_{b,t}^T MAT(u[i]) abar_{b,t}.
    """
    return group.project(u)


def project_rank_one(group: LayerGroup, basis: RankOne) -> torch.Tensor:
    """``project`` for rank-one columns: sum_t (g_{b,t} . left) (abar_{b,t} . right), (L, k, B)."""
    return group.project_rank_one(basis)


def combine(group: LayerGroup, v: torch.Tensor) -> torch.Tensor:
    """Per-layer (J v)[i] for k weight vectors: sum_b v_b sum_t g_{b,t} abar_{b,t}^T (A8-A13).

    v: (L, k, B) or (k, B) (broadcast over layers). Returns (L, k, O, I).
    """
    if v.dim() == 2:
        v = v.unsqueeze(0).expand(len(group.indices), -1, -1)
    return group.combine(v)


def jt(groups: list[LayerGroup], u: list[torch.Tensor]) -> torch.Tensor:
    """J^T u summed over all layers (A4): (k, B)."""
    return sum(project(grp, ug).sum(0) for grp, ug in zip(groups, u))


def fisher_product_and_projections(
    groups: list[LayerGroup], u: list[torch.Tensor], damping: float, scale: float | torch.Tensor = 1.0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """scale * F_bullet u (A1, A3) and, on the way, the per-layer projections J_i^T u[i] (A5-A6),
    (L, k, B) per group: the coarse operator of a basis containing u needs them again (3.21).
    ``scale`` costs nothing: it multiplies the (k, B) vector J^T u / B, not a layered vector."""
    batch = groups[0].total
    projections = [project(grp, ug) for grp, ug in zip(groups, u)]
    v = sum(p.sum(0) for p in projections) * (scale / batch)
    if isinstance(scale, torch.Tensor):  # a device scalar: no host synchronisation
        out = [grp.reduce(combine(grp, v)).addcmul_(ug, scale.to(ug.dtype), value=damping) for grp, ug in zip(groups, u)]
    else:
        out = [grp.reduce(combine(grp, v)).add_(ug, alpha=damping * scale) for grp, ug in zip(groups, u)]
    return out, projections


def fisher_vector_product(
    groups: list[LayerGroup], u: list[torch.Tensor], damping: float
) -> list[torch.Tensor]:
    """F_bullet u = (1/B) J J^T u + lambda u (A1, A3) for a layered vector with k columns."""
    return fisher_product_and_projections(groups, u, damping)[0]


def kfac_residual(
    groups: list[LayerGroup], grads: list[torch.Tensor], zeta: list[torch.Tensor], damping: float
) -> list[torch.Tensor]:
    """r_KFAC = g - F_bullet zeta_KFAC (3.10), written over the product (no extra temporary)."""
    return [torch.sub(g, f, out=f) for g, f in zip(grads, fisher_vector_product(groups, zeta, damping))]


def per_sample_projections(
    groups: list[LayerGroup], vectors: list[Basis], known: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """P = J^T R0^T in R^{B x m} for a block-diagonal coarse basis (eq. 3.21).

    vectors[grp]: (L, k, O, I) or ``RankOne``, column k of layer l's block V_l. Columns are
    ordered group by group, layer by layer, k fastest. ``known[grp]`` (L, k0, B): the projections
    of the first k0 columns of each group, already computed (only the others are projected).
    """
    cols = []
    for n, (grp, vg) in enumerate(zip(groups, vectors)):
        done = known[n] if known is not None else None
        if done is not None and done.shape[1] == vg.shape[1]:
            p = done
        elif done is not None:
            p = torch.cat([done, project(grp, vg[:, done.shape[1]:])], dim=1)
        else:
            p = project_rank_one(grp, vg) if isinstance(vg, RankOne) else project(grp, vg)
        cols.append(p.reshape(-1, grp.batch))
    return torch.cat(cols, dim=0).T


def coarse_operator(
    groups: list[LayerGroup],
    vectors: list[torch.Tensor],
    damping: float,
    projections: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """F_coarse = R0 F_bullet R0^T exactly (3.12, A15-A16), as one product of P with itself.

    F_coarse = (1/B) P^T P + lambda blockdiag(V_i^T V_i), with P the (B x m) per-sample
    projections (pass them, and the block Gram, if already computed); float64 since m is small
    and the operator may be ill-conditioned.
    """
    batch = groups[0].total
    p = per_sample_projections(groups, vectors) if projections is None else projections
    p = p.double()
    gram = block_gram(vectors) if gram is None else gram
    return groups[0].reduce(p.T @ p) / batch + damping * gram.double()


def per_sample_gradient_gram(groups: list[LayerGroup], max_elements: int = 2**26) -> torch.Tensor:
    """K = J^T J (B x B), the Gram matrix of per-sample gradients (for the Woodbury solve).

    Linear layers (T = 1): K_i = (G G^T) * (A A^T), no per-sample gradient formed. Layers with
    T > 1: per-sample gradients DW^(b) are formed in chunks of at most ``max_elements`` entries
    (the exact natural gradient is the reference, not the fast path).
    """
    batch = groups[0].batch
    gram = groups[0].a.new_zeros(batch, batch)
    for grp in groups:
        L, B, T, I = grp.a.shape
        O = grp.g.shape[-1]
        if T == 1:
            a, g = grp.a[:, :, 0], grp.g[:, :, 0]
            gram = gram + (torch.matmul(g, g.transpose(1, 2)) * torch.matmul(a, a.transpose(1, 2))).sum(0)
            continue
        chunk = max(1, max_elements // (B * O * I))
        for start in range(0, L, chunk):
            a, g = grp.a[start : start + chunk], grp.g[start : start + chunk]
            dw = torch.matmul(g.transpose(2, 3), a).flatten(2)  # (l, B, O*I)
            gram = gram + torch.matmul(dw, dw.transpose(1, 2)).sum(0)
    return gram


def layered_dot(u: list[torch.Tensor], w: list[torch.Tensor]) -> torch.Tensor:
    """Euclidean inner products <u_k, w_k> of two layered vectors: (k,)."""
    return sum((ug * wg).flatten(2).sum(-1).sum(0) for ug, wg in zip(u, w))


def fisher_norm_sq(groups: list[LayerGroup], u: list[torch.Tensor], damping: float) -> torch.Tensor:
    """||u||^2_{F_bullet} = (1/B) ||J^T u||^2 + lambda ||u||^2: (k,)."""
    batch = groups[0].total
    v = jt(groups, u)
    return groups[0].reduce((v * v).sum(-1)) / batch + damping * layered_dot(u, u)
