"""Errors the ``fastrlhf`` command reports as one clear line instead of a traceback."""


class ConfigError(ValueError):
    """A bad configuration file, key or value; the message says which and why."""


class PipelineError(RuntimeError):
    """A missing path, bad data, or a model/tokenizer the pipeline cannot use; the message says how to fix it."""
