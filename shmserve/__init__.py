"""shmserve: serve a Python model to Go over shared memory, Unix sockets, TCP and HTTP.

The public API for serving your own model is ``Model`` with a ``Signature`` of
``TensorSpec``s; see ``shmserve.model``.
"""
from .model import Call, ErrorCode, InferCall, Model, PromptCall, ProtocolError
from .tensors import Signature, TensorSpec

__version__ = "0.1.0"
__all__ = ["Model", "Signature", "TensorSpec", "Call", "InferCall", "PromptCall", "ErrorCode",
           "ProtocolError", "__version__"]
