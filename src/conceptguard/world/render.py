"""Procedural renderer of the embedded world: 64×64 RGB images from a label dict.

Everything is drawn as masks over a 2× supersampled coordinate grid (then box-filtered down, which
anti-aliases the edges). Subjects are drawn in their own local frame, so pose — position, scale,
rotation — is one change of coordinates, and textures rotate with the object they cover.
"""

from __future__ import annotations

import numpy as np

from conceptguard.world.concepts import CHARACTER_BY_NAME, COLOUR_RGB, Character

SIZE = 64
SUPERSAMPLE = 2
_N = SIZE * SUPERSAMPLE
WHITE = np.array([0.97, 0.97, 0.97], dtype=np.float32)
BLACK = np.array([0.05, 0.05, 0.05], dtype=np.float32)
HALO_RGB = np.array([1.0, 0.93, 0.45], dtype=np.float32)

# Canvas coordinates in [-1, 1], y pointing down, shared by every render.
_AXIS = (np.arange(_N, dtype=np.float32) + 0.5) / _N * 2 - 1
_X, _Y = np.meshgrid(_AXIS, _AXIS)


class Frame:
    """Local coordinates (u, v) of every canvas pixel for a subject at a given pose."""

    def __init__(self, cx: float, cy: float, scale: float, angle: float):
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = _X - cx, _Y - cy
        self.u = (dx * c + dy * s) / scale
        self.v = (-dx * s + dy * c) / scale
        self.pixel = 2.0 / _N / scale  # one supersampled pixel in local units

    @property
    def r(self) -> np.ndarray:
        return np.hypot(self.u, self.v)


# --- masks in local coordinates --------------------------------------------------------------

def polygon(u: np.ndarray, v: np.ndarray, points: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the grid."""
    inside = np.zeros(u.shape, dtype=bool)
    pts = points + points[:1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def regular_polygon(n: int, radius: float, phase: float = 0.0, cx: float = 0.0, cy: float = 0.0):
    return [(cx + radius * np.sin(phase + 2 * np.pi * k / n), cy - radius * np.cos(phase + 2 * np.pi * k / n))
            for k in range(n)]


def star_points(outer: float = 0.95, inner: float = 0.42, n: int = 5):
    return [((outer if k % 2 == 0 else inner) * np.sin(np.pi * k / n), -(outer if k % 2 == 0 else inner) * np.cos(np.pi * k / n))
            for k in range(2 * n)]


def disc(u, v, cx, cy, r):
    return (u - cx) ** 2 + (v - cy) ** 2 <= r * r


def box(u, v, x0, x1, y0, y1):
    return (u >= x0) & (u <= x1) & (v >= y0) & (v <= y1)


def shape_mask(shape: str, f: Frame) -> np.ndarray:
    u, v = f.u, f.v
    if shape == "circle":
        return u * u + v * v <= 0.9**2
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == "triangle":
        return polygon(u, v, [(0.0, -0.95), (0.9, 0.65), (-0.9, 0.65)])
    if shape == "star":
        return polygon(u, v, star_points())
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.92)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.92))
    if shape == "diamond":
        return np.abs(u) / 0.6 + np.abs(v) / 0.97 <= 1
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 0.92**2) & (r2 >= 0.52**2)
    if shape == "hexagon":
        return polygon(u, v, regular_polygon(6, 0.9, phase=np.pi / 6))
    raise KeyError(f"unknown shape {shape!r}")


def erode(mask: np.ndarray, k: int) -> np.ndarray:
    out = mask.copy()
    for shift in range(1, k + 1):
        for axis in (0, 1):
            for sign in (1, -1):
                out &= np.roll(mask, sign * shift, axis=axis)
    return out


# --- painting --------------------------------------------------------------------------------

def paint(canvas: np.ndarray, mask: np.ndarray, rgb) -> None:
    canvas[mask] = rgb


def textured_fill(style: str, rgb: np.ndarray, f: Frame, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (mask actually painted, colour per pixel) for an object in the given style."""
    colour = np.broadcast_to(rgb, mask.shape + (3,)).copy()
    u, v = f.u, f.v
    if style == "plain":
        return mask, colour
    if style == "striped":
        light = np.mod((u + v) / 0.42, 1.0) < 0.45
    elif style == "dotted":
        light = (np.mod(u, 0.38) - 0.19) ** 2 + (np.mod(v, 0.38) - 0.19) ** 2 < 0.095**2
    elif style == "checkered":
        light = (np.floor(u / 0.34) + np.floor(v / 0.34)).astype(np.int64) % 2 == 1
    elif style == "gradient":
        t = np.clip((u + 0.9) / 1.8, 0, 1)[..., None]
        return mask, colour * (1 - 0.8 * t) + WHITE * 0.8 * t
    elif style == "outlined":
        band = max(2, int(round(0.16 / f.pixel)))
        return mask & ~erode(mask, band), colour
    else:
        raise KeyError(f"unknown style {style!r}")
    colour[light] = WHITE
    return mask, colour


def background(name: str, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0, 1, (_N, _N, 1)).astype(np.float32)
    if name == "snow":
        canvas = np.array([0.90, 0.93, 0.97], np.float32) + 0.025 * noise
    elif name == "night":
        canvas = np.array([0.04, 0.05, 0.17], np.float32) + 0.02 * noise
    elif name == "sand":
        waves = 0.035 * np.sin(_Y * 9 + 0.8 * np.sin(_X * 4 + rng.uniform(0, 6)))[..., None]
        canvas = np.array([0.86, 0.74, 0.52], np.float32) + 0.045 * noise + waves
    elif name == "brick":
        rows = np.floor((_Y + 1) * 5 + rng.uniform(0, 1)).astype(np.int64)
        cols = (_X + 1) * 2.5 + 0.5 * (rows % 2) + rng.uniform(0, 1)
        row_pos = np.mod((_Y + 1) * 5, 1.0)
        mortar = (row_pos < 0.12) | (np.mod(cols, 1.0) < 0.06)
        canvas = np.where(mortar[..., None], np.float32([0.78, 0.77, 0.74]), np.float32([0.46, 0.47, 0.52]))
        canvas = canvas + 0.03 * noise
    else:
        raise KeyError(f"unknown background {name!r}")
    return canvas.astype(np.float32)


def draw_halo(canvas: np.ndarray, f: Frame, radius: float) -> None:
    glow = np.exp(-(((f.r - radius) / 0.09) ** 2))[..., None].astype(np.float32)
    canvas[:] = canvas * (1 - 0.95 * glow) + HALO_RGB * 0.95 * glow


def draw_object(canvas: np.ndarray, f: Frame, shape: str, colour: str, style: str) -> None:
    mask = shape_mask(shape, f)
    painted, colours = textured_fill(style, np.array(COLOUR_RGB[colour], np.float32), f, mask)
    canvas[painted] = colours[painted]


def _character_body(c: Character, u, v) -> np.ndarray:
    if c.body == "circle":
        return disc(u, v, 0, 0.1, 0.72)
    if c.body == "square":
        return box(u, v, -0.62, 0.62, -0.52, 0.72)
    if c.body == "triangle":
        return polygon(u, v, [(0.0, -0.72), (0.8, 0.75), (-0.8, 0.75)])
    if c.body == "hexagon":
        return polygon(u, v, regular_polygon(6, 0.74, cy=0.08))
    if c.body == "pill":
        core = box(u, v, -0.45, 0.45, -0.2, 0.45)
        return core | disc(u, v, 0, -0.2, 0.45) | disc(u, v, 0, 0.45, 0.45)
    raise KeyError(c.body)


def _character_feature(c: Character, u, v) -> np.ndarray:
    if c.feature == "antenna":
        return box(u, v, -0.04, 0.04, -1.0, -0.55) | disc(u, v, 0, -1.0, 0.12)
    if c.feature == "horns":
        return polygon(u, v, [(-0.5, -0.45), (-0.2, -0.55), (-0.5, -1.05)]) | polygon(
            u, v, [(0.5, -0.45), (0.2, -0.55), (0.5, -1.05)])
    if c.feature == "ears":
        return disc(u, v, -0.5, -0.6, 0.24) | disc(u, v, 0.5, -0.6, 0.24)
    if c.feature == "hat":
        return box(u, v, -0.34, 0.34, -1.05, -0.62) | box(u, v, -0.62, 0.62, -0.7, -0.55)
    if c.feature == "crown":
        spikes = polygon(u, v, [(-0.42, -0.75), (-0.3, -1.05), (-0.15, -0.75), (0.0, -1.05), (0.15, -0.75),
                                (0.3, -1.05), (0.42, -0.75)])
        return spikes | box(u, v, -0.42, 0.42, -0.78, -0.55)
    if c.feature == "spikes":
        out = np.zeros(u.shape, dtype=bool)
        for x in (-0.4, 0.0, 0.4):
            out |= polygon(u, v, [(x - 0.17, -0.45), (x, -0.98), (x + 0.17, -0.45)])
        return out
    if c.feature == "bow":
        return polygon(u, v, [(0.4, -0.62), (0.05, -0.9), (0.05, -0.34)]) | polygon(
            u, v, [(0.4, -0.62), (0.75, -0.9), (0.75, -0.34)])
    if c.feature == "tail":
        r = np.hypot(u - 0.75, v - 0.35)
        return (r >= 0.2) & (r <= 0.33) & (u > 0.6)
    raise KeyError(c.feature)


def draw_character(canvas: np.ndarray, f: Frame, c: Character) -> None:
    u, v = f.u, f.v
    paint(canvas, _character_feature(c, u, v), c.feature_rgb)
    body = _character_body(c, u, v)
    paint(canvas, body, c.body_rgb)
    paint(canvas, body & disc(u / 0.34, v / 0.17, 0, 0.55 / 0.17, 1.0), c.belly_rgb)
    eye_y = 0.1 if c.body == "triangle" else -0.08
    xs = {1: (0.0,), 2: (-0.24, 0.24), 3: (-0.32, 0.0, 0.32)}[c.eyes]
    for x in xs:
        paint(canvas, disc(u, v, x, eye_y, 0.13), WHITE)
        paint(canvas, disc(u, v, x, eye_y + 0.02, 0.06), BLACK)
    mouth_y = 0.3
    if c.mouth == "smile":
        r = np.hypot(u, v - (mouth_y - 0.12))
        mouth = (r >= 0.16) & (r <= 0.22) & (v > mouth_y - 0.05)
    elif c.mouth == "line":
        mouth = box(u, v, -0.2, 0.2, mouth_y - 0.03, mouth_y + 0.03)
    else:
        mouth = disc(u / 0.13, v / 0.08, 0, mouth_y / 0.08, 1.0)
    paint(canvas, mouth & body, BLACK)


def _zigzag(u: np.ndarray) -> np.ndarray:
    return 0.28 * (4 * np.abs(np.mod(u * 1.4 + 0.25, 1.0) - 0.5) - 1)


def draw_design(canvas: np.ndarray, f: Frame, design: str, colour: str | None) -> None:
    u, v = f.u, f.v
    if design == "zigzag":
        paint(canvas, disc(u, v, 0, 0, 0.92), (0.85, 0.65, 0.13))
        paint(canvas, (np.abs(v - _zigzag(u)) < 0.11) & (np.abs(u) < 0.62), BLACK)
    elif design == "wave":
        paint(canvas, np.maximum(np.abs(u), np.abs(v)) <= 0.82, (0.0, 0.45, 0.45))
        for offset in (-0.3, 0.3):
            paint(canvas, (np.abs(v - offset - 0.14 * np.sin(6 * u)) < 0.07) & (np.abs(u) < 0.7), WHITE)
    elif design == "bolt":
        paint(canvas, polygon(u, v, regular_polygon(6, 0.92)), BLACK)
        paint(canvas, polygon(u, v, [(0.15, -0.7), (-0.35, 0.08), (-0.02, 0.08), (-0.15, 0.7), (0.35, -0.1),
                                     (0.02, -0.1)]), (1.0, 0.85, 0.1))
    else:
        rgb = COLOUR_RGB[colour] if colour else (0.5, 0.5, 0.5)
        if design == "shirt":
            shape = polygon(u, v, [(-0.45, -0.75), (-0.15, -0.75), (0.0, -0.6), (0.15, -0.75), (0.45, -0.75),
                                   (0.92, -0.3), (0.72, -0.08), (0.45, -0.3), (0.45, 0.85), (-0.45, 0.85),
                                   (-0.45, -0.3), (-0.72, -0.08), (-0.92, -0.3)])
        elif design == "dress":
            shape = polygon(u, v, [(-0.25, -0.85), (-0.12, -0.85), (0.0, -0.72), (0.12, -0.85), (0.25, -0.85),
                                   (0.25, -0.2), (0.78, 0.88), (-0.78, 0.88), (-0.25, -0.2)])
        elif design == "trousers":
            shape = box(u, v, -0.5, 0.5, -0.9, -0.62) | polygon(
                u, v, [(-0.5, -0.65), (-0.03, -0.65), (-0.1, 0.92), (-0.55, 0.92)]) | polygon(
                u, v, [(0.5, -0.65), (0.03, -0.65), (0.1, 0.92), (0.55, 0.92)])
        else:
            raise KeyError(f"unknown design {design!r}")
        paint(canvas, shape, rgb)


def render(labels: dict, rng: np.random.Generator) -> np.ndarray:
    """Draw one image for ``labels`` (see ``dataset.sample_labels``); pose and noise come from ``rng``."""
    canvas = background(labels["background"], rng)
    subject = labels["subject"]
    jitter = 0.14 if subject == "object" else 0.1
    cx, cy = rng.uniform(-jitter, jitter, size=2)
    if subject == "object":
        scale, angle = rng.uniform(0.45, 0.66), np.deg2rad(rng.uniform(-20, 20))
    elif subject == "character":
        scale, angle = rng.uniform(0.5, 0.68), np.deg2rad(rng.uniform(-25, 25))
    else:
        scale, angle = rng.uniform(0.5, 0.66), np.deg2rad(rng.uniform(-15, 15))
    frame = Frame(cx, cy, scale, angle)
    if labels["halo"] == "present":
        draw_halo(canvas, frame, 1.2 if subject == "object" else 1.28)
    if subject == "object":
        draw_object(canvas, frame, labels["shape"], labels["colour"], labels["style"])
    elif subject == "character":
        draw_character(canvas, frame, CHARACTER_BY_NAME[labels["character"]])
    else:
        colour = labels["colour"] if labels["colour"] != "none" else None
        draw_design(canvas, frame, labels["design"], colour)
    image = canvas.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
