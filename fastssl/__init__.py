"""fastssl: performance-first self-supervised and weakly supervised pretraining."""

from fastssl import distributed, losses, ops

__version__ = "0.1.0"
__all__ = ["KeyQueue", "MemoryBank", "distributed", "losses", "ops", "__version__"]


def __getattr__(name: str):
    # The queue and the bank load (or JIT-build) the C++ extension: only on first use.
    if name == "KeyQueue":
        from fastssl.queue import KeyQueue

        return KeyQueue
    if name == "MemoryBank":
        from fastssl.bank import MemoryBank

        return MemoryBank
    raise AttributeError(f"module 'fastssl' has no attribute {name!r}")
