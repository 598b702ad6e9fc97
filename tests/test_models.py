"""DenseNet-169 architecture, checkpoint verification, and the committed POLEN23E checkpoint."""

from __future__ import annotations

import hashlib
import json
import shutil

import keras
import numpy as np
import pytest

from cam.study import data, models, paths
from cam.study.models import CHECKPOINT_STEM, build_densenet169, checkpoint_paths, load_checkpoint
from cam.study.train import TrainConfig, recalibrate_batchnorm, training_dataset

pytestmark = pytest.mark.study  # the study's tests: `make test-backends` runs -m "not study"

WEIGHTS, META = checkpoint_paths()


@pytest.fixture(scope="module")
def densenet():
    return build_densenet169(5, image_size=None)


def test_densenet_has_the_reference_layer_names_and_momentum(densenet):
    names = {layer.name for layer in densenet.layers}
    assert {"relu", "conv5_block32_concat", "conv4_block12_1_conv", "avg_pool", "predictions"} <= names
    momenta = {l.momentum for l in densenet.layers if isinstance(l, keras.layers.BatchNormalization)}
    assert momenta == {0.9}
    assert densenet.get_layer("predictions").activation is keras.activations.softmax


def test_densenet_takes_raw_pixels_at_any_size(densenet):
    x = np.random.default_rng(0).uniform(0, 255, (1, 96, 128, 3)).astype("float32")
    probs = densenet(x, training=False).numpy()
    assert probs.shape == (1, 5) and np.isclose(probs.sum(), 1, atol=1e-5)
    rescale = densenet.get_layer("rescale")
    out = rescale(x).numpy()
    assert out.min() >= -1 and out.max() <= 1


def test_recalibrate_batchnorm_moves_statistics_to_the_data():
    inputs = keras.Input((4, 4, 2))
    bn = keras.layers.BatchNormalization(momentum=0.99)
    model = keras.Model(inputs, bn(inputs))
    images = np.random.default_rng(0).normal(5.0, 2.0, (64, 4, 4, 2)).astype("float32")
    recalibrate_batchnorm(model, images, batch_size=16, passes=2)
    np.testing.assert_allclose(bn.moving_mean.numpy(), images.mean((0, 1, 2)), rtol=0.05)
    np.testing.assert_allclose(bn.moving_variance.numpy(), images.var((0, 1, 2)), rtol=0.2)
    assert bn.momentum == 0.99  # restored


def test_training_dataset_batches_augmented_images():
    images = np.random.default_rng(0).integers(0, 255, (10, 16, 16, 3), dtype=np.uint8)
    labels = np.eye(2, dtype="float32")[np.arange(10) % 2]
    cfg = TrainConfig(batch_size=4)
    batches = list(training_dataset(images, labels, cfg))
    assert len(batches) == 2  # the incomplete batch is dropped
    x, y = batches[0]
    assert x.shape == (4, 16, 16, 3) and y.shape == (4, 2)
    assert x.dtype.name == "float32"
    assert not any(np.array_equal(x.numpy()[0], img.astype("float32")) for img in images)


def packed_checkpoint(folder, blob: bytes, recorded: bytes | None = None):
    """A checkpoint "x" in ``folder``: ``blob`` compressed, and a JSON recording the SHA-256
    of ``recorded`` (``blob`` itself by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    packed, meta = checkpoint_paths("x", folder)
    raw = folder / "x.weights.h5"
    raw.write_bytes(blob)
    models.compress_file(raw, packed)
    raw.unlink()
    meta.write_text(json.dumps({"sha256": hashlib.sha256(recorded or blob).hexdigest()}))
    return packed


def test_compressed_weights_are_decompressed_once_and_checked(tmp_path, monkeypatch):
    blob = np.random.default_rng(0).integers(0, 8, 100_000, dtype=np.uint8).tobytes()
    packed = packed_checkpoint(tmp_path / "models", blob)
    first = packed.read_bytes()
    assert len(first) < len(blob) // 2
    cached = models.unpacked_weights("x", tmp_path / "models", tmp_path / "cache")
    assert cached == tmp_path / "cache" / "x.weights.h5" and cached.read_bytes() == blob
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["x.weights.h5"]
    packed_checkpoint(tmp_path / "models", blob)
    assert packed.read_bytes() == first  # the same weights give the same bytes (no dates)

    monkeypatch.setattr(models.gzip, "open", None)  # a copy whose digest matches is reused
    assert models.unpacked_weights("x", tmp_path / "models", tmp_path / "cache") == cached
    monkeypatch.undo()
    cached.write_bytes(b"stale")  # one that does not is decompressed again
    assert models.unpacked_weights("x", tmp_path / "models", tmp_path / "cache").read_bytes() == blob


def test_weights_that_decompress_to_other_bytes_name_both_digests(tmp_path):
    packed_checkpoint(tmp_path, b"retrained weights", recorded=b"recorded weights")
    with pytest.raises(ValueError) as error:
        models.unpacked_weights("x", tmp_path, tmp_path / "cache")
    assert hashlib.sha256(b"retrained weights").hexdigest() in str(error.value)
    assert hashlib.sha256(b"recorded weights").hexdigest() in str(error.value)
    assert not any((tmp_path / "cache").iterdir())  # no copy, partial or whole, is left


@pytest.mark.parametrize("corrupt", [
    lambda gz: gz[: len(gz) // 2],  # truncated
    lambda gz: b"version https://git-lfs.github.com/spec/v1\noid sha256:...\n",  # an LFS pointer
])
def test_unreadable_compressed_weights_are_refused(tmp_path, corrupt):
    packed = packed_checkpoint(tmp_path, b"weights" * 1000)
    packed.write_bytes(corrupt(packed.read_bytes()))
    with pytest.raises(ValueError, match="cannot be decompressed .*: the file is corrupt"):
        models.unpacked_weights("x", tmp_path, tmp_path / "cache")


def test_corrupt_checkpoint_is_refused(tmp_path):
    if not WEIGHTS.is_file():
        pytest.fail(f"the committed checkpoint {WEIGHTS} is missing")
    shutil.copy(META, tmp_path / META.name)
    blob = bytearray(WEIGHTS.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / WEIGHTS.name).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="the file is corrupt"):
        load_checkpoint(CHECKPOINT_STEM, tmp_path, cache_dir=tmp_path / "cache")


def test_checkpoint_with_other_architecture_is_refused(tmp_path):
    shutil.copy(WEIGHTS, tmp_path / WEIGHTS.name)
    record = json.loads(META.read_text())
    record["architecture"]["parameters"] += 1
    (tmp_path / META.name).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="architecture mismatch"):
        load_checkpoint(CHECKPOINT_STEM, tmp_path)


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one"):
        load_checkpoint(CHECKPOINT_STEM, tmp_path)


@pytest.mark.skipif(paths.polen23e_dir() is None, reason="POLEN23E not available (set POLEN23E_DIR)")
def test_committed_checkpoint_replays_its_recorded_predictions():
    model, record = load_checkpoint()
    sample = record["recorded_sample"]
    size = record["config"]["eval_size"]
    images = data.load_images(paths.polen23e_dir(), sample["files"], size, progress=False)
    predictions = model.predict(images.astype("float32"), verbose=0).argmax(1)
    assert predictions.tolist() == sample["predictions"]
    accuracy = float((predictions == np.array(sample["labels"])).mean())
    assert accuracy == pytest.approx(sample["accuracy"])
    # the sample is held-out images only
    folds = data.read_fold_table().set_index("file")
    assert (folds.loc[sample["files"], "fold"] == record["held_out_fold"]).all()


def test_study_checkpoint_names_the_shared_checkpoints():
    from cam.study import models

    assert models.study_checkpoint("polen23e") == (CHECKPOINT_STEM, paths.MODELS_DIR)
    assert models.study_checkpoint("synthetic", 2) == ("small-cnn-synthetic-fold2",
                                                       paths.DATA_DIR / "models")
    assert models.study_checkpoint("synthetic", 0, "densenet169")[0] == \
        "densenet169-synthetic-fold0"
    with pytest.raises(ValueError, match="architecture must be one of"):
        models.study_checkpoint("synthetic", 0, "resnet")


def _densenet_named_model():
    from keras import layers as L

    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((8, 8, 3))
    for name in ["conv1_conv", "conv2_block1_1_conv", "conv2_block2_1_conv", "pool2_conv",
                 "conv3_block1_1_conv", "conv3_block2_1_conv"]:
        x = L.Conv2D(2, 1, name=name)(x)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = L.Dense(3, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs)


def test_randomisation_stages_for_densenet_names_and_a_small_cnn():
    from cam import sanity

    stages = models.randomisation_stages(_densenet_named_model(), block_group=1)
    assert stages == [("predictions", ["predictions"]),
                      ("conv3 blocks 2-2", ["bn", "conv3_block2_1_conv"]),
                      ("conv3 blocks 1-1", ["conv3_block1_1_conv"]),
                      ("conv2 blocks 2-2", ["pool2_conv", "conv2_block2_1_conv"]),
                      ("conv2 blocks 1-1", ["conv2_block1_1_conv"]),
                      ("conv1", ["conv1_conv"])]
    assert [s for s, _ in models.randomisation_stages(_densenet_named_model(), block_group=2)] == \
        ["predictions", "conv3 blocks 1-2", "conv2 blocks 1-2", "conv1"]
    small = sanity.randomisation_stages(models.build_small_cnn(3, image_size=16, width=2))
    assert small == [("predictions", ["predictions"]), ("conv4", ["bn", "conv4"]),
                     ("conv3", ["bn3", "conv3"]), ("conv2", ["bn2", "conv2"]),
                     ("conv1", ["bn1", "conv1"])]
    # the DenseNet grouping leaves a model with other names to the generic one
    assert models.randomisation_stages(models.build_small_cnn(3, image_size=16, width=2)) == small
