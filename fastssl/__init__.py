"""fastssl: performance-first self-supervised and weakly supervised pretraining."""

from fastssl import distributed, losses, ops

__version__ = "0.1.0"
__all__ = ["KeyQueue", "distributed", "losses", "ops", "__version__"]


def __getattr__(name: str):
    # The queue loads (or JIT-builds) the C++ extension: only on first use.
    if name == "KeyQueue":
        from fastssl.queue import KeyQueue

        return KeyQueue
    raise AttributeError(f"module 'fastssl' has no attribute {name!r}")
