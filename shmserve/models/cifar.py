"""CIFAR-10 image classifier served through the LiteRT (TFLite) interpreter.

Requests carry planar RGB images: for each image 1024 bytes of R, then G, then
B, each plane row-major, i.e. a uint8 array of shape (3, 32, 32). The exported
model takes exactly that layout as uint8 and does the planar->NHWC transpose,
the 1/255 scaling and the softmax inside its graph (see
``shmserve.training.cifar.export_litert``), so serving copies the request bytes
straight into the input tensor with no numpy preprocessing.

Threading: a ``CifarClassifier`` is NOT thread-safe. Each call writes the input
tensor, invokes and reads the output of interpreters it owns, so two threads
interleaving those steps would mix their requests. The intended design is
lock-free confinement: one instance is used by one thread only (the server's
inference thread). For parallel inference give every worker thread its own
instance from ``clone()``; clones share the immutable model bytes and nothing
else. ``Interpreter.invoke()`` releases the GIL, so clones on different threads
really run in parallel.
"""
from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np

from shmserve import Model, Signature, TensorSpec
from shmserve.models.litert_model import Interpreters
from shmserve.protocol import IMAGE_BYTES, LABELS, MAX_BATCH_IMAGES, ErrorCode, ProtocolError

IMAGE_SHAPE = (3, 32, 32)  # planes x rows x columns: IMAGE_BYTES bytes

DEFAULT_MODEL_PATH: Path = Path(__file__).resolve().parent.parent / "assets" / "cifar10_cnn.tflite"


class CifarClassifier:
    """CIFAR-10 classifier over a LiteRT model with uint8 (N, 3, 32, 32) planar input.

    Not thread-safe: confine an instance to one thread; see the module docstring.
    """

    def __init__(self, path: str | PathLike[str] = DEFAULT_MODEL_PATH, num_threads: int = 2):
        self._setup(Path(path), Path(path).read_bytes(), num_threads)

    def _setup(self, path: Path, model: bytes, num_threads: int) -> None:
        self.path = path
        self.num_threads = num_threads
        self._interpreters = Interpreters(model, num_threads)
        ins, outs = self._interpreters.inputs, self._interpreters.outputs
        if (len(ins) != 1 or len(outs) != 1 or ins[0][2] != np.uint8
                or ins[0][3][1:] != IMAGE_SHAPE or outs[0][2] != np.float32
                or outs[0][3][1:] != (len(LABELS),)):
            raise ValueError(f"{path}: not a planar CIFAR-10 model: inputs "
                             f"{[(d.name, s) for _, _, d, s in ins]}, outputs "
                             f"{[(d.name, s) for _, _, d, s in outs]}")
        self._interpreters.run([np.zeros((1, *IMAGE_SHAPE), np.uint8)])  # pins batch 1

    def clone(self) -> CifarClassifier:
        """A new independent instance sharing this one's model bytes, for another thread."""
        twin = object.__new__(CifarClassifier)
        twin._setup(self.path, self._interpreters.model, self.num_threads)
        return twin

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities, float32 (N, 10), for uint8 images of shape (N, 3, 32, 32).

        ``images`` may be any strided view (e.g. a stack of slot views); it is
        gathered into the model's input tensor in one copy.
        """
        if (not isinstance(images, np.ndarray) or images.dtype != np.uint8
                or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or images.shape[0] < 1):
            raise ProtocolError(ErrorCode.BAD_LENGTH,
                                f"expected uint8 images of shape (N>=1, 3, 32, 32) ({IMAGE_BYTES} bytes each), "
                                f"got {_describe(images)}")
        return self._interpreters.run([images])[0]

    def predict_one(self, image: np.ndarray) -> np.ndarray:
        """Softmax probabilities, float32 (10,), for one uint8 (3, 32, 32) image view.

        The fast path: the batch-1 interpreter is pinned, never resized.
        """
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != IMAGE_SHAPE:
            raise ProtocolError(ErrorCode.BAD_LENGTH,
                                f"expected one uint8 image of shape (3, 32, 32) ({IMAGE_BYTES} bytes), "
                                f"got {_describe(image)}")
        return self._interpreters.run([image[np.newaxis]])[0][0]

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run each batch size once so the first real request does not pay for
        XNNPACK's weight packing and memory planning."""
        for n in batch_sizes:
            self.predict(np.zeros((n, *IMAGE_SHAPE), np.uint8))


def labels_for(probs: np.ndarray) -> list[str]:
    """Label of the highest-scoring class for each row of (N, 10) probabilities
    (a single (10,) row gives a one-element list)."""
    scores = np.asarray(probs).reshape(-1, len(LABELS))
    return [LABELS[i] for i in scores.argmax(axis=1)]


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype}{value.shape}"
    return type(value).__name__


class CifarModel(Model):
    """The CIFAR-10 CNN as an ordinary tensor model with labels: INFER takes uint8 planar
    images, CLASSIFY, CLASSIFY_SCORES and CLASSIFY_BATCH come with the labels.

    Every request the server stacks into one call becomes ONE forward pass, the images gathered
    straight from the transport's buffers (ring slots) into the interpreter's input tensor."""

    name = "cifar"
    labels = LABELS
    signature = Signature([TensorSpec("image", "uint8", (-1, *IMAGE_SHAPE))],
                          [TensorSpec("probabilities", "float32", (-1, len(LABELS)))],
                          max_batch_size=MAX_BATCH_IMAGES)

    def __init__(self, classifier: CifarClassifier, warm_batches: tuple[int, ...] = (1, 2, 4, 8)):
        self.classifier = classifier
        self.warm_batches = warm_batches

    def describe(self) -> dict:
        return {"model": self.name, "path": str(self.classifier.path),
                "threads": self.classifier.num_threads}

    def warmup(self) -> None:
        self.classifier.warmup(self.warm_batches)

    def infer(self, inputs):
        return self.classifier.predict(inputs["image"])


def build(model_path: str | None = None, threads: int = 2) -> CifarModel:
    return CifarModel(CifarClassifier(model_path or DEFAULT_MODEL_PATH, num_threads=threads))
