"""Ranks of a process group simulated by threads, for tests of ops that all-reduce."""

import contextlib
import threading
from unittest import mock

import torch
import torch.distributed as dist


class ThreadGroup:
    """A process group of ``world`` threads: ``all_reduce`` stacks every rank's tensor and
    reduces it in rank order, so every rank gets the same bits, as a real group does;
    ``all_gather`` gives every rank every rank's tensor."""

    def __init__(self, world):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots = [None] * world
        self.rank = threading.local()

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None):
        self.slots[self.rank.value] = tensor.clone()
        self.barrier.wait()
        stacked = torch.stack(self.slots)
        reduced = stacked.amax(0) if op == dist.ReduceOp.MAX else stacked.sum(0)
        self.barrier.wait()
        tensor.copy_(reduced)

    def all_gather(self, tensors, tensor, group=None):
        self.slots[self.rank.value] = tensor.clone()
        self.barrier.wait()
        for out, got in zip(tensors, self.slots):
            out.copy_(got)
        self.barrier.wait()

    def get_world_size(self, group=None):
        return self.world

    def run(self, fn):
        """``[fn(rank) for rank in range(world)]``, each on its own thread."""
        results, errors = [None] * self.world, []

        def target(rank):
            self.rank.value = rank
            try:  # backward on this thread: the autograd engine would run every rank's CUDA
                # backward on its one device thread, where ranks waiting for each other deadlock
                with torch.autograd.set_multithreading_enabled(False):
                    results[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 (re-raised below)
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        with mock.patch.object(dist, "all_reduce", self.all_reduce), \
                mock.patch.object(dist, "all_gather", self.all_gather), \
                mock.patch.object(dist, "get_world_size", self.get_world_size), \
                mock.patch.object(dist, "is_initialized", lambda: True), _one_interpreted_kernel_at_a_time():
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        return results


@contextlib.contextmanager
def _one_interpreted_kernel_at_a_time():
    """The Triton interpreter runs one kernel at a time: launches from the ranks' threads take a lock."""
    from fastrlhf.backend import triton_interpreter

    if not triton_interpreter():
        yield
        return
    from triton.runtime import interpreter

    lock, launch = threading.Lock(), interpreter.GridExecutor.__call__

    def locked(self, *args, **kwargs):
        with lock:
            return launch(self, *args, **kwargs)

    with mock.patch.object(interpreter.GridExecutor, "__call__", locked):
        yield
