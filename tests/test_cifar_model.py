"""CIFAR-10 model: serving through LiteRT, and training/export when TensorFlow is present.

The serving tests need only ai_edge_litert and the shipped asset. Training and
export tests need TensorFlow and skip without it.
"""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="ai_edge_litert (LiteRT runtime) is not installed")

from shmserve.models.cifar import (DEFAULT_MODEL_PATH, IMAGE_SHAPE, LABELS,  # noqa: E402
                                   CifarClassifier, labels_for)
from shmserve.protocol import IMAGE_BYTES, ErrorCode, ProtocolError  # noqa: E402


def synthetic_images(n: int, seed: int = 0) -> np.ndarray:
    """Deterministic smooth colour blobs: plausible inputs, no dataset needed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    out = np.empty((n, *IMAGE_SHAPE), np.uint8)
    for i in range(n):
        cy, cx, radius = rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(4, 12)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2))
        background, colour = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        for c in range(3):
            out[i, c] = np.clip(background[c] * (1 - blob) + colour[c] * blob, 0, 255)
    return out


# ---------------------------------------------------------------------------
# Serving: the shipped asset


@pytest.fixture(scope="module")
def shipped() -> CifarClassifier:
    return CifarClassifier()


def test_image_shape_matches_wire_size():
    assert int(np.prod(IMAGE_SHAPE)) == IMAGE_BYTES


def test_shipped_asset_classifies(shipped):
    images = synthetic_images(6)
    probs = shipped.predict(images)
    assert probs.shape == (6, len(LABELS)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    labels = labels_for(probs)
    assert len(labels) == 6 and set(labels) <= set(LABELS)
    for image, row in zip(images, probs):
        one = shipped.predict_one(image)
        assert one.shape == (len(LABELS),) and one.dtype == np.float32
        np.testing.assert_allclose(one, row, atol=1e-5)
        assert labels_for(one) == [LABELS[int(row.argmax())]]


def test_shipped_asset_is_accurate():
    """The training run measured the exported file itself on held-out images."""
    metrics = json.loads(DEFAULT_MODEL_PATH.with_suffix(".metrics.json").read_text())
    assert metrics["model_file"] == DEFAULT_MODEL_PATH.name
    assert metrics["tflite_val_accuracy"] >= 0.65
    assert abs(metrics["tflite_val_accuracy"] - metrics["val_accuracy"]) < 0.01


def test_batch_sizes_and_strided_input(shipped):
    images = synthetic_images(7, seed=1)
    expected = np.stack([shipped.predict_one(im) for im in images])
    # More distinct sizes than resident interpreters, and back, so cached,
    # created and resized interpreters all serve.
    for n in (2, 3, 4, 5, 7, 2, 1, 3):
        np.testing.assert_allclose(shipped.predict(images[:n]), expected[:n], atol=1e-5)
    # A non-contiguous stack, as a batch gathered from ring slots may be.
    spaced = np.zeros((14, *IMAGE_SHAPE), np.uint8)
    spaced[::2] = images
    np.testing.assert_allclose(shipped.predict(spaced[::2]), expected, atol=1e-5)


def test_wire_bytes_view(shipped):
    body = synthetic_images(2, seed=2).tobytes()
    batch = np.frombuffer(body, np.uint8).reshape(-1, *IMAGE_SHAPE)
    one = np.frombuffer(body, np.uint8, count=IMAGE_BYTES).reshape(IMAGE_SHAPE)
    np.testing.assert_allclose(shipped.predict_one(one), shipped.predict(batch)[0], atol=1e-5)


def test_clone_and_warmup(shipped):
    twin = shipped.clone()
    twin.warmup((1, 4))
    images = synthetic_images(4, seed=3)
    np.testing.assert_allclose(twin.predict(images), shipped.predict(images), atol=1e-6)


@pytest.mark.parametrize("bad", [
    np.zeros((2, 3, 32, 32), np.float32),
    np.zeros((2, 3, 32, 31), np.uint8),
    np.zeros((2, 32, 32, 3), np.uint8),
    np.zeros((0, 3, 32, 32), np.uint8),
    np.zeros((3, 32, 32), np.uint8),
    np.zeros(2 * IMAGE_BYTES, np.uint8),
    bytes(IMAGE_BYTES),
])
def test_predict_rejects_bad_input(shipped, bad):
    with pytest.raises(ProtocolError) as err:
        shipped.predict(bad)
    assert err.value.code == ErrorCode.BAD_LENGTH


@pytest.mark.parametrize("bad", [
    np.zeros((1, 3, 32, 32), np.uint8),
    np.zeros((3, 32, 32), np.int8),
    np.zeros((32, 32, 3), np.uint8),
    np.zeros(IMAGE_BYTES, np.uint8),
    bytes(IMAGE_BYTES),
])
def test_predict_one_rejects_bad_input(shipped, bad):
    with pytest.raises(ProtocolError) as err:
        shipped.predict_one(bad)
    assert err.value.code == ErrorCode.BAD_LENGTH


# ---------------------------------------------------------------------------
# Training and export (TensorFlow)


@pytest.fixture(scope="module")
def training():
    pytest.importorskip("tensorflow", reason="tensorflow is not installed: training/export tests need it")
    from shmserve.training import cifar
    return cifar


def write_image_folders(root, per_class: int):
    """Class folders of tiny PNG/JPEG files, one not 32x32 per class."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for k, name in enumerate(LABELS):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), np.uint8)
            pixels[..., k % 3] = 40 + 20 * k  # a weak class signal
            if i == 0:
                Image.fromarray(pixels).resize((40, 36)).save(folder / f"{i:04d}.jpg")
            else:
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def write_python_batches(root, batches: int, per_batch: int):
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for b in range(1, batches + 1):
        data = rng.integers(0, 256, (per_batch, IMAGE_BYTES), np.uint8)
        labels = [i % len(LABELS) for i in range(per_batch)]
        with (root / f"data_batch_{b}").open("wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)


def test_image_folders_load_planar(training, tmp_path):
    from PIL import Image
    write_image_folders(tmp_path / "train", per_class=2)
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[3, 5] = (255, 0, 0)
    pixels[5, 3] = (0, 0, 200)
    cat_dir = tmp_path / "train" / "cat"
    (cat_dir / "0000.jpg").unlink()  # replaced losslessly, still first in file order
    Image.fromarray(pixels).save(cat_dir / "0000.png")
    x, y = training.load_dataset(tmp_path)  # found one level down, in train/
    assert x.shape == (20, *IMAGE_SHAPE) and x.dtype == np.uint8
    assert y.tolist() == [k for k in range(10) for _ in range(2)]
    cat = x[2 * LABELS.index("cat")]
    assert cat[0, 3, 5] == 255 and cat[2, 5, 3] == 200
    assert np.count_nonzero(cat) == 2


def test_python_batches_load_planar(training, tmp_path):
    write_python_batches(tmp_path / "cifar-10-batches-py", batches=2, per_batch=30)
    x, y = training.load_dataset(tmp_path)
    first = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert x.shape == (60, *IMAGE_SHAPE)
    assert x[0].tobytes() == first[b"data"][0].tobytes()
    assert y[:30].tolist() == first[b"labels"]
    limited, labels = training.load_dataset(tmp_path, limit=2)
    assert np.bincount(labels, minlength=10).max() <= 2 and len(limited) == len(labels)


@pytest.mark.parametrize("layout", ["folders", "python_batches"])
def test_train_tiny(training, tmp_path, layout):
    data = tmp_path / "data"
    if layout == "folders":
        write_image_folders(data, per_class=4)
    else:
        write_python_batches(data, batches=2, per_batch=20)
    result = training.train(data, 1, tmp_path / "out" / "tiny.tflite", batch_size=8, limit=3)

    metrics = json.loads((tmp_path / "out" / "tiny.metrics.json").read_text())
    for key in ("val_accuracy", "val_loss", "tflite_val_accuracy", "epochs", "train_size",
                "val_size", "duration_s", "keras_version", "tensorflow_version", "date"):
        assert key in metrics, key
    assert metrics["epochs"] == 1 and metrics["train_size"] + metrics["val_size"] == 30
    assert result["val_accuracy"] == metrics["val_accuracy"]
    assert (tmp_path / "out" / "tiny.keras").is_file()

    served = CifarClassifier(tmp_path / "out" / "tiny.tflite", num_threads=1)
    for n in (1, 5):
        probs = served.predict(synthetic_images(n))
        assert probs.shape == (n, len(LABELS))
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


# A probe model whose logits read single input positions through the shipped
# planar_input() block: class 2 <- R at (row 3, col 5), 7 <- G there, 9 <- B
# there, 4 <- R at (row 5, col 3); class 0 has a bias so a blank image picks it.
# A swapped channel, row or column in the layout conversion picks another class.
PROBES = {(0, 3, 5): 2, (1, 3, 5): 7, (2, 3, 5): 9, (0, 5, 3): 4}


def test_export_keeps_planar_layout(training, tmp_path):
    import keras

    inputs, x = training.planar_input()
    logits = keras.layers.Dense(len(LABELS))(keras.layers.Flatten()(x))
    model = keras.Model(inputs, logits)
    kernel = np.zeros((32 * 32 * 3, len(LABELS)), np.float32)
    for (plane, row, col), k in PROBES.items():
        kernel[(row * 32 + col) * 3 + plane, k] = 20.0  # Flatten of NHWC
    bias = np.zeros(len(LABELS), np.float32)
    bias[0] = 10.0
    model.layers[-1].set_weights([kernel, bias])
    served = CifarClassifier(training.export_litert(model, tmp_path / "probe.tflite"), num_threads=1)

    body = bytearray(IMAGE_BYTES * (1 + len(PROBES)))  # image 0 stays blank
    for i, (plane, row, col) in enumerate(PROBES, start=1):
        body[i * IMAGE_BYTES + plane * 1024 + row * 32 + col] = 255
    images = np.frombuffer(bytes(body), np.uint8).reshape(-1, *IMAGE_SHAPE)
    expected = [0, *PROBES.values()]

    probs = served.predict(images)
    assert probs.argmax(axis=1).tolist() == expected
    assert probs.max(axis=1).min() > 0.99
    assert [int(served.predict_one(im).argmax()) for im in images] == expected
