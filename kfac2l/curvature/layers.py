"""Per-layer helpers: the paper's matrix view of Linear and Conv2d layers.

Every preconditioned layer i is seen as the matrix W_i of shape (d_i, d_{i-1} + 1) of eq. (2.3)
(MLP) or (c_i, c_{i-1} Delta_i + 1) of eq. (2.5) (convolution), the last column holding the
bias when the layer has one. Its per-sample quantities are

* ``a``: the (augmented) inputs abar_{i-1,t}, shape (B, T, I) with I = in_features (+1);
* ``g``: the pre-activation derivatives g_{i,t}, shape (B, T, O),

with T the number of spatial locations (T = 1 for a Linear layer on flat inputs; extra leading
dimensions of a Linear input are treated as locations sharing the weight, like a convolution).
The per-sample gradient is then DW_i^(b) = sum_t g_{i,t}^(b) abar_{i-1,t}^(b)T (eqs. 2.4, 2.7).
A module called several times in one forward pass (a shared module) is one layer whose locations
are those of all its calls, so that this sum runs over calls too (docs/library.md, "Shared modules").

Vectorisation order: in this code a layer's parameter vector is the row-major flattening of that
(O, I) matrix, i.e. [W.flatten(), b] row by row. This is the paper's column-stacking vec of W^T;
as a consequence the Kronecker block A (x) G of eq. (2.25) in the paper's order is G (x) A in ours.
All products are written in the matrix form (G^-1 MAT(u) A^-1, eq. 2.29), so no code depends on
the order except the explicit dense references in the tests and in ``kfac2l.verify``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


def is_supported(module: nn.Module) -> bool:
    """True for the layers KFAC preconditions: Linear and ungrouped zero-padded Conv2d."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    return False


def _excluded(name: str, module: nn.Module, exclude) -> bool:
    """``exclude`` holds module names (fnmatch patterns, e.g. ``"head"`` or ``"encoder.*"``) and
    module types (e.g. ``nn.Conv2d``)."""
    import fnmatch

    for rule in exclude:
        if isinstance(rule, type) and isinstance(module, rule):
            return True
        if isinstance(rule, str) and fnmatch.fnmatchcase(name, rule):
            return True
    return False


def preconditioned_layers(model: nn.Module, exclude=()) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of ``model`` that are preconditioned, in forward order of definition:
    supported layers (``is_supported``) not matched by ``exclude``."""
    return [(name, m) for name, m in model.named_modules() if is_supported(m) and not _excluded(name, m, exclude)]


def skipped_modules(model: nn.Module, exclude=()) -> list[tuple[str, str]]:
    """(name, type) of every module with parameters of its own that is *not* preconditioned
    (BatchNorm, LayerNorm, embeddings, grouped convolutions, excluded layers, ...): these keep
    their plain gradient."""
    kept = {id(m) for _, m in preconditioned_layers(model, exclude)}
    return [(name, type(m).__name__) for name, m in model.named_modules()
            if id(m) not in kept and any(True for _ in m.parameters(recurse=False))]


def check_untied(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
    """ValueError (one line) if a preconditioned layer shares a parameter with another module.

    A layer is one module: its Fisher comes from that module's calls. A parameter tied between two
    modules (``b.weight = a.weight``) gets a gradient summed over both, which neither module's
    Kronecker factors describe (and two layers would write one ``.grad``). Calling the same module
    twice is supported instead (its calls are locations of one layer, see ``ForwardCapture``).
    """
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        for pname, param in m.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{name}.{pname}" if name else pname)
    for name, m in layers:
        for pname, param in m.named_parameters(recurse=False):
            own = f"{name}.{pname}" if name else pname
            others = [o for o in owners[id(param)] if o != own]
            if others:
                raise ValueError(f"layer {name!r} shares its parameter {own!r} with {others}: a tied parameter's "
                                 "gradient sums over modules KFAC treats as separate layers; call one module twice "
                                 f"instead of tying two, or leave the layer out with exclude=[{name!r}]")


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(O, I): rows and columns of the layer matrix W_i, bias column included."""
    weight = module.weight
    out_features = weight.shape[0]
    in_features = weight[0].numel()
    return out_features, in_features + (1 if module.bias is not None else 0)


def conv_padding(module: nn.Conv2d, height: int, width: int) -> tuple[int, int, int, int]:
    """Explicit (left, right, top, bottom) zero padding of a Conv2d, resolving 'same'/'valid'."""
    if module.padding == "valid":
        return (0, 0, 0, 0)
    if module.padding == "same":
        pads = []
        for k, d in zip(module.kernel_size, module.dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return (left, right, top, bottom)
    ph, pw = module.padding
    return (pw, pw, ph, ph)


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """abar: the per-sample, per-location augmented inputs, shape (B, T, I) (eqs. 2.3, 2.5, A14b)."""
    if isinstance(module, nn.Conv2d):
        x = F.pad(x, conv_padding(module, x.shape[-2], x.shape[-1]))
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
        a = patches.transpose(1, 2)  # (B, T, C_in * kh * kw), channel-major like weight.view(O, -1)
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
    return a


def layer_output_grads(module: nn.Module, grad_output: torch.Tensor) -> torch.Tensor:
    """g: the per-sample, per-location pre-activation derivatives, shape (B, T, O) (eqs. 2.4, 2.7)."""
    if isinstance(module, nn.Conv2d):
        return grad_output.flatten(2).transpose(1, 2)
    return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])


def grad_matrix(module: nn.Module) -> torch.Tensor:
    """MAT(D theta[i]): the layer's gradient as an (O, I) matrix, bias in the last column."""
    weight = module.weight
    grad_w = weight.grad if weight.grad is not None else torch.zeros_like(weight)
    mat = grad_w.reshape(weight.shape[0], -1)
    if module.bias is not None:
        grad_b = module.bias.grad if module.bias.grad is not None else torch.zeros_like(module.bias)
        mat = torch.cat([mat, grad_b.unsqueeze(1)], dim=1)
    return mat


def write_grad_matrix(module: nn.Module, mat: torch.Tensor) -> None:
    """Write an (O, I) matrix back into ``.grad`` of the layer's weight and bias."""
    weight = module.weight
    n_w = weight[0].numel()
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    weight.grad.copy_(mat[:, :n_w].reshape(weight.shape))
    if module.bias is not None:
        if module.bias.grad is None:
            module.bias.grad = torch.zeros_like(module.bias)
        module.bias.grad.copy_(mat[:, n_w])


def param_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's parameters as an (O, I) matrix (used by dense references)."""
    mat = module.weight.detach().reshape(module.weight.shape[0], -1)
    if module.bias is not None:
        mat = torch.cat([mat, module.bias.detach().unsqueeze(1)], dim=1)
    return mat


class ForwardCapture:
    """Forward hooks that keep each layer's inputs and outputs of the latest forward pass while
    gradients are enabled.

    ``armed()`` (default: always) tells whether a forward pass is wanted; the preconditioners arm
    the hooks only until they have taken this step's Fisher batch, so the main training forward
    pass holds no extra references. The outputs are the pre-activations s_i; ``torch.autograd.grad`` of the summed sampled
    negative log-likelihood with respect to them gives g_i for every sample without touching
    ``.grad`` (so the user's own ``loss.backward()`` is unaffected).

    A module called several times in one forward pass (a shared block, weight tying) keeps every
    call: ``inputs[i]`` and ``outputs[i]`` are the lists of its calls in call order (None: not
    called), each output paired with its own input. ``root`` (the model): a forward pass of it
    starts a new capture, so only the latest pass is kept, never calls of two passes.
    """

    def __init__(self, modules: list[nn.Module], armed=None, root: nn.Module | None = None):
        self.modules = modules
        self.armed = armed if armed is not None else (lambda: True)
        self.clear()
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]
        if root is not None:
            self._handles.append(root.register_forward_pre_hook(self._new_pass))

    def _new_pass(self, module, inputs):
        if torch.is_grad_enabled() and self.armed():
            self.clear()

    def _hook(self, index: int):
        def hook(module, inputs, output):
            if torch.is_grad_enabled() and output.requires_grad and self.armed():
                if self.outputs[index] is None:
                    self.inputs[index], self.outputs[index], self._versions[index] = [], [], []
                self.inputs[index].append(inputs[0].detach())
                self._versions[index].append(inputs[0]._version)
                self.outputs[index].append(output)
                # The network continues with a copy: an in-place operation after the layer
                # (ReLU(inplace=True), a residual `out += x`) modifies the copy, so the captured
                # pre-activation s_i, and the gradient taken with respect to it, stay those of the
                # layer. Only on captured (Fisher) passes; the training pass is untouched.
                return output.clone()
            return None

        return hook

    def check_inputs(self, names: list[str]) -> None:
        """RuntimeError if a captured layer input was modified in place after the layer ran (its
        abar would then not be the input the layer saw), or if the calls of a shared layer saw
        different batch sizes (their per-sample gradients cannot be summed sample by sample)."""
        changed = [n for n, xs, vs in zip(names, self.inputs, self._versions)
                   if xs is not None and any(x._version != v for x, v in zip(xs, vs))]
        if changed:
            raise RuntimeError(f"the input of layer(s) {changed} was modified in place after the layer used it; "
                               "KFAC needs the layer's own input (avoid in-place operations on layer inputs)")
        for name, xs in zip(names, self.inputs):
            if xs is not None and len({x.shape[0] for x in xs}) > 1:
                raise RuntimeError(f"layer {name!r} was called {len(xs)} times in one forward pass on batches of "
                                   f"sizes {[x.shape[0] for x in xs]}; every call of a shared layer must see the "
                                   "whole batch, one row per sample (docs/library.md, 'Shared modules')")

    def clear(self) -> None:
        self.inputs: list[list[torch.Tensor] | None] = [None] * len(self.modules)
        self.outputs: list[list[torch.Tensor] | None] = [None] * len(self.modules)
        self._versions: list[list[int] | None] = [None] * len(self.modules)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
