"""Example user models, served from this file with nothing of shmserve's private code:

    shmserve serve --model examples/models/identity.py:identity
    shmserve serve --model examples/models/identity.py:typed
    shmserve serve --model examples/models/identity.py:unbatched
    shmserve serve --model examples/models/identity.py:broken

The Go tests and examples/go call them with Infer over every transport.
"""

import shmserve
from shmserve import Signature, TensorSpec


class Identity(shmserve.Model):
    """y = x for float32 rows of any width: the cheapest model there is, for overhead figures."""

    name = "identity"
    signature = Signature([TensorSpec("x", "float32", (-1, -1))],
                          [TensorSpec("y", "float32", (-1, -1))], max_batch_size=64)

    def infer(self, inputs):
        return {"y": inputs["x"]}


class Typed(shmserve.Model):
    """Several dtypes in and out, batched: what a tabular or multi-head model looks like."""

    name = "typed"
    signature = Signature(
        [TensorSpec("a", "int32", (-1, 4)), TensorSpec("b", "float64", (-1,)),
         TensorSpec("mask", "bool", (-1,)), TensorSpec("img", "uint8", (-1, 2, 2))],
        [TensorSpec("a2", "int32", (-1, 4)), TensorSpec("b_sum", "float64", (-1,)),
         TensorSpec("mask_not", "bool", (-1,)), TensorSpec("img", "uint8", (-1, 2, 2))],
        max_batch_size=64)

    def infer(self, inputs):
        a = inputs["a"]
        return {"a2": a * 2, "b_sum": inputs["b"] + a.sum(axis=1), "mask_not": ~inputs["mask"],
                "img": inputs["img"]}


class Unbatched(shmserve.Model):
    """Fixed shapes, no batch dimension: int64 ids and a bfloat16 matrix."""

    name = "unbatched"
    signature = Signature([TensorSpec("ids", "int64", (3,)), TensorSpec("h", "BF16", (2, 2))],
                          [TensorSpec("next_ids", "int64", (3,)), TensorSpec("h2", "BF16", (2, 2))])

    def infer(self, inputs):
        # Doubling is exact in bfloat16, so a client can check the reply bit for bit.
        return {"next_ids": inputs["ids"] + 1, "h2": inputs["h"] * 2}


class Broken(shmserve.Model):
    """Raises on negative input: the server answers INTERNAL and goes on serving."""

    name = "broken"
    signature = Signature([TensorSpec("x", "float32", (-1,))], [TensorSpec("y", "float32", (-1,))],
                          max_batch_size=64)

    def infer(self, inputs):
        x = inputs["x"]
        if (x < 0).any():
            raise ValueError(f"negative input: {float(x.min())}")
        return x


def identity() -> Identity:
    return Identity()


def typed() -> Typed:
    return Typed()


def unbatched() -> Unbatched:
    return Unbatched()


def broken() -> Broken:
    return Broken()
