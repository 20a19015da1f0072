"""
ops.py: the Llama block's three element-wise operations, RMSNorm, RoPE and SwiGLU's gate, as autograd
Functions with hand-written backward passes. model.py calls them; nothing else changes.

Why: written as plain tensor expressions, autograd keeps every intermediate (x^2, x * rsqrt, silu(gate), the
swapped halves of q) and runs one pass over memory per operation each way. Without torch.compile to fuse them,
these passes, not the matmuls, are what separates a Llama block from a GPT-2 block on a CPU: measured in
BENCHMARKS.md ("Training throughput on the CPU"). Each Function below saves only what its backward needs and
writes into its own fresh buffers in place, which cuts both the memory kept for backward (budget.py counts it)
and the passes. With torch.compile, dynamo traces through them (forward and backward) into the one graph of
the step and inductor fuses them as before; nothing in them may return a Python value or a dtype from a
tensor (torch.result_type would split the graph at every call: tests/test_compile.py).

Each backward is derived in its docstring and checked against autograd in float64 (tests/test_ops.py:
torch.autograd.gradcheck, and the plain expressions at the end of this file, which bench_train.py
--in_process also times).
"""

import torch
import torch.nn.functional as F

HALF = (torch.float16, torch.bfloat16)


class RMSNormFunction(torch.autograd.Function):
    """y = w * n,  n = x * r,  r = 1 / sqrt(mean(x^2) + eps)  over the last dimension (size D); Zhang and
    Sennrich 2019. Half-precision inputs are normalized in float32 and n is rounded to the input's dtype
    before the gain, as transformers' LlamaRMSNorm does (models/llama/modeling_llama.py).

    Backward, from dr/dx_j = -r^3 x_j / D:
        dL/dw = sum over tokens of g * n           = sum over tokens of r * (g * x)
        dL/dx = r * (g * w) - x * (r^3 / D) * sum_j (g * w * x)_j
    Both sums read the one product t = g * x: dL/dw = t^T r and sum_j (g w x)_j = t w, two matrix-vector
    products. Saved: x and r (one float per token), not n."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        # mean(x^2) as |x|^2 / D: vector_norm reads x once and writes no x^2. Half inputs are summed and
        # normalized in float32 by type promotion (x * r, r float32), without a float32 copy of x.
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32 if x.dtype in HALF else x.dtype)
        r = r.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, r)
        n = (x * r).to(x.dtype)
        # the gain in place when it keeps n's dtype; promote_types reads dtypes alone, so dynamo keeps it in the graph
        return n.mul_(weight) if torch.promote_types(n.dtype, weight.dtype) == n.dtype else weight * n

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        D = x.shape[-1]
        wf = weight.to(r.dtype)
        gf = g.to(r.dtype)  # float32 for half inputs; x joins it by type promotion, never copied
        t = (gf * x).reshape(-1, D)
        grad_w = torch.mv(t.t(), r.reshape(-1)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            coef = r.pow(3).mul_(torch.mv(t, wf).view(r.shape)).div_(-D)
            grad_x = (gf * wf).mul_(r).addcmul_(x, coef).to(x.dtype)
        return grad_x, grad_w, None


def _rotate(x, cos, sin):
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) for the two halves of the last dimension: one product
    with cos, then each half's sin term added in place (no swapped copy of x, no concatenation)."""
    h = x.shape[-1] // 2
    out = x * torch.cat([cos, cos], -1)
    out[..., :h].addcmul_(x[..., h:], sin, value=-1)
    out[..., h:].addcmul_(x[..., :h], sin)
    return out


class RoPEFunction(torch.autograd.Function):
    """Rotary position embedding (Su et al. 2021) in transformers' rotate-half layout: dimension i < D/2 of
    each head is paired with i + D/2, and the pair is rotated by the angle of its position and frequency.
    x: (..., T, [heads,] D); cos, sin: the angles' (T, [1,] D/2) tables, cast to x's dtype.

    A rotation is linear and orthogonal, so its backward is the rotation by the opposite angle:
    dL/dx = R(-angle) g, the same operation with sin negated. Saved: the tables alone."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _rotate(g, cos, -sin), None, None


class SiluMulFunction(torch.autograd.Function):
    """SwiGLU's gate (Shazeer 2020): y = silu(a) * b, where a = gate(x) and b = up(x).

    Backward: dL/db = g * silu(a) and dL/da = (g * b) * silu'(a). Saved: a and b only; silu(a) is computed
    again in backward (one pass) rather than kept (one ffn-wide tensor per token and layer), which on a CPU is
    the faster of the two as well as the smaller."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a).mul_(b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = g * b
            torch.ops.aten.silu_backward.grad_input(grad_a, a, grad_input=grad_a)  # in place: dL/ds * silu'(a)
        if ctx.needs_input_grad[1]:
            grad_b = F.silu(a).mul_(g)
        return grad_a, grad_b


def rms_norm(x, weight, eps):
    return RMSNormFunction.apply(x, weight, eps)


def apply_rope(x, cos, sin):
    return RoPEFunction.apply(x, cos, sin)


def silu_mul(a, b):
    return SiluMulFunction.apply(a, b)


# -----------------------------------------------------------------------------
# the plain expressions the Functions replace (as transformers writes them), for the tests and the benchmark


def rms_norm_plain(x, weight, eps):  # transformers' LlamaRMSNorm.forward
    h = x.float() if x.dtype in HALF else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def apply_rope_plain(x, cos, sin):  # transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin
    cos, sin = torch.cat([cos, cos], -1).to(x.dtype), torch.cat([sin, sin], -1).to(x.dtype)
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


def silu_mul_plain(a, b):
    return F.silu(a) * b
