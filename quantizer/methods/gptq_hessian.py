"""What GPTQ needs from the calibration inputs: the Hessian H = 2XᵀX (accumulated in float32
as a running mean, parked in host RAM when the plan says so), the relative output error it
implies for any weight change, and H's damped inverse Cholesky factor with dead columns and
act-order resolved."""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..kernels.packing import QuantizedWeight
from ..settings import GPTQOptions
from ..stream.hidden_store import to_device_ahead

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running mean of 2 x xᵀ over calibration tokens, in float32 whatever the input dtype.

    The running-mean scaling keeps H's magnitude independent of the number of tokens (as
    the reference implementation does) so float32 never overflows on long calibration sets.
    A batch of samples (batch, seq, n) is added one sample at a time, so H is the same bits
    however the samples were chunked for the forward (OOM recovery halves chunks mid-run, and
    the chunk size is a placement setting that must not change the output)."""

    def __init__(self, n_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros((n_features, n_features), dtype=torch.float32, device=device)
        self.n_tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add the tokens of x (..., n); `weights` (x's leading shape) weighs each token's
        x xᵀ (token weights, methods/token_weights.py); the mean still counts tokens."""
        if x.dim() >= 3:
            ws = (None if weights is None else
                  weights.reshape(-1, x.shape[-2]))
            for k, sample in enumerate(x.reshape(-1, *x.shape[-2:])):
                self._add_rows(sample, None if ws is None else ws[k])
        else:
            self._add_rows(x, weights)

    def _add_rows(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        half = x.dtype in (torch.float16, torch.bfloat16)
        x = x.reshape(-1, x.shape[-1]).to(self.H.device).to(torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        if weights is not None:
            x = x * weights.reshape(-1, 1).to(x.device, torch.float32).sqrt()
            half = False  # the products are no longer of half-precision values
        total = self.n_tokens + m
        # H <- H * n/(n+m) + (2/(n+m)) * xᵀx, in one fused addmm (scaling after the product,
        # so the factors stay the exact input values).
        with _lossless_tf32(half and x.is_cuda):
            self.H.addmm_(x.t(), x, beta=self.n_tokens / total, alpha=2.0 / total)
        self.n_tokens = total

    @torch.no_grad()
    def merge(self, other: "HessianAccumulator") -> None:
        """Fold in another accumulator's mean (the running-mean rule for a block of tokens):
        how calibration shards combine, in shard order (quantizer.parallel.distributed). A total kept in
        host RAM (to_host) is merged a block of rows at a time on the other's device: the same
        elementwise arithmetic, so the same bits, with one n×n matrix on the GPU."""
        total = self.n_tokens + other.n_tokens
        if total == 0:
            return
        a, b = self.n_tokens / total, other.n_tokens / total
        if self.H.device == other.H.device:
            self.H.mul_(a).add_(other.H, alpha=b)
        else:
            merge_rows(self.H, other.H, a, b)
        self.n_tokens = total

    def to_host(self) -> None:
        """Keep H in (pinned, where allowed) host memory from now on: the GPU then holds only
        the shard partial being accumulated (the plan's Hessian placement 'park')."""
        if not self.H.is_cuda:
            return
        try:
            host = torch.empty(self.H.shape, dtype=self.H.dtype, pin_memory=True)
        except RuntimeError:
            host = torch.empty(self.H.shape, dtype=self.H.dtype)
        host.copy_(self.H)
        self.H = host

    def state(self) -> list[torch.Tensor]:
        return [self.H, torch.tensor([self.n_tokens], dtype=torch.int64, device=self.H.device)]

    def load_state(self, tensors: list[torch.Tensor]) -> None:
        self.H, self.n_tokens = tensors[0], int(tensors[1].item())


@torch.no_grad()
def merge_rows(dst: torch.Tensor, src: torch.Tensor, a: float, b: float,
               rows: int | None = None) -> None:
    """dst <- dst·a + src·b, computed on src's device a block of rows at a time (dst may live
    elsewhere, e.g. in host RAM): per element the same two operations as the whole-matrix
    update, so the same result. From pinned host memory the next block's copy in runs while
    this block's copy out does (both directions of the bus at once)."""
    rows = rows or max(1, (64 << 20) // (4 * dst.shape[1]))  # 64 MiB blocks
    starts = range(0, dst.shape[0], rows)
    blocks = to_device_ahead([(dst[r0:r0 + rows],) for r0 in starts], src.device)
    for r0, (block,) in zip(starts, blocks):
        block.mul_(a).add_(src[r0:r0 + rows], alpha=b)
        dst[r0:r0 + rows].copy_(block, non_blocking=True)


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


def report_errors(w: torch.Tensor, q: QuantizedWeight, H: torch.Tensor,
                   row_slices: int) -> tuple[float, float]:
    """(output_error, relative weight error) of quantized q against w, by row slices, at
    most two float32 copies of a slice alive at a time (the planner counts two)."""
    num = den = wnum = wden = 0.0
    step = -(-w.shape[0] // max(1, row_slices))
    for r0 in range(0, w.shape[0], step):
        ws = w[r0:r0 + step].to(H.device, torch.float32)
        wden += float(torch.linalg.vector_norm(ws)) ** 2
        den += float(torch.mm(ws, H).mul_(ws).sum())
        d = q.rows(r0, r0 + ws.shape[0]).dequantize(torch.float32).to(H.device).sub_(ws)
        del ws
        wnum += float(torch.linalg.vector_norm(d)) ** 2
        num += float(torch.mm(d, H).mul_(d).sum())
        del d
    rel = math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0
    return rel, math.sqrt(wnum) / max(math.sqrt(wden), 1e-12)


_PARKING: dict[str, torch.Tensor] = {}  # one pinned host buffer, reused by every group


def park(H: torch.Tensor) -> torch.Tensor:
    """A host copy of a GPU Hessian, in a pinned buffer kept for the run (copies at PCIe speed
    and no pinning cost per layer); pageable memory where pinning is refused."""
    buf = _PARKING.get("H")
    if buf is None or buf.numel() < H.numel():
        _PARKING.pop("H", None)
        try:
            buf = torch.empty(H.numel(), dtype=H.dtype, pin_memory=True)
        except RuntimeError:
            return H.to("cpu")
        _PARKING["H"] = buf
    out = buf[:H.numel()].view(H.shape)
    out.copy_(H)
    return out


def _scratch(H: torch.Tensor, order: torch.Tensor, fix: torch.Tensor, device,
             rows: int = 1024) -> torch.Tensor:
    """A float32 copy of H on `device` with rows and columns in `order` and `fix` added to its
    diagonal, built a block of rows at a time so no second n×n matrix exists beside it. H may
    be in host RAM (a parked Hessian): its rows go over in natural, contiguous blocks (a
    pinned block copies at full PCIe speed) and are put in order on the device."""
    n = H.shape[0]
    out = torch.empty((n, n), dtype=torch.float32, device=device)
    order_d = order.to(device)
    position = torch.empty_like(order_d)  # where each row of H goes: out[position[i]] = H[i]
    position[order_d] = torch.arange(n, device=device)
    for r0 in range(0, n, rows):
        block = H[r0:r0 + rows].to(device, torch.float32)
        out.index_copy_(0, position[r0:r0 + rows], block.index_select(1, order_d))
    torch.diagonal(out).add_(fix.to(device, torch.float32)[order_d])
    return out


def _invert_lower_in_place(L: torch.Tensor, base: int = 512) -> None:
    """L <- L⁻¹ for lower-triangular L, in place: [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0],
    [-C⁻¹ B A⁻¹, C⁻¹]], the off-diagonal block updated a slice at a time so the scratch is a
    slice, never a second n×n matrix (what LAPACK's trtri does, which torch does not expose)."""
    n = L.shape[0]
    if n <= base:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        L.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
        return
    h = n // 2
    A, B, C = L[:h, :h], L[h:, :h], L[h:, h:]
    _invert_lower_in_place(A, base)
    _invert_lower_in_place(C, base)
    step = max(1, (1 << 24) // max(h, 1))
    for r0 in range(0, n - h, step):
        B[r0:r0 + step] = B[r0:r0 + step] @ A
    for c0 in range(0, h, step):
        B[:, c0:c0 + step] = -(C @ B[:, c0:c0 + step])


def _flip_in_place(M: torch.Tensor, rows: int = 1024) -> None:
    """M <- M reversed along both dimensions (M[i, j] = M[n-1-i, n-1-j]), by pairs of row
    blocks, so the scratch is two blocks of rows."""
    n = M.shape[0]
    half = n // 2
    for a in range(0, half, rows):
        b = min(a + rows, half)
        top = M[a:b].flip(0, 1)
        bottom = M[n - b:n - a].flip(0, 1)
        M[a:b] = bottom
        M[n - b:n - a] = top
    if n % 2:
        M[half] = M[half].flip(0)


def _all_finite(M: torch.Tensor, rows: int = 1024) -> bool:
    """torch.isfinite(M).all() a block of rows at a time: isfinite takes |M|, a full-size
    float copy (3 GiB for a 28672² Hessian, measured on an H200 at an 8 GiB budget)."""
    ok = torch.ones((), dtype=torch.bool, device=M.device)
    for r0 in range(0, M.shape[0], rows):
        ok &= torch.isfinite(M[r0:r0 + rows]).all()
    return bool(ok)


def _factor(make, shift: float) -> tuple[torch.Tensor | None, str]:
    """(lower Cholesky factor of make() + shift·I, "") computed in place in that copy, or
    (None, why) when it is not positive definite. A build that refuses the in-place form gets
    the ordinary one (one more n×n copy for a moment)."""
    S = make()
    torch.diagonal(S).add_(shift)
    info = torch.zeros((), dtype=torch.int32, device=S.device)
    try:
        try:
            # S is symmetric, so its column-major view is S too; factoring that view as
            # upper (S = UᵀU) leaves L = Uᵀ in S's rows. Column-major is cholesky's own
            # output layout: a row-major `out` would get a temporary n×n result copied back.
            F = S.mT
            torch.linalg.cholesky_ex(F, upper=True, out=(F, info))
        except RuntimeError as e:
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            S = make()
            torch.diagonal(S).add_(shift)
            S, info = torch.linalg.cholesky_ex(S)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as e:  # LinAlgError included
        return None, str(e).splitlines()[0][:120]
    if int(info):
        return None, f"leading minor {int(info)} is not positive"
    return S, ""


def _upper_factor_of_inverse(make, damp: float, mean_diag: float, max_retries: int = 4):
    """U, the upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹, on failure retrying with λ×10.

    `make()` returns a fresh float32 copy of H with rows and columns reversed (P H P, P the
    exchange matrix). With P H P = M Mᵀ (M lower), H⁻¹ = P M⁻ᵀ M⁻¹ P = Uᵀ U for
    U = P M⁻¹ P, which is upper triangular with a positive diagonal: the factor GPTQ needs.
    Factoring, inverting and reversing all happen in that one copy, so preparing the factor
    needs one n×n matrix beside H (the reference's cholesky_inverse route needs two)."""
    lam = damp
    for attempt in range(max_retries + 1):
        S, reason = _factor(make, lam * mean_diag)
        if reason:  # not positive definite at this damping
            if attempt < max_retries:
                log.info("gptq: Cholesky failed at damp=%g (%s); retrying at damp=%g", lam,
                         reason, lam * 10)
                lam *= 10
            continue
        S.tril_()
        _invert_lower_in_place(S)
        _flip_in_place(S)
        if _all_finite(S):
            return S, lam, attempt
        raise InputError("GPTQ: the inverse Hessian has non-finite entries (calibration "
                         "inputs may contain NaN/inf)")
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
    diag: torch.Tensor | None = None  # H's diagonal (float32, original column order)


@torch.no_grad()
def prepare_hessian(H: torch.Tensor, act_order: bool = False, damp: float = GPTQOptions.damp,
                    device=None) -> PreparedHessian:
    """The factor GPTQ solves with, on `device` (default: H's). H itself is never modified
    and may live elsewhere (a Hessian parked in host RAM is read into the GPU copy)."""
    device = torch.device(device) if device is not None else H.device
    diag = torch.diagonal(H).to(device, torch.float32)
    if not bool(torch.isfinite(diag).all()):
        raise InputError("GPTQ: the Hessian has non-finite entries (calibration inputs "
                         "contain NaN/inf)")
    # A column that never saw a non-zero input contributes nothing: its weights are set to 0
    # (in gptq_quantize) and H_ii = 1 keeps H invertible.
    dead = diag == 0
    fix = dead.to(torch.float32)
    perm = None
    order = torch.arange(H.shape[0], device=device)
    if act_order:
        perm = torch.argsort(diag + fix, descending=True)
        order = perm
    mean_diag = float((diag + fix).mean())
    reverse = order.flip(0)  # P H P in quantization order: see _upper_factor_of_inverse
    U, damp_used, retries = _upper_factor_of_inverse(
        lambda: _scratch(H, reverse, fix, device), damp, mean_diag)
    return PreparedHessian(U, perm, dead, damp_used, retries, diag)
