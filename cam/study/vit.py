"""A small Vision Transformer for the token-map examples and tests, and a short CPU training loop.

The model is functional (so :class:`cam.graph.Split` can cut it at any token layer), takes raw
0-255 pixels (a ``Rescaling`` layer inside), and names its layers so the usual CAM targets are
easy to pass: ``tokens`` (patch embeddings plus position), ``block{i}_norm1`` (the input of
block i's attention), ``block{i}_out``, ``final_norm``. With a class token, the input of the
last block's attention (``block{depth-1}_norm1``) is the natural target: after the last block
only the class token reaches the classifier, so later token layers get no gradient and their
patch ablations change nothing.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers as L
from keras import ops


@keras.saving.register_keras_serializable(package="cam")
class ClassToken(L.Layer):
    """Puts one learned token in front of the patch tokens: (B, N, D) -> (B, 1 + N, D)."""

    def build(self, input_shape):
        self.token = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="zeros",
                                     name="token")

    def call(self, x):
        token = ops.broadcast_to(ops.cast(self.token, x.dtype), (ops.shape(x)[0], 1, x.shape[-1]))
        return ops.concatenate([token, x], axis=1)

    def compute_output_shape(self, input_shape):
        n = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], n, input_shape[2])


@keras.saving.register_keras_serializable(package="cam")
class PositionEmbedding(L.Layer):
    """Adds a learned embedding per token position."""

    def build(self, input_shape):
        self.embedding = self.add_weight(
            shape=(1,) + tuple(input_shape[1:]),
            initializer=keras.initializers.RandomNormal(stddev=0.02), name="embedding")

    def call(self, x):
        return x + ops.cast(self.embedding, x.dtype)


@keras.saving.register_keras_serializable(package="cam")
class TakeToken(L.Layer):
    """The token at ``index``: (B, N, D) -> (B, D)."""

    def __init__(self, index: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.index = int(index)

    def call(self, x):
        return x[:, self.index]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "index": self.index}


def build_vit(num_classes: int, image_size: int = 64, channels: int = 3, patch_size: int = 8,
              dim: int = 64, depth: int = 2, heads: int = 4, mlp_dim: int = 128,
              class_token: bool = True, conv_stem: bool = True, dropout: float = 0.0,
              name: str = "vit") -> keras.Model:
    """A ViT classifier on raw 0-255 pixels that outputs logits.

    Parameters
    ----------
    num_classes, image_size, channels
        Output classes, input side in pixels, and colour channels (1 for grayscale).
    patch_size
        Side of a patch in pixels; the token grid is ``image_size / patch_size`` square.
    dim, depth, heads, mlp_dim
        Token width, transformer blocks, attention heads, hidden width of each block's MLP.
    class_token
        True: a learned class token goes first and the classifier reads it (``(g*g + 1)``
        tokens); False: the classifier reads the mean of the patch tokens (``g*g`` tokens).
    conv_stem
        True: two 3x3 convolution, batch-norm, ReLU and 2x2 max-pool blocks before the patch
        embedding (a "hybrid" ViT, which learns much faster on a small data set than plain
        patches do); ``patch_size`` must divide by 4.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if conv_stem and patch_size % 4:
        raise ValueError(f"conv_stem=True needs a patch_size that divides by 4, got {patch_size}")
    if dim % heads:
        raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
    grid = image_size // patch_size
    inputs = keras.Input((image_size, image_size, channels), name="image")
    x = L.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inputs)
    embed = patch_size
    if conv_stem:
        for i, filters in enumerate((dim // 2, dim), start=1):
            x = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"stem{i}")(x)
            x = L.BatchNormalization(momentum=0.9, name=f"stem{i}_bn")(x)
            x = L.ReLU(name=f"stem{i}_relu")(x)
            x = L.MaxPooling2D(name=f"stem{i}_pool")(x)
        embed = patch_size // 4
    x = L.Conv2D(dim, embed, strides=embed, name="patch_embed")(x)
    x = L.Reshape((grid * grid, dim), name="patches")(x)
    if class_token:
        x = ClassToken(name="class_token")(x)
    x = PositionEmbedding(name="tokens")(x)
    for i in range(depth):
        y = L.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm1")(x)
        y = L.MultiHeadAttention(heads, dim // heads, dropout=dropout,
                                 name=f"block{i}_attention")(y, y)
        x = L.Add(name=f"block{i}_add1")([x, y])
        y = L.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm2")(x)
        y = L.Dense(mlp_dim, activation="gelu", name=f"block{i}_mlp1")(y)
        y = L.Dropout(dropout, name=f"block{i}_dropout")(y)
        y = L.Dense(dim, name=f"block{i}_mlp2")(y)
        x = L.Add(name=f"block{i}_out")([x, y])
    x = L.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
    x = TakeToken(0, name="cls")(x) if class_token else L.GlobalAveragePooling1D(name="gap")(x)
    outputs = L.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def train_vit(model: keras.Model, images: np.ndarray, labels: np.ndarray, epochs: int,
              batch_size: int = 32, learning_rate: float = 2e-3, seed: int = 0,
              augment: bool = True, validation: tuple | None = None,
              verbose: int = 0) -> keras.callbacks.History:
    """Train ``model`` (logits out) with AdamW, a cosine schedule, label smoothing and the
    project's flip/rotate/zoom/brightness augmentation (:func:`cam.study.train.training_dataset`).

    ``images`` are raw 0-255 pixels (N, H, W, C), ``labels`` int class indices (N,);
    ``augment=False`` (or a grayscale model) trains on the images as they are.
    """
    from .train import TrainConfig, training_dataset  # TensorFlow-heavy: import on use

    keras.utils.set_random_seed(seed)
    num_classes = model.output_shape[-1]
    one_hot = keras.utils.to_categorical(labels, num_classes).astype(np.float32)
    # The augmentation, weight decay and label smoothing of cam.study.train's CNN training.
    cfg = TrainConfig(batch_size=min(batch_size, len(images)), zoom=0.1, seed=seed)
    if not augment or images.shape[-1] != 3:  # the colour augmentation needs RGB
        from .train import tf
        data = tf.data.Dataset.from_tensor_slices((images.astype(np.float32), one_hot))
        data = data.shuffle(len(images), seed=seed).batch(cfg.batch_size, drop_remainder=True)
    else:
        data = training_dataset(images, one_hot, cfg)
    steps = max(1, len(images) // cfg.batch_size) * epochs
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps, alpha=0.01, warmup_target=learning_rate, warmup_steps=max(1, steps // 10))
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay),
                  loss=keras.losses.CategoricalCrossentropy(
                      from_logits=True, label_smoothing=cfg.label_smoothing),
                  metrics=["accuracy"])
    if validation is not None:
        val_images, val_labels = validation
        validation = (val_images.astype(np.float32),
                      keras.utils.to_categorical(val_labels, num_classes).astype(np.float32))
    return model.fit(data, epochs=epochs, validation_data=validation, verbose=verbose)
