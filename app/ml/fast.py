"""The exact fast POLAR objective: the frozen part computed once, gradients by hand.

Q and K are untouched, so the last block's attention at the pooled (end-of-text) row is fixed
and only that row's V path changes: o' = o + per-head B_h (Â · u_h), u_h = Σ_j P_h[p, j] ln_1(x_j).
Out-projection, layer scale, ln_2's centring and affine part and c_fc are linear in B, so they
fold into one matrix G; per step only ln_2's 1/σ, the activation, c_proj, ln_final, the
projection and the loss run, on N rows, with a hand-written backward (no autograd graph).
"""

from __future__ import annotations

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
        return torch.ops.aten.gelu_backward(grad, z, approximate=act.approximate)
    if isinstance(act, QuickGELU):
        sg = torch.sigmoid(1.702 * z)
        return grad * (sg + 1.702 * z * sg * (1 - sg))
    with torch.enable_grad():  # any other activation: local autograd on one op
        z = z.detach().requires_grad_(True)
        (dz,) = torch.autograd.grad(act(z), z, grad)
    return dz


@dataclass(frozen=True)
class _Cache:
    """Forward intermediates the backward needs."""

    a_norm: torch.Tensor  # ()
    a_hat: torch.Tensor  # (d,)
    s: torch.Tensor  # (N, H)
    cq: torch.Tensor  # (H, 5d)
    r_c: torch.Tensor  # (N, d)
    inv_s: torch.Tensor  # (N, 1)
    z_pre: torch.Tensor  # (N, 4d)
    z: torch.Tensor  # (N, 4d)
    y_hat: torch.Tensor  # (N, d)
    inv_f: torch.Tensor  # (N, 1)
    f_norm: torch.Tensor  # (N, 1)
    f_n: torch.Tensor  # (N, D)


@dataclass(frozen=True)
class FastObjective:
    """L(a, b) = mean((normalize(f(a, b)) - target)²) + λ·mean(b²), f the text features."""

    tower: TextTower
    act: nn.Module  # the MLP activation (GELU or QuickGELU)
    ln_f: nn.LayerNorm  # ln_final
    u: torch.Tensor  # (N, H, d) attention-weighted LN'd inputs of the last block
    r0: torch.Tensor  # (N, d) pooled row after the base attention residual
    z0: torch.Tensor  # (N, 4d) c_fc input part of r0, before ln_2's 1/σ: (cen(r0)·g2) W1ᵀ
    z_bias: torch.Tensor  # (4d,) β2 W1ᵀ + b1
    g: torch.Tensor  # (H, dh, d + 4d): B_h -> [residual change | c_fc pre-activation change]
    w2: torch.Tensor  # (d, 4d) c_proj weight with ls_2 folded in
    b2: torch.Tensor  # (d,)
    eps: float  # ln_2 epsilon
    target: torch.Tensor  # (N, D)
    lam: float

    @classmethod
    def build(
        cls, tower: TextTower, tokens: torch.Tensor, target: torch.Tensor, lam: float
    ) -> FastObjective:
        """Run the frozen part once: all blocks but the last, and the last one's attention."""
        block = tower.last
        ln2, fc, proj = _affine_ln(block.ln_2), block.mlp.c_fc, block.mlp.c_proj
        with torch.no_grad():
            tokens = truncate(tower, tokens)
            x, mask = prefix_states(tower, tokens)  # (N, L, d)
            att = pooled_attention(block, x, pool_indices(tower, tokens), mask)
            r0 = att.x + block.ls_1(block.attn.out_proj(att.o))  # (N, d)
            d, heads = tower.width, tower.heads
            w_o = _layer_scale(block.ls_1, d, r0)[:, None] * block.attn.out_proj.weight  # (d, d)
            w_o_c = w_o - w_o.mean(dim=0, keepdim=True)  # centring the output, folded in
            w1g = fc.weight * ln2.weight  # (4d, d)
            # (H, dh, 5d): a row-vector bmm per head is far faster on CPU than a column one.
            g = torch.cat([w_o, w1g @ w_o_c]).T.reshape(heads, d // heads, -1).contiguous()
            gamma2 = _layer_scale(block.ls_2, d, r0)
            return cls(
                tower=tower,
                act=block.mlp.gelu,
                ln_f=_affine_ln(tower.ln_final),
                u=att.u,
                r0=r0,
                z0=(r0 - r0.mean(dim=-1, keepdim=True)) @ w1g.T,
                z_bias=ln2.bias @ fc.weight.T + fc.bias,
                g=g,
                w2=gamma2[:, None] * proj.weight,
                b2=gamma2 * proj.bias,
                eps=float(ln2.eps),
                target=target,
                lam=lam,
            )

    def _forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, _Cache]:
        """Loss and intermediates; differentiable, so autograd can check the hand backward."""
        d, heads = self.r0.shape[1], self.g.shape[0]
        ln_f = self.ln_f
        a_norm = a.norm()
        a_hat = a / a_norm
        s = self.u @ a_hat  # (N, H) how strongly Â fires per head
        cq = torch.bmm(b.view(heads, 1, -1), self.g).squeeze(1)  # (H, 5d)
        change = s @ cq  # (N, 5d)
        r = self.r0 + change[:, :d]  # (N, d) pooled row after the attention residual
        r_c = r - r.mean(dim=-1, keepdim=True)
        inv_s = torch.rsqrt(r_c.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (N, 1)
        z_pre = self.z0 + change[:, d:]
        z = z_pre * inv_s + self.z_bias  # (N, 4d) = c_fc(ln_2(r))
        y = r + F.linear(self.act(z), self.w2, self.b2)  # (N, d)
        y_c = y - y.mean(dim=-1, keepdim=True)
        inv_f = torch.rsqrt(y_c.pow(2).mean(dim=-1, keepdim=True) + ln_f.eps)  # (N, 1)
        y_hat = y_c * inv_f
        f = self._project(y_hat * ln_f.weight + ln_f.bias)  # (N, D)
        f_norm = f.norm(dim=-1, keepdim=True)
        f_n = f / f_norm
        loss = (f_n - self.target).pow(2).mean() + self.lam * b.pow(2).mean()
        return loss, _Cache(a_norm, a_hat, s, cq, r_c, inv_s, z_pre, z, y_hat, inv_f, f_norm, f_n)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.tower.text_projection
        if proj is None:
            return x
        if isinstance(proj, nn.Linear):
            return proj(x)
        return x @ proj

    def _project_back(self, grad: torch.Tensor) -> torch.Tensor:
        proj = self.tower.text_projection
        if proj is None:
            return grad
        if isinstance(proj, nn.Linear):
            return grad @ proj.weight
        return grad @ proj.T

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The loss (autograd-capable)."""
        return self._forward(a, b)[0]

    def loss_and_grads(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, dL/da, dL/db) with the backward written out (the training hot loop)."""
        with torch.no_grad():
            loss, c = self._forward(a, b)
            d = c.r_c.shape[1]
            heads = self.g.shape[0]
            d_fn = 2 * (c.f_n - self.target) / self.target.numel()
            d_f = (d_fn - c.f_n * (c.f_n * d_fn).sum(dim=-1, keepdim=True)) / c.f_norm
            d_yh = self._project_back(d_f) * self.ln_f.weight  # (N, d) into ln_final's x̂
            mean = (d_yh.mean(dim=-1, keepdim=True), (d_yh * c.y_hat).mean(dim=-1, keepdim=True))
            d_y = c.inv_f * (d_yh - mean[0] - c.y_hat * mean[1])  # (N, d)
            d_z = _act_backward(self.act, d_y @ self.w2, c.z)  # (N, 4d)
            d_inv_s = (d_z * c.z_pre).sum(dim=-1, keepdim=True)  # (N, 1)
            d_rc = d_inv_s * (-c.inv_s.pow(3)) * c.r_c / d  # via 1/σ = (mean(r_c²)+ε)^(-1/2)
            d_r = d_y + d_rc - d_rc.mean(dim=-1, keepdim=True)
            d_change = torch.cat([d_r, d_z * c.inv_s], dim=-1)  # (N, 5d)
            d_s = d_change @ c.cq.T  # (N, H)
            d_cq = c.s.T @ d_change  # (H, 5d)
            d_b = torch.bmm(d_cq.view(heads, 1, -1), self.g.transpose(1, 2)).reshape(d)
            d_b = d_b + (2 * self.lam / d) * b
            d_ahat = torch.einsum("nh,nhd->d", d_s, self.u)
            d_a = (d_ahat - c.a_hat * (c.a_hat @ d_ahat)) / c.a_norm
        return loss, d_a, d_b
