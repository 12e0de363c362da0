"""Host cost of one Triton launch on this machine (issue 12 diagnosis): an empty kernel with
few and with ~30 arguments, vs torch.empty and F.linear, enqueue-only microseconds per call."""
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _few(p, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if pid > n:
        tl.store(p + pid, 1.0)


@triton.jit(do_not_specialize=["a0", "a1"])
def _many(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, a0, a1, a2, a3, a4, s0, s1, s2, s3, s4, s5,
          C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, C4: tl.constexpr,
          C5: tl.constexpr, C6: tl.constexpr, C7: tl.constexpr):
    pid = tl.program_id(0)
    if pid > a0 + a1 + a2 + a3 + a4 + s0 + s1 + s2 + s3 + s4 + s5:
        tl.store(p0 + pid, 1.0)


def per_call(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    return t * 1e6


ps = [torch.empty(1024, device="cuda") for _ in range(10)]
x = torch.randn(160, 1024, device="cuda", dtype=torch.bfloat16)
w = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
print(f"torch.empty      {per_call(lambda: torch.empty(160, 16, device='cuda')):6.1f} us")
print(f"F.linear T=160   {per_call(lambda: F.linear(x, w)):6.1f} us")
print(f"triton few args  {per_call(lambda: _few[(4,)](ps[0], 100, BLOCK=64)):6.1f} us")
print(f"triton 29 args   {per_call(lambda: _many[(4, 2)](*ps, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, C0=1, C1=2, C2=3, C3=4, C4=5, C5=6, C6=True, C7=False, num_warps=4, num_stages=2)):6.1f} us")
