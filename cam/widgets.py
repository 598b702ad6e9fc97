"""A live explorer of class activation maps in Jupyter: ``cam.widgets.Explorer``.

    from cam.widgets import Explorer
    Explorer(model, images, class_names=names)   # the last expression of a cell shows it

One image at a time with its map laid over it, and controls for the image, the method (every
registered method), the layer (from :func:`cam.layer_table`, nearest the output first, with a
box that filters the list by name; head-only layers are marked), the selected method's own
settings (built from its :attr:`~cam.Explainer.SETTINGS`: nothing here knows a method by
name), the target (the predicted class, any class, or targets passed in), the threshold and
the overlay's opacity, and a raw-grid view (the map on the layer's grid, before upsampling).
Below: the prediction, how long the map took, and on request small multiples of every method
on the current image.

Maps update on every change. Explainers are kept per (method, layer, settings), and explainers
at one layer share their compiled functions, so a second map at a layer costs the map alone.
A choice expensive enough to keep the kernel busy for long (an estimate above ``ask_above``
seconds, from the method's ``evaluations_per_image`` and ``whole_network`` and the measured
cost of one evaluation) is not run at once: the explorer says what it would cost and waits
for the *Compute* button; long maps show progress.

Needs the ``widgets`` extra (``pip install "cam[widgets]"``: ipywidgets).
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import cv2
import numpy as np

from . import METHODS, maps as M
from ._optional import require

#: Appended to the label of a layer after which the ablation methods rerun only the head.
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


class SettingControl:
    """The control of one :class:`cam.Setting` of a method: a bounded int box, a tick box
    for a bool, a number box for a float, with an *auto* tick box beside it where the
    setting's default is None (ticked: None, which the method reads as "choose for me").
    ``value`` is what the method's constructor gets; ``widget`` is what is shown."""

    def __init__(self, setting, largest: int):
        widgets = require("ipywidgets", "widgets")
        self.setting = setting
        default, kind = setting.default, setting.kind
        label = dict(description=setting.name, tooltip=setting.doc)
        if kind is bool:
            self.input = widgets.Checkbox(bool(default), indent=False, **label)
        elif kind is int:
            low = setting.low if setting.low is not None else 0
            # without a declared high, the constructor checks the value against the layer and
            # the explorer shows its error; the box only stops absurd numbers
            high = setting.high if setting.high is not None else max(int(largest), low)
            self.input = widgets.BoundedIntText(low if default is None else int(default),
                                                min=low, max=high, layout={"width": "220px"},
                                                **label)
        elif kind is float:
            self.input = widgets.FloatText(0.0 if default is None else float(default),
                                           layout={"width": "220px"}, **label)
        elif kind is str:
            self.input = widgets.Text("" if default is None else str(default), **label)
        else:
            raise TypeError(f"setting {setting.name!r} is of kind {kind!r}; the explorer "
                            f"offers int, bool, float and str settings")
        parts = [self.input]
        self.auto = None
        if default is None:
            self.auto = widgets.Checkbox(True, description="auto", indent=False,
                                         tooltip=setting.doc, layout={"width": "70px"})
            self.input.disabled = True
            self.auto.observe(self._auto_changed, names="value")
            parts.append(self.auto)
        parts.append(widgets.HTML(f"<small>{setting.doc}</small>"))
        self.widget = widgets.HBox(parts)
        self.widget.add_class("cam-explorer-setting")

    def _auto_changed(self, change) -> None:
        self.input.disabled = change["new"]

    @property
    def name(self) -> str:
        return self.setting.name

    @property
    def value(self):
        if self.auto is not None and self.auto.value:
            return None
        return self.input.value

    @value.setter
    def value(self, value) -> None:
        if value is None:
            if self.auto is None:
                raise ValueError(f"setting {self.name!r} has no automatic value (None)")
            self.auto.value = True
            return
        self.input.value = value
        if self.auto is not None:
            self.auto.value = False

    def observe(self, callback) -> None:
        """Call ``callback(change)`` when the value changes."""
        self.input.observe(callback, names="value")
        if self.auto is not None:
            self.auto.observe(callback, names="value")


def explainable_rows(table, model_name: str, layer=None) -> tuple[list, str]:
    """The rows of a :func:`cam.layer_table` with a grid, and the layer to start at
    (``layer``, default the last with a grid that runs head-only, else the last with a
    grid), or a clear error."""
    rows = [r for r in table if r["grid"]]
    if not rows:
        raise ValueError(f"model {model_name!r} has no layer with a spatial grid to explain")
    names = [r["layer"] for r in rows]
    head_only = [r["layer"] for r in rows if r["head-only"]]
    start = layer if layer is not None else (head_only or names)[-1]
    if start not in names:
        raise ValueError(f"layer {start!r} is not one cam can explain; choose one of "
                         f"{', '.join(names)}")
    return rows, start


class Costs:
    """What a map is estimated to cost, from what the method declares (its evaluations per
    image and whether each runs the whole model) and the measured cost of one evaluation of
    the head on an earlier map."""

    def __init__(self):
        #: Seconds one evaluation of the head takes, measured on the last perturbation map.
        self.seconds_per_evaluation: float | None = None

    @staticmethod
    def evaluations(explainer) -> int | None:
        """Evaluations the explainer needs per image (1 for a gradient method), or None where
        that depends on the image size and the model does not fix it."""
        try:
            return explainer.evaluations_per_image
        except ValueError:  # a grid that depends on the input size: the cost is not known
            return None

    @staticmethod
    def work_per_evaluation(explainer) -> float:
        """One evaluation's work against one of the head after the layer, by the bytes a row
        writes: 1 for the head, the whole network's share for a ``whole_network`` method."""
        if not explainer.whole_network:
            return 1.0
        split = explainer.split
        return max(1.0, split.bytes_per_row("full", backward=True)
                   / max(1, split.bytes_per_row("head", backward=True)))

    def estimate(self, explainer) -> float | None:
        """Seconds the explainer's map is estimated to take (None before the first map that
        needed more than one evaluation)."""
        evaluations = self.evaluations(explainer)
        if self.seconds_per_evaluation is None or evaluations is None:
            return None
        return evaluations * self.work_per_evaluation(explainer) * self.seconds_per_evaluation

    def measured(self, explainer, seconds: float) -> None:
        """Keep the cost of one evaluation of the head from a map of many evaluations."""
        evaluations = self.evaluations(explainer)
        if evaluations is not None and evaluations > 1:
            self.seconds_per_evaluation = seconds / (evaluations
                                                     * self.work_per_evaluation(explainer))


class Explorer:
    """Interactive maps of ``model`` on ``images`` (B, H, W, C, preprocessed as the model
    expects). ``class_names``: one name per class; ``targets``: extra named targets
    ({name: a cam.targets target or callable}) offered beside the classes; ``layer``: the
    layer to start at (default: the last with a grid); ``method``: the method to start with
    (default: the first in ``cam.METHODS``); ``ask_above``: seconds above which an
    estimated map waits for *Compute*; ``size``: the displayed image's longer side in pixels.

    Every method in ``cam.METHODS`` when the explorer is built is offered, each with controls
    for its :attr:`~cam.Explainer.SETTINGS` (``explorer.settings[key][name].value``), shown
    while it is the selected method.
    """

    def __init__(self, model, images, class_names: Sequence[str] | None = None,
                 targets: Mapping | None = None, layer=None, method: str | None = None,
                 ask_above: float = 5.0, size: int = 320):
        widgets = require("ipywidgets", "widgets")
        from . import layer_table, method_class, method_key

        self.model = model
        self.images = np.asarray(images, np.float32)
        if self.images.ndim != 4 or not len(self.images):
            raise ValueError(f"images must be a non-empty (B, H, W, C) batch, got shape "
                             f"{self.images.shape}")
        self.class_names = list(class_names) if class_names is not None else None
        self.extra_targets = dict(targets or {})
        self.ask_above, self.size = float(ask_above), int(size)
        self.table = layer_table(model)
        rows, start = explainable_rows(self.table, model.name, layer)
        # nearest the output first: the last feature map is the usual choice
        self.layer_options = [(r["layer"] + (HEAD_ONLY_MARK if r["head-only"] else ""),
                               r["layer"]) for r in reversed(rows)]
        self._explainers: dict = {}
        self.costs = Costs()
        self.last: dict = {}
        self.methods = {key: method_class(key) for key in METHODS}

        self.image = widgets.IntSlider(0, 0, len(self.images) - 1, description="image")
        self.method = widgets.Dropdown(
            options=[(cls.name, key) for key, cls in self.methods.items()],
            value=method_key(method) if method else next(iter(self.methods)),
            description="method")
        self.layer_filter = widgets.Text(
            "", placeholder="part of a layer name, then Enter", description="find layer",
            continuous_update=False)
        self.layer_filter.add_class("cam-explorer-layer-filter")
        self.layer = widgets.Dropdown(options=self.layer_options, value=start,
                                      description="layer")
        self.layer_count = widgets.HTML(f"<small>{len(rows)} layers, nearest the output "
                                        f"first</small>")
        # the largest number an int setting could sensibly take: an image side or a channel
        # count (the constructor checks the real bound at the layer)
        largest = max([*self.images.shape[1:3],
                       *(r["output shape"][-1] or 1 for r in rows)])
        #: {method key: {setting name: SettingControl}}, from each method's SETTINGS.
        self.settings = {key: {s.name: SettingControl(s, largest) for s in cls.SETTINGS}
                         for key, cls in self.methods.items()}
        self.settings_box = widgets.VBox()
        self.settings_box.add_class("cam-explorer-settings")
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
        self._wire()
        self._show_settings()
        self.update()

    def _wire(self) -> None:
        """Connect the controls to their handlers and lay the widget out."""
        widgets = require("ipywidgets", "widgets")
        for control in (self.image, self.method, self.layer, self.target, self.threshold,
                        self.alpha, self.raw_grid):
            control.observe(self._changed, names="value")
        for controls in self.settings.values():
            for control in controls.values():
                control.observe(self._changed)
        self.layer_filter.observe(self._filter_layers, names="value")
        self.compute.on_click(lambda _: self.update(force=True))
        self.all_methods.on_click(lambda _: self.show_all_methods())
        controls = widgets.VBox([self.image, self.method, self.settings_box, self.layer_filter,
                                 self.layer, self.layer_count, self.target, self.threshold,
                                 self.alpha, self.raw_grid, self.compute, self.all_methods])
        self.widget = widgets.VBox([
            widgets.HBox([controls, widgets.VBox([self.picture, self.info])]),
            self.progress, self.multiples])
        self.widget.add_class("cam-explorer")

    # -- pieces --------------------------------------------------------------------------

    def _target_options(self) -> list:
        names = self.class_names
        classes = self.model.output_shape
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

    def _show_settings(self) -> None:
        """Show the selected method's settings and no other method's."""
        shown = [control.widget for control in self.settings[self.method.value].values()]
        if list(self.settings_box.children) != shown:
            self.settings_box.children = shown

    def _filter_layers(self, change) -> None:
        """Offer the layers whose name contains the filter's text (the current layer stays
        selected if it matches; otherwise the first match, nearest the output, is)."""
        text = change["new"].strip().lower()
        matches = [option for option in self.layer_options if text in option[1].lower()]
        total = len(self.layer_options)
        if not matches:
            self.layer_count.value = f"<small>no layer name contains {text!r}</small>"
            return
        self.layer_count.value = (f"<small>{len(matches)} of {total} layers match</small>"
                                  if text else f"<small>{total} layers, nearest the output "
                                               f"first</small>")
        self.layer.options = matches  # keeps the value if it is among them

    def setting_values(self, key: str | None = None) -> dict:
        """The values of a method's settings (the current method's by default) in the
        controls: what its constructor gets."""
        return {name: control.value
                for name, control in self.settings[key or self.method.value].items()}

    def explainer(self, key: str | None = None, layer: str | None = None):
        """The explainer for a method and layer (the current ones by default) with the
        settings in its controls, built once and kept."""
        key, layer = key or self.method.value, layer or self.layer.value
        options = self.setting_values(key)
        cache = (key, layer, tuple(sorted(options.items())))
        if cache not in self._explainers:
            self._explainers[cache] = self.methods[key](self.model, layer=layer, **options)
        return self._explainers[cache]

    evaluations = staticmethod(Costs.evaluations)
    work_per_evaluation = staticmethod(Costs.work_per_evaluation)

    def estimate_seconds(self, explainer) -> float | None:
        """Seconds the explainer's map is estimated to take (:meth:`Costs.estimate`)."""
        return self.costs.estimate(explainer)

    # -- updating ------------------------------------------------------------------------

    def _changed(self, change) -> None:
        self._show_settings()
        self.update()

    def update(self, force: bool = False) -> None:
        """Compute the current map and show it, or, when its estimate is above ``ask_above``
        seconds, say so and wait for *Compute*."""
        self.compute.layout.display = "none"
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
        index = self.image.value
        start = time.perf_counter()
        with self.progress:
            result = explainer.explain(self.images[index:index + 1], self._target(),
                                       upsample=not self.raw_grid.value,
                                       threshold=self.threshold.value)
        seconds = time.perf_counter() - start
        self.costs.measured(explainer, seconds)
        self.picture.value = overlay_png(self.images[index], result.maps[0], self.alpha.value,
                                         self.threshold.value, self.size)
        self.last = {"method": explainer.name, "layer": explainer.layer, "seconds": seconds,
                     "map": result.maps[0], "raw": result.raw[0], "image": index,
                     "target": result.target, "settings": explainer.settings}
        self.info.value = self._describe(result, explainer, seconds)

    def _describe(self, result, explainer, seconds: float) -> str:
        name = self._class_name
        settings = "".join(f", {k}={'auto' if v is None else v}"
                           for k, v in explainer.settings.items())
        lines = [f"<b>{explainer.name}</b> at <code>{explainer.layer}</code> "
                 f"({'x'.join(str(d) for d in explainer.split.target_shape)}{settings}), "
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
        """Small multiples: every method, with the settings in its controls, at the current
        layer on the current image (a method whose estimate exceeds ``skip_above`` seconds,
        default ``ask_above``, or whose settings do not fit the layer, is left out and says
        so). Returns {method: map}."""
        widgets = require("ipywidgets", "widgets")
        skip_above = self.ask_above if skip_above is None else skip_above
        index, tiles, out = self.image.value, [], {}
        for key, cls in self.methods.items():
            try:
                explainer = self.explainer(key)
            except ValueError as error:
                tiles.append(widgets.HTML(f"{cls.name}: left out ({error})"))
                continue
            estimate = self.estimate_seconds(explainer)
            if estimate is not None and estimate > skip_above:
                tiles.append(widgets.HTML(f"{explainer.name}: about {estimate:.0f} s, left out"))
                continue
            start = time.perf_counter()
            with self.progress:
                result = explainer.explain(self.images[index:index + 1], self._target(),
                                           threshold=self.threshold.value)
            self.costs.measured(explainer, time.perf_counter() - start)
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
