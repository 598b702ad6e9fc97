"""cam.study.shift against values worked out by hand on tiny arrays and tiny conv models."""

import keras
import numpy as np
import pytest

from cam.study import shift

pytestmark = pytest.mark.study  # the study's tests: `make test-backends` runs -m "not study"


def blob(size, row, col, sigma=2.0):
    y, x = np.mgrid[:size, :size]
    return np.exp(-((y - row) ** 2 + (x - col) ** 2) / (2 * sigma ** 2))


# -- centroids ------------------------------------------------------------------------------

def test_centroid_by_hand():
    m = np.zeros((2, 3, 3))
    m[0, 0, 2] = 1.0
    m[1, 0, 0], m[1, 0, 2] = 1.0, 3.0  # (0*1 + 2*3) / 4 = 1.5 along columns
    np.testing.assert_allclose(shift.centroid(m), [[0, 2], [0, 1.5]])


def test_centroid_of_zero_map_is_nan_and_negatives_are_clipped():
    m = np.zeros((2, 2, 2))
    m[1, 1, 1], m[1, 0, 0] = 2.0, -5.0  # the -5 must not pull the centroid to (0, 0)
    out = shift.centroid(m)
    assert np.isnan(out[0]).all()
    np.testing.assert_allclose(out[1], [1, 1])


def test_centroid_offset_is_b_minus_a():
    a = np.zeros((1, 4, 4))
    b = np.zeros((1, 4, 4))
    a[0, 1, 1], b[0, 2, 3] = 1, 1
    np.testing.assert_allclose(shift.centroid_offset(a, b), [[1, 2]])
    with pytest.raises(ValueError, match="one shape"):
        shift.centroid_offset(a, np.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        shift.centroid(np.zeros((4, 4)))


# -- cross-correlation shift -------------------------------------------------------------------

def test_correlation_shift_integer():
    a = blob(32, 12, 14)[None]
    b = blob(32, 14, 11)[None]  # b is a moved 2 down and 3 left
    np.testing.assert_allclose(shift.correlation_shift(a, b, subpixel=False), [[2, -3]])
    np.testing.assert_allclose(shift.correlation_shift(b, a, subpixel=False), [[-2, 3]])


def test_correlation_shift_subpixel_and_constant():
    a = np.stack([blob(32, 16, 16), np.ones((32, 32))])
    b = np.stack([blob(32, 16, 16.5), blob(32, 3, 3)])
    out = shift.correlation_shift(a, b)
    np.testing.assert_allclose(out[0], [0, 0.5], atol=0.05)
    assert np.isnan(out[1]).all()  # a constant map has no position


def test_correlation_shift_max_shift_bounds_the_search():
    a = blob(32, 8, 8)[None]
    b = blob(32, 8, 20)[None]  # 12 to the right, beyond max_shift=4
    out = shift.correlation_shift(a, b, max_shift=4, subpixel=False)
    assert np.abs(out).max() <= 4
    with pytest.raises(ValueError, match="max_shift"):
        shift.correlation_shift(a, b, max_shift=-1)


# -- upsampling conventions --------------------------------------------------------------------

def test_cell_positions_by_hand():
    # 2 cells on 8 pixels: half-pixel centres at 1.5 and 5.5, corners at 0 and 7
    np.testing.assert_allclose(shift.cell_positions(2, 8), [1.5, 5.5])
    np.testing.assert_allclose(shift.cell_positions(2, 8, "align-corners"), [0, 7])
    with pytest.raises(ValueError, match="method must be one of"):
        shift.cell_positions(2, 8, "cubic")


def test_upsample_conventions_place_cells_where_cell_positions_says():
    grid = np.array([[[0.0, 1.0]]]).repeat(2, axis=1)  # (1, 2, 2): right column hot
    for method, expected in (("half-pixel", [0, 0, 0.125, 0.375, 0.625, 0.875, 1, 1]),
                             ("align-corners", np.arange(8) / 7),
                             ("nearest", [0, 0, 0, 0, 1, 1, 1, 1])):
        row = shift.upsample(grid, (8, 8), method)[0, 0]
        np.testing.assert_allclose(row, expected, atol=1e-6, err_msg=method)
    with pytest.raises(ValueError, match="method must be one of"):
        shift.upsample(grid, (8, 8), "area")


# -- receptive fields ---------------------------------------------------------------------------

def tiny_model():
    x = keras.Input((8, 8, 1), name="image")
    y = keras.layers.ZeroPadding2D(1, name="pad")(x)
    y = keras.layers.Conv2D(2, 3, strides=2, name="conv")(y)  # 4x4, valid
    a = keras.layers.Conv2D(2, 3, padding="same", name="same")(y)
    y = keras.layers.Concatenate(name="concat")([y, a])
    y = keras.layers.AveragePooling2D(2, name="pool")(y)  # 2x2
    y = keras.layers.Conv2D(2, 3, strides=2, padding="same", name="strided_same")(y)  # 1x1
    y = keras.layers.GlobalAveragePooling2D()(y)
    return keras.Model(x, keras.layers.Dense(2)(y))


def test_receptive_field_by_hand():
    model = tiny_model()
    # pad 1 then 3x3 stride 2: cell 0 centred on input pixel -1 + 1 = 0, cells 2 apart.
    rf = shift.receptive_field(model, "conv")
    np.testing.assert_allclose(rf.centres[0], [0, 2, 4, 6])
    assert rf.jump == (2, 2) and rf.size == (3, 3)
    # a 'same' 3x3 at stride 1 pads one cell on each side: centres unchanged, size 3 + 2*2.
    assert shift.receptive_field(model, "same").size == (7, 7)
    # 2x2 average of conv cells (0, 2) and (4, 6): centres 1 and 5, 4 apart.
    rf = shift.receptive_field(model, "pool")
    np.testing.assert_allclose(rf.centres[1], [1, 5])
    assert rf.jump == (4, 4) and rf.size == (9, 9)


def test_receptive_field_same_padding_at_stride_2_pads_after():
    x = keras.Input((8, 8, 1))
    y = keras.layers.Conv2D(1, 3, strides=2, padding="same", name="c")(x)  # 4x4
    y = keras.layers.Conv2D(1, 3, padding="same", name="d")(y)
    model = keras.Model(x, keras.layers.Dense(2)(keras.layers.Flatten()(y)))
    # total padding (4 - 1) * 2 + 3 - 8 = 1, all after (TensorFlow): centres 1, 3, 5, 7
    np.testing.assert_allclose(shift.receptive_field(model, "c").centres[0], [1, 3, 5, 7])


def test_receptive_field_rejects_branches_that_disagree():
    x = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(1, 3, padding="same", name="a")(x)
    b = keras.layers.ZeroPadding2D(((1, 0), (1, 0)), name="p")(x)
    b = keras.layers.Cropping2D(((0, 1), (0, 1)), name="crop")(b)  # same shape, moved by 1
    y = keras.layers.Add(name="add")([a, b])
    model = keras.Model(x, keras.layers.Dense(2)(keras.layers.Flatten()(y)))
    with pytest.raises(ValueError, match="crop|different grids"):
        shift.receptive_field(model, "add")


def test_gradient_centres_by_hand():
    model = tiny_model()
    conv = model.get_layer("conv")
    conv.set_weights([np.ones_like(w) for w in conv.get_weights()])
    image = np.zeros((8, 8, 1), np.float32)
    centres = shift.gradient_centres(model, "conv", image, batch_size=3)
    assert centres.shape == (4, 4, 2)
    # with all-ones kernels each cell's gradient is 1 on its 3x3 window: pixels 1..3 for cell
    # 1 (centre 2); cell 0's window starts at padding pixel -1, so only pixels 0, 1 count: 0.5
    np.testing.assert_allclose(centres[:, 0, 0], [0.5, 2, 4, 6], atol=1e-6)
    np.testing.assert_allclose(centres[2, :, 1], [0.5, 2, 4, 6], atol=1e-6)
    with pytest.raises(ValueError, match="one"):
        shift.gradient_centres(model, "conv", image[None])


# -- normalisation, layer picker, summaries -----------------------------------------------------

def test_normalise_by_hand():
    m = np.array([[[-2.0, 0.0], [1.0, 2.0]]])
    np.testing.assert_allclose(shift.normalise(m), [[[0, 0], [0.5, 1]]])
    np.testing.assert_allclose(shift.normalise(m, "minmax"), [[[0, 0.5], [0.75, 1]]])
    np.testing.assert_allclose(shift.normalise(np.ones((1, 2, 2)), "minmax"), 0)
    with pytest.raises(ValueError, match="how must be one of"):
        shift.normalise(m, "softmax")


def test_last_conv_layer_is_the_last_convolution():
    # strided_same is later but 1x1: no grid to explain, so the picker skips it
    assert shift.last_conv_layer(tiny_model()) == "same"
    x = keras.Input((8, 8, 1))
    y = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    with pytest.raises(ValueError, match="no convolution"):
        shift.last_conv_layer(keras.Model(x, y))


def test_summarise_offsets_and_verdict():
    offsets = np.array([[3.0, 0.0], [3.0, 0.0], [3.0, 0.0], [np.nan, 1.0]])
    s = shift.summarise_offsets(offsets, resamples=200)
    assert s["images"] == 3 and s["undefined"] == 1
    assert s["rows"] == s["rows low"] == s["rows high"] == 3 and s["length"] == 3
    assert shift.verdict(s) == "systematic 3.0 px down"
    s = shift.summarise_offsets(np.array([[3.0, -4.0], [-3.0, 4.0]]), resamples=200)
    assert s["length"] == 5 and s["rows"] == 0
    assert shift.verdict(s) == "scatter, no common direction"
    assert shift.verdict(shift.summarise_offsets(np.zeros((3, 2)))) == "none"
