"""fastrlhf's benchmark suite: ``python -m bench --help`` (method in bench/README.md)."""
