"""Train the CIFAR-10 CNN of the TensorFlow tutorial and export its serving model.

The Keras model takes the wire layout itself, uint8 planar RGB (N, 3, 32, 32),
and starts with Permute + Rescaling, so training and serving run the same graph:
the exported LiteRT model needs no preprocessing in Python and a layout mistake
cannot hide in a separate numpy step.

Importing this module imports TensorFlow (seconds); import it lazily from CLIs.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import pickle
import platform
import re
import time
from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image

# TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notices) would bury
# Keras' progress bar; an explicit user setting still wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

from shmserve.models.cifar import IMAGE_SHAPE, LABELS, CifarClassifier  # noqa: E402

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".webp"})
_BATCH_FILE = re.compile(r"data_batch_(\d+)$")


# ---------------------------------------------------------------------------
# Data


def load_dataset(data_dir: str | PathLike[str], *, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a CIFAR-10 training set as (images uint8 (N, 3, 32, 32) planar, labels int64 (N,)).

    ``data_dir`` (or, failing that, a single level below it, such as the
    ``train/`` of the shared archive or ``cifar-10-batches-py/``) holds either
    - one folder per class named after ``LABELS`` (case-insensitive) with image
      files of any size PIL reads (resized to 32x32 if needed), or
    - the CIFAR-10 python batches ``data_batch_1`` .. ``data_batch_5`` (pickles:
      only load files you trust).
    ``limit`` keeps at most that many images per class, in file order.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    for candidate in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        if _batch_files(candidate):
            return _load_python_batches(candidate, limit)
        if _class_dirs(candidate):
            return _load_image_folders(candidate, limit)
    raise FileNotFoundError(
        f"{root}: no CIFAR-10 data found (expected class folders {', '.join(LABELS)} "
        "or data_batch_N pickles, here or one directory below)")


def _batch_files(directory: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _BATCH_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def _class_dirs(directory: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in directory.iterdir() if p.is_dir() and p.name.lower() in LABELS}


def _load_python_batches(directory: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in _batch_files(directory):
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
        # Each row is already the wire layout: 1024 R, 1024 G, 1024 B bytes.
        images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, *IMAGE_SHAPE))
        labels.append(np.asarray(batch[b"labels"], np.int64))
    x, y = np.concatenate(images), np.concatenate(labels)
    if limit is not None:
        keep = np.concatenate([np.flatnonzero(y == k)[:limit] for k in range(len(LABELS))])
        keep.sort()
        x, y = x[keep], y[keep]
    return x, y


def _load_image_folders(directory: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    dirs = _class_dirs(directory)
    missing = [name for name in LABELS if name not in dirs]
    if missing:
        raise FileNotFoundError(f"{directory}: missing class folders: {', '.join(missing)}")
    files, labels = [], []
    for k, name in enumerate(LABELS):
        paths = sorted(p for p in dirs[name].iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        if not paths:
            raise FileNotFoundError(f"{dirs[name]}: no image files")
        files += paths
        labels += [k] * len(paths)
    x = np.empty((len(files), *IMAGE_SHAPE), np.uint8)

    def decode(i: int) -> None:
        with Image.open(files[i]) as img:
            img = img.convert("RGB")
            if img.size != (32, 32):
                img = img.resize((32, 32), Image.Resampling.BILINEAR)
            x[i] = np.asarray(img).transpose(2, 0, 1)

    # PIL releases the GIL while decoding, so threads scale across cores.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(decode, range(len(files)), chunksize=256))
    return x, np.asarray(labels, np.int64)


def split(x: np.ndarray, y: np.ndarray, val_fraction: float,
          seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Seeded shuffle, then the first ``val_fraction`` of it is the validation set."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(x) < 2:
        raise ValueError(f"need at least 2 images to hold out a validation set, got {len(x)}")
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = min(max(1, round(len(x) * val_fraction)), len(x) - 1)
    val, tr = order[:n_val], order[n_val:]
    return (x[tr], y[tr]), (x[val], y[val])


# ---------------------------------------------------------------------------
# Model


def planar_input(name: str = "planar_rgb"):
    """The model input, uint8 (N, 3, 32, 32), and the float NHWC [0, 1] tensor
    every CIFAR model here builds on. Shared by ``build_model`` and the tests so
    the layout conversion they check is the one that ships."""
    inputs = keras.Input(IMAGE_SHAPE, dtype="uint8", name=name)
    # Planes-first -> channels-last; LiteRT and XNNPACK convolve NHWC only.
    x = layers.Permute((2, 3, 1), name="planar_to_nhwc")(inputs)
    x = layers.Rescaling(1.0 / 255, name="scale")(x)
    return inputs, x


def build_model(*, augment: bool = True) -> keras.Model:
    """The tutorial CNN (~122k parameters) on planar uint8 input, giving logits.

    ``augment`` adds random horizontal flips and +-10% shifts; they are active
    only while training and vanish from the exported graph.
    """
    inputs, x = planar_input()
    if augment:
        x = layers.RandomFlip("horizontal")(x)
        x = layers.RandomTranslation(0.1, 0.1, fill_mode="nearest")(x)
    x = layers.Conv2D(32, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    logits = layers.Dense(len(LABELS), name="logits")(x)
    model = keras.Model(inputs, logits, name="cifar10_cnn")
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def export_litert(model: keras.Model, path: str | PathLike[str]) -> Path:
    """Write ``model`` (planar uint8 in, logits out) as the LiteRT serving model:
    uint8 (N, 3, 32, 32) in, float32 softmax (N, 10) out, any N >= 1."""
    path = Path(path)
    serving = keras.Model(model.input, layers.Softmax(name="probabilities")(model.output))
    serving.export(
        str(path), format="litert", verbose=False,
        input_signature=[tf.TensorSpec((None, *IMAGE_SHAPE), tf.uint8, name="planar_rgb")],
        # Builtin ops only: the server's plain LiteRT runtime has no TF-ops (Flex) delegate.
        target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]},
    )
    return path


# ---------------------------------------------------------------------------
# Training


def train(data_dir: str | PathLike[str], epochs: int, out_path: str | PathLike[str], *,
          val_fraction: float = 0.1, batch_size: int = 64, seed: int = 0,
          limit: int | None = None, augment: bool = True) -> dict:
    """Train on ``data_dir`` (see ``load_dataset``; ``limit`` caps images per
    class), holding out a seeded ``val_fraction``, and write next to
    ``out_path`` (a ``.keras``/``.tflite`` suffix is dropped):

    - ``<out>.keras``: the trained Keras model (logits),
    - ``<out>.tflite``: the serving model (see ``export_litert``),
    - ``<out>.metrics.json``: the metrics, also returned (with the three paths added).

    ``tflite_val_accuracy`` is measured through ``CifarClassifier`` on the
    exported file, so it checks the artifact that is served, not just Keras.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    out = Path(out_path)
    if out.suffix in (".keras", ".tflite"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    keras_path, tflite_path = out.with_name(out.name + ".keras"), out.with_name(out.name + ".tflite")
    metrics_path = out.with_name(out.name + ".metrics.json")

    started = time.perf_counter()
    x, y = load_dataset(data_dir, limit=limit)
    load_s = time.perf_counter() - started
    (x_train, y_train), (x_val, y_val) = split(x, y, val_fraction, seed)

    keras.utils.set_random_seed(seed)
    model = build_model(augment=augment)
    fit_started = time.perf_counter()
    history = model.fit(x_train, y_train, validation_data=(x_val, y_val),
                        epochs=epochs, batch_size=batch_size, shuffle=True, verbose="auto")
    fit_s = time.perf_counter() - fit_started

    model.save(keras_path)
    export_litert(model, tflite_path)
    served = CifarClassifier(tflite_path, num_threads=os.cpu_count() or 1)
    probs = np.concatenate([served.predict(x_val[i:i + 256]) for i in range(0, len(x_val), 256)])

    hist = {k: [round(float(v), 5) for v in vals] for k, vals in history.history.items()}
    metrics = {
        "val_accuracy": hist["val_accuracy"][-1],
        "val_loss": hist["val_loss"][-1],
        "tflite_val_accuracy": round(float((probs.argmax(axis=1) == y_val).mean()), 5),
        "train_accuracy": hist["accuracy"][-1],
        "epochs": epochs,
        "batch_size": batch_size,
        "augment": augment,
        "seed": seed,
        "val_fraction": val_fraction,
        "train_size": int(len(x_train)),
        "val_size": int(len(x_val)),
        "limit": limit,
        "history": hist,
        "load_s": round(load_s, 1),
        "sec_per_epoch": round(fit_s / epochs, 1),
        "duration_s": round(time.perf_counter() - started, 1),
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
        "python_version": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_file": tflite_path.name,
        "keras_file": keras_path.name,
    }
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return {**metrics, "tflite_path": str(tflite_path), "keras_path": str(keras_path),
            "metrics_path": str(metrics_path)}
