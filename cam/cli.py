"""Command line: explain images with a saved Keras model, or list the layers it can explain.

    python -m cam layers MODEL.keras
    python -m cam methods
    python -m cam explain MODEL.keras IMAGE... --method gradcam --layer relu --out DIR
    python -m cam explain MODEL.keras IMAGE... --method fastablationcam --set window=2
    python -m cam bulk MODEL.keras FOLDER --layer relu --method gradcam,fastablationcam --out DIR

A method's settings (``--set NAME=VALUE``) are the ones it declares (``SETTINGS``, listed by
``python -m cam methods``), so a method added with :func:`cam.register_method` in a module
passed to ``--import`` is offered with its settings too.

Errors (a missing file, an unreadable image, an unknown layer or method) print one line on
stderr and exit with status 2; set CAM_TRACEBACK=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from . import METHODS, method_key

PREPROCESSING = (
    "Images are decoded to RGB (any format Pillow reads), converted to gray for a one-channel "
    "model, and resized to the model's input size (a non-square image is first padded to a "
    "square with its border colour, as the project's training does). Pixels are passed as "
    "raw 0-255 floats: the models in this project rescale inside the model. A model that "
    "expects other preprocessing must include it as layers."
)


@contextlib.contextmanager
def _quiet_stderr():
    """Hide what TensorFlow's C++ side writes to stderr while it is imported (CUDA probes on
    a CPU machine), so that an error stays the only line there. Python errors still surface:
    the descriptor is restored before any exception leaves."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _import_backend() -> None:
    """Keras and its backend (KERAS_BACKEND), with TensorFlow's start-up noise kept quiet."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if os.environ.get("CAM_TRACEBACK"):
        from . import backend  # noqa: F401
        return
    with _quiet_stderr():
        from . import backend

        if backend.name() == "tensorflow":
            import tensorflow

            tensorflow.constant(0)  # starts the runtime, whose device probe also writes to stderr


class UsageError(Exception):
    """A bad command line, reported in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise UsageError(f"{message} (see `python -m cam {self.prog.split()[-1]} --help`)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m cam", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    layers = commands.add_parser(
        "layers", help="print the layers a CAM can target",
        description="Print the candidate layers of a model: the index and name to pass as "
                    "--layer, the output shape, the grid the map is on, and whether the "
                    "ablation methods can rerun only the part of the model after the layer.")
    layers.add_argument("model", help="a Keras model saved as .keras")
    layers.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help=IMPORT_HELP)

    methods = commands.add_parser(
        "methods", help="list the methods and their settings",
        description="List every registered method with the settings --set takes: name, "
                    "kind, default and what it does.")
    methods.add_argument("--import", dest="imports", action="append", default=[],
                         metavar="MODULE", help=IMPORT_HELP)

    explain = commands.add_parser(
        "explain", help="write saliency maps of images",
        description="Write, for each image, the map over the image (IMAGE-METHOD.png) and the "
                    "raw map on the layer's grid (IMAGE-METHOD.npy: before ReLU and "
                    "normalisation), and print the predicted class. " + PREPROCESSING)
    explain.add_argument("model", help="a Keras model saved as .keras")
    explain.add_argument("images", nargs="+", help="image files")
    explain.add_argument("--method", default="fastablationcam",
                         help=f"one of {', '.join(METHODS)} (default fastablationcam)")
    explain.add_argument("--layer", default=None,
                         help="layer name, or index from `python -m cam layers` "
                              "(default: the candidate nearest the output)")
    explain.add_argument("--target", default=None,
                         help="what to explain (default: each image's predicted class): a class "
                              "index (3, or class:3), label:K (multi-label), regression or "
                              "regression:INDEX, region:K:MASK (MASK a .npy or image file, "
                              "nonzero pixels), or output:NAME_OR_INDEX:<one of those> for a "
                              "multi-output model")
    explain.add_argument("--score", default="logit", choices=("logit", "probability"),
                         help="explain the logit (default) or the softmax probability")
    explain.add_argument("--set", dest="settings", action="append", default=[],
                         metavar="NAME=VALUE",
                         help="a setting of the method, e.g. --set window=2 --set stride=1 "
                              "(repeatable; none or auto for a setting whose default is None; "
                              "`python -m cam methods` lists each method's settings)")
    explain.add_argument("--window", type=int, default=None,
                         help="shorthand for --set window=N, for the methods that declare a "
                              "window (FastAblationCAM: grid cells; Occlusion: pixels)")
    explain.add_argument("--threshold", default="0",
                         help="level replacing ReLU's 0 when normalising the map: a number on "
                              "the raw map's scale, or qQ for the Q quantile of each map, "
                              "e.g. q0.8 (default 0)")
    explain.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (0.5)")
    explain.add_argument("--classes", default=None,
                         help="class names, comma-separated, to print with the indices")
    explain.add_argument("--out", default="cam-maps", help="output folder (default cam-maps)")
    explain.add_argument("--import", dest="imports", action="append", default=[],
                         metavar="MODULE", help=IMPORT_HELP)
    _bulk_parser(commands)
    return parser


def _bulk_parser(commands) -> None:
    bulk = commands.add_parser(
        "bulk", help="explain a whole folder or archive into a Parquet dataset",
        description="Explain every image of INPUT with one or more methods at one layer into "
                    "OUT/maps (Parquet, one row per image and method: path, sha256, size, "
                    "predicted class and score, target, method, layer, the raw map on the "
                    "layer's grid, its min and max, time), the images that cannot be explained "
                    "into OUT/errors.parquet with the reason, and OUT/manifest.json. A rerun "
                    "skips the images already done. Exit status: 0 every image explained (or "
                    "already done), 1 some images failed (see errors.parquet), 2 bad arguments "
                    "or a failure of the run itself.")
    bulk.add_argument("model", help="a Keras model saved as .keras (loaded in safe mode), or "
                                    "module:function returning one")
    bulk.add_argument("input", help="a folder (recursive), a glob (quoted), a text file of "
                                    "paths (one a line) or a .tar/.zip archive")
    bulk.add_argument("--layer", default=None,
                      help="layer name, or index from `python -m cam layers` (default: the "
                           "candidate nearest the output)")
    bulk.add_argument("--method", default="fastablationcam",
                      help=f"one or more, comma-separated, of {', '.join(METHODS)} (default "
                           f"fastablationcam); they share one trunk pass per batch")
    bulk.add_argument("--out", required=True, help="output folder")
    bulk.add_argument("--target", default=None,
                      help="what to explain, as `python -m cam explain --target` takes it "
                           "(default: each image's predicted class)")
    bulk.add_argument("--score", default="logit", choices=("logit", "probability"),
                      help="explain the logit (default) or the softmax probability")
    bulk.add_argument("--set", dest="settings", action="append", default=[],
                      metavar="[METHOD.]NAME=VALUE",
                      help="a setting of the methods that declare it, or of METHOD only "
                           "(repeatable; `python -m cam methods` lists them)")
    bulk.add_argument("--preprocess", default="square",
                      help="square (default; what `python -m cam explain` does: RGB, "
                           "padded to a square with its border colour, resized to the model's "
                           "input, gray for a one-channel model, raw 0-255 pixels) or "
                           "module:function taking (rgb uint8 (h, w, 3), height, width, "
                           "channels) and returning the model's input")
    bulk.add_argument("--batch-size", type=int, default=None,
                      help="images per batch (default: what one trunk call fits in the memory "
                           "budget, CAM_MEMORY_BUDGET, at most 256)")
    bulk.add_argument("--workers", type=int, default=None,
                      help="decoding threads (local engine; default: the CPU count, at most 8) "
                           "or the CPUs a local Ray starts with (ray engine)")
    bulk.add_argument("--overlays", action="store_true",
                      help="also write OUT/overlays/PATH-METHOD.png, the map over the image")
    bulk.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (0.5)")
    bulk.add_argument("--engine", default="local", choices=("local", "ray"),
                      help="local (default: one process) or ray (Ray Data; pip install "
                           "'cam[ray]')")
    bulk.add_argument("--address", default=None,
                      help="ray engine: the cluster to join (e.g. auto, or ray://HOST:10001); "
                           "default: start Ray on this machine")
    bulk.add_argument("--actors", type=int, default=1,
                      help="ray engine: explaining actors, each with its own model (default 1)")
    bulk.add_argument("--gpus-per-actor", type=float, default=0.0,
                      help="ray engine: GPUs each explaining actor takes (default 0)")
    bulk.add_argument("--overwrite", action="store_true",
                      help="start afresh: delete what an earlier run wrote in OUT")
    bulk.add_argument("--no-progress", dest="progress", action="store_false",
                      help="no progress bar")
    bulk.add_argument("--import", dest="imports", action="append", default=[],
                      metavar="MODULE", help=IMPORT_HELP)


def _bulk(args) -> int:
    from . import bulk

    summary = bulk.bulk(args.model, args.input, args.out, layer=_layer(args.layer),
                        methods=args.method, settings=args.settings, target=args.target,
                        score=args.score, preprocess=args.preprocess,
                        batch_size=args.batch_size, workers=args.workers,
                        overlays=args.overlays, alpha=args.alpha, engine=args.engine,
                        address=args.address, num_cpus=args.workers, actors=args.actors,
                        gpus_per_actor=args.gpus_per_actor, overwrite=args.overwrite,
                        imports=args.imports, progress=args.progress)
    print(summary)
    return summary.exit_code


def _layer(text):
    return int(text) if text is not None and text.lstrip("-").isdigit() else text


IMPORT_HELP = ("a Python module to import before loading the model, for models with custom "
               "layers registered with keras.saving.register_keras_serializable, or methods "
               "added with cam.register_method (repeatable)")


def _check_model_path(path: str) -> Path:
    model_path = Path(path)
    if not model_path.is_file():
        raise FileNotFoundError(f"model file {path!r} does not exist")
    if model_path.suffix != ".keras":
        raise ValueError(f"{path!r} is not a .keras file; save the model with "
                         f"model.save('model.keras')")
    return model_path


def _import_modules(imports) -> None:
    """Keras, then the ``--import`` modules (custom layers, registered methods)."""
    _import_backend()
    import importlib

    for module in imports:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"--import {module}: cannot import it ({err})") from err


def _load_model(path: str, imports=()):
    model_path = _check_model_path(path)
    _import_modules(imports)
    import keras

    try:
        return keras.saving.load_model(model_path, compile=False)
    except Exception as err:  # Keras raises many types for a bad archive; name the file
        raise ValueError(f"cannot load {path!r} as a Keras model: {err}") from err


def _read_image(path: str, height: int, width: int, channels: int):
    from .images import fit_to_input, read_rgb

    if not Path(path).is_file():
        raise FileNotFoundError(f"image file {path!r} does not exist")
    return fit_to_input(read_rgb(path), height, width, channels)


def _layers(args) -> int:
    model = _load_model(args.model, args.imports)
    from . import layer_table

    print(layer_table(model))
    return 0


def _describe_setting(setting) -> str:
    """What a setting takes, in words: ``an int >= 1``, ``true or false``, ``a number``."""
    if setting.kind is bool:
        what = "true or false"
    elif setting.kind is int:
        what = ("an int" + (f" >= {setting.low}" if setting.low is not None else "")
                + (f" <= {setting.high}" if setting.high is not None else ""))
        if setting.low is not None and setting.high is not None:
            what = f"an int between {setting.low} and {setting.high}"
    elif setting.kind is float:
        what = "a number"
    else:
        what = f"a {setting.kind.__name__}"
    return f"none (auto) or {what}" if setting.default is None else what


def setting_value(setting, text: str):
    """The value of ``setting`` (a :class:`cam.Setting`) written as ``text`` on the command
    line, or a ValueError that says what it takes."""
    text = text.strip()
    if setting.default is None and text.lower() in ("none", "auto"):
        return None
    try:
        if setting.kind is bool:
            words = {"true": True, "yes": True, "on": True, "1": True,
                     "false": False, "no": False, "off": False, "0": False}
            value = words[text.lower()]
        elif setting.kind is int:
            value = int(text)
            if (setting.low is not None and value < setting.low) or \
                    (setting.high is not None and value > setting.high):
                raise ValueError
        else:
            value = setting.kind(text)
    except (KeyError, ValueError):
        raise ValueError(f"--set {setting.name}={text}: {setting.name} must be "
                         f"{_describe_setting(setting)} ({setting.doc})") from None
    return value


def parse_settings(method, key: str, pairs, window: int | None = None) -> dict:
    """The constructor keywords of ``method`` (a registered class, under ``key``) from
    ``--set NAME=VALUE`` pairs and the ``--window`` shorthand, checked against its
    declared :attr:`~cam.Explainer.SETTINGS`."""
    from .methods import method_class

    declared = {s.name: s for s in method.SETTINGS}
    options: dict = {}
    for pair in pairs:
        name, equals, text = pair.partition("=")
        name = name.strip()
        if not equals or not name:
            raise ValueError(f"--set {pair!r}: write NAME=VALUE, e.g. --set window=2")
        if name not in declared:
            has = (f"its settings are {', '.join(declared)}" if declared
                   else "it has no settings")
            raise ValueError(f"--set {name}: {key} has no setting {name!r}; {has} "
                             f"(`python -m cam methods` lists every method's)")
        if name in options:
            raise ValueError(f"--set {name} is given twice")
        options[name] = setting_value(declared[name], text)
    if window is not None:
        if "window" not in declared:
            takes = [k for k in METHODS
                     if any(s.name == "window" for s in method_class(k).SETTINGS)]
            raise ValueError(f"--window does not apply to {key}; it is an option of "
                             f"{', '.join(takes)}")
        if "window" in options:
            raise ValueError("--window and --set window=... are the same setting; give one")
        options["window"] = setting_value(declared["window"], str(window))
    return options


def _methods(args) -> int:
    _import_modules(args.imports)
    from .methods import method_class

    for key in METHODS:
        method = method_class(key)
        if not method.SETTINGS:
            print(f"{key} ({method.name}): no settings")
            continue
        print(f"{key} ({method.name}):")
        for s in method.SETTINGS:
            default = f"{s.name}={s.default}"
            print(f"    {default:<16} {_describe_setting(s)}: {s.doc}")
    return 0


def _save_overlay(path: Path, image, saliency, alpha: float, threshold: float) -> None:
    """The map over the image as a PNG, coloured with OpenCV's jet colour map (no matplotlib
    needed), drawn at least 256 pixels on its short side so a small model input stays legible."""
    import cv2
    import numpy as np

    from . import maps as M

    base = M.as_display(image)
    colours = cv2.applyColorMap(np.uint8(np.clip(saliency, 0, 1) * 255), cv2.COLORMAP_JET)
    colours = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    picture = np.uint8(np.round(M.blend(base, saliency, colours, alpha, threshold) * 255))
    scale = max(1, -(-256 // min(picture.shape[:2])))
    if scale > 1:
        picture = cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))


def _explain(args) -> int:
    import numpy as np

    from . import maps as M

    # Everything that can be checked without TensorFlow is checked before its slow import
    # (a method from an --import module is known only once it is imported).
    if args.imports:
        _import_modules(args.imports)
    key = method_key(args.method)
    threshold = M.as_threshold(args.threshold)
    if not 0 <= args.alpha <= 1:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    _check_model_path(args.model)
    for path in args.images:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image file {path!r} does not exist")
    classes = args.classes.split(",") if args.classes else None
    _import_backend()
    from .methods import method_class

    method = method_class(key)
    options = parse_settings(method, key, args.settings, args.window)
    model = _load_model(args.model, args.imports)
    from .intercept import model_input_shape

    # a subclassed model has no input_shape of its own; the shape it was built with serves
    _, height, width, channels = model_input_shape(model)
    images = np.stack([_read_image(p, height, width, channels) for p in args.images])
    layer = int(args.layer) if args.layer is not None and args.layer.lstrip("-").isdigit() \
        else args.layer
    explainer = method(model, layer, score=args.score, **options)
    target = parse_target(args.target) if args.target is not None else None
    result = explainer.explain(images.astype(np.float32), targets=target, upsample=False,
                               normalize=False)
    raw = result.raw
    maps = M.upsample_maps(M.normalize_maps(raw, threshold), (height, width))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stems = [Path(p).stem for p in args.images]
    settings = ", ".join(f"{k}={v}" for k, v in explainer.settings.items())
    settings = f" ({settings})" if settings else ""

    def named(k):
        return f"{k} ({classes[k]})" if classes and k < len(classes) else str(k)

    for i, path in enumerate(args.images):
        stem = stems[i] if stems.count(stems[i]) == 1 else f"{stems[i]}-{i}"
        _save_overlay(out / f"{stem}-{key}.png", images[i], maps[i], args.alpha,
                      1e-6 if threshold != 0 else 0.0)
        np.save(out / f"{stem}-{key}.npy", raw[i])
        if result.targets is not None and np.ndim(result.scores) == 2:
            explained, predicted = int(result.targets[i]), int(result.predicted[i])
            what = (f"predicted class {named(predicted)} ({args.score} "
                    f"{result.scores[i, predicted]:.3g}); explained class {named(explained)}")
        else:
            what = f"explained {result.target!r} ({result.target_scores[i]:.4g})"
        print(f"{path}: {what} with {explainer.name}{settings} at layer {explainer.layer!r} on a "
              f"{raw.shape[1]}x{raw.shape[2]} grid")
    print(f"wrote {len(args.images)} overlays (.png) and raw maps (.npy) to {out}")
    return 0


def parse_target(text: str):
    """``--target`` as a :mod:`cam.targets` target (see ``--help``)."""
    from . import targets as T

    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind.lstrip("-").isdigit() and not rest:
        return T.Class(int(kind))
    try:
        if kind in ("class", "label"):
            return (T.Class if kind == "class" else T.MultiLabel)(int(rest))
        if kind == "regression":
            return T.Regression(int(rest) if rest else None)
        if kind == "region":
            k, _, path = rest.partition(":")
            return T.Region(int(k), _read_mask(path))
        if kind == "output":
            which, _, inner = rest.partition(":")
            which = int(which) if which.isdigit() else which
            return T.Output(which, parse_target(inner))
    except ValueError as error:
        raise ValueError(f"--target {text!r}: {error}") from None
    raise ValueError(f"--target {text!r} is not a target: use K, class:K, label:K, regression, "
                     f"regression:INDEX, region:K:MASK or output:NAME_OR_INDEX:TARGET")


def _read_mask(path: str):
    import numpy as np

    if not Path(path).is_file():
        raise ValueError(f"mask file {path!r} does not exist")
    if path.endswith(".npy"):
        return np.load(path) != 0
    import cv2

    return cv2.imread(path, cv2.IMREAD_GRAYSCALE) != 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return {"layers": _layers, "methods": _methods, "explain": _explain,
                "bulk": _bulk}[args.command](args)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except Exception as err:  # the boundary: one line, no traceback (CAM_TRACEBACK=1 for it)
        if os.environ.get("CAM_TRACEBACK"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"cam: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
