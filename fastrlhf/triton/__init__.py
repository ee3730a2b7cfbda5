"""Triton kernels and their launchers (imported only when the ``triton`` backend runs)."""
