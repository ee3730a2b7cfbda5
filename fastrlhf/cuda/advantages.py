"""CUDA launchers for GAE / discounted returns and group advantages (kernels/advantages.cu).

Same semantics, arguments and outputs as :mod:`fastrlhf.triton.advantages`. GAE is a reverse
scan of affine step maps (warp shuffles, a block carry between tiles), fp32 math (fp64 when
an input is fp64), inputs read in place with any row stride: 16-byte loads and stores when the
rewards and values are in the math's dtype, T is a multiple of 4 and every row starts on a
16-byte boundary (a mask of 1, 4 or 8 bytes), scalar loads otherwise. Tiles of rows without
holes (all steps; in skip mode also one run of valid tokens, as prompt + response + padding)
take a scan of two numbers per thread instead of five. As in the Triton launcher, a
batch that fills the GPU gets one block per row, and long rows of a small batch are cut into
chunks scanned in parallel: a summary launch stores each chunk's composite map, the scan
launch composes the later chunks' maps of its row (fixed order: deterministic) into the state
entering its chunk.
"""

from __future__ import annotations

from fastrlhf._cuda import ops
from fastrlhf.cuda import extension_ops

ITEMS = 4  # positions per thread in a tile (kItems in kernels/advantages.cu)
MAX_THREADS = 512  # threads per block (kMaxScanThreads): a tile of 2048 positions at most
MAX_CHUNKS = 256
TARGET_BLOCKS = 1024  # enough blocks to fill a GPU before cutting rows into chunks
MIN_CHUNK = 512  # positions per chunk when the launcher picks the tile


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def plan(B: int, T: int, block: int | None = None, tiles_per_chunk: int | None = None):
    """``(threads, chunk, n_chunks)``: threads per block (a tile is ``ITEMS * threads``
    positions), chunk length and chunks per row.

    Whole rows (no summary launch) when the batch gives ``TARGET_BLOCKS`` blocks or a row fits
    in one tile; else rows are cut into up to ``MAX_CHUNKS`` chunks of at least ``MIN_CHUNK``
    positions. ``block`` (tile positions, rounded up to a power of two in [128, 2048]) and
    ``tiles_per_chunk`` override the choice, as in the Triton launcher (tests force chunks).
    """
    full = ITEMS * MAX_THREADS
    if block is None and tiles_per_chunk is None and (B >= TARGET_BLOCKS or T <= full):
        return min(MAX_THREADS, max(32, _pow2(_cdiv(T, ITEMS)))), T, 1
    wanted = min(_cdiv(TARGET_BLOCKS, max(B, 1)), MAX_CHUNKS)  # chunks per row
    if block is None:
        block = max(MIN_CHUNK, _cdiv(T, wanted))
    tile = min(full, max(32 * ITEMS, _pow2(block)))
    n_tiles = _cdiv(T, tile)
    if tiles_per_chunk is None:
        tiles_per_chunk = _cdiv(n_tiles, min(n_tiles, wanted))
    tiles_per_chunk = max(tiles_per_chunk, _cdiv(n_tiles, MAX_CHUNKS))
    return tile // ITEMS, tiles_per_chunk * tile, _cdiv(n_tiles, tiles_per_chunk)


def gae_fwd(rewards, values, mask, gamma, lam, skip, advantages, returns, block=None, tiles_per_chunk=None):
    """Fill ``advantages`` and ``returns`` as :func:`fastrlhf.triton.advantages.gae_fwd`.
    Allocates ``5 * B * n_chunks`` floats for chunked rows. ``block`` / ``tiles_per_chunk``:
    see :func:`plan`."""
    threads, chunk, n_chunks = plan(*rewards.shape, block, tiles_per_chunk)
    maps = advantages.new_empty((rewards.shape[0], n_chunks, 5) if n_chunks > 1 else 0)
    ops().gae_fwd(rewards, values, mask, float(gamma), float(lam), bool(skip), threads, chunk,
                  advantages, returns, maps)


(group_advantages_fwd,) = extension_ops("group_advantages_fwd")
