"""Everything that touches vLLM internals lives in this package, pinned to one version.

``VLLM_VERSION`` is the only vLLM release this code was written and tested against;
``tests/vllm_ext/test_host_contract.py`` fails loudly when a symbol used here moves.
"""

VLLM_VERSION = "0.32.0"


def get_logger(module: str):
    """The logger of a ``crystal_vllm`` module, placed under vLLM's ``vllm`` logger.

    vLLM configures only its own logger tree (handler, format, ``VLLM_LOGGING_LEVEL``,
    ``VLLM_LOGGING_CONFIG_PATH``); a child of it prints the plugin's lines through the same
    handler under a plain ``vllm serve``, with no configuration of our own.
    """
    from vllm.logger import init_logger

    return init_logger("vllm." + module)
