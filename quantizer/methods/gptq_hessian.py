"""What GPTQ needs from the calibration inputs: the Hessian H = 2XᵀX (accumulated in float32
as a running mean, parked in host RAM when the plan says so), the relative output error it
implies for any weight change, and H's damped inverse Cholesky factor with dead columns and
act-order resolved."""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..kernels.packing import QuantizedWeight
from ..settings import GPTQOptions
from ..stream.hidden_store import to_device_ahead

log = logging.getLogger(__name__)


# A GPU accumulator gathers whole samples for one XᵀX product (fewer read-modify-writes of the
# n×n fp32 H than one product per sample), within this much scratch: the gathered inputs in
# the working dtype, plus their fp32 copy where the GEMM needs one (mode 'tf32').
GRAM_SCRATCH_BYTES = 64 << 20
GRAM_GROUP_ROWS = 4096  # ...and no more rows: past it the n×n update is amortised


def gram_group_samples(n_features: int, seqlen: int, item_bytes: int, mode: str) -> int:
    """Samples per XᵀX product on a GPU: a fixed function of the widths and the GEMM the
    device uses, never of how the samples were chunked, so H is the same bits for any chunk
    size."""
    per_row = n_features * (item_bytes + (4 if mode == "tf32" else 0))
    rows = min(GRAM_GROUP_ROWS, GRAM_SCRATCH_BYTES // max(1, per_row))
    return max(1, rows // max(1, seqlen))


def hessian_update_bytes(n_features: int, seqlen: int, item_bytes: int, cuda: bool) -> int:
    """Memory one XᵀX update needs beside H (the memory planner's term): one sample in fp32,
    or on a GPU with half inputs the gathered group (whichever GEMM the device turns out to
    use; one sample is multiplied as it is)."""
    one = seqlen * n_features * 4
    if not (cuda and item_bytes == 2):
        return one
    sizes = [g * seqlen * n_features * (item_bytes + extra)
             for mode, extra in (("addmm", 0), ("tf32", 4))
             for g in (gram_group_samples(n_features, seqlen, item_bytes, mode),) if g > 1]
    return max([one, *sizes])


class HessianAccumulator:
    """Running mean of 2 x xᵀ over calibration tokens, in float32 whatever the input dtype.

    The running-mean scaling keeps H's magnitude independent of the number of tokens (as
    the reference implementation does) so float32 never overflows on long calibration sets.
    A batch of samples (batch, seq, n) is added a fixed group of samples at a time, so H is
    the same bits however the samples were chunked for the forward (OOM recovery halves chunks
    mid-run, and the chunk size is a placement setting that must not change the output):
    on the CPU one sample per product, in float32; on a GPU with fp16/bf16 inputs
    `gram_group_samples` samples gathered into one buffer, multiplied on tensor cores with
    float32 accumulation (products of half values are exact in fp32 either way), straight
    into float32 where torch's GEMM can (`out_dtype`), else through an fp32 copy in TF32
    (which holds half values exactly). A flat (tokens, n) input (MoE experts' routed tokens)
    is one product, as before."""

    def __init__(self, n_features: int, device: torch.device | str = "cpu"):
        self._H: torch.Tensor | None = torch.zeros((n_features, n_features), dtype=torch.float32,
                                                   device=device)
        self._n = 0  # tokens in H (n_tokens: those gathered too)
        self._group: torch.Tensor | None = None  # samples gathered for the next product
        self._filled = 0  # samples in _group
        self._group_samples = 0

    @property
    def H(self) -> torch.Tensor | None:
        """The sum so far (flushed); None once the owner released it (set to None)."""
        self.flush()
        return self._H

    @H.setter
    def H(self, value: torch.Tensor | None) -> None:
        self._group, self._filled = None, 0
        self._H = value

    def live_H(self) -> torch.Tensor:
        """H for a caller that needs it: an error once it was released."""
        self.flush()
        return self._sum()

    def _sum(self) -> torch.Tensor:
        """The float32 sum as it is (not flushed); an error once released."""
        if self._H is None:
            raise RuntimeError("internal: Hessian used after it was released")
        return self._H

    @property
    def n_tokens(self) -> int:
        self.flush()
        return self._n

    @n_tokens.setter
    def n_tokens(self, value: int) -> None:
        self._n = value

    @torch.no_grad()
    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add the tokens of x (..., n); `weights` (x's leading shape) weighs each token's
        x xᵀ (token weights, methods/token_weights.py); the mean still counts tokens.
        Weighted tokens are added a sample at a time in float32 (never gathered)."""
        if x.dim() < 3:
            self.flush()
            self._add_rows(x, weights)
        elif weights is None and self._gathers(x):
            self._gather(x.reshape(-1, *x.shape[-2:]))
        else:
            self.flush()
            ws = None if weights is None else weights.reshape(-1, x.shape[-2])
            for k, sample in enumerate(x.reshape(-1, *x.shape[-2:])):
                self._add_rows(sample, None if ws is None else ws[k])

    def _gathers(self, x: torch.Tensor) -> bool:
        return (self._sum().is_cuda and x.dtype in (torch.float16, torch.bfloat16)
                and x.numel() > 0)

    def _gather(self, samples: torch.Tensor) -> None:
        """Copy whole samples into the group buffer; one product per full group."""
        count, seq, n = samples.shape
        if self._group is None:
            self._group_samples = gram_group_samples(n, seq, samples.element_size(),
                                                     gram_mode(self._sum().device))
        if self._group_samples == 1:  # nothing to gather: each sample as it is
            for sample in samples:
                self._add_rows(sample)
            return
        done = 0
        while done < count:
            if self._group is None:
                self._group = torch.empty((self._group_samples * seq, n), dtype=samples.dtype,
                                          device=self._sum().device)
                self._filled = 0
            take = min(count - done, self._group_samples - self._filled)
            rows = self._group[self._filled * seq:(self._filled + take) * seq]
            rows.copy_(samples[done:done + take].reshape(-1, n))
            self._filled += take
            done += take
            if self._filled == self._group_samples:
                self.flush()

    def flush(self) -> None:
        """Multiply in the samples gathered so far (a partial group at a shard's end)."""
        if self._group is None:
            return
        group, filled = self._group, self._filled
        self._group, self._filled = None, 0
        if filled:
            seq = group.shape[0] // self._group_samples
            self._add_rows(group[:filled * seq])

    def _add_rows(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1])
        m = x.shape[0]
        if m == 0:
            return
        total = self._n + m
        H = self._sum()
        half = x.dtype in (torch.float16, torch.bfloat16)
        if weights is not None:
            x = x.to(H.device).to(torch.float32)
            x = x * weights.reshape(-1, 1).to(x.device, torch.float32).sqrt()
            half = False  # the products are no longer of half-precision values
        # H <- H * n/(n+m) + (2/(n+m)) * xᵀx, in one fused addmm (scaling after the product,
        # so the factors stay the exact input values).
        beta, alpha = self._n / total, 2.0 / total
        if half and x.is_cuda and H.is_cuda and x.device == H.device:
            gram_update(H, x, beta, alpha)
        else:
            x = x.to(H.device).to(torch.float32)
            with _lossless_tf32(half and x.is_cuda):
                H.addmm_(x.t(), x, beta=beta, alpha=alpha)
        self._n = total

    @torch.no_grad()
    def merge(self, other: "HessianAccumulator") -> None:
        """Fold in another accumulator's mean (the running-mean rule for a block of tokens):
        how calibration shards combine, in shard order (quantizer.parallel.distributed). A total kept in
        host RAM (to_host) is merged a block of rows at a time on the other's device: the same
        elementwise arithmetic, so the same bits, with one n×n matrix on the GPU."""
        mine, theirs = self.live_H(), other.live_H()  # both flushed
        total = self.n_tokens + other.n_tokens
        if total == 0:
            return
        a, b = self.n_tokens / total, other.n_tokens / total
        if mine.device == theirs.device:
            mine.mul_(a).add_(theirs, alpha=b)
        else:
            merge_rows(mine, theirs, a, b)
        self.n_tokens = total

    def to_host(self) -> None:
        """Keep H in (pinned, where allowed) host memory from now on: the GPU then holds only
        the shard partial being accumulated (the plan's Hessian placement 'park')."""
        H = self.live_H()
        if not H.is_cuda:
            return
        try:
            host = torch.empty(H.shape, dtype=H.dtype, pin_memory=True)
        except RuntimeError:
            host = torch.empty(H.shape, dtype=H.dtype)
        host.copy_(H)
        self.H = host

    def state(self) -> list[torch.Tensor]:
        H = self.live_H()
        return [H, torch.tensor([self.n_tokens], dtype=torch.int64, device=H.device)]

    def load_state(self, tensors: list[torch.Tensor]) -> None:
        self.H, self.n_tokens = tensors[0], int(tensors[1].item())


# How a GPU adds xᵀx of half inputs into a float32 H, per device kind: found once per process
# by `gram_mode` (torch versions differ in which GEMM writes fp32 from fp16/bf16 in place).
_GRAM_MODE: dict = {}


def gram_update(H: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> None:
    """H <- beta·H + alpha·xᵀx for half x (m, n) and float32 H (n, n) on one GPU, products
    on tensor cores accumulated in float32."""
    mode = gram_mode(H.device)
    if mode != "tf32":
        try:
            _gemm(mode, H, x, beta, alpha)
            return
        except RuntimeError as e:
            # refused for a shape the probe did not cover (argument checks run before the
            # GEMM, so H is untouched): TF32 from now on
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            _GRAM_MODE[_device_key(H.device)] = "tf32"
    _gemm("tf32", H, x, beta, alpha)


def _gemm(mode: str, H: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> None:
    xt = x.t()
    if mode == "addmm":
        torch.addmm(H, xt, x, beta=beta, alpha=alpha, out_dtype=torch.float32, out=H)
    elif mode == "baddbmm":
        H3 = H.unsqueeze(0)
        torch.baddbmm(H3, xt.unsqueeze(0), x.unsqueeze(0), beta=beta, alpha=alpha,
                      out_dtype=torch.float32, out=H3)
    else:
        x32 = x.to(torch.float32)
        with _lossless_tf32(True):
            H.addmm_(x32.t(), x32, beta=beta, alpha=alpha)


def gram_mode(device: torch.device) -> str:
    """'addmm' or 'baddbmm' (a half GEMM writing float32 into H in place), else 'tf32'.
    A candidate must give the float64 reference's values on a probe and leave no n×n
    temporary behind (measured with the allocator's peak); LAYERQUANT_GRAM=tf32 forces the
    fallback."""
    key = _device_key(device)
    if key in _GRAM_MODE:
        return _GRAM_MODE[key]
    mode = "tf32"
    if os.environ.get("LAYERQUANT_GRAM", "auto") != "tf32":
        for candidate in ("addmm", "baddbmm"):
            if _probe(candidate, device):
                mode = candidate
                break
    _GRAM_MODE[key] = mode
    return mode


def _device_key(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _probe(mode: str, device: torch.device) -> bool:
    n, m = 1024, 256
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        x = torch.randn((m, n), device=device, generator=gen).to(torch.bfloat16)
        H = torch.randn((n, n), device=device, generator=gen)
        H = H @ H.t() / n
        want = H.double() * 0.25 + 0.5 * (x.double().t() @ x.double())
        _gemm(mode, H, x, 0.25, 0.5)  # the first call may set up cuBLAS workspaces
        torch.cuda.synchronize(device)
        H = want.float()
        ptr = H.data_ptr()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _gemm(mode, H, x, 0.25, 0.5)
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - before
        want = want * 0.25 + 0.5 * (x.double().t() @ x.double())
        err = float((H.double() - want).abs().max() / want.abs().max())
        return H.data_ptr() == ptr and extra < n * n * 4 and err < 1e-5
    except Exception:  # noqa: BLE001 - this torch has no such GEMM: the next candidate
        return False


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
    layer's FLOPs). (report_errors also uses it for fp32 inputs, where it is not lossless.)"""
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
    most two float32 copies of a slice alive at a time (the planner counts two). A report,
    not an input to anything written: on a GPU its two products run in TF32 (a ~1e-3 relative
    difference in the error figure, ~8x less time than full fp32)."""
    num = den = wnum = wden = 0.0
    step = -(-w.shape[0] // max(1, row_slices))
    for r0 in range(0, w.shape[0], step):
        ws = w[r0:r0 + step].to(H.device, torch.float32)
        wden += float(torch.linalg.vector_norm(ws)) ** 2
        with _lossless_tf32(H.is_cuda):
            den += float(torch.mm(ws, H).mul_(ws).sum())
        d = q.rows(r0, r0 + ws.shape[0]).dequantize(torch.float32).to(H.device).sub_(ws)
        del ws
        wnum += float(torch.linalg.vector_norm(d)) ** 2
        with _lossless_tf32(H.is_cuda):
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
        if S is None:  # not positive definite at this damping (`reason` says why)
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
