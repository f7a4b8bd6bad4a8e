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

from collections import OrderedDict
from os import PathLike
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from shmserve import Model, Signature, TensorSpec
from shmserve.protocol import IMAGE_BYTES, LABELS, MAX_BATCH_IMAGES, ErrorCode, ProtocolError

IMAGE_SHAPE = (3, 32, 32)  # planes x rows x columns: IMAGE_BYTES bytes

DEFAULT_MODEL_PATH: Path = Path(__file__).resolve().parent.parent / "assets" / "cifar10_cnn.tflite"

# Batch interpreters kept alive at once. Resizing an interpreter's input costs a
# re-plan on the next invoke (tens to hundreds of microseconds, growing with N);
# keeping a few sizes resident makes a client that alternates between a handful
# of batch sizes pay it only once per size.
_BATCH_SLOTS = 3


class _Runner:
    """One LiteRT interpreter, its input sized for some batch size."""

    __slots__ = ("interpreter", "input_index", "output_index")

    def __init__(self, model: bytes, num_threads: int, batch: int):
        self.interpreter = Interpreter(model_content=model, num_threads=num_threads)
        inp = self.interpreter.get_input_details()[0]
        out = self.interpreter.get_output_details()[0]
        if (inp["dtype"] != np.uint8 or tuple(inp["shape_signature"][1:]) != IMAGE_SHAPE
                or out["dtype"] != np.float32 or tuple(out["shape_signature"][1:]) != (len(LABELS),)):
            raise ValueError(
                f"not a planar CIFAR-10 model: input {inp['dtype'].__name__}{tuple(inp['shape_signature'])}, "
                f"output {out['dtype'].__name__}{tuple(out['shape_signature'])}")
        self.input_index, self.output_index = inp["index"], out["index"]
        self.resize(batch)

    def resize(self, batch: int) -> None:
        # strict: a model exported with a fixed batch size fails here, loudly.
        self.interpreter.resize_tensor_input(self.input_index, [batch, *IMAGE_SHAPE], strict=True)
        self.interpreter.allocate_tensors()

    def run(self, images: np.ndarray) -> np.ndarray:
        # set_tensor copies (and gathers a non-contiguous array) in one pass and
        # measured no slower than writing through interpreter.tensor() views;
        # get_tensor returns a copy the caller may keep after the next invoke.
        self.interpreter.set_tensor(self.input_index, images)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output_index)


class CifarClassifier:
    """CIFAR-10 classifier over a LiteRT model with uint8 (N, 3, 32, 32) planar input.

    Not thread-safe: confine an instance to one thread; see the module docstring.
    """

    def __init__(self, path: str | PathLike[str] = DEFAULT_MODEL_PATH, num_threads: int = 2):
        self._setup(Path(path), Path(path).read_bytes(), num_threads)

    def _setup(self, path: Path, model: bytes, num_threads: int) -> None:
        self.path = path
        self.num_threads = num_threads
        self._model = model
        self._single = _Runner(model, num_threads, 1)
        # Most recently used last; a miss with all slots taken resizes the least
        # recently used interpreter, since building one costs ~1 ms against
        # ~0.03-0.3 ms for a resize.
        self._batch_runners: OrderedDict[int, _Runner] = OrderedDict()

    def clone(self) -> CifarClassifier:
        """A new independent instance sharing this one's model bytes, for another thread."""
        twin = object.__new__(CifarClassifier)
        twin._setup(self.path, self._model, self.num_threads)
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
        n = images.shape[0]
        if n == 1:
            return self._single.run(images)
        return self._batch_runner(n).run(images)

    def predict_one(self, image: np.ndarray) -> np.ndarray:
        """Softmax probabilities, float32 (10,), for one uint8 (3, 32, 32) image view.

        The fast path: a dedicated batch-1 interpreter that is never resized.
        """
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != IMAGE_SHAPE:
            raise ProtocolError(ErrorCode.BAD_LENGTH,
                                f"expected one uint8 image of shape (3, 32, 32) ({IMAGE_BYTES} bytes), "
                                f"got {_describe(image)}")
        return self._single.run(image[np.newaxis])[0]

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run each batch size once so the first real request does not pay for
        XNNPACK's weight packing and memory planning."""
        for n in batch_sizes:
            self.predict(np.zeros((n, *IMAGE_SHAPE), np.uint8))

    def _batch_runner(self, n: int) -> _Runner:
        runner = self._batch_runners.get(n)
        if runner is not None:
            self._batch_runners.move_to_end(n)
            return runner
        if len(self._batch_runners) < _BATCH_SLOTS:
            runner = _Runner(self._model, self.num_threads, n)
        else:
            _, runner = self._batch_runners.popitem(last=False)
            runner.resize(n)
        self._batch_runners[n] = runner
        return runner


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
