"""Errors fastrlhf raises beyond ``ValueError`` / ``TypeError`` (imports nothing of fastrlhf)."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why."""
