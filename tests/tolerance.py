"""How close results must be to the reference, stated once for the test modules.

Low-precision inputs (bf16, fp16): a result is held to the PyTorch reference run on the same
inputs in the same dtype, both measured against the fp64 truth. Its error may be at most twice
that reference's, plus one rounding of the dtype at the truth's scale (results and gradients
come back in the inputs' dtype) and a small absolute slack::

    max|got - truth| <= 2 * max|same - truth| + eps(dtype) * max|truth| + slack

What a dtype allows depends on the op and its inputs; the same-dtype reference measures it, so
one rule serves every op without a tolerance tuned per case. Twice: a kernel rounds in other
places than PyTorch, not more often.
"""

import torch


def max_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest ``|got - truth|`` in fp64 (0 for empty tensors). ``got`` must be NaN exactly
    where ``truth`` is (a label out of range has a NaN log-prob); those places count as 0."""
    got, truth = got.double(), truth.double()
    nan = truth.isnan()
    assert torch.equal(got.isnan(), nan), "NaN in other places than the reference"
    return (got - truth).abs().masked_fill(nan, 0).max().item() if got.numel() else 0.0


def assert_same_dtype_close(got, same, truth, dtype: torch.dtype, slack: float = 1e-6):
    """The rule above for ``got`` against ``truth``, with ``same`` the reference in ``dtype``:
    tensors, or sequences or dicts of them (the outputs ``truth`` has; None ones are skipped)."""
    if isinstance(truth, torch.Tensor):
        got, same, truth = [got], [same], [truth]
    for k in truth if isinstance(truth, dict) else range(len(truth)):
        if truth[k] is None:
            continue
        err, base = max_error(got[k], truth[k]), max_error(same[k], truth[k])
        scale = truth[k].double().abs().nan_to_num(0.0).max().item() if truth[k].numel() else 0.0
        limit = 2 * base + torch.finfo(dtype).eps * scale + slack
        assert err <= limit, f"output {k!r}: error {err:.3g} > {limit:.3g} (same-dtype reference: {base:.3g})"


def assert_close_fp64(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4):
    """fp32 results against the fp64 reference, compared in fp64 (the losses' tolerance)."""
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


def assert_close_fp32(a, b, tol: float = 1e-5):
    """Numbers or tensors compared in fp32, ``tol`` absolute and relative (the drop-ins against
    transcriptions of the peers' formulas)."""
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=tol, rtol=tol)
