"""Everything that touches vLLM internals lives in this package, pinned to one version.

``VLLM_VERSION`` is the only vLLM release this code was written and tested against;
``tests/vllm_ext/test_host_contract.py`` fails loudly when a symbol used here moves.
"""

VLLM_VERSION = "0.32.0"
