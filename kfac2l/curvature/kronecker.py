"""Kronecker factors of KFAC, their damping and their inverses (paper section 2.3).

For a group of L equally shaped layers:
  A_i = E[sum_t abar_{i-1,t} abar_{i-1,t}^T]          (2.25, 2.27)  shape (L, I, I)
  G_i = (1/T_i) E[sum_t g_{i,t} g_{i,t}^T]             (2.25, 2.27)  shape (L, O, O)
estimated on the Fisher mini-batch (targets sampled from the model) and averaged over time with
weight rho = min(1 - 1/k, decay) (k = number of updates so far). T_i counts the locations of all
calls of a module called several times per forward pass (a shared module, like a sequence layer).

Damping modes of [F_bullet KFAC]_{i,i}:
  * ``pi``     (A + pi sqrt(lambda) I) (x) (G + sqrt(lambda)/pi I)  with pi of eq. (2.30b) (paper);
  * ``factor`` (A + lambda I) (x) (G + lambda I)  (what the authors' public code does:
    natural-gradients@97105b6 optimizers/twolevel_kfac.py:128-132);
  * ``exact``  A (x) G + lambda I, inverted in the Kronecker eigenbasis (Tselepidis et al.:
    KFAC-Pytorch@2ff652f optimizers/gkfac.py:187-190);
  * ``unit_pi`` (A + sqrt(lambda/T) I) (x) (G + sqrt(lambda/T) I): pi = 1 and T the number of
    spatial locations (1 for Linear layers), the damping of the KFAC *baseline* of the authors'
    public code (opt-in, ``convention=authors``; natural-gradients@97105b6 optimizers/kfac.py:357-388).
All three are applied through eigen-decompositions batched over the group (one ``eigh`` call
per factor size and group), which also give the spectral coarse vectors of eqs. (3.25-3.28).
"""

from __future__ import annotations

import torch

DAMPING_MODES = ("pi", "factor", "exact", "unit_pi")


def batch_factors(
    a: torch.Tensor, g: torch.Tensor, total: int | None = None, reduce=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mini-batch estimates of A and G (eq. 2.27) from a (L, B, T, I) and g (L, B, T, O).

    Data-parallel training: the B samples are one process's shard of a Fisher batch of ``total``
    samples and ``reduce`` completes the sums over samples across processes (``FisherShard``)."""
    L, B, T, I = a.shape
    a2 = a.reshape(L, B * T, I)
    g2 = g.reshape(L, B * T, g.shape[-1])
    B = B if total is None else total
    A = torch.matmul(a2.transpose(1, 2), a2)
    G = torch.matmul(g2.transpose(1, 2), g2)
    if reduce is not None:
        A, G = reduce(A), reduce(G)
    return A / B, G / (B * T)


def pi_factor(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """pi_i = sqrt((tr A_i / dim A_i) / (tr G_i / dim G_i)) of eq. (2.30b), 1 where G_i = 0. (L,)"""
    ta = torch.diagonal(A, dim1=-2, dim2=-1).mean(-1)
    tg = torch.diagonal(G, dim1=-2, dim2=-1).mean(-1)
    ok = (ta > 0) & (tg > 0)
    ratio = torch.where(ok, ta / torch.where(ok, tg, torch.ones_like(tg)), torch.ones_like(ta))
    # Guard against degenerate factors (e.g. vanishing gradients through many BatchNorm layers):
    # pi^2 is kept within [eps, 1/eps] of the dtype so that neither damping shift underflows.
    eps = torch.finfo(A.dtype).eps
    return ratio.clamp(eps, 1.0 / eps).sqrt()


def _scaled_eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Batched eigh of symmetric matrices scaled to max |entry| = 1 first: the factors of layers
    behind many BatchNorm layers can be denormal, where LAPACK's eigh fails to converge.

    LAPACK can also fail on large factors of low rank (many repeated zero eigenvalues, e.g. a
    ResNet layer's A from a few samples); the decomposition is then retried once on the matrix
    plus a distinct tiny diagonal (1e3 eps .. 2e3 eps of the scaled matrix, far below any damping),
    which separates the repeated eigenvalues. Returns (eigenvalues, eigenvectors, retries); a
    second failure raises ``torch.linalg.LinAlgError`` (the caller keeps its previous inverses)."""
    scale = m.abs().amax(dim=(-2, -1), keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    m = m / scale
    try:
        evals, evecs = torch.linalg.eigh(m)
        retries = 0
    except torch.linalg.LinAlgError:
        n = m.shape[-1]
        jitter = torch.linspace(1.0, 2.0, n, dtype=m.dtype, device=m.device) * (1e3 * torch.finfo(m.dtype).eps)
        evals, evecs = torch.linalg.eigh(m + torch.diag_embed(jitter.expand(m.shape[:-1])))
        retries = 1
    return evals * scale.squeeze(-1), evecs, retries


class DampedKronecker:
    """The damped KFAC blocks of one layer group and their inverses (eqs. 2.29-2.31, 3.8).

    ``apply_inverse(U)`` returns [F_bullet KFAC]_{i,i}^{-1} u[i] as G'^{-1} MAT(u[i]) A'^{-1}.
    """

    def __init__(self, A: torch.Tensor, G: torch.Tensor, damping: float, mode: str = "pi", locations: int = 1):
        if mode not in DAMPING_MODES:
            raise ValueError(f"damping_mode={mode!r} is not valid; choose one of {DAMPING_MODES}")
        self.mode = mode
        self.damping = damping
        eA, self.QA, retries_a = _scaled_eigh(A)
        eG, self.QG, retries_g = _scaled_eigh(G)
        self.eigh_retries = retries_a + retries_g
        self.eA, self.eG = eA.clamp_min(0), eG.clamp_min(0)
        if mode == "exact":
            self.denominator = self.eG.unsqueeze(-1) * self.eA.unsqueeze(-2) + damping  # (L, O, I)
        else:
            if mode == "pi":
                pi = pi_factor(A, G)
                shift_a, shift_g = pi * damping**0.5, damping**0.5 / pi
            elif mode == "unit_pi":
                shift_a = shift_g = torch.full_like(self.eA[:, 0], (damping / locations) ** 0.5)
            else:
                shift_a = shift_g = torch.full_like(self.eA[:, 0], damping)
            self.dA = self.eA + shift_a.unsqueeze(-1)
            self.dG = self.eG + shift_g.unsqueeze(-1)
            self.A_inv = (self.QA / self.dA.unsqueeze(-2)) @ self.QA.transpose(-1, -2)
            self.G_inv = (self.QG / self.dG.unsqueeze(-2)) @ self.QG.transpose(-1, -2)

    _TENSORS = ("QA", "QG", "eA", "eG", "dA", "dG", "A_inv", "G_inv", "denominator")

    def state_dict(self) -> dict:
        """Everything ``apply_inverse`` uses (a checkpoint restores the inverses bit for bit)."""
        state = {"mode": self.mode, "damping": self.damping}
        state.update({k: getattr(self, k) for k in self._TENSORS if hasattr(self, k)})
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "DampedKronecker":
        obj = cls.__new__(cls)
        for key, value in state.items():
            setattr(obj, key, value)
        return obj

    def apply_inverse(self, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[F_bullet KFAC]^{-1} applied layer-wise to u of shape (L, k, O, I) (eq. 2.29); written
        into ``out`` (same shape) when given."""
        if self.mode == "exact":
            QA, QG = self.QA.unsqueeze(1), self.QG.unsqueeze(1)
            rotated = QG.transpose(-1, -2) @ u @ QA
            result = QG @ (rotated / self.denominator.unsqueeze(1)) @ QA.transpose(-1, -2)
        else:
            result = self.G_inv.unsqueeze(1) @ u @ self.A_inv.unsqueeze(1)
        return result if out is None else out.copy_(result)

    def eigen_denominator(self) -> torch.Tensor:
        """The eigenvalues of the damped block in its Kronecker eigenbasis, as (L, O, I):
        K^{-1} u = QG ((QG^T MAT(u) QA) / D) QA^T for every damping mode."""
        if self.mode == "exact":
            return self.denominator
        return self.dG.unsqueeze(-1) * self.dA.unsqueeze(-2)

    def eigen_reciprocal(self) -> torch.Tensor:
        """1 / ``eigen_denominator()``, (L, O, I), computed once per inverse refresh: K^{-1} in the
        eigenbasis is then a multiplication (a division costs several times more on a CPU)."""
        if getattr(self, "_eigen_reciprocal", None) is None:
            self._eigen_reciprocal = self.eigen_denominator().reciprocal()
        return self._eigen_reciprocal

    def rotate_in(self, u: torch.Tensor) -> torch.Tensor:
        """QG^T MAT(u) QA for u of shape (L, k, O, I): coordinates in the eigenbasis."""
        return self.QG.transpose(-1, -2).unsqueeze(1) @ u @ self.QA.unsqueeze(1)

    def rotate_out(self, u: torch.Tensor) -> torch.Tensor:
        """QG MAT(u) QA^T: back from the eigenbasis."""
        return self.QG.unsqueeze(1) @ u @ self.QA.transpose(-1, -2).unsqueeze(1)

    def apply_inverse_rank_one(self, basis):
        """[F_bullet KFAC]^{-1} (u w^T) = (G'^{-1} u)(A'^{-1} w)^T for ``RankOne`` columns in the
        pi/factor modes; None in ``exact`` mode, where the image is not rank-one."""
        if self.mode == "exact":
            return None
        return type(basis)(
            torch.matmul(basis.left, self.G_inv.transpose(1, 2)), torch.matmul(basis.right, self.A_inv.transpose(1, 2))
        )

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """[F_bullet KFAC] applied layer-wise (the damped block itself; for tests and Taylor)."""
        QA, QG = self.QA.unsqueeze(1), self.QG.unsqueeze(1)
        if self.mode == "exact":
            scale = self.denominator
        else:
            scale = self.dG.unsqueeze(-1) * self.dA.unsqueeze(-2)
        rotated = QG.transpose(-1, -2) @ u @ QA
        return QG @ (rotated * scale.unsqueeze(1)) @ QA.transpose(-1, -2)

    def smallest_eigenvector(self) -> torch.Tensor:
        """MAT of the eigenvector of the smallest eigenvalue of each damped block (3.25, 3.28).

        The damped block is (A') (x) (G') in the paper's vec order, whose smallest eigenpair is
        the product of the smallest of A' and of G'; as a matrix this is v_G v_A^T, shape (L, O, I).
        In ``exact`` mode A (x) G + lambda I has the same eigenvectors (eigenvalues >= 0).
        """
        v_g, v_a = self.smallest_eigenvector_factors()
        return v_g.unsqueeze(-1) * v_a.unsqueeze(-2)

    def smallest_eigenvector_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_G, v_A), shapes (L, O) and (L, I), with ``smallest_eigenvector`` = v_G v_A^T."""
        return self.QG[..., :, 0], self.QA[..., :, 0]

    def ones_sum(self) -> torch.Tensor:
        """1^T [F_bullet KFAC]_{i,i} 1 per layer: the diagonal of the PREVIOUS coarse operator (3.18b)."""
        ones = torch.ones(self.QG.shape[0], 1, self.QG.shape[-1], self.QA.shape[-1],
                          dtype=self.QA.dtype, device=self.QA.device)
        return (self.apply(ones) * ones).flatten(1).sum(-1)


class FactorState:
    """Moving averages of the Kronecker factors of one layer group, rho = min(1 - 1/k, decay).

    k is the number of updates so far (default, the paper's running average) or, when the caller
    passes ``count``, that number (the authors' code used its iteration counter, natural-gradients@97105b6
    optimizers/twolevel_kfac.py:517, so rho = decay
    from the second refresh on).
    """

    def __init__(self, decay: float = 0.95):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay={decay!r} must lie in [0, 1)")
        self.decay = decay
        self.updates = 0
        self.locations = 1
        self.A: torch.Tensor | None = None
        self.G: torch.Tensor | None = None

    def update(self, A: torch.Tensor, G: torch.Tensor, count: int | None = None, locations: int = 1) -> None:
        """Fold in one mini-batch estimate. A layer whose estimate is not finite (e.g. output
        gradients overflowing through a deep BatchNorm stack on a degenerate Fisher batch) keeps
        its previous factors (zeros before the first finite one, i.e. KFAC = the damped
        gradient), decided on the device without synchronisation."""
        self.updates += 1
        self.locations = int(locations)
        k = self.updates if count is None else max(int(count), 1)
        rho = min(1.0 - 1.0 / k, self.decay)
        finite = (A.isfinite().flatten(1).all(1) & G.isfinite().flatten(1).all(1))[:, None, None]
        if self.A is None:
            self.A, self.G = torch.zeros_like(A), torch.zeros_like(G)
            rho = 0.0
        for old, new in ((self.A, A), (self.G, G)):
            blended = old * rho + torch.where(finite, new, old) * (1.0 - rho)
            old.copy_(torch.where(finite, blended, old))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "locations": self.locations, "A": self.A, "G": self.G}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates, self.locations = state["decay"], state["updates"], state["locations"]
        self.A, self.G = state["A"], state["G"]


class DiagonalBlocks:
    """K_i^{-1} in the Kronecker eigenbasis of the damped blocks: the elementwise product with the
    reciprocal eigenvalues 1/D (L, O, I). Stands in for ``DampedKronecker`` when a computation runs
    in rotated coordinates (``TwoLevelKFAC``'s polynomial spaces on Linear layers)."""

    def __init__(self, reciprocal: torch.Tensor):
        self.reciprocal = reciprocal

    def apply_inverse(self, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.mul(u, self.reciprocal.unsqueeze(1), out=out)

    def apply_inverse_rank_one(self, basis):
        return None
