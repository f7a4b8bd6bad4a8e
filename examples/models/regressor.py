"""A user-side model that builds itself in a fraction of a second: a least-squares linear
regressor fitted at construction on synthetic data, served with nothing of shmserve's private
code:

    shmserve serve --model examples/models/regressor.py:build [--model-option features=8]

The data is y = x @ w + 0.5 + noise with w[i] = (i + 1) / features, so a client can check
a prediction against the truth: x of all ones predicts about (features + 1) / 2 + 0.5.
examples/go calls it with Infer.
"""
import numpy as np

import shmserve
from shmserve import Signature, TensorSpec


class LinearRegressor(shmserve.Model):
    name = "regressor"

    def __init__(self, features: int, samples: int = 10_000, seed: int = 0):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(samples, features))
        truth = np.arange(1, features + 1) / features
        y = x @ truth + 0.5 + rng.normal(scale=0.01, size=samples)
        # One column of ones fits the intercept with the weights.
        design = np.hstack([x, np.ones((samples, 1))])
        fitted, *_ = np.linalg.lstsq(design, y, rcond=None)
        self.weights = fitted[:-1].astype(np.float32).reshape(features, 1)
        self.bias = np.float32(fitted[-1])
        # dim 0 is the batch: concurrent requests are stacked into one infer() call.
        self.signature = Signature([TensorSpec("x", "float32", (-1, features))],
                                   [TensorSpec("y", "float32", (-1, 1))], max_batch_size=256)

    def describe(self) -> dict:
        return {"model": self.name, "features": int(self.weights.shape[0])}

    def infer(self, inputs):
        return {"y": inputs["x"] @ self.weights + self.bias}


def build(features="8") -> LinearRegressor:
    """--model-option features=N arrives as a string."""
    return LinearRegressor(int(features))
