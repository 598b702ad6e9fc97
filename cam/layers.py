"""Which layers a CAM can explain: :func:`candidate_layers` and :func:`layer_table`."""

from __future__ import annotations

import keras

from .graph import LayerGraph, Split
from .intercept import NOTE, call_only_candidates
from .keras_internals import functional_graph
from .tokens import TokenGrid


def candidate_layers(model: keras.Model) -> list[tuple[str, tuple]]:
    """``[(name, output_shape), ...]`` of the layers a CAM can target, in graph order.

    A candidate has one 4-D output (batch, h, w, channels) with h, w > 1 (or unknown), or one
    token output (batch, tokens, channels) whose tokens are a square grid, after a class token
    if there is one. Layers inside nested models are included; their name is qualified
    (``outer/inner``) only when the plain name is not unique. The list index is what
    ``layer=<int>`` means; :func:`layer_table` prints it as a table.

    For a model without a functional graph (a subclassed model) these are the layers its
    ``call`` reaches, named by attribute path (``"encoder/blocks/3"``, :mod:`cam.intercept`),
    in the order their calls return.
    """
    if functional_graph(model) is None:
        return call_only_candidates(model)
    return LayerGraph.from_model(model).candidates()


class LayerTable(list):
    """The rows of :func:`layer_table`: a list of dicts with the keys in :attr:`columns`.

    ``str(table)`` is an aligned plain-text table (what ``cam layers`` prints), the candidate
    index as an unlabeled left column; :meth:`to_frame` is the same as a pandas DataFrame
    (pandas is imported only there: the library does not need it).
    """

    #: The keys of every row, in column order ("index" is the ``layer=<int>`` to pass).
    columns = ("index", "layer", "output shape", "grid", "head-only", "head layers", "note")

    def to_frame(self):
        """The table as a pandas DataFrame indexed by the candidate index (named "index")."""
        import pandas as pd

        data = [{k: row[k] for k in self.columns[1:]} for row in self]
        return pd.DataFrame(data, columns=list(self.columns[1:]),
                            index=pd.Index([row["index"] for row in self], name="index"))

    def __str__(self) -> str:
        # Numbers and flags right-aligned, text left-aligned, two spaces between columns.
        names = self.columns[1:]
        cells = [["" if row["index"] is None else str(row["index"])]
                 + [str(row[k]) for k in names] for row in self]
        header = [""] + list(names)
        widths = [max(len(r[i]) for r in [header] + cells) for i in range(len(header))]
        right = [True] + [k in ("head-only", "head layers") for k in names]

        def line(values):
            return "  ".join(v.rjust(w) if r else v.ljust(w)
                             for v, w, r in zip(values, widths, right)).rstrip()

        return "\n".join([line(header)] + [line(c) for c in cells])

    def __repr__(self) -> str:
        return self.__str__()


def _grid(target_shape: tuple, tokens) -> str:
    h, w = target_shape[:2]
    return f"{h}x{w}" + (f" +{tokens.prefix + tokens.suffix} token"
                         if tokens and tokens.carried else "")


def _call_only_grid(shape: tuple) -> str:
    """The grid of a call-only candidate's output (a grid, or square tokens)."""
    if len(shape) == 4:
        return _grid(shape[1:], None)
    tokens = TokenGrid.infer(shape[1])
    return _grid((tokens.height, tokens.width), tokens)


def layer_table(model: keras.Model, score: str = "logit") -> LayerTable:
    """The candidate layers as a table: which ``layer=`` to pass, and what it costs.

    Returns a :class:`LayerTable`, one row dict per candidate (``print`` it for an aligned
    table, ``.to_frame()`` for a pandas DataFrame indexed by the candidate index): the
    ``index`` (``layer=<int>``), the ``layer`` name, ``output shape``, the ``grid`` the map is
    on (``8x8``; ``8x8 +1 token`` for a class token carried past the cut), ``head-only``
    (True when the model splits at the layer so the ablation methods rerun only the head;
    False with the reason in ``note`` otherwise) and ``head layers`` (how many layer calls
    each ablation reruns, out of the model's total).

    Layers only a ``call`` reaches (a subclassed model's, or those inside a custom layer of a
    functional model) are listed too, by attribute path, with ``head-only`` False and the
    note "intercepted: whole model per evaluation" (:mod:`cam.intercept`). In a functional
    model they come after the graph's layers, with no index: pass their name.
    """
    rows = LayerTable()
    graph = LayerGraph.from_model(model) if functional_graph(model) is not None else None
    for index, (name, shape) in enumerate(graph.candidates() if graph else ()):
        row = {"index": index, "layer": name, "output shape": shape, "grid": "",
               "head-only": False, "head layers": "", "note": ""}
        try:
            split = Split(model, name, score, graph=graph)
        except ValueError as err:
            row["note"] = str(err).split(";")[0]
        else:
            row["grid"] = _grid(split.target_shape, split.tokens)
            row["head-only"] = True
            row["head layers"] = f"{len(split.head_calls)}/{len(graph.calls)}"
        rows.append(row)
    for index, (name, shape) in enumerate(call_only_candidates(model)):
        rows.append({"index": None if graph else index, "layer": name, "output shape": shape,
                     "grid": _call_only_grid(shape), "head-only": False, "head layers": "",
                     "note": NOTE})
    return rows
