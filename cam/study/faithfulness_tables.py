"""The tables of notebook 05 (:mod:`cam.study.faithfulness`): :func:`cost_table` (what each
method costs), :func:`mean_ci_rows` and :func:`metric_table` (per-image values to means with
bootstrap intervals, :data:`BETTER` saying which way each metric is better),
:func:`summary_table` (one "mean [low, high]" cell per metric and method), :func:`road_table`
and :func:`road_summary` (ROAD per method), :func:`sanity_summary` (the randomisation check
per stage)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from .. import metrics, road


def cost_table(cost_ms: Mapping, explainers: Mapping, timed_images: Mapping,
               whole_network=()) -> pd.DataFrame:
    """What each method of ``cost_ms`` (``{method: milliseconds per image}``) costs, one row
    per method in that order: ``evaluations/image`` (its explainer's ``evaluations_per_image``,
    1 where it has none), ``runs`` (``"whole network"`` for the methods in ``whole_network``,
    else ``"head (trunk once)"``), ``timed images`` (from ``timed_images``) and ``ms/image``."""
    methods = list(cost_ms)
    return pd.DataFrame({
        "evaluations/image": [getattr(explainers[n], "evaluations_per_image", 1) for n in methods],
        "runs": ["whole network" if n in whole_network else "head (trunk once)" for n in methods],
        "timed images": [timed_images[n] for n in methods],
        "ms/image": [cost_ms[n] for n in methods]}, index=methods).rename_axis("method")


def mean_ci_rows(values: Mapping, confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> pd.DataFrame:
    """``{name: per-image values}`` -> one row per name: mean, bootstrap interval
    (:func:`cam.metrics.bootstrap_ci`), images (finite values) and NaN count."""
    rows = []
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        mean, low, high = metrics.bootstrap_ci(v, confidence, resamples, seed)
        rows.append({"name": name, "mean": mean, f"{confidence:.0%} CI low": low,
                     f"{confidence:.0%} CI high": high, "images": int(np.isfinite(v).sum()),
                     "NaN": int(np.isnan(v).sum())})
    return pd.DataFrame(rows).set_index("name")


#: Which way each metric of notebook 05 is better, in the order of its tables.
BETTER = {"Average Drop %": "lower", "Increase in Confidence %": "higher", "deletion AUC": "lower",
          "insertion AUC": "higher", "pointing game %": "higher", "energy in mask": "higher",
          "ROAD MoRF AUC": "lower", "ROAD LeRF AUC": "higher", "ROAD LeRF - MoRF": "higher"}


def metric_table(per_image: Mapping, better: Mapping, confidence: float = 0.95,
                 resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """``{method: {metric: per-image values}}`` -> one row per (metric, method), methods in
    their order and each method's metrics in theirs: ``better`` (``better[metric]``, e.g.
    ``"lower"``), then :func:`mean_ci_rows`' mean, bootstrap interval, images and NaN count."""
    parts = []
    for method, values in per_image.items():
        rows = mean_ci_rows(values, confidence, resamples, seed).rename_axis("metric")
        parts.append(rows.assign(method=method, better=[better[m] for m in rows.index]))
    table = pd.concat(parts).set_index("method", append=True)
    return table[["better", *table.columns.drop("better")]]


def summary_table(table: pd.DataFrame, better: Mapping, methods, images: int,
                  confidence: float = 0.95) -> pd.DataFrame:
    """:func:`metric_table` as one cell per metric (rows, in the order of ``better``, labelled
    ``"<metric> (<better> is better)"``) and method (columns, in the order of ``methods``):
    ``"mean [low, high]"`` to 3 significant digits, with ``" n=<images>"`` where the cell used
    other than ``images`` images, and ``"not run"`` where the method has no such metric."""
    low, high = f"{confidence:.0%} CI low", f"{confidence:.0%} CI high"
    cells = [f"{r['mean'] + 0.0:.3g} [{r[low] + 0.0:.3g}, {r[high] + 0.0:.3g}]"  # + 0.0: no "-0"
             + (f" n={r['images']}" if r["images"] != images else "")
             for _, r in table.iterrows()]
    wide = (table.assign(cell=cells)["cell"].unstack("method")
            .reindex(index=list(better), columns=list(methods), fill_value="not run")
            .fillna("not run"))
    wide.index = [f"{m} ({better[m]} is better)" for m in wide.index]
    return wide


#: The three ROAD numbers per image, as :func:`cam.road.road` names them, and how the tables
#: call them.
ROAD_SCORES = {"morf_auc": "MoRF AUC", "lerf_auc": "LeRF AUC", "lerf_minus_morf": "LeRF - MoRF"}


def road_table(results: Mapping, cost_ms: Mapping | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per method from ``{method: cam.road.road(...)}``: images, the mean of each
    of :data:`ROAD_SCORES` with its 95% bootstrap interval, the mean curve at every fraction
    (MoRF and LeRF), and ``ms/image`` from ``cost_ms`` where given."""
    rows = []
    for method, r in results.items():
        row = {"method": method, "images": len(r["targets"])}
        if cost_ms is not None:
            row["ms/image"] = cost_ms.get(method, np.nan)
        for key, label in ROAD_SCORES.items():
            mean, low, high = metrics.bootstrap_ci(r[key], 0.95, 2000, seed)
            row.update({label: mean, f"{label} CI low": low, f"{label} CI high": high})
        for order, label in zip(road.ROAD_ORDERS, ("MoRF", "LeRF")):
            for f, value in zip(r["fractions"], r[order][:, 1:].mean(axis=0)):
                row[f"{label} {f:.0%}"] = value
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def road_summary(results: Mapping, cost: pd.DataFrame, paired_images: int,
                 seed: int = 0) -> pd.DataFrame:
    """:func:`road_table` with what each method costs from ``cost`` (:func:`cost_table`):
    ``evaluations/image`` after ``images``, and ``ms/image``; NaN for a method ``cost`` lacks
    (random maps). Last, ``"LeRF - MoRF, first <paired_images> images"``: every method's mean
    gap on the first ``paired_images`` images only, so that methods scored on fewer images
    (the costly ones) compare with the others on the same images."""
    table = road_table(results, cost["ms/image"], seed)
    table.insert(1, "evaluations/image", cost["evaluations/image"])
    table[f"LeRF - MoRF, first {paired_images} images"] = [
        r["lerf_minus_morf"][:paired_images].mean() for r in results.values()]
    return table


def sanity_summary(sanity: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`cam.sanity.randomisation_check` (as a DataFrame), one row per stage
    (``stage``, ``reinitialised``, ``layers``) and, per method, the ``mean``, ``std`` and
    ``count`` of the Spearman correlations over the images (NaNs, constant maps, not counted)."""
    return (sanity.groupby(["stage", "reinitialised", "layers", "method"], sort=True)["spearman"]
            .agg(["mean", "std", "count"]).unstack("method"))
