"""Token log-probs Triton forward: PREFETCH off/on, bf16, against the same-run copy bandwidth.

Run on the H200 as `python3 prefetch.py` (output: extra.log; the kernel then took PREFETCH as a
module constant, the launcher now sets it to `not with_entropy`; the printed "copy" figure is in
TB/s, mislabelled GB/s, the percentages are right)."""
import torch, triton
import fastrlhf
from fastrlhf.triton import logprobs as L

def bench(fn):
    return triton.testing.do_bench(fn, warmup=5, rep=40)

x = torch.empty(2**28, dtype=torch.bfloat16, device="cuda"); y = torch.empty_like(x)
ms = bench(lambda: y.copy_(x)); copy = 2 * x.numel() * 2 / ms / 1e9
print(f"copy {copy:.0f} GB/s"); del x, y
for V in (32000, 151936, 262144):
    logits = torch.randn(16384, V, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (16384,), device="cuda")
    for ent in (False, True):
        res = []
        for pf in (False, True):
            L.PREFETCH = pf
            ms = bench(lambda: fastrlhf.token_logprobs(logits, labels, return_entropy=ent, backend="triton"))
            res.append(f"prefetch={pf}: {ms:.3f} ms {logits.numel() * 2 / ms / 1e9 / copy * 100:.1f}% of copy")
        print(f"V={V} entropy={ent}: " + " | ".join(res))
    del logits
