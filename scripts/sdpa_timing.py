"""Times PyTorch's fused attention backends at llmq's attention shapes, for comparison with
the attention section of crates/llmq-cuda/benches/kernels.rs: causal GQA, bf16, B16 T1024, forward
and forward+backward, median over repeats, CUDA events. Run on the GPU machine:
    python3 scripts/sdpa_timing.py
Each backend is also tried with torch.use_deterministic_algorithms(True), to see whether its
backward can run deterministically (llmq's contract)."""
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [("Qwen2.5-0.5B", 16, 1024, 14, 2, 64), ("Qwen2.5-1.5B", 16, 1024, 12, 2, 128)]
BACKENDS = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main():
    print(torch.__version__, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name())
    for name, b, t, hq, hkv, hd in SHAPES:
        q = torch.randn(b, hq, t, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, hkv, t, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, hkv, t, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn(b, hq, t, hd, device="cuda", dtype=torch.bfloat16)
        for bname, backend in BACKENDS:
            for det in (False, True):
                torch.use_deterministic_algorithms(det, warn_only=False)
                try:
                    with sdpa_kernel(backend):
                        fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                        tf = timed(fwd)

                        def fb():
                            o = fwd()
                            torch.autograd.grad(o, (q, k, v), do)

                        tfb = timed(fb)
                    print(f"{name} {bname:5s} deterministic={det}: fwd {tf:.3f} ms, fwd+bwd {tfb:.3f} ms, bwd {tfb - tf:.3f} ms")
                except Exception as e:  # a backend that cannot run this shape or mode
                    print(f"{name} {bname:5s} deterministic={det}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                finally:
                    torch.use_deterministic_algorithms(False)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
