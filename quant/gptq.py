"""GPTQ (Frantar et al. 2022): weight quantization that compensates each column's rounding error.

For a linear layer with inputs X (T, K) the layer-output error ||X W^T - X Q^T||^2 is a quadratic
form in the weight error with Hessian H = X^T X / T. GPTQ quantizes the columns of W one at a time
and spreads each column's rounding error over the columns not yet quantized, weighted by the
inverse Hessian (the optimal-brain-surgeon update), so later columns absorb earlier errors:

  1. H += damp * mean(diag H) * I       (dampening; inputs never active on the calibration data get H_kk = 1,
                                        so their weights are rounded to nearest and pass no error on; the
                                        reference code zeroes them, but W4A4's quantized calibration inputs
                                        can be 0 on a channel live on other images)
  2. optional act-order: columns in order of decreasing H_kk (the most active inputs first)
  3. U = upper Cholesky factor of H^-1 (a numerically stable form of the sequential inverse updates)
  4. for each block of `block_size` columns ("lazy batch updates"): quantize column i with its group's
     scale/zero, err = (w_i - q_i) / U_ii, update the block's remaining columns by -err * U_i,:;
     after the block, update all later columns at once with one matmul.
Group scales (one per `group_size` consecutive inputs) are found when the first column of a group
is reached, from the weights as updated so far; with act-order they are fixed up front from the
original weight ("static groups"), so that group g is always inputs g*group_size .. (g+1)*group_size - 1
(the layout QuantLinear and every kernel expect).

Over a whole model (`gptq_model`) the layers are quantized one after another in the order the
forward pass runs them, each with a Hessian from calibration inputs that already went through the
quantized layers before it (the inputs of every call, for a layer the forward pass calls more than once):
its float inputs, also for a layer that will round them to int8 per token
(weighing by the rounded inputs instead changed w4a8-gptq's test top-1 by under 0.1 point: quant/README.md).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from quant.cli import is_positive_int
from quant.models import forward_with_hooks
from quant.qlinear import QuantLinear
from quant.quantizers import WEIGHT_FORMATS, QuantizedWeight, is_uniform_format, num_groups, uniform_params


def gptq_weight(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None = None,
                asymmetric: bool = True, act_order: bool = False, damp: float = 0.01,
                block_size: int = 128, what: str = "the inputs") -> QuantizedWeight:
    """GPTQ codes (O, K) of weight w (O, K) given the input Hessian H (K, K), with scales/zeros (O, G): one
    scale per `group_size` consecutive inputs (None: one per output channel), columns updated `block_size` at a
    time (any positive number: the codes do not depend on it); `what` names the inputs in a refusal ("the
    inputs of blocks.0.attn.qkv")."""
    if group_size is not None and not is_positive_int(group_size):
        raise ValueError(f"group_size must be a positive integer or None (one scale per output channel), "
                         f"got {group_size!r}")
    if not is_positive_int(block_size):  # a negative one quantized no column: codes all 0
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    W = w.detach().float().clone()
    O, K = W.shape
    gs = group_size or K
    H = H.detach().double().clone()
    if H.shape != (K, K):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not fit a weight with {K} inputs")
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    symmetric, maxq = not asymmetric, 2 ** bits - 1
    G = num_groups(K, gs)
    scales = torch.zeros(O, G, device=W.device)
    zeros = torch.full((O, G), float(2 ** (bits - 1)), device=W.device)

    def set_group(g: int, block: torch.Tensor) -> None:   # block (O, <= gs): this group's current weights
        s, z = uniform_params(block, bits, None, symmetric)
        scales[:, g] = s[:, 0]
        if z is not None:
            zeros[:, g] = z[:, 0]

    perm = torch.arange(K, device=W.device)
    if act_order:
        for g in range(G):
            set_group(g, W[:, g * gs:(g + 1) * gs])
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * H.diagonal().mean() * torch.eye(K, dtype=H.dtype, device=H.device)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    except torch.linalg.LinAlgError:
        raise ValueError(f"GPTQ: the Hessian of {what} is not positive definite even with damp={damp}; "
                         f"raise the recipe's damp (quant.recipe(name, damp=0.1); --set damp=0.1 on the command line) "
                         f"or calibrate on more images") from None

    codes = torch.zeros(O, K, device=W.device)
    cols = perm.tolist()  # on the host: one transfer, not a device sync per column
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros(O, i2 - i1, device=W.device)
        for i in range(i2 - i1):
            col = cols[i1 + i]
            g = col // gs
            if not act_order and col % gs == 0:
                # the group's scales come from its weights as updated so far; those past this lazy block
                # (columns i2..) have not yet received the update of this block's columns i1..i-1: apply it
                ahead = W[:, i2:i1 + i + gs]
                if ahead.shape[1]:
                    ahead = ahead - Err1[:, :i] @ U[i1:i1 + i, i2:i1 + i + gs]
                set_group(g, torch.cat([W1[:, i:], ahead], 1)[:, :gs])
            w = W1[:, i]
            q = torch.clamp(torch.round(w / scales[:, g]) + zeros[:, g], 0, maxq)
            codes[:, i1 + i] = q
            err = (w - (q - zeros[:, g]) * scales[:, g]) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return QuantizedWeight(out.to(torch.uint8), scales, zeros if asymmetric else None)


# ----------------------------------------------------------------------------- calibration over a model


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the wanted inputs are seen."""


def _run(model: nn.Module, calib: torch.Tensor, batch_size: int) -> None:
    with torch.no_grad():
        for i in range(0, len(calib), batch_size):
            try:
                model(calib[i:i + batch_size])
            except _Stop:
                pass


def capture(model: nn.Module, module: nn.Module, calib: torch.Tensor, batch_size: int = 128,
            output: bool = False, keep_shape: bool = False, calls: int = 1) -> torch.Tensor:
    """The input (or output) of `module` over all calibration batches, stopping each forward pass there
    (at its `calls`-th call: a module the forward pass calls more than once gives the tensors of each).

    Returns the tensors concatenated along the first dimension: a module's output, or with
    `keep_shape` its input, as it is (B, ...); else its input as tokens (for a linear layer's input
    (B, N, K), (B * N, K)).
    """
    seen: list[torch.Tensor] = []

    def grab(t: torch.Tensor) -> None:
        seen.append(t.detach() if output or keep_shape else t.detach().reshape(-1, t.shape[-1]))
        if len(seen) % calls == 0:
            raise _Stop

    hook = (module.register_forward_hook(lambda m, i, o: grab(o)) if output
            else module.register_forward_pre_hook(lambda m, i: grab(i[0])))
    try:
        _run(model, calib, batch_size)
    finally:
        hook.remove()
    if not seen:
        raise ValueError(f"{type(module).__name__} never ran in the model's forward pass")
    return torch.cat(seen).float()


def execution_order(model: nn.Module, example: torch.Tensor, calls: dict[str, int] | None = None) -> list[str]:
    """Names of the model's nn.Linear layers in the order one (eval-mode) forward pass first calls them;
    `calls`, if given, gets how many times the pass calls each."""
    order: list[str] = []
    calls = {} if calls is None else calls

    def called(n: str) -> None:
        calls[n] = calls.get(n, 0) + 1
        if n not in order:
            order.append(n)
    forward_with_hooks(model, example, [m.register_forward_pre_hook(lambda mod, i, n=n: called(n))
                                        for n, m in model.named_modules() if isinstance(m, nn.Linear)])
    return order


def refuse_non_finite_inputs(t: torch.Tensor, what: str) -> None:
    """Refuse calibration that gave a layer NaN or infinite inputs (`t`: the inputs or their Hessian), which no
    damping or range mends; `what` names them ("the inputs of blocks.0.attn.qkv")."""
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} are NaN or infinite on the calibration images: calibrate on inputs the model takes "
                         f"(normalised images, quant.data.to_model_input)")


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = X^T X / T (K, K) of inputs X (T, K), accumulated in float64."""
    x = x.double()
    return x.T @ x / max(len(x), 1)


def gptq_model(model: nn.Module, calib: torch.Tensor, plan: Callable[[str, nn.Linear], dict | None],
               progress: bool = True) -> nn.Module:
    """Quantize every nn.Linear that `plan(name, layer)` gives settings for, in forward order, in place.

    `plan` returns None (leave the layer as it is) or a dict with `weight_format` ("intB"), and
    optionally `group_size`, `asymmetric`, `act_order`, `damp`, `block_size`, `act_format`.
    """
    from tqdm import tqdm
    model.eval()
    try:  # one input first: inputs of the wrong shape or dtype fail here, in torch's words, not mid-calibration
        calls: dict[str, int] = {}
        names = execution_order(model, calib[:1], calls)
    except RuntimeError as e:
        raise ValueError(f"the model cannot run on the calibration inputs ({calib.dtype} {tuple(calib.shape)}: "
                         f"{(str(e).splitlines() or [''])[0][:160]}); give a batch of the inputs the model takes") from None
    unused = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in names]
    for name in tqdm(names + unused, desc="GPTQ", unit="layer", disable=not progress, leave=False):
        layer = model.get_submodule(name)
        settings = plan(name, layer)
        if settings is None:
            continue
        settings = dict(settings)
        fmt, act_format = settings.pop("weight_format"), settings.pop("act_format", "none")
        if not is_uniform_format(fmt):
            raise ValueError(f"GPTQ makes uniform integer codes (intB), not {fmt!r}")
        # a layer the forward pass never calls has no inputs to weigh its error by: H = I, round to nearest
        h = hessian(capture(model, layer, calib, 128, calls=calls[name])) if name not in unused else \
            torch.eye(layer.in_features, dtype=torch.float64, device=layer.weight.device)
        refuse_non_finite_inputs(h, f"GPTQ: the inputs of {name}")  # else blamed on the Hessian's definiteness
        q = gptq_weight(layer.weight, h, WEIGHT_FORMATS[fmt], **settings, what=f"the inputs of {name}")
        model.set_submodule(name, QuantLinear.from_codes(q.codes, q.scales, q.zeros, layer.bias, fmt,
                                                         settings.get("group_size"), act_format))
    return model
