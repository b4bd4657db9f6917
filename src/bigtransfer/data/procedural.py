"""A procedural upstream dataset, "glyphs": many classes of rendered strokes, shapes and textures.

It lets the BiT story run end to end offline: pre-train on it, then transfer to real images.
Everything is a pure function of the seed, so the same seed always renders the same dataset.

Each class is a template drawn once from the seed, from one of three families:
  * strokes:  2-4 quadratic Bezier curves (handwriting-like glyphs),
  * shapes:   a filled or outlined star-polygon, sometimes with a hole,
  * textures: an oriented grating of a class-specific frequency inside a class-specific mask.
Each example renders its class's template with its own random affine jitter (rotation, scale,
shift), stroke width, contrast, polarity and pixel noise, supersampled 4x for anti-aliasing, at
a random native resolution between 8 px and the output size, then scaled up: real collections
mix sharp and low-resolution images, and a representation should cope with both. With `deform`
each example also moves its template's control points a little on its own, so a class varies
in shape and not only in pose, as handwritten characters (and real objects) do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..errors import BigTransferError
from .imageset import ImageSet, Splits

FAMILIES = ("strokes", "shapes", "textures")
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Template:
    family: str
    params: tuple


def class_templates(num_classes: int, seed: int) -> list[Template]:
    """One template per class; families in proportion 50% strokes, 30% shapes, 20% textures."""
    rng = np.random.default_rng([seed, 0x9E11])
    templates = []
    for c in range(num_classes):
        family = FAMILIES[0] if c % 10 < 5 else FAMILIES[1] if c % 10 < 8 else FAMILIES[2]
        if family == "strokes":
            strokes = tuple(tuple(map(tuple, rng.uniform(0.12, 0.88, size=(3, 2)))) for _ in range(rng.integers(2, 5)))
            templates.append(Template(family, strokes))
        elif family == "shapes":
            corners = int(rng.integers(3, 8))
            radii = tuple(rng.uniform(0.45, 1.0, size=corners))
            templates.append(Template(family, (radii, bool(rng.random() < 0.5), bool(rng.random() < 0.3))))
        else:
            templates.append(Template(family, (float(rng.uniform(0, math.pi)), float(rng.uniform(2.5, 6.0)),
                                               int(rng.integers(0, 3)))))
    return templates


def _affine(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Points in [0, 1]^2 -> jittered points (rotation, scale, shift about the centre)."""
    angle = rng.uniform(-0.35, 0.35)
    scale = rng.uniform(0.8, 1.1)
    shift = rng.uniform(-0.08, 0.08, size=2)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return (points - 0.5) @ rot.T * scale + 0.5 + shift


def _bezier(p0, p1, p2, n: int = 24) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t**2 * np.asarray(p2)


NATIVE_SIZES = (8, 12, 16, 24, 32)


def render(template: Template, rng: np.random.Generator, size: int, deform: float = 0.0) -> np.ndarray:
    """One example of `template` as a uint8 [size, size] grey image (ink bright on dark).

    `deform` (a fraction of the side) moves every stroke control point and polygon corner of this
    example on its own: the class keeps its shape only up to a non-rigid change, as handwritten
    characters do, not just up to an affine one. 0 draws nothing extra: the same images as before."""
    native = int(rng.choice([s for s in NATIVE_SIZES if s < size] + [size]))
    big = native * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    if template.family == "strokes":
        width = int(rng.uniform(0.06, 0.12) * big)
        for stroke in template.params:
            if deform:
                stroke = np.asarray(stroke) + rng.normal(0, deform, size=(3, 2))
            curve = _affine(_bezier(*stroke), rng) * big
            draw.line([tuple(p) for p in curve], fill=255, width=width, joint="curve")
    elif template.family == "shapes":
        radii, filled, hole = template.params
        if deform:
            radii = tuple(np.clip(np.asarray(radii) + rng.normal(0, 2 * deform, size=len(radii)), 0.2, 1.2))
        angles = np.linspace(0, 2 * math.pi, len(radii), endpoint=False) + rng.uniform(0, 0.3)
        outline = np.stack([0.5 + 0.38 * np.array(radii) * np.cos(angles),
                            0.5 + 0.38 * np.array(radii) * np.sin(angles)], axis=1)
        polygon = [tuple(p) for p in _affine(outline, rng) * big]
        if filled:
            draw.polygon(polygon, fill=255)
            if hole:
                draw.ellipse([big * 0.42, big * 0.42, big * 0.58, big * 0.58], fill=0)
        else:
            draw.polygon(polygon, outline=255, width=int(rng.uniform(0.06, 0.1) * big))
    else:
        angle, frequency, mask = template.params
        yy, xx = np.mgrid[0:big, 0:big] / big - 0.5
        phase = rng.uniform(0, 2 * math.pi)
        theta = angle + rng.uniform(-0.15, 0.15)
        wave = 0.5 + 0.5 * np.sin(2 * math.pi * frequency * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
        radius = rng.uniform(0.3, 0.42)
        inside = (np.hypot(xx, yy) < radius) if mask == 0 else (np.maximum(abs(xx), abs(yy)) < radius) if mask == 1 \
            else (abs(xx) + abs(yy) < radius * 1.3)
        canvas = Image.fromarray((wave * inside * 255).astype(np.uint8))
    small = canvas.resize((native, native), Image.Resampling.BOX)
    image = np.asarray(small.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    low, high = rng.uniform(0.0, 0.25), rng.uniform(0.7, 1.0)
    image = low + (high - low) * image
    if rng.random() < 0.15:
        image = 1.0 - image
    image = image + rng.normal(0, rng.uniform(0.0, 0.06), size=image.shape)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def glyphs(classes: int = 100, per_class: int = 200, test_per_class: int = 20, size: int = 32,
           seed: int = 0, deform: int = 0, progress: bool = True) -> Splits:
    """Render the whole dataset into memory (RGB uint8), train and test splits; `deform` is the
    per-example shape jitter in percent of the side (see `render`)."""
    from tqdm.auto import tqdm

    num_classes = classes
    if num_classes < 2 or per_class < 1 or test_per_class < 0 or size < 8:
        raise BigTransferError(
            f"glyphs: need classes >= 2, per_class >= 1, test_per_class >= 0, size >= 8 "
            f"(got {classes}, {per_class}, {test_per_class}, {size})")
    if not 0 <= deform <= 25:
        raise BigTransferError(f"glyphs: deform is a percentage of the side from 0 to 25, got {deform}")
    templates = class_templates(num_classes, seed)
    names = [f"{t.family}{c:03d}" for c, t in enumerate(templates)]

    def split(count: int, offset: int) -> ImageSet:
        n = num_classes * count
        pixels = np.empty((n, size, size), dtype=np.uint8)
        labels = np.arange(n) % num_classes
        for i in tqdm(range(n), desc="rendering glyphs", unit="img", disable=not progress or n < 5000, leave=False):
            pixels[i] = render(templates[labels[i]], np.random.default_rng([seed, offset + i]), size, deform / 100)
        return ImageSet(names, labels, pixels=np.repeat(pixels[..., None], 3, axis=-1), origin=f"glyphs(seed={seed}{f', deform={deform}' if deform else ''})")

    return Splits(split(per_class, 0), split(test_per_class, 10**9) if test_per_class else None)
