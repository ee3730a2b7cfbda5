"""Static performance report: what the compiled sm_90 (and sm_80) code of every fastrlhf
kernel says about its speed, read without a GPU. Run ``python -m bench.static``; see
``bench/README.md``."""
