"""Helpers that apply fastrlhf ops to models from other libraries (imported only on use)."""
