"""Procedurally drawn faces whose identity lives in known parts, for offline runs with ground truth.

Every identity is a set of part parameters (eyes, brows, nose, mouth) drawn once from the seed.
Everything else -- hair, skin tone, clothes, background, pose, lighting, blur and noise -- is drawn
anew for every image, so a model can only tell identities apart by looking at the parts, and the
mask of those parts is the ground truth of where the evidence is. Optional occluders follow the
AR Face protocols: sunglasses over the eyes or a scarf over the lower face.

Image ``k`` of identity ``i`` is a pure function of ``(seed, i, k)`` (and the occlusion setting,
which draws from its own random stream so the face underneath is the same with and without it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

#: Occlusion settings of :class:`SyntheticFaces`; "random" picks none, glasses or scarf per image.
OCCLUSIONS = (None, "glasses", "scarf", "random")
#: Names of the identity-bearing parts, the keys of :attr:`FaceRendering.parts`.
PART_NAMES = ("eyes", "brows", "nose", "mouth")

_IDENTITY_STREAM = 0
_IMAGE_STREAM = 1
_OCCLUDER_STREAM = 2  # which occluder an image wears (occlusion="random")
_OCCLUDER_LOOK_STREAM = 3  # how the occluder looks
_PAIR_STREAM = 4

# Fixed-point precision of the polygon vertices handed to OpenCV (coordinates times 2**4).
_SUBPIXEL_BITS = 4

_IRIS_COLOURS = np.array(
    [
        [0.36, 0.22, 0.10],  # brown
        [0.16, 0.09, 0.05],  # dark brown
        [0.22, 0.42, 0.72],  # blue
        [0.25, 0.52, 0.30],  # green
        [0.50, 0.55, 0.58],  # grey
        [0.62, 0.45, 0.15],  # amber
    ],
    dtype=np.float32,
)
_SKIN_TONES = np.array(
    [
        [0.98, 0.86, 0.76],
        [0.92, 0.74, 0.60],
        [0.80, 0.60, 0.44],
        [0.62, 0.43, 0.30],
        [0.42, 0.28, 0.19],
    ],
    dtype=np.float32,
)
_HAIR_COLOURS = np.array(
    [
        [0.08, 0.06, 0.05],  # black
        [0.30, 0.18, 0.09],  # brown
        [0.55, 0.36, 0.18],  # light brown
        [0.86, 0.72, 0.42],  # blond
        [0.62, 0.25, 0.10],  # red
        [0.70, 0.70, 0.70],  # grey
    ],
    dtype=np.float32,
)
_HAIR_STYLES = ("bald", "short", "long", "curly")


@dataclass(frozen=True)
class FaceIdentity:
    """Part parameters of one identity, in face coordinates (the image spans [-1, 1], y down)."""

    eye_spacing: float  # half the distance between the eye centres
    eye_y: float
    eye_half_width: float
    eye_openness: float  # upper-lid height as a fraction of the half width
    eye_lower_ratio: float  # lower-lid height relative to the upper lid
    eye_tilt: float  # radians, outer corners up when positive
    iris_colour: tuple[float, float, float]
    iris_size: float  # iris radius as a fraction of the eye's half width
    brow_gap: float  # from the top of the eye to the brow
    brow_length: float
    brow_angle: float  # radians, outer end up when positive
    brow_arch: float
    brow_thickness: float
    brow_colour: tuple[float, float, float]
    nose_length: float  # from the eye line to the tip
    nose_width: float  # half width at the wings
    nose_bridge: float  # half width at the top
    nostril_size: float
    mouth_gap: float  # from the nose tip to the mouth line
    mouth_half_width: float
    mouth_curvature: float  # corners up when positive
    upper_lip: float
    lower_lip: float
    lip_colour: tuple[float, float, float]

    @classmethod
    def sample(cls, rng: np.random.Generator) -> FaceIdentity:
        """Draw the parameters of a new identity."""

        def colour(base: np.ndarray, jitter: float) -> tuple[float, float, float]:
            return tuple(float(c) for c in np.clip(base + rng.uniform(-jitter, jitter, 3), 0.0, 1.0))

        lip_base = np.array([0.75, 0.28, 0.30]) + rng.uniform(-1, 1) * np.array([0.15, 0.12, 0.05])
        return cls(
            eye_spacing=rng.uniform(0.19, 0.27),
            eye_y=rng.uniform(-0.10, -0.04),
            eye_half_width=rng.uniform(0.10, 0.15),
            eye_openness=rng.uniform(0.28, 0.60),
            eye_lower_ratio=rng.uniform(0.45, 0.95),
            eye_tilt=math.radians(rng.uniform(-12, 12)),
            iris_colour=colour(_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))], 0.08),
            iris_size=rng.uniform(0.38, 0.62),
            brow_gap=rng.uniform(0.05, 0.12),
            brow_length=rng.uniform(0.18, 0.28),
            brow_angle=math.radians(rng.uniform(-18, 18)),
            brow_arch=rng.uniform(0.0, 0.05),
            brow_thickness=rng.uniform(0.025, 0.06),
            brow_colour=colour(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * 0.8, 0.05),
            nose_length=rng.uniform(0.20, 0.30),
            nose_width=rng.uniform(0.06, 0.12),
            nose_bridge=rng.uniform(0.015, 0.04),
            nostril_size=rng.uniform(0.012, 0.028),
            mouth_gap=rng.uniform(0.12, 0.17),
            mouth_half_width=rng.uniform(0.13, 0.24),
            mouth_curvature=rng.uniform(-0.05, 0.06),
            upper_lip=rng.uniform(0.015, 0.04),
            lower_lip=rng.uniform(0.022, 0.06),
            lip_colour=colour(lip_base, 0.04),
        )


@dataclass(frozen=True)
class FaceRendering:
    """One drawn face with the masks of its parts (drawn, whether occluded or not) and occluder."""

    image: np.ndarray  # float32 (H, W, 3) RGB in [0, 1]
    parts: dict[str, np.ndarray]  # bool (H, W) per name in PART_NAMES
    occluder: Optional[np.ndarray]  # bool (H, W), None without an occluder
    occluder_kind: Optional[str]  # "glasses", "scarf" or None

    @property
    def identity_mask(self) -> np.ndarray:
        """The visible identity-bearing pixels: the union of the parts minus the occluder."""
        mask = np.logical_or.reduce([self.parts[name] for name in PART_NAMES])
        if self.occluder is not None:
            mask &= ~self.occluder
        return mask


@dataclass(frozen=True)
class _Nuisance:
    """Everything about one image that does not depend on the identity."""

    skin: np.ndarray
    hair_style: str
    hair_colour: np.ndarray
    hairline: float
    clothes: np.ndarray
    background: tuple[np.ndarray, np.ndarray]
    background_angle: float
    face_half_width: float
    face_half_height: float
    pose: np.ndarray  # 2x3 affine from face coordinates to pixels
    gaze: tuple[float, float]
    brow_angle_jitter: float
    mouth_curvature_jitter: float
    openness_jitter: float
    light_direction: float
    light_strength: float
    brightness: float
    blur_sigma: float
    noise_sigma: float


_CIRCLE_ANGLES = np.linspace(0.0, 2.0 * np.pi, 40, endpoint=False)
_UNIT_CIRCLE = np.stack([np.cos(_CIRCLE_ANGLES), np.sin(_CIRCLE_ANGLES)], axis=1)


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    axes = np.array([[rx * c, rx * s], [-ry * s, ry * c]])
    return _UNIT_CIRCLE @ axes + (cx, cy)


def _rotate(points: np.ndarray, angle: float, centre: tuple[float, float]) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    shifted = points - centre
    return np.stack([c * shifted[:, 0] - s * shifted[:, 1], s * shifted[:, 0] + c * shifted[:, 1]], axis=1) + centre


class _Coverage(NamedTuple):
    """Anti-aliased coverage of a shape (0..255), with the box outside which it is zero."""

    alpha: np.ndarray  # (H, W) uint8
    box: tuple[slice, slice]  # rows, columns

    @property
    def mask(self) -> np.ndarray:
        """The pixels at least half covered."""
        return self.alpha >= 128


class _Canvas:
    """Paints polygons given in face coordinates onto an RGB float image through a pose."""

    def __init__(self, size: int, pose: np.ndarray) -> None:
        self.size = size
        self.pose = pose
        self.image = np.zeros((size, size, 3), dtype=np.float32)

    def coverage(self, polygons: list[np.ndarray]) -> _Coverage:
        """Coverage of the union of polygons (face coordinates)."""
        alpha = np.zeros((self.size, self.size), dtype=np.uint8)
        pixels = np.concatenate([polygon @ self.pose[:, :2].T + self.pose[:, 2] for polygon in polygons])
        start = 0
        for polygon in polygons:  # one call per polygon: a single call would cancel out overlaps
            fixed_point = np.rint(pixels[start : start + len(polygon)] * (1 << _SUBPIXEL_BITS)).astype(np.int32)
            cv2.fillPoly(alpha, [fixed_point], 255, lineType=cv2.LINE_AA, shift=_SUBPIXEL_BITS)
            start += len(polygon)
        (left, top), (right, bottom) = pixels.min(axis=0), pixels.max(axis=0)
        rows = slice(max(int(top) - 1, 0), min(int(bottom) + 2, self.size))
        columns = slice(max(int(left) - 1, 0), min(int(right) + 2, self.size))
        return _Coverage(alpha, (rows, columns))

    def paint(
        self,
        coverage: _Coverage,
        colour: np.ndarray | tuple[float, ...],
        opacity: float = 1.0,
        clip: Optional[_Coverage] = None,
    ) -> None:
        """Blend ``colour`` over the covered pixels, optionally only where ``clip`` also covers."""
        box = coverage.box
        alpha = coverage.alpha[box] * (opacity / 255.0)
        if clip is not None:
            alpha *= clip.alpha[box] * (1 / 255.0)
        region = self.image[box]
        region += alpha[..., None] * (np.asarray(colour, dtype=np.float32) - region)

    def fill(self, polygons: list[np.ndarray], colour: np.ndarray | tuple[float, ...]) -> _Coverage:
        coverage = self.coverage(polygons)
        self.paint(coverage, colour)
        return coverage


def _sample_nuisance(rng: np.random.Generator, size: int) -> _Nuisance:
    tone = rng.uniform(0, len(_SKIN_TONES) - 1)
    low = int(tone)
    high = min(low + 1, len(_SKIN_TONES) - 1)
    skin = (1 - (tone - low)) * _SKIN_TONES[low] + (tone - low) * _SKIN_TONES[high]
    skin = np.clip(skin + rng.uniform(-0.03, 0.03, 3), 0, 1)
    hair_colour = np.clip(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] + rng.uniform(-0.05, 0.05, 3), 0, 1)

    angle = math.radians(rng.uniform(-12, 12))
    scale = rng.uniform(1.12, 1.3) * size / 2.0
    shift = rng.uniform(-0.07, 0.07, 2) * size
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    centre = size / 2.0 + shift
    pose = np.array([[c, -s, centre[0]], [s, c, centre[1]]], dtype=np.float64)

    background = (rng.uniform(0.1, 0.9, 3).astype(np.float32), rng.uniform(0.1, 0.9, 3).astype(np.float32))
    return _Nuisance(
        skin=skin.astype(np.float32),
        hair_style=_HAIR_STYLES[rng.integers(len(_HAIR_STYLES))],
        hair_colour=hair_colour.astype(np.float32),
        hairline=rng.uniform(-0.56, -0.46),
        clothes=rng.uniform(0.05, 0.95, 3).astype(np.float32),
        background=background,
        background_angle=rng.uniform(0, 2 * np.pi),
        face_half_width=rng.uniform(0.52, 0.58),
        face_half_height=rng.uniform(0.68, 0.74),
        pose=pose,
        gaze=(rng.uniform(-0.25, 0.25), rng.uniform(-0.15, 0.15)),
        brow_angle_jitter=math.radians(rng.uniform(-3, 3)),
        mouth_curvature_jitter=rng.uniform(-0.008, 0.008),
        openness_jitter=rng.uniform(0.92, 1.08),
        light_direction=rng.uniform(0, 2 * np.pi),
        light_strength=rng.uniform(0.0, 0.35),
        brightness=rng.uniform(0.85, 1.12),
        blur_sigma=rng.uniform(0.0, 0.7),
        noise_sigma=rng.uniform(0.005, 0.03),
    )


def _face_outline(nuisance: _Nuisance) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, 60, endpoint=False)
    sin = np.sin(t)
    narrowing = np.where(sin > 0, 1.0 - 0.28 * sin**2, 1.0)  # the jaw narrows towards the chin
    return np.stack([nuisance.face_half_width * np.cos(t) * narrowing, 0.02 + nuisance.face_half_height * sin], axis=1)


def _hair_cap(nuisance: _Nuisance) -> np.ndarray:
    """The hair covering the top of the head, down to a hairline above the brows."""
    rx, ry = nuisance.face_half_width + 0.03, nuisance.face_half_height + 0.04
    t = np.linspace(np.pi * 1.06, np.pi * 1.94, 30)
    top = np.stack([rx * np.cos(t), 0.02 + ry * np.sin(t)], axis=1)
    u = np.linspace(top[-1, 0], top[0, 0], 20)
    hairline = np.stack([u, nuisance.hairline + 0.22 * (u / rx) ** 2], axis=1)
    return np.concatenate([top, hairline])


def _draw_background_and_body(canvas: _Canvas, nuisance: _Nuisance) -> None:
    size = canvas.size
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ramp = math.cos(nuisance.background_angle) * grid[None, :] + math.sin(nuisance.background_angle) * grid[:, None]
    ramp = np.clip(ramp + 0.5, 0.0, 1.0)[..., None]
    first, second = nuisance.background
    canvas.image[:] = (1 - ramp) * first + ramp * second

    style, hair = nuisance.hair_style, nuisance.hair_colour
    if style == "long":
        canvas.fill([np.array([[-0.66, -0.2], [0.66, -0.2], [0.74, 0.95], [-0.74, 0.95]])], hair)
    elif style == "curly":
        bumps = [
            _ellipse(0.62 * math.cos(a), -0.05 - 0.7 * math.sin(a), 0.17, 0.17)
            for a in np.linspace(-0.3, np.pi + 0.3, 9)
        ]
        canvas.fill([_ellipse(0.0, -0.15, 0.68, 0.7), *bumps], hair)
    neck = np.array([[-0.2, 0.45], [0.2, 0.45], [0.24, 1.05], [-0.24, 1.05]])
    canvas.fill([neck], nuisance.skin * 0.85)
    canvas.fill([_ellipse(0.0, 1.42, 0.95, 0.55)], nuisance.clothes)
    ears = [_ellipse(side * nuisance.face_half_width, -0.02, 0.07, 0.13) for side in (-1, 1)]
    canvas.fill(ears, nuisance.skin * 0.92)
    canvas.fill([_face_outline(nuisance)], nuisance.skin)
    if style != "bald":
        canvas.fill([_hair_cap(nuisance)], hair)


def _eye_polygon(identity: FaceIdentity, side: int, openness: float) -> np.ndarray:
    w = identity.eye_half_width
    upper = w * identity.eye_openness * openness
    lower = upper * identity.eye_lower_ratio
    x = np.linspace(-w, w, 16)
    bulge = np.sqrt(np.clip(1 - (x / w) ** 2, 0, 1))
    top = np.stack([x, -upper * bulge], axis=1)
    bottom = np.stack([x[::-1], lower * bulge[::-1]], axis=1)
    centre = (side * identity.eye_spacing, identity.eye_y)
    return _rotate(np.concatenate([top, bottom]) + centre, -side * identity.eye_tilt, centre)


def _draw_eyes(canvas: _Canvas, identity: FaceIdentity, nuisance: _Nuisance) -> _Coverage:
    openness = nuisance.openness_jitter
    outlines = [_eye_polygon(identity, side, openness) for side in (-1, 1)]
    eyes = canvas.fill(outlines, (0.95, 0.95, 0.93))
    w = identity.eye_half_width
    irises, pupils = [], []
    for side in (-1, 1):
        x, y = side * identity.eye_spacing + nuisance.gaze[0] * w, identity.eye_y + nuisance.gaze[1] * w
        radius = identity.iris_size * w
        irises.append(_ellipse(x, y, radius, radius))
        pupils.append(_ellipse(x, y, 0.45 * radius, 0.45 * radius))
    canvas.paint(canvas.coverage(irises), identity.iris_colour, clip=eyes)
    canvas.paint(canvas.coverage(pupils), (0.03, 0.03, 0.03), clip=eyes)
    canvas.paint(canvas.coverage([_upper_lid(outline, 0.014) for outline in outlines]), (0.15, 0.1, 0.08))
    return eyes


def _upper_lid(eye: np.ndarray, width: float) -> np.ndarray:
    """A band of the given width (face units) along the upper half of an eye outline."""
    upper = eye[: len(eye) // 2]
    normal = np.gradient(upper, axis=0)[:, ::-1] * np.array([1.0, -1.0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-9
    return np.concatenate([upper + normal * width / 2, (upper - normal * width / 2)[::-1]])


def _brow_polygon(identity: FaceIdentity, side: int, angle_jitter: float, openness: float) -> np.ndarray:
    length, thickness = identity.brow_length, identity.brow_thickness
    eye_top = identity.eye_y - identity.eye_half_width * identity.eye_openness * openness
    centre = (side * (identity.eye_spacing + 0.01), eye_top - identity.brow_gap - thickness / 2)
    t = np.linspace(-1.0, 1.0, 14)  # -1 at the inner end, +1 at the outer end
    along = side * t * length / 2
    centre_line = -identity.brow_arch * (1 - t**2)
    half_thickness = thickness / 2 * (1.15 - 0.45 * (t + 1) / 2)  # tapering outwards
    top = np.stack([along, centre_line - half_thickness], axis=1)
    bottom = np.stack([along, centre_line + half_thickness], axis=1)[::-1]
    polygon = np.concatenate([top, bottom]) + centre
    return _rotate(polygon, -side * (identity.brow_angle + angle_jitter), centre)


def _draw_brows(canvas: _Canvas, identity: FaceIdentity, nuisance: _Nuisance) -> _Coverage:
    brows = [_brow_polygon(identity, side, nuisance.brow_angle_jitter, nuisance.openness_jitter) for side in (-1, 1)]
    return canvas.fill(brows, identity.brow_colour)


def _draw_nose(canvas: _Canvas, identity: FaceIdentity, nuisance: _Nuisance) -> _Coverage:
    top, tip = identity.eye_y, identity.eye_y + identity.nose_length
    bridge, wing = identity.nose_bridge, identity.nose_width
    outline = np.array(
        [
            [-bridge, top],
            [bridge, top],
            [wing * 0.55, tip - 0.06],
            [wing, tip - 0.015],
            [wing * 0.7, tip + 0.02],
            [-wing * 0.7, tip + 0.02],
            [-wing, tip - 0.015],
            [-wing * 0.55, tip - 0.06],
        ]
    )
    nose = canvas.coverage([outline])
    canvas.paint(nose, nuisance.skin * 0.72, opacity=0.55)
    ridge = np.array(
        [[bridge * 0.2, top + 0.02], [bridge * 0.9, top + 0.02], [wing * 0.35, tip - 0.02], [0.0, tip - 0.02]]
    )
    canvas.paint(canvas.coverage([ridge]), np.minimum(nuisance.skin * 1.12, 1.0), opacity=0.5)
    nostrils = [
        _ellipse(side * wing * 0.45, tip + 0.002, identity.nostril_size * 1.4, identity.nostril_size * 0.8)
        for side in (-1, 1)
    ]
    canvas.fill(nostrils, nuisance.skin * 0.35)
    return nose


def _draw_mouth(canvas: _Canvas, identity: FaceIdentity, nuisance: _Nuisance) -> _Coverage:
    w = identity.mouth_half_width
    y0 = identity.eye_y + identity.nose_length + identity.mouth_gap
    curvature = identity.mouth_curvature + nuisance.mouth_curvature_jitter
    x = np.linspace(-w, w, 21)
    line = y0 - curvature * (x / w) ** 2
    fullness = np.sqrt(np.clip(1 - (x / w) ** 2, 0, 1)) ** 0.8
    dip = 1 - 0.35 * np.exp(-((x / (0.25 * w)) ** 2))  # the cupid's bow
    upper = np.stack([x, line - identity.upper_lip * fullness * dip], axis=1)
    lower = np.stack([x, line + identity.lower_lip * fullness], axis=1)
    lips = np.concatenate([upper, lower[::-1]])
    mouth = canvas.fill([lips], identity.lip_colour)
    seam = np.concatenate([np.stack([x, line - 0.005], axis=1), np.stack([x, line + 0.005], axis=1)[::-1]])
    canvas.paint(canvas.coverage([seam]), np.asarray(identity.lip_colour) * 0.35, opacity=0.9)
    return mouth


def _glasses() -> list[np.ndarray]:
    lenses = [
        np.array(
            [
                [s * 0.035, -0.23],
                [s * 0.52, -0.23],
                [s * 0.52, 0.03],
                [s * 0.46, 0.09],
                [s * 0.1, 0.09],
                [s * 0.035, 0.01],
            ]
        )
        for s in (-1, 1)
    ]
    bridge = np.array([[-0.05, -0.21], [0.05, -0.21], [0.05, -0.17], [-0.05, -0.17]])
    return [*lenses, bridge]


def _scarf(rng: np.random.Generator) -> list[np.ndarray]:
    u = np.linspace(-0.85, 0.85, 24)
    top_edge = 0.14 + 0.012 * np.sin(u * rng.uniform(6, 12) + rng.uniform(0, 2 * np.pi)) - 0.1 * u**2
    return [np.concatenate([np.stack([u, top_edge], axis=1), [[0.9, 1.2], [-0.9, 1.2]]])]


def _draw_occluder(canvas: _Canvas, kind: str, rng: np.random.Generator) -> _Coverage:
    if kind == "glasses":
        lenses = canvas.fill(_glasses(), rng.uniform(0.02, 0.12, 3))
        glint = _ellipse(rng.choice([-1, 1]) * 0.3, -0.14, 0.06, 0.02, angle=-0.4)
        canvas.paint(canvas.coverage([glint]), (1.0, 1.0, 1.0), opacity=0.35)
        return lenses
    colour, stripe_colour = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    scarf = canvas.fill(_scarf(rng), colour)
    period = rng.uniform(0.1, 0.2)
    stripes = [
        np.array([[-1.0, y], [1.0, y], [1.0, y + period / 3], [-1.0, y + period / 3]])
        for y in np.arange(0.12 + rng.uniform(0, period), 1.2, period)
    ]
    canvas.paint(canvas.coverage(stripes), stripe_colour, clip=scarf)
    return scarf


def _finish(canvas: _Canvas, nuisance: _Nuisance, rng: np.random.Generator) -> np.ndarray:
    """Lighting gradient, camera blur and sensor noise."""
    size = canvas.size
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    ramp = math.cos(nuisance.light_direction) * grid[None, :] + math.sin(nuisance.light_direction) * grid[:, None]
    image = canvas.image * (nuisance.brightness * (1 + nuisance.light_strength * ramp))[..., None]
    if nuisance.blur_sigma > 0.3:  # a narrower kernel would leave the pixels as they are
        image = cv2.GaussianBlur(image, (0, 0), nuisance.blur_sigma)
    image += rng.normal(0.0, nuisance.noise_sigma, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0)


def render_face(
    identity: FaceIdentity,
    size: int,
    image_rng: np.random.Generator,
    occluder: Optional[str] = None,
    occluder_rng: Optional[np.random.Generator] = None,
) -> FaceRendering:
    """Draw one image of ``identity``; all per-image variation comes from ``image_rng``.

    ``occluder`` ("glasses", "scarf" or None) draws from ``occluder_rng`` only, so the face under it
    is the same as without it.
    """
    if occluder not in (None, "glasses", "scarf"):
        raise ValueError(f"occluder must be None, 'glasses' or 'scarf', got {occluder!r}")
    if occluder is not None and occluder_rng is None:
        raise ValueError(f"drawing {occluder!r} needs occluder_rng, a numpy Generator for its look")
    nuisance = _sample_nuisance(image_rng, size)
    canvas = _Canvas(size, nuisance.pose)
    _draw_background_and_body(canvas, nuisance)
    coverage = {
        "nose": _draw_nose(canvas, identity, nuisance),
        "eyes": _draw_eyes(canvas, identity, nuisance),
        "brows": _draw_brows(canvas, identity, nuisance),
        "mouth": _draw_mouth(canvas, identity, nuisance),
    }
    occluder_mask = None
    if occluder is not None:
        occluder_mask = _draw_occluder(canvas, occluder, occluder_rng).mask
    image = _finish(canvas, nuisance, image_rng)
    parts = {name: coverage[name].mask for name in PART_NAMES}
    return FaceRendering(image=image, parts=parts, occluder=occluder_mask, occluder_kind=occluder)


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class SyntheticFaces(Dataset):
    """Procedurally drawn face identities with the masks of their identity-bearing parts.

    Sample ``index`` is image ``index % images_per_identity`` of identity
    ``index // images_per_identity``. Items are dicts with ``image`` (float32 (3, H, W) RGB in
    [0, 1]), ``label`` (int, 0..num_identities-1), ``mask`` (float32 (1, H, W), the visible
    identity parts), ``id`` ("synface-<seed>-<identity>-<k>") and, when ``occlusion`` is set,
    ``occluder_mask`` (float32 (1, H, W), all zeros for images that drew no occluder).
    ``first_identity`` offsets the identities drawn, so disjoint sets (say, training identities
    and verification identities) come from the same seed.
    """

    def __init__(
        self,
        num_identities: int = 200,
        images_per_identity: int = 10,
        size: int = 64,
        seed: int = 0,
        occlusion: Optional[str] = None,
        first_identity: int = 0,
    ) -> None:
        _check_count("num_identities", num_identities, 1)
        _check_count("images_per_identity", images_per_identity, 1)
        _check_count("size", size, 32)
        _check_count("seed", seed, 0)
        _check_count("first_identity", first_identity, 0)
        if occlusion not in OCCLUSIONS:
            raise ValueError(f"occlusion must be one of {OCCLUSIONS}, got {occlusion!r}")
        self.num_identities = int(num_identities)
        self.images_per_identity = int(images_per_identity)
        self.size = int(size)
        self.seed = int(seed)
        self.occlusion = occlusion
        self.first_identity = int(first_identity)
        self._identities: dict[int, FaceIdentity] = {}

    @property
    def num_classes(self) -> int:
        return self.num_identities

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    def identity(self, label: int) -> FaceIdentity:
        """The part parameters of identity ``label`` (0-based within this dataset)."""
        self._check_label(label)
        if label not in self._identities:
            rng = np.random.default_rng((self.seed, _IDENTITY_STREAM, self.first_identity + label))
            self._identities[label] = FaceIdentity.sample(rng)
        return self._identities[label]

    def occluder_of(self, label: int, image: int) -> Optional[str]:
        """Which occluder image ``image`` of identity ``label`` wears under this dataset's setting."""
        if self.occlusion == "random":
            rng = np.random.default_rng((self.seed, _OCCLUDER_STREAM, self.first_identity + label, image))
            return (None, "glasses", "scarf")[int(rng.integers(3))]
        return self.occlusion

    def render(self, label: int, image: int) -> FaceRendering:
        """Draw image ``image`` of identity ``label`` with its part and occluder masks."""
        self._check_label(label)
        if not 0 <= image < self.images_per_identity:
            raise IndexError(f"image must be in [0, {self.images_per_identity}), got {image}")
        identity = self.first_identity + label
        image_rng = np.random.default_rng((self.seed, _IMAGE_STREAM, identity, image))
        occluder_rng = np.random.default_rng((self.seed, _OCCLUDER_LOOK_STREAM, identity, image))
        return render_face(self.identity(label), self.size, image_rng, self.occluder_of(label, image), occluder_rng)

    def item_id(self, index: int) -> str:
        label, image = self._locate(index)
        return f"synface-{self.seed}-{self.first_identity + label}-{image}"

    def __getitem__(self, index: int) -> dict:
        label, image = self._locate(index)
        rendering = self.render(label, image)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(rendering.image.transpose(2, 0, 1))),
            "label": label,
            "mask": torch.from_numpy(rendering.identity_mask[None].astype(np.float32)),
            "id": self.item_id(index),
        }
        if self.occlusion is not None:
            occluder = rendering.occluder if rendering.occluder is not None else np.zeros((self.size, self.size), bool)
            item["occluder_mask"] = torch.from_numpy(occluder[None].astype(np.float32))
        return item

    def _locate(self, index: int) -> tuple[int, int]:
        if isinstance(index, torch.Tensor):
            index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} synthetic faces")
        return divmod(index % len(self), self.images_per_identity)

    def _check_label(self, label: int) -> None:
        if not 0 <= label < self.num_identities:
            raise IndexError(f"identity label must be in [0, {self.num_identities}), got {label}")


class SyntheticFacePairs(Dataset):
    """Verification pairs over :class:`SyntheticFaces`: even pairs genuine, odd pairs impostor.

    Pair ``k`` is a pure function of ``(seed, k)`` and the faces. Items are dicts with ``gallery``
    and ``probe`` images, ``same`` (bool), ``id`` ("synpair-<faces seed>-<seed>-<k>"), the
    ``gallery_mask`` / ``probe_mask`` identity masks and the ``gallery_id`` / ``probe_id`` face ids.
    """

    def __init__(self, faces: SyntheticFaces, num_pairs: int, seed: int = 0) -> None:
        _check_count("num_pairs", num_pairs, 1)
        _check_count("seed", seed, 0)
        if faces.images_per_identity < 2:
            raise ValueError("genuine pairs need two images per identity: use images_per_identity >= 2")
        if faces.num_identities < 2:
            raise ValueError("impostor pairs need two identities: use num_identities >= 2")
        self.faces = faces
        self.num_pairs = int(num_pairs)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.num_pairs

    def indices(self, pair: int) -> tuple[int, int, bool]:
        """(gallery index, probe index, same identity) of pair ``pair`` in the faces dataset."""
        if not 0 <= pair < self.num_pairs:
            raise IndexError(f"pair must be in [0, {self.num_pairs}), got {pair}")
        faces = self.faces
        rng = np.random.default_rng((self.seed, _PAIR_STREAM, pair))
        same = pair % 2 == 0
        if same:
            label = int(rng.integers(faces.num_identities))
            first, second = rng.choice(faces.images_per_identity, size=2, replace=False)
            labels, images = (label, label), (int(first), int(second))
        else:
            first, second = rng.choice(faces.num_identities, size=2, replace=False)
            labels = (int(first), int(second))
            images = tuple(int(i) for i in rng.integers(faces.images_per_identity, size=2))
        gallery, probe = (label * faces.images_per_identity + image for label, image in zip(labels, images))
        return gallery, probe, same

    def __getitem__(self, pair: int) -> dict:
        if isinstance(pair, torch.Tensor):
            pair = int(pair)
        gallery_index, probe_index, same = self.indices(pair)
        gallery, probe = self.faces[gallery_index], self.faces[probe_index]
        return {
            "gallery": gallery["image"],
            "probe": probe["image"],
            "same": same,
            "id": f"synpair-{self.faces.seed}-{self.seed}-{pair}",
            "gallery_mask": gallery["mask"],
            "probe_mask": probe["mask"],
            "gallery_id": gallery["id"],
            "probe_id": probe["id"],
        }
