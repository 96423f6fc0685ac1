"""What GPTQ needs from the calibration inputs: the Hessian H = 2XᵀX (accumulated in float32
as a running mean), the relative output error it implies for any weight change, and H's
damped inverse Cholesky factor with dead columns and act-order resolved."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from quantizer.errors import InputError


class HessianAccumulator:
    """Running mean of 2 x xᵀ over calibration tokens, in float32 whatever the input dtype.

    The running-mean scaling keeps H's magnitude independent of the number of tokens (as
    the reference implementation does) so float32 never overflows on long calibration sets."""

    def __init__(self, n_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros((n_features, n_features), dtype=torch.float32, device=device)
        self.n_tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        half = x.dtype in (torch.float16, torch.bfloat16)
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        total = self.n_tokens + m
        # H <- H * n/(n+m) + (2/(n+m)) * xᵀx, in one fused addmm (scaling after the product,
        # so the factors stay the exact input values).
        with _lossless_tf32(half and x.is_cuda):
            self.H.addmm_(x.t(), x, beta=self.n_tokens / total, alpha=2.0 / total)
        self.n_tokens = total

    @torch.no_grad()
    def merge(self, other: "HessianAccumulator") -> None:
        """Fold in another accumulator's mean (the running-mean rule for a block of tokens):
        how calibration shards combine, in shard order (quantizer.distributed)."""
        total = self.n_tokens + other.n_tokens
        if total == 0:
            return
        self.H.mul_(self.n_tokens / total).add_(other.H, alpha=other.n_tokens / total)
        self.n_tokens = total

    def state(self) -> list[torch.Tensor]:
        return [self.H, torch.tensor([self.n_tokens], dtype=torch.int64, device=self.H.device)]

    def load_state(self, tensors: list[torch.Tensor]) -> None:
        self.H, self.n_tokens = tensors[0], int(tensors[1].item())


@contextlib.contextmanager
def _lossless_tf32(enable: bool):
    """TF32 tensor cores for an fp32 matmul whose inputs came from fp16/bf16: TF32 keeps 10
    mantissa bits, so those values enter exactly and products accumulate in fp32 -- the
    full-fp32 result at tensor-core speed (the 11008² down_proj Hessian is most of a 7B
    layer's FLOPs)."""
    if not enable:
        yield
        return
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    prev = matmul.fp32_precision if new_api else matmul.allow_tf32
    try:
        if new_api:
            matmul.fp32_precision = "tf32"
        else:
            matmul.allow_tf32 = True
        yield
    finally:
        if new_api:
            matmul.fp32_precision = prev
        else:
            matmul.allow_tf32 = prev


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error ‖(W-Ŵ)X‖/‖WX‖ from H ∝ XᵀX: tr(D H Dᵀ)/tr(W H Wᵀ), no forward."""
    w = w.to(H.device, torch.float32)
    d = w - w_hat.to(H.device, torch.float32)
    num = ((d @ H) * d).sum()
    den = ((w @ H) * w).sum()
    return math.sqrt(max(float(num), 0.0) / float(den)) if float(den) > 0 else 0.0


def _inverse_hessian_cholesky(box: list, damp: float, log, max_retries: int = 4):
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹; on failure retry with λ×10.

    `box` holds the only reference to a scratch copy of H, which is damped in place and
    dropped as soon as its factor exists: at most three n×n matrices live at once (the
    caller's H, one factor, its inverse), which matters for an 11008-wide down_proj."""
    H = box.pop()
    diag = torch.diagonal(H)
    mean_diag = float(diag.mean())
    lam, applied = damp, 0.0
    for attempt in range(max_retries + 1):
        diag += (lam - applied) * mean_diag
        applied = lam
        try:
            L = torch.linalg.cholesky(H)
        except (RuntimeError, torch.linalg.LinAlgError) as e:  # not positive definite
            reason = str(e).splitlines()[0][:120]
        else:
            del H, diag
            Hinv = torch.cholesky_inverse(L)
            del L
            U = torch.linalg.cholesky(Hinv, upper=True)
            del Hinv
            U = U.contiguous()
            if bool(torch.isfinite(U).all()):
                return U, lam, attempt
            raise InputError("GPTQ: the inverse Hessian has non-finite entries (calibration "
                             "inputs may contain NaN/inf)")
        if attempt < max_retries:
            log(f"gptq: Cholesky failed at damp={lam:g} ({reason}); retrying at damp={lam * 10:g}")
            lam *= 10
    raise InputError(f"GPTQ: the Hessian is not positive definite even at damp={lam:g} "
                     f"(calibration inputs may contain NaN/inf)")


@dataclass
class PreparedHessian:
    """Everything GPTQ derives from H alone, shared by every weight quantized against it
    (the linears of one input group, every candidate of a measurement)."""

    U: torch.Tensor  # upper Cholesky factor of the damped inverse, in quantization order
    perm: torch.Tensor | None  # act-order column order (None: natural order)
    dead: torch.Tensor  # bool (in,): columns that never saw a non-zero input
    damp_used: float
    retries: int


@torch.no_grad()
def prepare_hessian(H: torch.Tensor, act_order: bool = False, damp: float = 0.01,
                    log=print) -> PreparedHessian:
    if not bool(torch.isfinite(torch.diagonal(H)).all()):
        raise InputError("GPTQ: the Hessian has non-finite entries (calibration inputs "
                         "contain NaN/inf)")
    # A column that never saw a non-zero input contributes nothing: its weights are set to 0
    # (in gptq_quantize) and H_ii = 1 keeps H invertible.
    dead = torch.diagonal(H) == 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H) + dead.to(H.dtype), descending=True)
        H = H.index_select(0, perm).index_select(1, perm).to(torch.float32)
        dead_here = dead[perm]
    else:
        H = H.to(torch.float32, copy=True)
        dead_here = dead
    torch.diagonal(H).add_(dead_here.to(H.dtype))  # dead columns: H_ii 0 -> 1
    box = [H]
    del H
    U, damp_used, retries = _inverse_hessian_cholesky(box, damp, log)
    return PreparedHessian(U, perm, dead, damp_used, retries)
