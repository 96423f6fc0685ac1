import time, torch, sys
from quantizer.methods.gptq_hessian import merge_rows, HessianAccumulator
dev = torch.device("cuda")
n = 28672
def t(f, reps=3):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize(); a = time.perf_counter(); f(); torch.cuda.synchronize(); ts.append(time.perf_counter() - a)
    return min(ts)
host = torch.empty((n, n), dtype=torch.float32, pin_memory=True); host.normal_()
gpu = torch.randn((n, n), device=dev)
gb = n * n * 4 / 1e9
print(f"matrix {gb:.2f} GB")
print("H2D whole   GB/s", gb / t(lambda: gpu.copy_(host, non_blocking=True)))
print("D2H whole   GB/s", gb / t(lambda: host.copy_(gpu, non_blocking=True)))
rows = (64 << 20) // (4 * n)
def blocks_h2d():
    for r in range(0, n, rows): gpu[r:r+rows].copy_(host[r:r+rows], non_blocking=True)
def blocks_d2h():
    for r in range(0, n, rows): host[r:r+rows].copy_(gpu[r:r+rows], non_blocking=True)
print("H2D blocks  GB/s", gb / t(blocks_h2d))
print("D2H blocks  GB/s", gb / t(blocks_d2h))
host2 = torch.empty((n, n), dtype=torch.float32, pin_memory=True)
gpu2 = torch.empty((n, n), device=dev)
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
def bidir():
    with torch.cuda.stream(s1): gpu2.copy_(host2, non_blocking=True)
    with torch.cuda.stream(s2): host.copy_(gpu, non_blocking=True)
    s1.synchronize(); s2.synchronize()
print("bidir       GB/s each", gb / t(bidir))
print("merge_rows  s", t(lambda: merge_rows(host, gpu, 0.5, 0.5)), "ideal(both dirs at measured) ~", gb / (gb / t(blocks_h2d)))
for mb in (16, 256):
    r = (mb << 20) // (4 * n)
    print(f"merge_rows {mb}MiB s", t(lambda: merge_rows(host, gpu, 0.5, 0.5, rows=r)))
del host2, gpu2
# symmetry of addmm-accumulated H
acc = HessianAccumulator(n, dev)
for _ in range(4):
    acc.add(torch.randn(1, 512, n, device=dev, dtype=torch.bfloat16))
H = acc.H
asym = 0
for r in range(0, n, 1024):
    asym += int((H[r:r+1024] != H[:, r:r+1024].t()).sum())
print("addmm H asymmetric elements (bf16 inputs):", asym)
acc = HessianAccumulator(8192, dev)
for _ in range(4):
    acc.add(torch.randn(1, 512, 8192, device=dev, dtype=torch.bfloat16))
print("8192 asym:", int((acc.H != acc.H.t()).sum()))
# CPU vs GPU merge bits
a = torch.randn(4096, 4096); b = torch.randn(4096, 4096)
g = a.to(dev).mul_(0.3).add_(b.to(dev), alpha=0.7).cpu()
c = a.clone().mul_(0.3).add_(b, alpha=0.7)
print("cpu merge == gpu merge:", torch.equal(g, c), int((g != c).sum()))
# shard accumulate cost: 16 samples x 512 tok
x = torch.randn(16, 512, n, device=dev, dtype=torch.bfloat16)
acc = HessianAccumulator(n, dev)
print("accumulate one shard (16x512) s", t(lambda: acc.add(x), reps=2))
