"""The one batching policy and what one explain call costs, counted: compiled calls, rows per
call, copies to the host. These counts pin the design that makes a GPU pay (few large calls,
nothing leaving the device until the end) on the CPU, on every backend."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

import cam
from cam import backend as B
from cam import batching
from conftest import build_dense_concat_model, build_tiny_sequential, random_images

N = 32  # images per explain call, as in the example


def test_parse_bytes():
    assert batching.parse_bytes("512M") == 512 * 2**20
    assert batching.parse_bytes("2G") == 2 * 2**30
    assert batching.parse_bytes("1.5k") == 1536
    assert batching.parse_bytes("1000") == 1000
    for bad in ("", "-1G", "lots", "0", "2T"):
        with pytest.raises(ValueError, match="CAM_MEMORY_BUDGET must be a positive number"):
            batching.parse_bytes(bad)


def test_rows_per_call_divides_the_budget_and_is_bounded():
    assert batching.rows_per_call(1000, budget=64_000) == 64
    assert batching.rows_per_call(1000, budget=64_999) == 64
    assert batching.rows_per_call(10**9, budget=1) == 1  # at least one row
    assert batching.rows_per_call(1, budget=2**40) == batching.MAX_ROWS


@pytest.mark.parametrize("total, most, expected", [
    (100, 100, (1, 100)), (100, 1000, (1, 100)), (101, 100, (2, 51)),
    (32 * 1664, 790, (68, 784)), (7, 1, (7, 1)), (1, 5, (1, 1))])
def test_plan_uses_the_fewest_calls_and_spreads_the_rows(total, most, expected):
    calls, rows = batching.plan(total, most)
    assert (calls, rows) == expected
    assert rows <= most and calls * rows >= total and (calls - 1) * rows < total


def test_the_budget_comes_from_the_environment_then_the_device(monkeypatch):
    monkeypatch.setenv("CAM_MEMORY_BUDGET", "3M")
    assert batching.memory_budget() == 3 * 2**20
    monkeypatch.delenv("CAM_MEMORY_BUDGET")
    monkeypatch.setattr(B, "accelerator_free_bytes", lambda: 10 * 2**30)
    assert batching.memory_budget() == int(10 * 2**30 * batching.ACCELERATOR_SHARE)
    monkeypatch.setattr(B, "accelerator_free_bytes", lambda: None)
    assert batching.memory_budget() == batching.CPU_BUDGET
    assert B.accelerator_free_bytes.__module__  # the real one: None on this CPU machine


def test_bytes_per_row_by_hand():
    """tiny_sequential at relu2 (5x5x6): through the head a row holds its ablated relu2
    (150) and at most the largest call's input and output, GAP's 150 + 6; a backward pass
    keeps GAP's 6 and Dense's 3 besides relu2. The trunk writes conv1, relu1 (10x10x4 each),
    pool1 (5x5x4), conv2 and relu2 (5x5x6 each): 1200 in all, kept for a backward pass; a
    forward pass holds at most its largest call's input and output, relu1's 400 + 400."""
    model = build_tiny_sequential()
    split = cam.GradCAM(model, "relu2").split
    assert split.bytes_per_row("head") == 4 * (150 + 150 + 6)
    assert split.bytes_per_row("head", backward=True) == 4 * (150 + 6 + 3)
    assert split.bytes_per_row("trunk") == split.bytes_per_row("full") == 4 * (400 + 400)
    assert split.bytes_per_row("trunk", backward=True) == 4 * (400 + 400 + 100 + 150 + 150)
    assert split.bytes_per_row("full", backward=True) == 4 * (1200 + 6 + 3)
    # a head-only function reads (and on JAX is passed) the Dense kernel and bias only
    assert [id(v) for v in split.variables("head")] == \
        [id(v) for v in model.get_layer("logits").variables]
    assert len(split.variables("trunk")) == 4 and len(split.variables("full")) == 6
    with pytest.raises(ValueError, match="part must be one of trunk, head, full"):
        split.bytes_per_row("middle")


def test_the_default_batch_follows_the_memory_budget(monkeypatch):
    model = build_dense_concat_model()
    probe = cam.AblationCAM(model, "relu1")
    head, full = probe.split.bytes_per_row("head"), probe.split.bytes_per_row("full")
    monkeypatch.setenv("CAM_MEMORY_BUDGET", str(50 * head))
    assert cam.AblationCAM(model, "relu1").batch_size == 50
    assert cam.FastAblationCAM(model, "relu1").batch_size == 50
    assert cam.AblationCAM(model, "relu1", mode="full").batch_size == 50 * head // full
    assert cam.Occlusion(model, "relu1").batch_size == max(1, 50 * head // full)
    assert cam.AblationCAM(model, "relu1", batch_size=7).batch_size == 7  # explicit wins
    monkeypatch.setenv("CAM_MEMORY_BUDGET", "1")
    assert cam.AblationCAM(model, "relu1").batch_size == 1


class Counter:
    """Counts the copies to the host that cam makes (every one goes through cam.backend.numpy)."""

    def __init__(self, monkeypatch):
        self.copies = 0
        real = B.numpy

        def counting(value):
            self.copies += 1
            return real(value)

        monkeypatch.setattr(B, "numpy", counting)


def _no_implicit_transfers():
    """On JAX, a guard that fails any implicit device-to-host transfer (np.asarray of a device
    array, float(x), a Python branch on a tensor): cam's one copy is explicit. It bites on
    an accelerator only (on the CPU a JAX array already lives in host memory); here the
    copy counter is what checks."""
    if keras.backend.backend() != "jax":
        import contextlib
        return contextlib.nullcontext()
    import jax
    return jax.transfer_guard_device_to_host("disallow")


@pytest.mark.parametrize("method, kwargs, path", [
    ("AblationCAM", {}, "head"),
    ("FastAblationCAM", {"window": 2, "stride": 1}, "head"),
    ("ReciproCAM", {"gaussian": True}, "head"),
    ("AblationCAM", {"mode": "full"}, "full"),
    ("Occlusion", {"window": 4, "stride": 3}, "input"),
    ("ScoreCAM", {}, "input"),
])
def test_one_explain_of_32_images_makes_few_calls_and_one_host_copy(method, kwargs, path,
                                                                    monkeypatch):
    """Ablation-CAM at a layer of C channels makes ceil(32 C / batch) scoring calls and one
    host copy; every perturbation method likewise: all (image, mask) rows in equal calls."""
    model = build_dense_concat_model()
    batch = 20
    explainer = getattr(cam, method)(model, "relu1", batch_size=batch, **kwargs)
    images = random_images((10, 10, 3), N, seed=4)
    explainer(images[:2])  # compile first: tracing may copy shapes, never data
    counter = Counter(monkeypatch)
    assert explainer.path == path
    function = explainer.scorer
    before = function.calls
    with _no_implicit_transfers():
        result = explainer.explain(images)
    per_image = explainer.evaluations_per_image
    assert function.calls - before == math.ceil(N * per_image / batch)
    assert counter.copies == 1
    assert result.raw.shape[0] == N and result.scores.shape == (N, 3)
    if kwargs.get("mode") != "full" and method not in ("Occlusion", "ScoreCAM"):
        oracle = getattr(cam, method)(model, "relu1", mode="full", **kwargs).explain(images)
        np.testing.assert_allclose(result.raw, oracle.raw, rtol=1e-4,
                                   atol=1e-4 * np.abs(oracle.raw).max())


def test_gradient_methods_make_one_call_per_budgeted_chunk_and_one_host_copy(monkeypatch):
    model = build_dense_concat_model()
    explainer = cam.GradCAMPlusPlus(model, "relu1")
    images = random_images((10, 10, 3), N, seed=5)
    explainer(images)
    counter = Counter(monkeypatch)
    before, trunk = explainer._gradients.calls, explainer._trunk.calls
    with _no_implicit_transfers():
        explainer.explain(images)
    assert counter.copies == 1
    assert explainer._gradients.calls - before == 1  # 32 small images fit one call
    assert explainer._trunk.calls - trunk == 1
    # a budget of 5 rows of the backward pass: ceil(32 / 5) calls
    monkeypatch.setenv("CAM_MEMORY_BUDGET",
                       str(5 * explainer.split.bytes_per_row("head", backward=True)))
    before = explainer._gradients.calls
    explainer.explain(images)
    assert explainer._gradients.calls - before == math.ceil(N / 5)


def test_masks_are_made_once_per_grid_and_kept_on_the_device(monkeypatch):
    model = build_tiny_sequential()
    explainer = cam.FastAblationCAM(model, "relu2", window=2)
    made = []
    real = type(explainer).masks

    def counting(self, grid):
        made.append(grid)
        return real(self, grid)

    monkeypatch.setattr(type(explainer), "masks", counting)
    images = random_images((10, 10, 3), 3)
    for _ in range(3):
        explainer(images)
    assert len(made) == 1


def test_a_pooled_head_scores_channel_and_cell_masks_in_closed_form():
    """After global average pooling an ablation moves the pooled value p by the grid mean of
    (v - A) m (for a channel mask, (v - p) m); the rest of the head (here Dropout and a Dense
    softmax, scored as logit and as probability) runs on the moved vectors, equal to
    rerunning the whole network."""
    from cam import pooled

    model = build_dense_concat_model()  # relu2 -> GAP -> Dropout -> Dense(softmax)
    found = pooled.find(cam.AblationCAM(model, "relu2").split)
    assert isinstance(found.pool.operation, keras.layers.GlobalAveragePooling2D)
    assert pooled.find(cam.AblationCAM(model, "relu1").split) is None  # a convolution after
    images = random_images((10, 10, 3), 4, seed=6)
    # channel masks (Ablation-CAM), cell masks (FastAblationCAM) and float cell masks
    # (ReciproCAM's Gaussian), each with two ablation values
    for method, options in ((cam.AblationCAM, {}), (cam.FastAblationCAM, {"window": 2}),
                            (cam.ReciproCAM, {"gaussian": True})):
        for value, score in ((0.0, "logit"), (1.5, "logit"), (0.5, "probability")):
            explainer = method(model, "relu2", ablation_value=value, score=score, **options)
            assert explainer.path == "pooled"
            head = explainer.explain(images)
            full = method(model, "relu2", ablation_value=value, mode="full", score=score,
                          **options).explain(images)
            np.testing.assert_allclose(head.raw, full.raw, rtol=1e-4,
                                       atol=1e-4 * np.abs(full.raw).max())


@pytest.mark.parametrize("method, kwargs", [("Occlusion", {"window": 4}), ("ScoreCAM", {}),
                                            ("FastAblationCAM", {"window": 2}),
                                            ("AblationCAM", {"mode": "full"})])
def test_every_call_of_a_large_explain_stays_inside_the_budget(method, kwargs, monkeypatch):
    """A budget of 5 trunk rows: the trunk pass takes 5 images a call, whatever the method
    (Occlusion once put every image in one trunk call), and each scoring call fits too."""
    model = build_dense_concat_model()
    budget = 5 * getattr(cam, method)(model, "relu1", **kwargs).split.bytes_per_row("trunk")
    monkeypatch.setenv("CAM_MEMORY_BUDGET", str(budget))
    explainer = getattr(cam, method)(model, "relu1", **kwargs)
    assert explainer.batch_size * explainer.bytes_per_row() <= budget
    images = random_images((10, 10, 3), N, seed=7)
    trunk, scorer = explainer._trunk.calls, explainer.scorer.calls
    explainer(images)
    assert explainer._trunk.calls - trunk == math.ceil(N / 5)
    rows = N * explainer.evaluations_per_image
    assert explainer.scorer.calls - scorer == math.ceil(rows / explainer.batch_size)
