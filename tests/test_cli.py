"""`python -m cam`: the layer table and explanations of a saved tiny ViT, through subprocess,
and one-line errors with a non-zero exit code."""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from cam import cli
from cam.study.vit import build_vit


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A grayscale class-token ViT (16x16 input, 4x4 token grid) saved as .keras, two RGB
    images of other sizes, and a file that is not an image."""
    root = tmp_path_factory.mktemp("cli")
    keras.utils.set_random_seed(0)
    model = build_vit(3, image_size=16, channels=1, patch_size=4, dim=8, depth=1, heads=2,
                      mlp_dim=16, conv_stem=False)
    model.save(root / "vit.keras")
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (20, 30, 3)), ("b.jpg", (16, 16, 3))):
        Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8)).save(root / name)
    (root / "broken.png").write_text("not an image")
    return root


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cam", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


#: The ViT's custom layers are registered by importing the study module that defines them.
VIT = ("--import", "cam.study.vit")


def test_layers_prints_the_candidate_table(files):
    result = run("layers", files / "vit.keras", *VIT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["layer", "output", "shape", "grid"]
    row = next(line for line in lines if " block0_norm1 " in line)
    assert "(None, 17, 8)" in row and "4x4 +1 token" in row and "True" in row
    assert result.stderr == ""


def test_explain_writes_overlays_and_raw_maps(files, tmp_path):
    out = tmp_path / "maps"
    result = run("explain", files / "vit.keras", files / "a.png", files / "b.jpg",
                 "--method", "Ablation-CAM", "--layer", "block0_norm1", "--target", "2",
                 "--threshold", "q0.5", "--classes", "x,y,z", "--out", out, *VIT)
    assert result.returncode == 0, result.stderr
    for stem in ("a", "b"):
        raw = np.load(out / f"{stem}-ablationcam.npy")
        assert raw.shape == (4, 4) and raw.dtype == np.float32 and np.abs(raw).max() > 0
        with Image.open(out / f"{stem}-ablationcam.png") as png:
            assert min(png.size) > 100
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{files / 'a.png'}: predicted class ")
    assert "explained class 2 (z) with Ablation-CAM at layer 'block0_norm1' on a 4x4 grid" \
        in lines[0]
    assert lines[-1] == f"wrote 2 overlays (.png) and raw maps (.npy) to {out}"


def test_explain_takes_the_methods_declared_settings(files, tmp_path):
    out = tmp_path / "maps"
    result = run("explain", files / "vit.keras", files / "b.jpg", "--method", "fastablationcam",
                 "--layer", "block0_norm1", "--set", "window=2", "--set", "stride=1",
                 "--out", out, *VIT)
    assert result.returncode == 0, result.stderr
    assert np.load(out / "b-fastablationcam.npy").shape == (4, 4)
    assert "with FastAblationCAM (window=2, stride=1) at layer 'block0_norm1'" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--method", "fastablationcam", "--set", "windw=2"],
     "--set windw: fastablationcam has no setting 'windw'; its settings are window, stride"),
    (["--method", "gradcam", "--set", "window=2"],
     "gradcam has no setting 'window'; it has no settings"),
    (["--method", "fastablationcam", "--set", "window=two"],
     "--set window=two: window must be an int >= 1 (side of the ablated block"),
    (["--method", "fastablationcam", "--set", "window=0"], "window must be an int >= 1"),
    (["--method", "fastablationcam", "--set", "window"], "--set 'window': write NAME=VALUE"),
    (["--method", "reciprocam", "--set", "gaussian=maybe"],
     "gaussian must be true or false"),
    (["--method", "occlusion", "--set", "baseline=grey"], "baseline must be a number"),
    (["--method", "fastablationcam", "--set", "window=2", "--window", "2"],
     "--window and --set window=... are the same setting"),
    (["--method", "fastablationcam", "--set", "window=2", "--set", "window=3"],
     "--set window is given twice"),
])
def test_a_bad_setting_is_one_clear_line(files, capsys, args, message):
    assert cli.main(["explain", str(files / "vit.keras"), str(files / "a.png"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_setting_values_follow_the_declaration():
    import cam

    stride = cam.FastAblationCAM.SETTINGS[1]
    assert cli.setting_value(stride, "auto") is None and cli.setting_value(stride, "3") == 3
    gaussian = cam.ReciproCAM.SETTINGS[0]
    assert cli.setting_value(gaussian, "yes") is True and cli.setting_value(gaussian, "0") is False
    window = cam.FastAblationCAM.SETTINGS[0]
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        cli.setting_value(window, "none")  # its default is 1, not None


def test_methods_lists_every_method_with_its_settings(capsys):
    import cam

    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for key in cam.METHODS:
        assert f"{key} (" in out
    assert "gradcam (Grad-CAM): no settings" in out
    assert "window=1" in out and "side of the ablated block" in out
    assert "none (auto) or an int >= 1: step between blocks" in out


def test_a_method_registered_by_an_imported_module_takes_its_settings(files, tmp_path,
                                                                       monkeypatch, capsys):
    import cam

    (tmp_path / "toy_cam_method.py").write_text(TOY_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "maps"
    try:
        code = cli.main(["explain", str(files / "vit.keras"), str(files / "b.jpg"),
                         "--method", "toyband", "--set", "band=2", "--layer", "block0_norm1",
                         "--out", str(out), "--import", "cam.study.vit",
                         "--import", "toy_cam_method"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "with Toy-Band (band=2) at layer 'block0_norm1'" in captured.out
        raw = np.load(out / "b-toyband.npy")
        assert raw.shape == (4, 4) and (raw[0] == raw[1]).all()  # rows 0-1 ablated together
        assert cli.main(["explain", str(files / "vit.keras"), str(files / "b.jpg"),
                         "--method", "toyband", "--set", "band=9", "--import",
                         "toy_cam_method"]) == 2
        assert "band must be an int between 1 and 4 (rows ablated together)" in \
            capsys.readouterr().err
    finally:
        cam.METHODS.pop("toyband", None)
        sys.modules.pop("toy_cam_method", None)


#: A method module a user might write: a class with its SETTINGS, registered on import.
TOY_METHOD = '''
import numpy as np
from keras import ops

import cam
from cam import combine


class ToyBand(cam.AblationExplainer):
    name = "Toy-Band"
    SETTINGS = (cam.Setting("band", int, 1, "rows ablated together", low=1, high=4),)

    def __init__(self, model, layer=None, band=1, **kwargs):
        super().__init__(model, layer, **kwargs)
        self.band = band

    def mask_settings(self):
        return (self.band,)

    def masks(self, grid_shape):
        h, w = grid_shape[:2]
        masks = np.zeros((len(range(0, h, self.band)), h, w, 1), bool)
        for n, start in enumerate(range(0, h, self.band)):
            masks[n, start:start + self.band] = True
        return masks

    def combine(self, activation, scores, ablated, masks):
        return combine.spread_window_drops(ops.expand_dims(scores, 1) - ablated,
                                           masks[..., 0])


cam.register_method(ToyBand)
'''


@pytest.mark.parametrize("args, message", [
    (["layers", "{root}/missing.keras"], "model file '{root}/missing.keras' does not exist"),
    (["explain", "{root}/vit.keras", "{root}/a.png", "--method", "gradcamm"],
     "unknown method 'gradcamm'"),
    (["explain", "{root}/vit.keras", "{root}/nowhere.png"],
     "image file '{root}/nowhere.png' does not exist"),
    (["explain", "{root}/vit.keras", "{root}/broken.png"], "cannot decode {root}/broken.png"),
    (["explain", "{root}/vit.keras", "{root}/a.png", "--layer", "block0_nrom1"],
     "no layer named 'block0_nrom1'"),
    (["explain", "{root}/vit.keras", "{root}/a.png", "--method", "gradcam", "--window", "2"],
     "--window does not apply to gradcam; it is an option of fastablationcam, occlusion"),
    (["explain", "{root}/vit.keras", "{root}/a.png", "--import", "no_such_module_here"],
     "--import no_such_module_here: cannot import it"),
])
def test_errors_are_one_line_and_exit_non_zero(files, args, message):
    imports = [] if "--import" in args else list(VIT)
    result = run(*[a.format(root=files) for a in args], *imports)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("cam: error: " )
    assert message.format(root=files) in result.stderr
    assert "Traceback" not in result.stderr


def test_help_states_the_preprocessing(capsys):
    assert cli.main(["explain", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "raw 0-255" in text and "rescale inside the model" in text


def test_usage_errors_are_one_line(capsys):
    assert cli.main(["explain", "m.keras", "x.png", "--window", "two"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value: 'two'" in err


def test_a_model_with_custom_layers_needs_its_module_imported(files):
    result = run("layers", files / "vit.keras")
    assert result.returncode == 2
    assert "cannot load" in result.stderr and "ClassToken" in result.stderr


def test_parse_target_takes_the_built_ins(tmp_path):
    from cam import cli
    from cam import targets as T

    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    np.save(tmp_path / "m.npy", mask)
    assert cli.parse_target("3").k.tolist() == 3 and type(cli.parse_target("3")) is T.Class
    assert type(cli.parse_target("label:2")) is T.MultiLabel
    assert cli.parse_target("regression").index is None
    assert cli.parse_target("regression:1").index == 1
    region = cli.parse_target(f"region:1:{tmp_path / 'm.npy'}")
    assert region.k == 1 and region.mask.sum() == 4
    output = cli.parse_target("output:age:regression")
    assert output.which == "age" and isinstance(output.target, T.Regression)
    assert cli.parse_target("output:0:class:2").which == 0
    for bad, phrase in (("cat", "is not a target"), ("class:x", "--target 'class:x'"),
                        ("region:1:nope.npy", "does not exist")):
        with pytest.raises(ValueError, match=phrase):
            cli.parse_target(bad)


#: A subclassed model a user might save: its layers are reached only through its call.
SUBCLASSED = '''
import keras
from keras import layers


@keras.saving.register_keras_serializable(package="toy_subclassed_net")
class Net(keras.Model):
    def __init__(self, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.classes = classes
        self.c1 = layers.Conv2D(4, 3, padding="same", activation="relu")
        self.c2 = layers.Conv2D(6, 3, strides=2, padding="same", activation="relu")
        self.pool = layers.GlobalAveragePooling2D()
        self.out = layers.Dense(classes)

    def call(self, x):
        return self.out(self.pool(self.c2(self.c1(x))))

    def get_config(self):
        return {**super().get_config(), "classes": self.classes}
'''


def test_a_saved_subclassed_model_is_listed_and_explained(tmp_path, monkeypatch, capsys):
    import importlib

    import cam

    (tmp_path / "toy_subclassed_net.py").write_text(SUBCLASSED)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        net = importlib.import_module("toy_subclassed_net").Net()
        net(np.zeros((1, 12, 12, 3), np.float32))
        net.save(tmp_path / "net.keras")
        image = np.random.default_rng(1).integers(0, 256, (12, 12, 3)).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "img.png")
        imports = ["--import", "toy_subclassed_net"]

        assert cli.main(["layers", str(tmp_path / "net.keras"), *imports]) == 0
        rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:]}
        assert set(rows) == {"c1", "c2"}
        assert all("intercepted: whole model per evaluation" in row for row in rows.values())

        out = tmp_path / "maps"
        for method in ("gradcam", "ablationcam"):
            assert cli.main(["explain", str(tmp_path / "net.keras"), str(tmp_path / "img.png"),
                             "--method", method, "--layer", "c2", "--out", str(out),
                             *imports]) == 0
            assert "at layer 'c2' on a 6x6 grid" in capsys.readouterr().out
            # the same map as the library explaining the model in this process
            expected = cam.method_class(method)(net, "c2")(
                image[None].astype(np.float32), normalize=False, upsample=False)[0]
            np.testing.assert_allclose(np.load(out / f"img-{method}.npy"), expected,
                                       rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    finally:
        sys.modules.pop("toy_subclassed_net", None)
