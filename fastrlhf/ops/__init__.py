"""The public ops: input checks, backend dispatch, registered custom ops."""
