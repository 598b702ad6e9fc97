"""A live explorer of class activation maps in Jupyter: ``cam.widgets.Explorer``.

    from cam.widgets import Explorer
    Explorer(model, images, class_names=names)   # the last expression of a cell shows it

One image at a time with its map laid over it, and controls for the image, the method (every
registered method), the layer (from :func:`cam.layer_table`; head-only layers are marked),
FastAblationCAM's window and stride, the target (the predicted class, any class, or targets
passed in), the threshold and the overlay's opacity, and a raw-grid view (the map on the
layer's grid, before upsampling). Below: the prediction, how long the map took, and on request
small multiples of every method on the current image.

Maps update on every change. Explainers are kept per (method, layer, settings), and explainers
at one layer share their compiled functions, so a second map at a layer costs the map alone.
A choice expensive enough to keep the kernel busy for long (an estimate above ``ask_above``
seconds, from the evaluations it needs and the measured cost of one) is not run at once: the
explorer says what it would cost and waits for the *Compute* button; long maps show progress.

Needs the ``widgets`` extra (``pip install "cam[widgets]"``: ipywidgets).
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import cv2
import numpy as np

from . import METHODS, maps as M
from ._optional import require

#: Methods offered, in the registry's order, with their display names.
HEAD_ONLY_MARK = " (head-only)"


def overlay_png(image: np.ndarray, saliency: np.ndarray, alpha: float = 0.5,
                threshold: float = 0.0, size: int | None = None) -> bytes:
    """PNG bytes of ``saliency`` (h, w) in [0, 1] in OpenCV's JET colours over ``image``
    (H, W, C), resized to ``size`` pixels on the longer side (nearest neighbour for a map on a
    coarse grid, so its cells stay visible)."""
    display = M.as_display(image)
    if saliency.shape != display.shape[:2]:  # a raw grid: show its cells as blocks
        saliency = cv2.resize(saliency.astype(np.float32), display.shape[1::-1],
                              interpolation=cv2.INTER_NEAREST)
    colours = cv2.applyColorMap(np.uint8(np.clip(saliency, 0, 1) * 255), cv2.COLORMAP_JET)
    colours = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    blended = M.blend(display, saliency, colours, alpha, threshold)
    if size:
        scale = size / max(blended.shape[:2])
        blended = cv2.resize(blended, (round(blended.shape[1] * scale),
                                       round(blended.shape[0] * scale)),
                             interpolation=cv2.INTER_NEAREST)
    ok, png = cv2.imencode(".png", cv2.cvtColor(np.uint8(blended * 255), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode the overlay as PNG")
    return png.tobytes()


class Explorer:
    """Interactive maps of ``model`` on ``images`` (B, H, W, C, preprocessed as the model
    expects). ``class_names``: one name per class; ``targets``: extra named targets
    ({name: a cam.targets target or callable}) offered beside the classes; ``layer``: the
    layer to start at (default: the last with a grid); ``ask_above``: seconds above which an
    estimated map waits for *Compute*; ``size``: the displayed image's longer side in pixels.
    """

    def __init__(self, model, images, class_names: Sequence[str] | None = None,
                 targets: Mapping | None = None, layer=None, method: str = "gradcam",
                 ask_above: float = 5.0, size: int = 320):
        widgets = require("ipywidgets", "widgets")
        from . import graph, method_key

        self.model = model
        self.images = np.asarray(images, np.float32)
        if self.images.ndim != 4 or not len(self.images):
            raise ValueError(f"images must be a non-empty (B, H, W, C) batch, got shape "
                             f"{self.images.shape}")
        self.class_names = list(class_names) if class_names is not None else None
        self.extra_targets = dict(targets or {})
        self.ask_above, self.size = float(ask_above), int(size)
        self.table = graph.layer_table(model)
        layers = [(r["layer"] + (HEAD_ONLY_MARK if r["head-only"] else ""), r["layer"])
                  for r in self.table if r["grid"]]
        if not layers:
            raise ValueError(f"model {model.name!r} has no layer with a spatial grid to explain")
        names = [value for _, value in layers]
        start = layer if layer is not None else names[-1]
        if start not in names:
            raise ValueError(f"layer {start!r} is not one cam can explain; choose one of "
                             f"{', '.join(names)}")
        self._explainers: dict = {}
        self._seconds_per_evaluation: float | None = None
        self.last: dict = {}
        self._predictions = None

        self.image = widgets.IntSlider(0, 0, len(self.images) - 1, description="image")
        self.method = widgets.Dropdown(
            options=[(self._method_class(k).name, k) for k in METHODS],
            value=method_key(method), description="method")
        self.layer = widgets.Dropdown(options=layers, value=start, description="layer")
        self.window = widgets.IntSlider(1, 1, 7, description="window")
        self.stride = widgets.IntSlider(1, 1, 7, description="stride")
        self.target = widgets.Dropdown(options=self._target_options(), value="predicted",
                                       description="target")
        self.threshold = widgets.FloatSlider(0.0, min=0.0, max=0.95, step=0.05,
                                             description="threshold")
        self.alpha = widgets.FloatSlider(0.5, min=0.0, max=1.0, step=0.05, description="alpha")
        self.raw_grid = widgets.Checkbox(False, description="raw grid")
        self.compute = widgets.Button(description="Compute", button_style="warning",
                                      layout=widgets.Layout(display="none"))
        self.all_methods = widgets.Button(description="All methods",
                                          tooltip="every method on this image, side by side")
        self.picture = widgets.Image(format="png")
        self.picture.add_class("cam-explorer-map")
        self.info = widgets.HTML()
        self.info.add_class("cam-explorer-info")
        self.multiples = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.progress = widgets.Output()
        controls = [self.image, self.method, self.layer, self.window, self.stride, self.target,
                    self.threshold, self.alpha, self.raw_grid]
        for control in controls:
            control.observe(self._changed, names="value")
        self.compute.on_click(lambda _: self.update(force=True))
        self.all_methods.on_click(lambda _: self.show_all_methods())
        self.widget = widgets.VBox([
            widgets.HBox([widgets.VBox(controls + [self.compute, self.all_methods]),
                          widgets.VBox([self.picture, self.info])]),
            self.progress, self.multiples])
        self.widget.add_class("cam-explorer")
        self.window.disabled = self.stride.disabled = self.method.value != "fastablationcam"
        self.update()

    # -- pieces --------------------------------------------------------------------------

    @staticmethod
    def _method_class(key):
        from .methods import method_class

        return method_class(key)

    def _target_options(self) -> list:
        names = self.class_names
        classes = self.table and self.model.output_shape
        options = [("predicted class", "predicted")]
        count = classes[-1] if isinstance(classes, tuple) and len(classes) == 2 else 0
        options += [(f"class {k}" + (f": {names[k]}" if names and k < len(names) else ""), k)
                    for k in range(count)]
        options += [(name, f"extra:{name}") for name in self.extra_targets]
        return options

    def _target(self):
        value = self.target.value
        if value == "predicted":
            return None
        if isinstance(value, str) and value.startswith("extra:"):
            return self.extra_targets[value[len("extra:"):]]
        return int(value)

    def explainer(self, key: str | None = None, layer: str | None = None):
        """The explainer for a method and layer (the current ones by default) with the current
        window and stride, built once and kept."""
        key, layer = key or self.method.value, layer or self.layer.value
        cls = self._method_class(key)
        options = {}
        if key == "fastablationcam":
            options = {"window": self.window.value, "stride": min(self.stride.value,
                                                                 self.window.value)}
        cache = (key, layer, tuple(sorted(options.items())))
        if cache not in self._explainers:
            self._explainers[cache] = cls(self.model, layer, **options)
        return self._explainers[cache]

    def evaluations(self, explainer) -> int:
        """Perturbed copies the explainer scores per image (1 for a gradient method)."""
        if hasattr(explainer, "evaluations"):
            size = explainer.split.target_shape
            if type(explainer).__name__ == "Occlusion":
                return explainer.evaluations(self.images.shape[1:3])
            return explainer.evaluations(tuple(size))
        return getattr(explainer, "evaluations_per_image", 1)

    def estimate_seconds(self, explainer) -> float | None:
        """Seconds the explainer's map is estimated to take, from the cost of one evaluation
        measured on earlier maps (None before the first ablation map)."""
        if self._seconds_per_evaluation is None:
            return None
        whole = type(explainer).__name__ in ("Occlusion", "ScoreCAM") or explainer.mode == "full"
        # the work of an evaluation, by the bytes it writes: the whole network against the head
        split = explainer.split
        ratio = 1.0 if not whole else max(1.0, split.bytes_per_row("full", backward=True)
                                          / max(1, split.bytes_per_row("head", backward=True)))
        return self.evaluations(explainer) * self._seconds_per_evaluation * ratio

    # -- updating ------------------------------------------------------------------------

    def _changed(self, change) -> None:
        self.window.disabled = self.stride.disabled = self.method.value != "fastablationcam"
        self.update()

    def update(self, force: bool = False) -> None:
        """Compute the current map and show it, or, when its estimate is above ``ask_above``
        seconds, say so and wait for *Compute*."""
        try:
            explainer = self.explainer()
        except ValueError as error:  # e.g. a window larger than the layer's grid
            self.info.value = f"<b>Cannot explain:</b> {error}"
            return
        estimate = self.estimate_seconds(explainer)
        if not force and estimate is not None and estimate > self.ask_above:
            self.compute.layout.display = None
            self.compute.description = f"Compute (about {estimate:.0f} s)"
            self.info.value = (f"{explainer.name} at {explainer.layer!r} needs "
                               f"{self.evaluations(explainer):,} evaluations per image, about "
                               f"{estimate:.0f} s: press <b>Compute</b> to run it")
            return
        self.compute.layout.display = "none"
        index = self.image.value
        start = time.perf_counter()
        with self.progress:
            result = explainer.explain(self.images[index:index + 1], self._target(),
                                       upsample=not self.raw_grid.value,
                                       threshold=self.threshold.value)
        seconds = time.perf_counter() - start
        evaluations = self.evaluations(explainer)
        if evaluations > 1:
            self._seconds_per_evaluation = seconds / evaluations
        self.picture.value = overlay_png(self.images[index], result.maps[0], self.alpha.value,
                                         self.threshold.value, self.size)
        self.last = {"method": explainer.name, "layer": explainer.layer, "seconds": seconds,
                     "map": result.maps[0], "raw": result.raw[0], "image": index,
                     "target": result.target}
        self.info.value = self._describe(result, explainer, seconds)

    def _describe(self, result, explainer, seconds: float) -> str:
        name = self._class_name
        lines = [f"<b>{explainer.name}</b> at <code>{explainer.layer}</code> "
                 f"({'x'.join(str(d) for d in explainer.split.target_shape)}), "
                 f"{seconds * 1000:.0f} ms"]
        if result.targets is not None and np.ndim(result.scores) == 2:
            predicted = int(result.predicted[0])
            lines.append(f"predicted {name(predicted)} (logit {result.scores[0, predicted]:.2f});"
                         f" explained {name(int(result.targets[0]))}")
        else:
            lines.append(f"explained {result.target!r}: {result.target_scores[0]:.4g}")
        return "<br>".join(lines)

    def _class_name(self, k: int) -> str:
        names = self.class_names
        return f"{k} ({names[k]})" if names and k < len(names) else str(k)

    def show_all_methods(self, skip_above: float | None = None) -> dict:
        """Small multiples: every method at the current layer on the current image (a method
        whose estimate exceeds ``skip_above`` seconds, default ``ask_above``, is left out and
        says so). Returns {method: map}."""
        widgets = require("ipywidgets", "widgets")
        skip_above = self.ask_above if skip_above is None else skip_above
        index, tiles, out = self.image.value, [], {}
        for key in METHODS:
            explainer = self.explainer(key)
            estimate = self.estimate_seconds(explainer)
            if estimate is not None and estimate > skip_above:
                tiles.append(widgets.HTML(f"{explainer.name}: about {estimate:.0f} s, left out"))
                continue
            with self.progress:
                result = explainer.explain(self.images[index:index + 1], self._target(),
                                           threshold=self.threshold.value)
            out[explainer.name] = result.maps[0]
            picture = widgets.Image(value=overlay_png(self.images[index], result.maps[0],
                                                      self.alpha.value, self.threshold.value,
                                                      160), format="png")
            tiles.append(widgets.VBox([widgets.HTML(f"<small>{explainer.name}</small>"),
                                       picture]))
        self.multiples.children = tiles
        return out

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
