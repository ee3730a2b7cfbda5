"""Helpers that apply fastrlhf ops to models from other libraries (imported only on use).

``trl``, ``verl``, ``openrlhf``: drop-ins for those trainers' functions and the patch that swaps
them in; ``transformers``: log-probs of a Hugging Face causal LM; ``patching``: the patch
mechanism they share; ``common``: tensor helpers they share; ``peer_tests``: the peers' own tests
run against the drop-ins.
"""
