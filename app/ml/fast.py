"""The exact fast POLAR objective: the frozen part computed once, gradients by hand.

Q and K are untouched, so the last block's attention at the pooled (end-of-text) row is fixed
and only that row's V path changes: o' = o + per-head B_h (Â · u_h), u_h = Σ_j P_h[p, j] ln_1(x_j).
Out-projection, layer scale, ln_2's centring and affine part and c_fc are linear in B, so they
fold into one matrix G; per step only ln_2's 1/σ, the activation, c_proj, ln_final, the
projection and the loss run, on N rows, with a hand-written backward (no autograd graph).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from app.ml.text import TextTower, pool_indices, pooled_attention, prefix_states, truncate


def _layer_scale(module: nn.Module, d: int, like: torch.Tensor) -> torch.Tensor:
    """The per-channel factor of an open_clip LayerScale (ones for Identity), (d,)."""
    gamma = getattr(module, "gamma", None)
    return torch.ones(d, dtype=like.dtype, device=like.device) if gamma is None else gamma


def _affine_ln(module: nn.Module) -> nn.LayerNorm:
    """The module as a LayerNorm with weight and bias (all open_clip text towers qualify)."""
    if not (
        isinstance(module, nn.LayerNorm) and module.weight is not None and module.bias is not None
    ):
        raise NotImplementedError(f"expected an affine LayerNorm, got {type(module).__name__}")
    return module


def _act_backward(act: nn.Module, grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """d act(z) / dz applied to grad."""
    if isinstance(act, nn.GELU):
        dgelu: torch.Tensor = torch.ops.aten.gelu_backward(grad, z, approximate=act.approximate)
        return dgelu
    if isinstance(act, QuickGELU):
        sg = torch.sigmoid(1.702 * z)
        return grad * (sg + 1.702 * z * sg * (1 - sg))
    with torch.enable_grad():  # any other activation: local autograd on one op
        z = z.detach().requires_grad_(True)
        (dz,) = torch.autograd.grad(act(z), z, grad)
    return dz


def _projection(tower: TextTower, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The text projection as (weight (D, d), bias) of a Linear."""
    proj = tower.text_projection
    if proj is None:
        return torch.eye(tower.width, dtype=like.dtype, device=like.device), None
    if isinstance(proj, nn.Linear):
        return proj.weight, proj.bias
    return proj.T.contiguous(), None


class _Linear:
    """x Wᵀ + b; on CPU float32 with oneDNN's pre-packed weight (about 3x MKL's at N = 5 rows).

    `rows` is oneDNN's batch hint: any hint from 5 up packs equally well for 3-16 rows.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int = 16) -> None:
        self.weight, self.bias = weight.contiguous(), bias
        self.packed: torch.Tensor | None = None
        if weight.device.type == "cpu" and weight.dtype == torch.float32:
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)
                probe = torch.randn(
                    rows, weight.shape[1], generator=torch.Generator().manual_seed(0)
                )
                got = torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
                if torch.allclose(got, F.linear(probe, self.weight, bias), rtol=1e-4, atol=1e-4):
                    self.packed = packed
            except (AttributeError, RuntimeError):  # torch built without oneDNN
                pass

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and not torch.is_grad_enabled():
            y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                x, self.packed, self.bias, "none", [], ""
            )
            return y
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class _Cache:
    """Forward intermediates the backward needs."""

    a_norm: torch.Tensor  # ()
    a_hat: torch.Tensor  # (d,)
    s: torch.Tensor  # (N, H)
    cq: torch.Tensor  # (H, 5d)
    r_hat: torch.Tensor  # (N, d) ln_2's normalised input (before its affine part)
    inv_s: torch.Tensor  # (N, 1) ln_2's 1/σ
    z_pre: torch.Tensor  # (N, 4d)
    z: torch.Tensor  # (N, 4d)
    y: torch.Tensor  # (N, d) block output at the pooled row
    y_mean: torch.Tensor  # (N, 1) ln_final statistics
    y_rstd: torch.Tensor  # (N, 1)
    f_norm: torch.Tensor  # (N, 1)
    f_n: torch.Tensor  # (N, D)
    diff: torch.Tensor  # (N, D) f_n - target


@dataclass(frozen=True)
class _ModelConstants:
    """Per model, not per concept: the folded and packed weights of the last block's tail."""

    act: nn.Module  # the MLP activation (GELU or QuickGELU)
    ln_f: nn.LayerNorm  # ln_final
    g: torch.Tensor  # (H, dh, d + 4d): B_h -> [residual change | c_fc pre-activation change]
    c_fc: _Linear  # (N, d) -> (N, 4d): W1 with ln_2's scale, no bias
    z_bias: torch.Tensor  # (4d,) β2 W1ᵀ + b1
    c_proj: _Linear  # (N, 4d) -> (N, d), ls_2 folded in
    c_proj_back: _Linear  # (N, d) -> (N, 4d): its transpose, for the backward
    proj: _Linear  # (N, d) -> (N, D) text projection (identity if none)
    proj_back: _Linear  # (N, D) -> (N, d)
    eps: float  # ln_2 epsilon

    @classmethod
    def build(cls, tower: TextTower) -> _ModelConstants:
        """Fold out_proj, ls_1, ln_2's centring and scale and c_fc into G; pack the rest."""
        block = tower.last
        ln2, fc, proj = _affine_ln(block.ln_2), block.mlp.c_fc, block.mlp.c_proj
        d, heads = tower.width, tower.heads
        w = block.attn.out_proj.weight
        w_o = _layer_scale(block.ls_1, d, w)[:, None] * w  # (d, d)
        w_o_c = w_o - w_o.mean(dim=0, keepdim=True)  # centring the output, folded in
        w1g = fc.weight * ln2.weight  # (4d, d)
        # (H, dh, 5d): a row-vector bmm per head is far faster on CPU than a column one.
        g = torch.cat([w_o, w1g @ w_o_c]).T.reshape(heads, d // heads, -1).contiguous()
        gamma2 = _layer_scale(block.ls_2, d, w)
        w2 = gamma2[:, None] * proj.weight  # (d, 4d)
        proj_w, proj_b = _projection(tower, w)
        return cls(
            act=block.mlp.gelu,
            ln_f=_affine_ln(tower.ln_final),
            g=g,
            c_fc=_Linear(w1g, None),
            z_bias=ln2.bias @ fc.weight.T + fc.bias,
            c_proj=_Linear(w2, gamma2 * proj.bias),
            c_proj_back=_Linear(w2.T, None),
            proj=_Linear(proj_w, proj_b),
            proj_back=_Linear(proj_w.T, None),
            eps=float(ln2.eps),
        )


_constants: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[object, ...], _ModelConstants]] = (
    weakref.WeakKeyDictionary()
)
_constants_lock = threading.Lock()


def _model_constants(tower: TextTower) -> _ModelConstants:
    """Cached per last block; rebuilt if any weight involved was modified in place."""
    params = [*tower.last.parameters(), *tower.ln_final.parameters()]
    if isinstance(tower.text_projection, torch.Tensor):
        params.append(tower.text_projection)
    elif tower.text_projection is not None:
        params.extend(tower.text_projection.parameters())
    key = (tower.dtype, tower.last.attn.in_proj_weight.device, *(p._version for p in params))
    with _constants_lock:
        found = _constants.get(tower.last)
        if found is None or found[0] != key:
            with torch.no_grad():
                found = (key, _ModelConstants.build(tower))
            _constants[tower.last] = found
        return found[1]


@dataclass(frozen=True)
class FastObjective:
    """L(a, b) = mean((normalize(f(a, b)) - target)²) + λ·mean(b²), f the text features."""

    consts: _ModelConstants
    u: torch.Tensor  # (N, H, d) attention-weighted LN'd inputs of the last block
    r0: torch.Tensor  # (N, d) pooled row after the base attention residual
    z0: torch.Tensor  # (N, 4d) c_fc input part of r0, before ln_2's 1/σ: (cen(r0)·g2) W1ᵀ
    target: torch.Tensor  # (N, D)
    lam: float

    @classmethod
    def build(
        cls, tower: TextTower, tokens: torch.Tensor, target: torch.Tensor, lam: float
    ) -> FastObjective:
        """Run the frozen part once: all blocks but the last, and the last one's attention."""
        block = tower.last
        consts = _model_constants(tower)
        with torch.no_grad():
            tokens = truncate(tower, tokens)
            x, mask = prefix_states(tower, tokens)  # (N, L, d)
            att = pooled_attention(block, x, pool_indices(tower, tokens), mask)
            r0 = att.x + block.ls_1(block.attn.out_proj(att.o))  # (N, d)
            z0 = consts.c_fc(r0 - r0.mean(dim=-1, keepdim=True))
        return cls(consts=consts, u=att.u, r0=r0, z0=z0, target=target, lam=lam)

    def _forward(self, a: torch.Tensor, b: torch.Tensor) -> _Cache:
        """Intermediates up to f_n - target; differentiable, so autograd can check the backward."""
        k = self.consts
        d, heads = self.r0.shape[1], k.g.shape[0]
        a_norm = torch.linalg.vector_norm(a)
        a_hat = a / a_norm
        s = self.u @ a_hat  # (N, H) how strongly Â fires per head
        cq = torch.bmm(b.view(heads, 1, -1), k.g).squeeze(1)  # (H, 5d)
        change = s @ cq  # (N, 5d)
        r = self.r0 + change[:, :d]  # (N, d) pooled row after the attention residual
        var, mean = torch.var_mean(r, dim=-1, keepdim=True, correction=0)
        inv_s = torch.rsqrt(var + k.eps)  # (N, 1) ln_2's 1/σ
        r_hat = (r - mean) * inv_s
        z_pre = self.z0 + change[:, d:]
        z = torch.addcmul(k.z_bias, z_pre, inv_s)  # (N, 4d) = c_fc(ln_2(r))
        y = r + k.c_proj(k.act(z))  # (N, d)
        y_ln, y_mean, y_rstd = torch.native_layer_norm(
            y, (d,), k.ln_f.weight, k.ln_f.bias, k.ln_f.eps
        )
        f = k.proj(y_ln)  # (N, D)
        f_norm = torch.linalg.vector_norm(f, dim=-1, keepdim=True)
        f_n = f / f_norm
        diff = f_n - self.target
        return _Cache(
            a_norm, a_hat, s, cq, r_hat, inv_s, z_pre, z, y, y_mean, y_rstd, f_norm, f_n, diff
        )

    def _loss(self, c: _Cache, b: torch.Tensor) -> torch.Tensor:
        return c.diff.pow(2).mean() + self.lam * b.pow(2).mean()

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The loss (autograd-capable)."""
        return self._loss(self._forward(a, b), b)

    def loss_and_grads(
        self, a: torch.Tensor, b: torch.Tensor, want_loss: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(loss, dL/da, dL/db) with the backward written out (the training hot loop).

        The loss itself is not needed for the gradients: skipped unless `want_loss`.
        """
        with torch.no_grad():
            c = self._forward(a, b)
            loss = self._loss(c, b) if want_loss else None
            k = self.consts
            d, heads = c.y.shape[1], k.g.shape[0]
            d_fn = c.diff * (2 / c.diff.numel())
            d_f = (d_fn - c.f_n * torch.linalg.vecdot(c.f_n, d_fn)[:, None]) / c.f_norm
            d_y = torch.ops.aten.native_layer_norm_backward(
                k.proj_back(d_f), c.y, [d], c.y_mean, c.y_rstd,
                k.ln_f.weight, k.ln_f.bias, [True, False, False],
            )[0]  # (N, d)  # fmt: skip
            d_z = _act_backward(k.act, k.c_proj_back(d_y), c.z)  # (N, 4d)
            d_inv_s = torch.linalg.vecdot(d_z, c.z_pre)[:, None]  # (N, 1)
            # 1/σ = (mean(r_c²) + ε)^(-1/2): d/dr = -(1/σ)³ r_c / d = -(1/σ)² r̂ / d (zero-mean).
            d_r = torch.addcmul(d_y, c.r_hat, d_inv_s * c.inv_s.pow(2), value=-1 / d)
            d_change = torch.cat([d_r, d_z * c.inv_s], dim=-1)  # (N, 5d)
            d_s = d_change @ c.cq.T  # (N, H)
            d_cq = c.s.T @ d_change  # (H, 5d)
            d_b = torch.bmm(d_cq.view(heads, 1, -1), k.g.transpose(1, 2)).view(d)
            d_b = d_b.add(b, alpha=2 * self.lam / d)
            d_ahat = d_s.reshape(-1) @ self.u.reshape(-1, d)  # (d,)
            d_a = (d_ahat - c.a_hat * (c.a_hat @ d_ahat)) / c.a_norm
        return loss, d_a, d_b
