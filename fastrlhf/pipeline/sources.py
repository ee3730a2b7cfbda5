"""Where a model is read from: a local Hugging Face directory or a GGUF file, never a hub.

The model loaders (:mod:`fastrlhf.pipeline.model`) and the tokenizer loader
(:mod:`fastrlhf.pipeline.tokenizer`) both read a model's files through :func:`source_kwargs`.
"""

from __future__ import annotations

import importlib.util
import os

from fastrlhf.pipeline.errors import PipelineError


def model_source(path: str | None, what: str, hint: str = "") -> tuple[str, str | None]:
    """``(directory, GGUF file name or None)`` of a model given as a local Hugging Face
    directory, a ``.gguf`` file, or a directory holding one ``.gguf`` file (and no config.json)."""
    tail = f"; {hint}" if hint else ""
    if path is None:
        raise PipelineError(f"{what}: no path was given{tail}")
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if not os.path.isdir(path):
        raise PipelineError(f"{what}: {path!r} is not a directory or a .gguf file{tail}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, None
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(ggufs) > 1:
        raise PipelineError(f"{what}: {path!r} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}); pass one of them")
    if not ggufs:
        raise PipelineError(f"{what}: {path!r} is not a Hugging Face model directory (no config.json) and holds "
                            "no .gguf file")
    return path, ggufs[0]


def check_model_dir(path: str | None, what: str, hint: str = "") -> str:
    """``path`` if it is a model :func:`model_source` can read (GGUF: with the gguf package)."""
    if model_source(path, what, hint)[1] is not None and importlib.util.find_spec("gguf") is None:
        raise PipelineError(f"{what}: reading the GGUF file {path!r} needs the gguf package: pip install gguf")
    return path


def source_kwargs(path: str) -> tuple[str, dict]:
    """``(directory, from_pretrained keyword arguments)`` that read the model at ``path`` from
    local files only (its GGUF file, where it is one)."""
    directory, gguf = model_source(path, "model")
    return directory, {"local_files_only": True, **({"gguf_file": gguf} if gguf else {})}
