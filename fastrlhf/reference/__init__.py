"""Naive PyTorch references of every op: the test oracle, the benchmark baseline and the ``torch`` backend."""
