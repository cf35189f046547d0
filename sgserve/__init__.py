"""sgserve: DeepRec's SessionGroup for stock TensorFlow.

Several pinned worker processes serve one model, sharing one copy of its variables in POSIX shared
memory, behind a ZeroMQ broker. This package's top level never imports TensorFlow.
"""
from sgserve.errors import (DeadlineExceeded, Internal, InvalidArgument, NotFound, ResourceExhausted,
                            ServeError, Unavailable)

__version__ = "0.1.0"


def __getattr__(name: str):
    # The client pulls in pyzmq; import it on first use so `import sgserve.errors` stays light.
    if name in ("Client", "PredictResult"):
        from sgserve import client  # noqa: PLC0415

        return getattr(client, name)
    raise AttributeError(name)


__all__ = ["Client", "PredictResult", "ServeError", "InvalidArgument", "NotFound", "ResourceExhausted",
           "Unavailable", "DeadlineExceeded", "Internal", "__version__"]
