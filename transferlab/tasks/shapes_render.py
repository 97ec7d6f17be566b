"""Procedural renderer behind the ``shapes`` task: coloured filled shapes on a dark, noisy background.

Rendering is plain numpy on pixel centres with no anti-aliasing, so every pixel belongs to exactly one
shape or to the background and the mask is exact. Only IEEE-exact operations (+, -, *, /, sqrt,
comparisons) touch the geometry, and the random stream is numpy's PCG64 seeded with a
``SeedSequence``, so a seed gives the same images on every platform.

Geometry: each shape lives in a unit frame ``u, v`` in [-1, 1] (v points down) scaled by a half-extent
``r`` in pixels. Its pixel area is drawn first (as a fraction of the image side) and ``r`` follows from
the kind's unit area, so no kind is systematically larger than another and the labels stay balanced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Bump whenever the output for a given seed changes (it is part of the task fingerprint).
RENDER_VERSION = 1

KINDS = ("circle", "square", "triangle", "diamond", "cross", "star")
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.1, 0.3, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
COLOUR_NAMES = tuple(PALETTE)
BACKGROUND_MAX = 0.15  # background pixels are uniform noise in [0, BACKGROUND_MAX) per channel
MAX_SHAPES = 3

_CROSS_HALF_WIDTH = 1.0 / 3.0
_STAR_INNER = 0.5


def _star_kites() -> list[np.ndarray]:
    # A five-pointed star, tip up, as five convex kites (centre, valley, tip, next valley). Vertices are
    # rounded so the libm used for cos/sin cannot change a pixel.
    def point(angle_deg: float, radius: float) -> tuple[float, float]:
        a = math.radians(angle_deg)
        return round(radius * math.cos(a), 9), round(radius * math.sin(a), 9)

    kites = []
    for k in range(5):
        tip = -90.0 + 72.0 * k
        quad = [(0.0, 0.0), point(tip - 36.0, _STAR_INNER), point(tip, 1.0), point(tip + 36.0, _STAR_INNER)]
        kites.append(np.array(quad))
    return kites


_W = _CROSS_HALF_WIDTH
# Every kind but the circle is a union of convex polygons in the unit frame.
_POLYGONS: dict[str, list[np.ndarray]] = {
    "square": [np.array([(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)])],
    "triangle": [np.array([(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)])],
    "diamond": [np.array([(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)])],
    "cross": [
        np.array([(-1.0, -_W), (1.0, -_W), (1.0, _W), (-1.0, _W)]),
        np.array([(-_W, -1.0), (_W, -1.0), (_W, 1.0), (-_W, 1.0)]),
    ],
    "star": _star_kites(),
}


def _inner_edges(poly: np.ndarray) -> list[tuple[float, float, float, float]]:
    # Edges (x1, y1, x2, y2) of a convex polygon, ordered so that its inside is on their left: the
    # cross product of the edge with (point - start) is then >= 0 for every inside point.
    x, y = poly[:, 0].tolist(), poly[:, 1].tolist()
    k = len(x)
    twice_area = sum(x[i] * y[(i + 1) % k] - x[(i + 1) % k] * y[i] for i in range(k))
    order = list(range(k)) if twice_area > 0 else list(range(k))[::-1]
    return [(x[order[i]], y[order[i]], x[order[(i + 1) % k]], y[order[(i + 1) % k]]) for i in range(k)]


_EDGES = {kind: [_inner_edges(poly) for poly in polys] for kind, polys in _POLYGONS.items()}
UNIT_AREA = {
    "circle": math.pi,
    "square": 4.0,
    "triangle": 2.0,
    "diamond": 2.0,
    "cross": 8.0 * _W - 4.0 * _W * _W,
    "star": 5.0 * _STAR_INNER * math.sin(math.radians(36.0)),
}

# Sampling ranges: the side of the largest shape's area square as a fraction of the image side, and the
# other shapes' sides relative to it; acceptance rules keep every shape clearly visible and the largest
# one unambiguous.
LARGEST_SIDE = (0.30, 0.50)
OTHER_SIDE_RATIO = (0.45, 0.80)
MIN_VISIBLE_SHARE = 0.5  # each shape shows at least this share of its own pixels
MIN_VISIBLE_PIXELS = 4
LARGEST_MARGIN = 1.25  # visible area of the largest shape / that of the second largest


def inside(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean array: which unit-frame points ``(u, v)`` lie in a shape of ``kind``."""
    if kind == "circle":
        return u * u + v * v <= 1.0
    hit = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for edges in _EDGES[kind]:
        part = np.ones_like(hit)
        for x1, y1, x2, y2 in edges:
            part &= (x2 - x1) * (v - y1) - (y2 - y1) * (u - x1) >= 0.0
        hit |= part
    return hit


@dataclass
class RenderedShapes:
    """A batch of N scenes with up to ``MAX_SHAPES`` shapes each (slots beyond ``count`` are unused).

    Attributes:
        image: float32 N x 3 x H x W in [0, 1], not normalised.
        owner: int8 N x H x W, the slot of the visible shape at each pixel, -1 for background.
        count: int64 N, shapes per image.
        kind: int64 N x MAX_SHAPES, index into ``KINDS`` (-1 in unused slots).
        colour: int64 N x MAX_SHAPES, index into ``COLOUR_NAMES``, distinct within an image (-1 if unused).
        visible: int64 N x MAX_SHAPES, visible pixels of each shape.
        box: float32 N x MAX_SHAPES x 4, each shape's visible pixels' box as normalised cx, cy, w, h.
    """

    image: np.ndarray
    owner: np.ndarray
    count: np.ndarray
    kind: np.ndarray
    colour: np.ndarray
    visible: np.ndarray
    box: np.ndarray

    @property
    def largest(self) -> np.ndarray:
        """int64 N: the slot of each image's largest shape by visible area."""
        return np.argmax(self.visible, axis=1)

    @property
    def mask(self) -> np.ndarray:
        """int64 N x H x W: 0 for background, kind + 1 of the visible shape elsewhere."""
        mask = np.zeros(self.owner.shape, dtype=np.int64)
        for slot in range(MAX_SHAPES):
            mask = np.where(self.owner == slot, self.kind[:, slot, None, None] + 1, mask)
        return mask


def render_scenes(
    n: int, image_size: int, rng: np.random.Generator, *, min_shapes: int = 1, max_shapes: int = MAX_SHAPES
) -> RenderedShapes:
    """Render ``n`` accepted scenes; rejected candidates are redrawn from ``rng`` until none is left."""
    s = image_size
    owner = np.full((n, s, s), -1, dtype=np.int8)
    count = np.zeros(n, dtype=np.int64)
    kind = np.zeros((n, MAX_SHAPES), dtype=np.int64)
    colour = np.zeros((n, MAX_SHAPES), dtype=np.int64)
    todo = np.arange(n)
    for _ in range(1000):
        c_count, c_kind, c_colour, c_owner, ok = _draw_candidates(len(todo), s, rng, min_shapes, max_shapes)
        done = todo[ok]
        owner[done], count[done] = c_owner[ok], c_count[ok]
        kind[done], colour[done] = c_kind[ok], c_colour[ok]
        todo = todo[~ok]
        if len(todo) == 0:
            break
    else:  # pragma: no cover - the acceptance rate is far above zero for every allowed option
        raise RuntimeError(f"shapes: could not place shapes in {len(todo)} images of {s} px")
    visible = np.stack([(owner == m).sum(axis=(1, 2)) for m in range(MAX_SHAPES)], axis=1).astype(np.int64)
    box = np.stack([_boxes(owner == m) for m in range(MAX_SHAPES)], axis=1)
    image = rng.random((n, 3, s, s), dtype=np.float32) * np.float32(BACKGROUND_MAX)
    rgb = np.array([PALETTE[c] for c in COLOUR_NAMES], dtype=np.float32)[colour]  # N x MAX_SHAPES x 3
    for slot in range(MAX_SHAPES):
        image = np.where((owner == slot)[:, None], rgb[:, slot, :, None, None], image)
    return RenderedShapes(image, owner, count, kind, colour, visible, box)


def _draw_candidates(
    n: int, s: int, rng: np.random.Generator, min_shapes: int, max_shapes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw and rasterise ``n`` candidate scenes; returns count, kind, colour, owner and acceptance."""
    m = MAX_SHAPES
    count = rng.integers(min_shapes, max_shapes + 1, size=n)
    kind = rng.integers(0, len(KINDS), size=(n, m))
    colour = np.argsort(rng.random((n, len(COLOUR_NAMES))), axis=1)[:, :m]  # distinct within an image
    big = rng.integers(0, count)  # which slot (hence draw order) holds the largest shape
    largest = rng.uniform(*LARGEST_SIDE, size=n)
    side = largest[:, None] * rng.uniform(*OTHER_SIDE_RATIO, size=(n, m))
    side[np.arange(n), big] = largest
    unit_area = np.array([UNIT_AREA[k] for k in KINDS])[kind]
    half = np.minimum(np.sqrt((side * s) ** 2 / unit_area), s / 2.0)
    cx = half + rng.random((n, m)) * (s - 2.0 * half)
    cy = half + rng.random((n, m)) * (s - 2.0 * half)

    centres = np.arange(s, dtype=np.float64) + 0.5
    owner = np.full((n, s, s), -1, dtype=np.int8)
    drawn = np.zeros((n, m), dtype=np.int64)
    for slot in range(m):  # later slots are drawn on top
        for k, name in enumerate(KINDS):
            rows = np.nonzero((slot < count) & (kind[:, slot] == k))[0]
            if len(rows) == 0:
                continue
            r = half[rows, slot, None, None]
            u = (centres[None, None, :] - cx[rows, slot, None, None]) / r
            v = (centres[None, :, None] - cy[rows, slot, None, None]) / r
            hit = inside(name, u, v)
            drawn[rows, slot] = hit.sum(axis=(1, 2))
            block = owner[rows]
            block[hit] = slot
            owner[rows] = block
    visible = np.stack([(owner == slot).sum(axis=(1, 2)) for slot in range(m)], axis=1)
    active = np.arange(m)[None, :] < count[:, None]
    clear = (visible >= MIN_VISIBLE_SHARE * drawn) & (visible >= MIN_VISIBLE_PIXELS)
    ordered = -np.sort(-np.where(active, visible, 0), axis=1)
    distinct = (count < 2) | (ordered[:, 0] >= LARGEST_MARGIN * ordered[:, 1])
    ok = np.all(clear | ~active, axis=1) & distinct
    return count, np.where(active, kind, -1), np.where(active, colour, -1), owner, ok


def _boxes(hit: np.ndarray) -> np.ndarray:
    """float32 N x 4 normalised (cx, cy, w, h) of the True pixels of N x H x W ``hit``; zeros if none."""
    n, s, _ = hit.shape
    rows, cols = hit.any(axis=2), hit.any(axis=1)
    y0, x0 = rows.argmax(axis=1), cols.argmax(axis=1)
    y1, x1 = s - rows[:, ::-1].argmax(axis=1), s - cols[:, ::-1].argmax(axis=1)
    box = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=1) / s
    return np.where(rows.any(axis=1)[:, None], box, 0.0).astype(np.float32)
