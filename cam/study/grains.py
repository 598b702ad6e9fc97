"""Drawing one synthetic pollen grain (:mod:`cam.study.synthetic`): its shape and features as
exact masks (:func:`draw_grain`), then its colours and optics (:func:`paint`). Every random
number comes from the generator passed in, in a fixed order."""

from __future__ import annotations

import math

import cv2
import numpy as np

_RADIUS_RANGE: dict[str, tuple[float, float]] = {
    "tricolpate": (0.56, 0.70),
    "periporate": (0.56, 0.72),
    "echinate": (0.42, 0.54),
    "reticulate": (0.64, 0.78),
    "triangular": (0.52, 0.64),
    "monosulcate": (0.62, 0.76),  # half the long axis
}
# With these ranges no grain pixel lies farther than ~0.82 half-sides from the grain
# centre, which leaves room for a random position with the grain clear of the border.
_BORDER = 2  # pixels kept free of grain between the grain and the image edge


_SHIFT = 4  # sub-pixel bits for cv2 drawing calls
_ONE = 1 << _SHIFT


def _fix(points: np.ndarray) -> np.ndarray:
    """Float pixel coordinates -> int32 fixed point for cv2 calls with ``shift=_SHIFT``."""
    return np.round(np.asarray(points, dtype=np.float64) * _ONE).astype(np.int32)


def _polar_polygon(cx: float, cy: float, radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _fill_poly(mask: np.ndarray, points: np.ndarray) -> None:
    cv2.fillPoly(mask, [_fix(points).reshape(-1, 1, 2)], 255, lineType=cv2.LINE_8, shift=_SHIFT)


def _fill_ellipse(mask: np.ndarray, cx: float, cy: float, half_long: float, half_short: float,
                  angle_rad: float) -> None:
    cv2.ellipse(mask, (int(round(cx * _ONE)), int(round(cy * _ONE))),
                (max(1, int(round(half_long * _ONE))), max(1, int(round(half_short * _ONE)))),
                math.degrees(angle_rad), 0, 360, 255, thickness=-1, lineType=cv2.LINE_8, shift=_SHIFT)


def _disc(mask: np.ndarray, cx: float, cy: float, r: float, value: int = 255, thickness: int = -1) -> None:
    cv2.circle(mask, (int(round(cx * _ONE)), int(round(cy * _ONE))), max(1, int(round(r * _ONE))),
               value, thickness=thickness, lineType=cv2.LINE_8, shift=_SHIFT)


def _kernel(radius: int) -> np.ndarray:
    d = 2 * max(0, radius) + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))


def _scattered_points(rng: np.random.Generator, n: int, max_r: float, min_dist: float,
                      tries: int = 400) -> np.ndarray:
    """Up to ``n`` points uniform in a disc of radius ``max_r`` at least ``min_dist`` apart."""
    pts: list[tuple[float, float]] = []
    for _ in range(tries):
        if len(pts) == n:
            break
        r = max_r * math.sqrt(rng.random())
        a = rng.uniform(0, 2 * math.pi)
        p = (r * math.cos(a), r * math.sin(a))
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= min_dist**2 for q in pts):
            pts.append(p)
    return np.array(pts, dtype=np.float64).reshape(-1, 2)


# --------------------------------------------------------------------------- geometry per class


def _outline_radii(name: str, rng: np.random.Generator, R: float, angles: np.ndarray,
                   phi: float) -> np.ndarray:
    """Radius of the grain body outline at each polar angle (before translation)."""
    if name == "triangular":
        # Rounded triangle with convex sides; corners at phi + 2*pi*k/3.
        k = rng.uniform(0.14, 0.19)
        radii = R * (1 + k * np.cos(3 * (angles - phi)))
    elif name == "monosulcate":
        a = R
        b = R * rng.uniform(0.56, 0.70)
        t = angles - phi
        radii = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
    else:
        radii = np.full_like(angles, R)
    # Slight irregularity so no two grains share an exact outline.
    wobble = sum(
        rng.uniform(0, 0.012) * np.cos(m * angles + rng.uniform(0, 2 * math.pi)) for m in (2, 3, 5)
    )
    return radii * (1 + wobble)


def _draw_features(name: str, rng: np.random.Generator, size: int, cx: float, cy: float, R: float,
                   phi: float, angles: np.ndarray, radii: np.ndarray,
                   feature: np.ndarray, light: np.ndarray) -> None:
    """Paint the class-specific features into ``feature`` (uint8 0/255, body features are
    clipped to ``interior`` by the caller); ``light`` marks lighter pore centres."""
    if name == "tricolpate":
        # Three meridional furrows, from inside the grain out to the margin.
        for k in range(3):
            a = phi + 2 * math.pi * k / 3 + rng.normal(0, 0.05)
            inner, outer = rng.uniform(0.30, 0.40) * R, rng.uniform(0.95, 1.02) * R
            mid, half_len = (inner + outer) / 2, (outer - inner) / 2
            half_w = max(1.0, R * rng.uniform(0.06, 0.085))
            _fill_ellipse(feature, cx + mid * math.cos(a), cy + mid * math.sin(a), half_len, half_w, a)
    elif name == "monosulcate":
        # One long furrow along the long axis (slightly off-centre).
        off = R * rng.uniform(-0.08, 0.08)
        half_len = R * rng.uniform(0.72, 0.86)
        half_w = max(1.0, R * rng.uniform(0.07, 0.10))
        _fill_ellipse(feature, cx - off * math.sin(phi), cy + off * math.cos(phi), half_len, half_w, phi)
    elif name in ("periporate", "triangular"):
        if name == "periporate":
            rp = max(1.5, R * rng.uniform(0.095, 0.12))
            n = int(rng.integers(6, 10))
            pts = _scattered_points(rng, n, 0.78 * R - rp, min_dist=3.2 * rp)
            centres = pts + np.array([cx, cy])
        else:
            rp = max(1.5, R * rng.uniform(0.12, 0.15))
            corner = phi + 2 * math.pi * np.arange(3) / 3
            r_corner = np.interp(np.mod(corner, 2 * math.pi), angles, radii, period=2 * math.pi)
            r_pore = r_corner - rp - max(2.0, 0.08 * R)
            centres = np.stack([cx + r_pore * np.cos(corner), cy + r_pore * np.sin(corner)], axis=1)
        ring = max(1, int(round(rp * 0.45)))
        for x, y in centres:
            _disc(feature, x, y, rp)
            _disc(light, x, y, max(0.6, rp - ring))
    elif name == "echinate":
        # Spines on the outline (triangles pointing outwards) ...
        n = int(rng.integers(14, 21))
        spine_len = R * rng.uniform(0.20, 0.26)
        base = R * rng.uniform(0.10, 0.13)
        start = rng.uniform(0, 2 * math.pi)
        for k in range(n):
            a = start + 2 * math.pi * k / n + rng.normal(0, 0.04)
            r0 = np.interp(np.mod(a, 2 * math.pi), angles, radii, period=2 * math.pi) * 0.92
            tip = (cx + (r0 + spine_len) * math.cos(a), cy + (r0 + spine_len) * math.sin(a))
            nx, ny = -math.sin(a) * base / 2, math.cos(a) * base / 2
            bx, by = cx + r0 * math.cos(a), cy + r0 * math.sin(a)
            _fill_poly(feature, np.array([[bx - nx, by - ny], tip, [bx + nx, by + ny]]))
        # ... and spines seen end-on as dark dots on the face.
        rd = max(1.0, R * rng.uniform(0.07, 0.09))
        pts = _scattered_points(rng, int(rng.integers(10, 18)), 0.78 * R, min_dist=3.0 * rd)
        for x, y in pts:
            _disc(feature, cx + x, cy + y, rd)
    elif name == "reticulate":
        # Polygonal net: Voronoi cell borders of jittered seeds (cv2 distance-transform labels).
        spacing = R * rng.uniform(0.28, 0.36)
        ext = int(math.ceil(R * 1.3))
        seeds = np.full((size, size), 255, np.uint8)
        step = spacing
        ys = np.arange(cy - ext, cy + ext + step, step)
        for row, y in enumerate(ys):
            xs = np.arange(cx - ext + (step / 2) * (row % 2), cx + ext + step, step)
            for x in xs:
                sx = int(round(x + rng.normal(0, 0.18 * step)))
                sy = int(round(y + rng.normal(0, 0.18 * step)))
                if 0 <= sx < size and 0 <= sy < size:
                    seeds[sy, sx] = 0
        _, labels = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
        width = max(1, int(round(R / 28)))
        edges = cv2.morphologyEx(labels.astype(np.float32), cv2.MORPH_GRADIENT,
                                 np.ones((width + 1, width + 1), np.uint8)) > 0
        feature[edges] = 255
    else:  # pragma: no cover - guarded by _check_label
        raise AssertionError(name)


# --------------------------------------------------------------------------- public API


def draw_grain(name: str, rng: np.random.Generator, size: int):
    """The grain's shape: its body and interior (uint8 masks), its features and their light
    parts (bool), drawn at a random size, rotation and position."""
    half = size / 2

    # ---- geometry: size, rotation, position
    lo, hi = _RADIUS_RANGE[name]
    R = rng.uniform(lo, hi) * half
    phi = rng.uniform(0, 2 * math.pi)
    n_vertices = max(64, int(4 * R))
    angles = np.linspace(0, 2 * math.pi, n_vertices, endpoint=False)
    radii = _outline_radii(name, rng, R, angles, phi)
    # Farthest grain pixel from the centre (spines reach at most 0.92 r + 0.26 R beyond).
    extent = float(radii.max()) * (1.20 if name == "echinate" else 1.0) + 1.0
    reach = int(math.ceil(extent)) + _BORDER + 1
    cx = rng.uniform(reach, size - 1 - reach) if size - 1 - 2 * reach > 0 else (size - 1) / 2
    cy = rng.uniform(reach, size - 1 - reach) if size - 1 - 2 * reach > 0 else (size - 1) / 2

    body = np.zeros((size, size), np.uint8)
    _fill_poly(body, _polar_polygon(cx, cy, radii, angles))
    rim_w = max(1, int(round(size / 110)))
    interior = cv2.erode(body, _kernel(rim_w))

    feature = np.zeros_like(body)
    light = np.zeros_like(body)
    _draw_features(name, rng, size, cx, cy, R, phi, angles, radii, feature, light)
    if name == "echinate":
        # Spines cross the rim and stick out of the body; they all count.
        feature_m = feature > 0
    else:
        # Apertures and net lines live on the face, inside the rim.
        feature_m = (feature > 0) & (interior > 0)
    light_m = (light > 0) & feature_m

    return body, interior, feature_m, light_m


def paint(rng: np.random.Generator, size: int, body, interior, feature_m, light_m):
    """The RGB image of a drawn grain: colours, shading, texture, focus blur, sensor noise."""
    body_m = body > 0
    # ---- colours (RGB, float 0..255)
    tone = rng.uniform(0, 1)  # 0 = pale yellow, 1 = brown
    grain_rgb = (1 - tone) * np.array([232, 198, 112]) + tone * np.array([178, 120, 62])
    grain_rgb = grain_rgb + rng.normal(0, 4, 3)
    feature_rgb = grain_rgb * rng.uniform(0.42, 0.55)
    rim_rgb = grain_rgb * rng.uniform(0.62, 0.72)
    bg_rgb = np.array([236.0, 234.0, 226.0]) + rng.normal(0, 5, 3)

    ramp = np.arange(size, dtype=np.float32) / size - 0.5
    g_angle = rng.uniform(0, 2 * math.pi)
    g_amp = rng.uniform(0.03, 0.10)
    gradient = 1 + g_amp * (ramp[None, :] * math.cos(g_angle) + ramp[:, None] * math.sin(g_angle))
    img = (gradient[..., None] * bg_rgb.astype(np.float32)).astype(np.float32)

    # Grain body: brighter centre, darker towards the rim, faint granular texture.
    dist = cv2.distanceTransform(body, cv2.DIST_L2, 5)
    depth = np.sqrt(dist / max(float(dist.max()), 1.0))
    shade = 0.80 + 0.25 * depth
    texture = cv2.GaussianBlur(rng.standard_normal((size, size), dtype=np.float32), (0, 0), max(0.8, size / 160))
    texture *= 7.0 / max(float(texture.std()), 1e-6)
    body_rgb = (shade[..., None] * grain_rgb.astype(np.float32) + texture[..., None]).astype(np.float32)
    rim_m = body_m & (interior == 0)
    cv2.copyTo(body_rgb, body_m.view(np.uint8), img)
    img[rim_m] = rim_rgb
    img[feature_m] = feature_rgb
    img[light_m] = grain_rgb * 1.08

    # ---- optics: focus blur, sensor noise
    sigma = rng.uniform(0.35, 1.1) * size / 128
    img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += rng.uniform(2.0, 4.5) * rng.standard_normal(img.shape, dtype=np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    return image
