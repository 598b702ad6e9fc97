"""cam on Keras' three backends: the same maps everywhere, clear errors elsewhere.

``make test`` runs the library's tests once per backend (KERAS_BACKEND=tensorflow, jax, torch);
this module adds what one backend alone cannot show: the three backends' maps of every method
on the same saved models compared with each other (in one subprocess per backend), that
explaining on JAX or PyTorch never imports TensorFlow, and the errors for a backend cam does
not run on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import cam
from cam import backend
from cam.study.vit import build_vit
from conftest import CASES, build_tiny_sequential, random_images

HERE = Path(__file__).parent
#: The same models, weights and images on every backend must give maps this close, relative
#: to each map's largest value (float32 kernels differ between backends in rounding only).
RTOL = 1e-4
VIT = dict(num_classes=3, image_size=8, channels=3, patch_size=2, dim=8, depth=1, heads=2,
           mlp_dim=16, class_token=True, conv_stem=False)


def start_backend(name: str, *args, code: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "KERAS_BACKEND": name, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    command = [sys.executable, "-c", code, *args] if code else \
        [sys.executable, str(HERE / "backend_maps.py"), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=900)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_backend(name: str, *args, code: str | None = None) -> subprocess.CompletedProcess:
    return finish(start_backend(name, *args, code=code))


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """The five model shapes of conftest saved as .keras files, and a ViT as a .weights.h5
    file to load into the same ViT built on each backend; images and targets fixed here."""
    folder = tmp_path_factory.mktemp("backends")
    spec = {}
    for name, (build, layer, _, _) in CASES.items():
        model = build()
        model.save(folder / f"{name}.keras")
        spec[name] = {"keras": f"{name}.keras", "layer": layer}
        # head-versus-full on every backend is the suite's job; one bypassed model here too
        if name == "dense_concat_model":
            spec[name]["full"] = ["gradcam", "ablationcam", "fastablationcam"]
    keras.utils.set_random_seed(1)
    vit = build_vit(**VIT)
    vit.save_weights(folder / "vit.weights.h5")
    spec["vit"] = {"vit": VIT, "weights": "vit.weights.h5", "layer": "tokens"}
    for name, entry in spec.items():
        model = vit if name == "vit" else keras.saving.load_model(folder / entry["keras"])
        images = random_images(tuple(model.input_shape[1:]), 3, seed=4)
        if name == "vit":
            images = (images - images.min()) * 40  # the ViT takes 0-255 pixels
        np.save(folder / f"{name}-images.npy", images)
        entry["images"] = f"{name}-images.npy"
        entry["targets"] = [0, 1, 2]  # fixed: an argmax tie could differ between backends
    (folder / "spec.json").write_text(json.dumps(spec))
    return folder


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="compares all three backends in subprocesses: run once, in the "
                           "TensorFlow session of make test")
def test_every_backend_gives_the_same_maps(saved_models, tmp_path):
    maps = {}
    # the three at once: small models keep each process mostly on one core
    running = {name: start_backend(name, str(saved_models), str(tmp_path / f"{name}.npz"))
               for name in backend.BACKENDS}
    for name, process in running.items():
        result = finish(process)
        assert result.returncode == 0, f"{name}:\n{result.stderr[-3000:]}"
        with np.load(tmp_path / f"{name}.npz") as data:
            assert str(data["backend"]) == name
            maps[name] = {key: data[key] for key in data.files if key != "backend"}
    reference = maps["tensorflow"]
    methods = {key.split("/")[1] for key in reference if not key.endswith("scores")}
    assert methods == set(cam.METHODS)
    assert len(reference) == 6 * (len(cam.METHODS) + 1) + 3  # + 3 full-mode maps
    worst = {}
    for name in ("jax", "torch"):
        assert set(maps[name]) == set(reference)
        for key, expected in reference.items():
            got = maps[name][key]
            assert got.shape == expected.shape, key
            if key == "vit/hirescam/head":
                # Each patch token reaches the class token only through a LayerNorm, which
                # ignores its scale, so sum_k A_k dy/dA_k = 0 there: the map is float32 noise
                # (about 1e-5 of its terms, sum_k |A_k dy/dA_k|) on every backend.
                assert np.abs(got).max() < 1e-4 and np.abs(expected).max() < 1e-4, key
                continue
            scale = max(np.abs(expected).max(), 1e-12)
            worst[(name, key)] = np.abs(got.astype(np.float64) - expected).max() / scale
    (name, key), error = max(worst.items(), key=lambda item: item[1])
    print(f"largest relative difference from TensorFlow: {error:.1e} ({name}, {key})")
    for (name, key), error in worst.items():
        assert error <= RTOL, f"{name} vs tensorflow, {key}: relative error {error:.2e}"


NO_TENSORFLOW = """
import sys, numpy as np, keras, cam
from keras import layers as L
model = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3, name="conv"),
                          L.ReLU(name="relu"), L.GlobalAveragePooling2D(), L.Dense(3)])
images = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype("float32")
for key in cam.METHODS:
    assert cam.explain(key, model, images, layer="relu").shape == (2, 8, 8)
print(keras.backend.backend(), "tensorflow" in sys.modules)
"""


@pytest.mark.skipif(keras.backend.backend() == "tensorflow",
                    reason="on TensorFlow, TensorFlow is rightly imported")
def test_explaining_on_this_backend_does_not_import_tensorflow():
    result = run_backend(keras.backend.backend(), code=NO_TENSORFLOW)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == [keras.backend.backend(), "False"]


def test_an_unsupported_backend_is_refused_with_the_three_that_work():
    result = run_backend("numpy", code="import cam; cam.GradCAM")
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "'numpy'" in message and "does not support" in message
    for name, install in backend.BACKENDS.items():
        assert repr(name) in message and install in message


def test_a_backend_that_is_not_installed_is_named_with_how_to_install_it(monkeypatch):
    """KERAS_BACKEND=jax without jax: Keras fails at import; cam says what to do instead."""
    code = ("import sys; sys.modules['jax'] = None\n"  # as if jax were not installed
            "import cam; cam.GradCAM")
    result = run_backend("jax", code=code)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: Keras could not load its backend (jax)")
    assert 'pip install "cam[jax]"' in message


def test_compiled_functions_report_their_backend_and_traces():
    model = build_tiny_sequential()  # its own model: compiled functions are shared per model
    explainer = cam.FastAblationCAM(model, "relu2", batch_size=25)  # 25 cells: one image a call
    images = random_images((10, 10, 3), 2)
    explainer(images)
    explainer(images)
    compiled = explainer.scorer
    assert compiled.backend == keras.backend.backend()
    eager = compiled.backend == "torch" and os.environ.get("CAM_TORCH_COMPILE") is None
    assert compiled.traces == (None if eager else 1)  # one shape of mask batch: one trace
    # two images a call (batch_size 50 holds both images' 25 ablations): the same function,
    # traced once more for that shape
    grouped = cam.FastAblationCAM(model, "relu2", batch_size=50)
    grouped(images)
    grouped(images)
    assert grouped.scorer is compiled
    assert compiled.traces == (None if eager else 2)
    assert repr(compiled).startswith(f"Compiled(backend={keras.backend.backend()!r}")
    # another method on the same model and layer shares the split and its compiled functions
    other = cam.ReciproCAM(model, "relu2")
    assert other.split is explainer.split and other._trunk is explainer._trunk
    assert other.scorer is compiled
    assert cam.AblationCAM(model, "relu2", ablation_value=1.0).scorer is not compiled
    assert cam.GradCAM(model, "relu2")._gradients is cam.LayerCAM(model, "relu2")._gradients
    assert cam.GradCAM(model, "relu1")._trunk is not explainer._trunk


def test_jax_takes_the_weights_as_arguments(tiny_sequential):
    """On JAX the compiled functions read the model's current weights on every call: new
    weights give new maps without recompiling (they are not baked in as constants)."""
    if keras.backend.backend() != "jax":
        pytest.skip("JAX only: TensorFlow and PyTorch read variables, never copies")
    model = keras.models.clone_model(tiny_sequential)
    model.set_weights(tiny_sequential.get_weights())
    explainer = cam.GradCAM(model, "relu2")
    images = random_images((10, 10, 3), 2)
    before = explainer(images, targets=0, normalize=False)
    dense = model.get_layer("logits")
    dense.kernel.assign(-dense.kernel)
    after = explainer(images, targets=0, normalize=False)
    np.testing.assert_allclose(after, -before, rtol=1e-5, atol=1e-6)
    assert explainer._gradients.traces == 1


def test_fusing_is_chosen_from_the_head_and_changes_no_map(tiny_sequential, dense_concat_model):
    """XLA fusing (TensorFlow) is on by default only where the head after the layer has no
    convolution or attention; fused and unfused scoring give the same maps on every backend."""
    images = random_images((10, 10, 3), 3)
    light = cam.AblationCAM(tiny_sequential, "relu2")  # head: GAP -> Dense
    heavy = cam.FastAblationCAM(dense_concat_model, "relu1")  # head: concat -> conv -> ...
    assert light.fuse is True and heavy.fuse is False
    for model, layer, method in ((tiny_sequential, "relu2", cam.AblationCAM),
                                 (dense_concat_model, "relu1", cam.FastAblationCAM),
                                 (dense_concat_model, "relu1", cam.ReciproCAM)):
        fused = method(model, layer, fuse=True)
        plain = method(model, layer, fuse=False)
        assert fused.scorer is not plain.scorer
        a = fused(images, targets=1, normalize=False, upsample=False)
        b = plain(images, targets=1, normalize=False, upsample=False)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), method.name


@pytest.mark.parametrize("fuse", ["yes", 1, 0.0])
def test_fuse_must_be_a_bool_or_none(tiny_sequential, fuse):
    with pytest.raises(ValueError, match="fuse must be None"):
        cam.FastAblationCAM(tiny_sequential, "relu2", fuse=fuse)


def test_a_head_xla_cannot_compile_runs_unfused_with_a_warning():
    """A NumPy function inside the head (tf.numpy_function) is beyond XLA: the scoring falls
    back to plain tf.function once, says why, and gives the same map."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("XLA fusing is a TensorFlow option (JAX always compiles with XLA)")
    import tensorflow as tf

    class NumpyScale(keras.layers.Layer):
        def call(self, x):
            y = tf.numpy_function(lambda v: (v * 2).astype(np.float32), [x], tf.float32)
            return tf.ensure_shape(y, x.shape)

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3)(NumpyScale()(x))
    model = keras.Model(inputs, outputs)
    images = random_images((6, 6, 3), 2)
    fused = cam.AblationCAM(model, "relu")
    assert fused.fuse is True
    with pytest.warns(RuntimeWarning, match="XLA could not compile"):
        a = fused(images, targets=0, normalize=False, upsample=False)
    b = cam.AblationCAM(model, "relu", fuse=False)(images, targets=0, normalize=False,
                                                   upsample=False)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
