"""Detection targets (cam.targets.Box, cam/detection.py): scores worked out by hand on a tiny
fake detector whose outputs are set, every method head-only equal to the whole network, and
KerasHub's RetinaNet and D-FINE built from a config (random weights, 64x64 images): the
built-in decoders agree with the models' own decoding, and head-only maps at a backbone layer
equal the whole network on every backend."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from keras import layers as L
from keras import ops

import cam
from cam import backend as B
from cam import targets as T
from conftest import assert_rel_close, random_images

P, C = 3, 2  # the fake detector's predictions and classes
#: its boxes (xyxy) and logits when the image is all zeros: the Dense layers' biases
BOXES = np.array([[0, 0, 4, 4], [2, 0, 6, 4], [10, 10, 12, 12]], np.float32)
LOGITS = np.array([[-3, 0], [3, 2], [0, 5]], np.float32)
OPTIONS = {"FastAblationCAM": {"window": 2, "stride": 1}, "Occlusion": {"window": 3, "stride": 2}}
GATED = ("GradCAMPlusPlus", "LayerCAM")  # may leave a map all zeros


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def decode(outputs):
    """The fake detector's decoder: its boxes as they are, the sigmoid of its logits."""
    boxes, logits = outputs
    return boxes, ops.sigmoid(logits)


@pytest.fixture(scope="module")
def fake_detector():
    """(B, 8, 8, 3) -> boxes (B, 3, 4) and logits (B, 3, 2); with zero biases before the
    Dense layers, an all-zero image gives exactly BOXES and LOGITS."""
    keras.utils.set_random_seed(7)
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 3, padding="same", activation="relu", name="conv0")(inputs)
    x = L.ReLU(name="relu")(L.Conv2D(5, 3, padding="same", name="conv1")(x))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    boxes = L.Dense(P * 4, name="box_dense", bias_initializer=keras.initializers.Constant(
        BOXES.ravel()))(x)
    logits = L.Dense(P * C, name="class_dense", bias_initializer=keras.initializers.Constant(
        LOGITS.ravel()))(x)
    return keras.Model(inputs, [L.Reshape((P, 4), name="boxes")(boxes),
                                L.Reshape((P, C), name="logits")(logits)], name="fake_detector")


def test_box_scores_by_hand(fake_detector):
    """max over predictions of IoU x probability: [0,0,4,4] overlaps the predictions 1, 1/3
    and 0. Class 1: 1 * sigmoid(0) = 0.5 beats 1/3 * sigmoid(2); class 0: 1/3 * sigmoid(3)
    beats 1 * sigmoid(-3), a less overlapping but confident prediction wins."""
    zeros = np.zeros((2, 8, 8, 3), np.float32)
    expected = [0.5, sigmoid(3) / 3]
    explainer = cam.GradCAM(fake_detector, "relu")
    with warnings.catch_warnings():  # an all-zero image: no gradient reaches relu
        warnings.simplefilter("ignore")
        listed = explainer.explain(zeros, [T.Box([0, 0, 4, 4], 1, decode),
                                           T.Box([0, 0, 4, 4], 0, decode)])
        stacked = explainer.explain(zeros, T.Box([[0, 0, 4, 4]] * 2, [1, 0], decode))
        # [2, 0, 6, 4] as yxyx is [0, 2, 4, 6]: IoU 1 with prediction 1
        yxyx = explainer.explain(zeros[:1], T.Box([0, 2, 4, 6], 0, decode, box_format="yxyx"))
        wide = explainer.explain(zeros[:1], T.Box([0, 0, 12, 12], 1, decode))
    np.testing.assert_allclose(listed.target_scores, expected, rtol=1e-5)
    np.testing.assert_allclose(stacked.target_scores, expected, rtol=1e-5)
    np.testing.assert_allclose(yxyx.target_scores, [sigmoid(3)], rtol=1e-5)
    # [0,0,12,12] covers every prediction: IoUs 16/144, 16/144, 4/144; class 1's best is 5
    np.testing.assert_allclose(wide.target_scores, [max(16 / 144 * sigmoid(2),
                                                        4 / 144 * sigmoid(5))], rtol=1e-5)
    assert listed.targets is None and listed.scores[0].shape == (2, P, 4)


def test_box_scores_are_the_formula_on_random_outputs():
    """box_scores against a NumPy IoU on random boxes, probabilities and classes."""
    from cam.detection import box_scores

    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 20, (4, 6, 2, 2))
    boxes = np.concatenate([corners.min(axis=2), corners.max(axis=2) + 1], -1).astype(np.float32)
    reference = boxes[:, 2] + rng.uniform(-2, 2, (4, 4)).astype(np.float32)
    probabilities = rng.uniform(0, 1, (4, 6, 3)).astype(np.float32)
    classes = np.array([0, 2, 1, 2])
    got = B.numpy(box_scores(B.tensor(reference), B.tensor(classes), B.tensor(boxes),
                             B.tensor(probabilities)))

    def iou(a, b):
        w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
        area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
        return w * h / (area(a) + area(b) - w * h)

    expected = [max(iou(reference[i], boxes[i, p]) * probabilities[i, p, classes[i]]
                    for p in range(6)) for i in range(4)]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("method", [cam.method_class(k) for k in cam.METHODS],
                         ids=lambda m: m.__name__)
def test_every_method_head_equals_full_on_the_fake_detector(fake_detector, method):
    images = random_images((8, 8, 3), 2, seed=3) * 0.3
    boxes = [T.Box([0, 0, 4, 4], 1, decode), T.Box([1, 0, 6, 5], 0, decode)]
    options = OPTIONS.get(method.__name__, {})
    head = method(fake_detector, "relu", **options).explain(
        images, boxes, normalize=False, upsample=False)
    full = method(fake_detector, "relu", mode="full", **options).explain(
        images, boxes, normalize=False, upsample=False)
    assert head.raw.shape == (2, 8, 8)
    if method.__name__ not in GATED:
        assert np.abs(head.raw).max() > 0
    assert_rel_close(head.raw, full.raw, rtol=1e-4)
    np.testing.assert_allclose(head.target_scores, full.target_scores, rtol=1e-5)


def test_a_new_box_compiles_nothing(fake_detector):
    images = random_images((8, 8, 3), 2, seed=4) * 0.3
    explainer = cam.FastAblationCAM(fake_detector, "relu")
    first = T.Box([0, 0, 4, 4], 1, decode)
    explainer.explain(images, first)
    scorer = explainer.scoring_function(first)
    traces = scorer.traces
    explainer.explain(images, [T.Box([1, 1, 5, 5], 0, decode), T.Box([2, 0, 6, 4], 1, decode)])
    assert scorer.traces == traces


class NotADetector(keras.Model):
    pass


@pytest.mark.parametrize("make, phrase", [
    (lambda: T.Box([0, 0, 4], 1, decode), "4 finite numbers"),
    (lambda: T.Box([0, 0, 4, np.nan], 1, decode), "4 finite numbers"),
    (lambda: T.Box([4, 0, 4, 4], 1, decode), "has no area"),
    (lambda: T.Box([0, 0, 4, 4], -1, decode), "class_id must be an int >= 0"),
    (lambda: T.Box([0, 0, 4, 4], 1.5, decode), "class_id must be an int >= 0"),
    (lambda: T.Box([0, 0, 4, 4], 1, "retinanet"), "decode must be a detector"),
    (lambda: T.Box([0, 0, 0.5, 0.5], 1, decode, box_format="rel_xyxy"), "in pixels"),
    (lambda: T.Box([0, 0, 4, 4], 1, keras.Sequential([keras.Input((2,)), L.Dense(1)])),
     "no built-in decoding for Sequential"),
])
def test_bad_boxes_are_refused_clearly(make, phrase):
    with pytest.raises(ValueError, match=phrase):
        make()


def test_bad_box_lists_are_refused_clearly(fake_detector):
    explainer = cam.GradCAM(fake_detector, "relu")
    images = random_images((8, 8, 3), 2)
    with pytest.raises(ValueError, match="Box has 3 boxes for 2 images"):
        explainer.explain(images, T.Box([[0, 0, 4, 4]] * 3, 1, decode))
    with pytest.raises(ValueError, match="of one kind"):
        explainer.explain(images, [T.Box([0, 0, 4, 4], 1, decode),
                                   T.Box([0, 0, 4, 4], 1, lambda out: decode(out))])


# --------------------------------------------------------------------------- KerasHub


def _resnet(image_shape):
    import keras_hub

    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 16, 16, 16], stackwise_num_blocks=[1, 1, 1, 1],
        stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block", image_shape=image_shape)


def build_retinanet(image_shape=(64, 64, 3)):
    """A small RetinaNet from a config: ResNet stages P2..P5, pyramid P3..P5 (8x8, 4x4, 2x2
    cells of 9 anchors: 756 predictions at 64x64), three classes, boxes in yxyx, and non-max
    suppression that keeps every confidence (random weights are never confident)."""
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=_resnet(image_shape), min_level=3, max_level=5, use_p5=False,
        image_shape=image_shape)
    return keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone, num_classes=3, bounding_box_format="yxyx",
        pre_logits_num_conv_layers=1, classification_head_prior_probability=0.2,
        prediction_decoder=keras_hub.layers.NonMaxSuppression(
            bounding_box_format="yxyx", from_logits=True, confidence_threshold=0.0,
            max_detections=5))


@pytest.fixture(scope="module")
def retinanet():
    return build_retinanet()


def top_detections(detector, images):
    """Each image's most confident detection after the model's own decoding and non-max
    suppression: (boxes in the model's format, labels, confidences)."""
    found = detector.decode_predictions(detector(images), images)
    return tuple(B.numpy(found[k])[:, 0] for k in ("boxes", "labels", "confidence"))


def test_retinanet_anchors_by_hand(retinanet):
    """With zero regressions the decoded boxes are the anchors: the first is P3's cell (0, 0)
    at scale 2^3 * 4 = 32 and aspect ratio 0.5, w = 32 sqrt(2), h = 32 / sqrt(2), rounded
    half-sizes 23 and 11."""
    decoder = T.RetinaNet(retinanet)
    deltas = ops.zeros((1, 756, 4))
    boxes, probabilities = decoder([deltas, ops.zeros((1, 756, 3))])
    np.testing.assert_allclose(B.numpy(boxes)[0, 0], [-23, -11, 23, 11], atol=1e-4)
    assert B.numpy(probabilities).shape == (1, 756, 3)
    np.testing.assert_allclose(B.numpy(probabilities), 0.5)
    # P5's last anchor: cell (1, 1) of a 2x2 grid at stride 32, scale 32 * 4 * 2^(2/3) -> 203,
    # aspect ratio 2: w = 203 / sqrt(2) = 143.5 -> 72, h = 287.1 -> 144 (half-sizes, rounded)
    np.testing.assert_allclose(B.numpy(boxes)[0, -1], [32 - 72, 32 - 144, 32 + 72, 32 + 144],
                               atol=1e-4)


def test_retinanet_decoder_agrees_with_the_models_own_decoding(retinanet):
    """Every detection the model's decode_predictions keeps (after non-max suppression) is
    one of the decoded predictions, with its confidence as that class's probability, and a
    Box on it scores at least its confidence (IoU 1 with itself)."""
    images = random_images((64, 64, 3), 2, seed=1)
    boxes, labels, confidence = top_detections(retinanet, images)
    decoded, probabilities = T.RetinaNet(retinanet)(keras.tree.flatten(retinanet(images)))
    decoded, probabilities = B.numpy(decoded), B.numpy(probabilities)
    as_yxyx = decoded[..., [1, 0, 3, 2]]
    for i in range(2):
        match = np.abs(as_yxyx[i] - boxes[i]).max(axis=1).argmin()
        np.testing.assert_allclose(as_yxyx[i, match], boxes[i], atol=1e-3)
        np.testing.assert_allclose(probabilities[i, match, labels[i]], confidence[i], rtol=1e-5)
    target = [T.Box(boxes[i], int(labels[i]), retinanet, box_format="yxyx") for i in range(2)]
    scores = cam.GradCAM(retinanet, "stack2_block0_out").explain(images, target).target_scores
    assert (scores >= confidence * (1 - 1e-4)).all() and (scores <= 1).all()


@pytest.mark.parametrize("method", [cam.GradCAM, cam.FastAblationCAM], ids=lambda m: m.__name__)
def test_retinanet_head_equals_full_at_a_backbone_layer(retinanet, method):
    """The head after the ResNet's stage 2 (4x4): the rest of the backbone, the feature
    pyramid (one layer of several outputs) and the prediction heads shared by its levels."""
    images = random_images((64, 64, 3), 2, seed=2)
    boxes, labels, _ = top_detections(retinanet, images)
    target = [T.Box(boxes[i], int(labels[i]), retinanet, box_format="yxyx") for i in range(2)]
    head = method(retinanet, "stack2_block0_out").explain(images, target, normalize=False,
                                                        upsample=False)
    full = method(retinanet, "stack2_block0_out", mode="full").explain(
        images, target, normalize=False, upsample=False)
    assert head.raw.shape == (2, 4, 4) and np.abs(head.raw).max() > 0
    assert_rel_close(head.raw, full.raw, rtol=1e-4)
    np.testing.assert_allclose(head.target_scores, full.target_scores, rtol=1e-5)


def test_retinanet_of_any_image_size_needs_the_size():
    detector = build_retinanet((None, None, 3))
    with pytest.raises(ValueError, match=r"takes images of any size .* pass image_size"):
        T.Box([0, 0, 8, 8], 0, detector)
    box = T.Box([0, 0, 8, 8], 0, T.RetinaNet(detector, image_size=(64, 64)))
    assert box.decode.anchors.shape == (756, 4)
    with pytest.raises(ValueError, match="out of range: the detector has 3 classes"):
        cam.GradCAM(detector, "stack2_block0_out").explain(
            random_images((64, 64, 3), 1), T.Box([0, 0, 8, 8], 3, box.decode))


@pytest.fixture(scope="module")
def dfine():
    """A small D-FINE from a config: HGNetV2 stages 3 and 4 (strides 16 and 32), ten
    queries, one decoder layer, three classes, boxes in xyxy."""
    import keras_hub

    keras.utils.set_random_seed(0)
    hgnetv2 = keras_hub.models.HGNetV2Backbone(
        stem_channels=[3, 8, 8],
        stackwise_stage_filters=[[8, 8, 16, 1, 1, 3], [16, 8, 32, 1, 1, 3],
                                 [32, 16, 64, 1, 1, 3], [64, 16, 64, 1, 1, 3]],
        apply_downsample=[False, True, True, True],
        use_lightweight_conv_block=[False, False, True, True], depths=[1, 1, 1, 1],
        hidden_sizes=[16, 32, 64, 64], embedding_size=8, use_learnable_affine_block=True,
        hidden_act="relu", image_shape=(64, 64, 3), out_features=["stage3", "stage4"])
    backbone = keras_hub.models.DFineBackbone(
        backbone=hgnetv2, decoder_in_channels=[16, 16], encoder_hidden_dim=16,
        num_denoising=0, num_labels=3, hidden_dim=16, learn_initial_query=False,
        num_queries=10, anchor_image_size=(64, 64), feat_strides=[16, 32],
        num_feature_levels=2, encoder_in_channels=[64, 64], encode_proj_layers=[1],
        num_attention_heads=2, encoder_ffn_dim=16, num_encoder_layers=1,
        hidden_expansion=0.34, depth_multiplier=0.5, eval_idx=-1, num_decoder_layers=1,
        decoder_attention_heads=2, decoder_ffn_dim=16, decoder_n_points=[2, 2],
        lqe_hidden_dim=8, num_lqe_layers=1, out_features=["stage3", "stage4"],
        image_shape=(64, 64, 3), seed=0)
    return keras_hub.models.DFineObjectDetector(
        backbone=backbone, num_classes=3, bounding_box_format="xyxy",
        prediction_decoder=keras_hub.layers.NonMaxSuppression(
            bounding_box_format="yxyx", from_logits=True, confidence_threshold=0.0,
            max_detections=5))


@pytest.mark.skipif(keras.config.backend() == "jax", reason="D-FINE takes about three minutes "
                    "to build and compile on JAX on two CPU cores; its decoder is keras.ops, "
                    "tested here on TensorFlow and PyTorch")
def test_dfine_decoder_agrees_and_head_equals_full(dfine):
    """D-FINE's queries decoded as its decode_predictions does (the kept detection is one of
    them, confidence included); FastAblationCAM at the HGNetV2 stem (16x16) head-only equals
    the whole network, the query selection (top-k) and deformable attention included."""
    images = random_images((64, 64, 3), 2, seed=5)
    boxes, labels, confidence = top_detections(dfine, images)  # yxyx (the NMS's format)
    decoded, probabilities = T.DFine(dfine)(keras.tree.flatten(dfine(images)))
    as_yxyx = B.numpy(decoded)[..., [1, 0, 3, 2]]
    for i in range(2):
        match = np.abs(as_yxyx[i] - boxes[i]).max(axis=1).argmin()
        np.testing.assert_allclose(as_yxyx[i, match], boxes[i], atol=1e-3)
        np.testing.assert_allclose(B.numpy(probabilities)[i, match, labels[i]], confidence[i],
                                   rtol=1e-5)
    target = [T.Box(boxes[i], int(labels[i]), dfine, box_format="yxyx") for i in range(2)]
    head = cam.FastAblationCAM(dfine, "embedder", window=4, stride=4).explain(
        images, target, normalize=False, upsample=False)
    full = cam.FastAblationCAM(dfine, "embedder", window=4, stride=4, mode="full").explain(
        images, target, normalize=False, upsample=False)
    assert head.raw.shape == (2, 16, 16) and np.abs(head.raw).max() > 0
    assert (head.target_scores >= confidence * (1 - 1e-4)).all()
    assert_rel_close(head.raw, full.raw, rtol=1e-4)


def test_the_detection_module_imports_on_its_own():
    """cam/detection.py builds on cam.targets.Target and cam.targets exports its names:
    either can be imported first."""
    import subprocess
    import sys

    code = ("import cam.detection as d, cam.targets as t; "
            "assert t.Box is d.Box and t.RetinaNet is d.RetinaNet and t.DFine is d.DFine")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with pytest.raises(AttributeError, match="has no attribute 'Boxes'"):
        T.Boxes  # noqa: B018
