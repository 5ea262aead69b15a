"""An articulated procedural hand: a skeleton with joint angles, turned into capsules by forward kinematics.

Hand frame (before placing it in the world; the world is z-up, see :mod:`instsim.cameras`):

* ``+z`` points from the wrist towards the fingertips (the hand stands upright in the world),
* ``+x`` is the palm normal: the **palm faces +x**, so a camera at azimuth 0 sees the palm and one at
  azimuth 180 deg sees the back of the hand,
* ``+y`` points towards the thumb: it is a **right hand**, whose thumb a camera at azimuth 0 sees on the
  right of the image and one at azimuth 90 deg sees in front.

Lengths are in "hand units" while the skeleton is built (palm about 1 long, like decimetres); :func:`build_scene`
scales by :data:`HAND_SCALE` (the same for every gesture, so a fist is smaller than an open hand) and centres
the result (the centre of its bounding box) at the origin, so every gesture fits in a sphere of radius < 1 world
unit (:func:`bounding_radius` says how much exactly).

Joint angles are radians. A finger's *flexion* rotates about its local +y axis, bending it towards its palm
side (local +x); *spread* (abduction) rotates about the local x axis, positive towards the thumb (+y).
The thumb's chain starts with a base rotation ``R_y(pitch) R_x(-abduct) R_z(roll)`` (pitch towards the palm,
abduction away from the index finger, roll turning its pad towards the palm), then flexes like a finger.

The palm side of every part (palm, finger pads, thumb pad) has a lighter, pinker albedo than the back
(:attr:`Scene.palm_albedo`, chosen by the surface normal against :attr:`Scene.palm_dir`), and the wrist wears
a blue sleeve cuff: the views from the front, back, sides, above and below all look different.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

__all__ = [
    "FINGERS",
    "HAND_SCALE",
    "SKIN_BACK",
    "SKIN_PALM",
    "SLEEVE",
    "NAIL",
    "FingerGeometry",
    "GEOMETRY",
    "FingerPose",
    "ThumbPose",
    "HandPose",
    "Capsule",
    "Scene",
    "rot_x",
    "rot_y",
    "rot_z",
    "chain_capsules",
    "nail_capsule",
    "finger_capsules",
    "thumb_capsules",
    "palm_capsules",
    "wrist_capsules",
    "thenar_capsules",
    "hand_capsules",
    "build_scene",
    "bounding_radius",
    "scene_sdf",
]

FINGERS = ("thumb", "index", "middle", "ring", "pinky")

#: world units per hand unit; the open gestures (``palm``, ``yeah``) get a bounding radius of ~0.86, ``fist`` ~0.60.
HAND_SCALE = 0.62

SKIN_BACK = (0.80, 0.58, 0.45)  # back of the hand
SKIN_PALM = (0.95, 0.72, 0.64)  # palm side: lighter and pinker
SLEEVE = (0.18, 0.32, 0.72)  # the cuff around the wrist
NAIL = (0.96, 0.86, 0.82)


# ---------------------------------------------------------------------------------------------------------
# Skeleton: geometry (fixed) and pose (joint angles)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FingerGeometry:
    """One digit's fixed geometry in hand units: the base joint position, three bone lengths and radii."""

    base: tuple[float, float, float]
    lengths: tuple[float, float, float]
    radii: tuple[float, float, float]


#: the right hand's digits; the thumb's base is its carpometacarpal joint inside the palm.
GEOMETRY: dict[str, FingerGeometry] = {
    "thumb": FingerGeometry((0.04, 0.28, 0.14), (0.40, 0.30, 0.25), (0.125, 0.115, 0.105)),
    "index": FingerGeometry((0.0, 0.31, 0.95), (0.40, 0.24, 0.19), (0.100, 0.094, 0.088)),
    "middle": FingerGeometry((0.0, 0.105, 0.99), (0.44, 0.28, 0.20), (0.102, 0.096, 0.090)),
    "ring": FingerGeometry((0.0, -0.105, 0.95), (0.41, 0.26, 0.19), (0.098, 0.092, 0.086)),
    "pinky": FingerGeometry((0.0, -0.30, 0.86), (0.32, 0.20, 0.17), (0.088, 0.082, 0.077)),
}


@dataclass(frozen=True)
class FingerPose:
    """Joint angles of a finger in radians: ``flex`` for the (MCP, PIP, DIP) joints, ``spread`` at the MCP."""

    flex: tuple[float, float, float] = (0.0, 0.0, 0.0)
    spread: float = 0.0


@dataclass(frozen=True)
class ThumbPose:
    """Thumb joint angles in radians: the base rotation (``abduct``, ``pitch``, ``roll``, see the module
    docstring) and ``flex`` for the (CMC, MCP, IP) joints."""

    abduct: float = 0.6
    pitch: float = 0.2
    roll: float = -1.2
    flex: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class HandPose:
    """Joint angles of the whole hand (radians), one pose per digit."""

    thumb: ThumbPose = field(default_factory=ThumbPose)
    index: FingerPose = field(default_factory=FingerPose)
    middle: FingerPose = field(default_factory=FingerPose)
    ring: FingerPose = field(default_factory=FingerPose)
    pinky: FingerPose = field(default_factory=FingerPose)

    def jittered(self, sigma: float, generator: torch.Generator) -> "HandPose":
        """A copy with every angle perturbed by ``sigma`` (radians) times a standard normal draw."""

        def noise(n: int) -> list[float]:
            return (torch.randn(n, generator=generator, dtype=torch.float64) * sigma).tolist()

        out = {}
        for name in FINGERS:
            p = getattr(self, name)
            d = noise(6 if name == "thumb" else 4)
            flex = tuple(f + e for f, e in zip(p.flex, d[:3]))
            if name == "thumb":
                out[name] = ThumbPose(p.abduct + d[3], p.pitch + d[4], p.roll + d[5], flex)
            else:
                out[name] = FingerPose(flex, p.spread + d[3])
        return replace(self, **out)


# ---------------------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capsule:
    """One capsule in hand units: segment ``a``-``b``, ``radius``, back/palm-side albedo and the direction its
    palm side faces (zero vector: no palm side)."""

    name: str
    a: tuple[float, float, float]
    b: tuple[float, float, float]
    radius: float
    albedo: tuple[float, float, float]
    palm_albedo: tuple[float, float, float]
    palm_dir: tuple[float, float, float]


@dataclass
class Scene:
    """A set of ``K`` capsules in world units (float32 tensors).

    Attributes:
        a, b: ``(K, 3)`` segment endpoints.
        radius: ``(K,)`` radii.
        albedo: ``(K, 3)`` RGB albedo in [0, 1] (the back side of the hand).
        palm_albedo: ``(K, 3)`` albedo of the part of the surface facing ``palm_dir`` (``None``: ``albedo``).
        palm_dir: ``(K, 3)`` unit direction the primitive's palm side faces, or zeros (``None``: no palm side).
        names: ``K`` part names such as ``"index.2"`` (for debugging and tests).
    """

    a: torch.Tensor
    b: torch.Tensor
    radius: torch.Tensor
    albedo: torch.Tensor
    palm_albedo: torch.Tensor | None = None
    palm_dir: torch.Tensor | None = None
    names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.radius.shape[0])

    def to(self, device: torch.device | str) -> "Scene":
        """The same scene with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Scene(move(self.a), move(self.b), move(self.radius), move(self.albedo),
                     move(self.palm_albedo), move(self.palm_dir), self.names)


# ---------------------------------------------------------------------------------------------------------
# Forward kinematics
# ---------------------------------------------------------------------------------------------------------


def rot_x(angle: float) -> torch.Tensor:
    """``(3, 3)`` float64 rotation by ``angle`` radians about the x axis (right-handed)."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], dtype=torch.float64)


def rot_y(angle: float) -> torch.Tensor:
    """``(3, 3)`` float64 rotation about y; a positive angle turns +z towards +x (finger flexion)."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=torch.float64)


def rot_z(angle: float) -> torch.Tensor:
    """``(3, 3)`` float64 rotation about z; a positive angle turns +x towards +y."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _t(v: torch.Tensor) -> tuple[float, float, float]:
    return tuple(float(x) for x in v)  # type: ignore[return-value]


def chain_capsules(
    name: str,
    base: Sequence[float],
    base_rot: torch.Tensor,
    geom: FingerGeometry,
    flex: Sequence[float],
    nail: bool = True,
) -> list[Capsule]:
    """Forward kinematics of one three-bone chain: joint ``i`` flexes by ``flex[i]`` about its local y axis,
    then bone ``i`` runs ``lengths[i]`` along the local z axis. Returns the bones (``name.0`` .. ``name.2``),
    plus a fingernail on the back of the last bone when ``nail``."""
    pos = torch.as_tensor(base, dtype=torch.float64)
    rot = base_rot
    caps = []
    for i, (length, radius, angle) in enumerate(zip(geom.lengths, geom.radii, flex)):
        rot = rot @ rot_y(angle)
        end = pos + rot[:, 2] * length
        caps.append(Capsule(f"{name}.{i}", _t(pos), _t(end), radius, SKIN_BACK, SKIN_PALM, _t(rot[:, 0])))
        pos = end
    if nail:
        caps.append(nail_capsule(name, caps[-1], rot))
    return caps


def nail_capsule(name: str, tip: Capsule, rot: torch.Tensor) -> Capsule:
    """A flat-ish nail on the back (local -x side) of the distal bone ``tip`` whose frame is ``rot``."""
    a, b = torch.tensor(tip.a, dtype=torch.float64), torch.tensor(tip.b, dtype=torch.float64)
    r = tip.radius
    back = -rot[:, 0] * (r * 0.55)
    start = a + (b - a) * 0.45 + back
    end = b - rot[:, 2] * (r * 0.15) + back
    return Capsule(f"{name}.nail", _t(start), _t(end), r * 0.5, NAIL, NAIL, (0.0, 0.0, 0.0))


def finger_capsules(name: str, pose: FingerPose) -> list[Capsule]:
    """A finger's capsules: spread about x at the knuckle, then the flexion chain."""
    geom = GEOMETRY[name]
    return chain_capsules(name, geom.base, rot_x(-pose.spread), geom, pose.flex)


def thumb_capsules(pose: ThumbPose) -> list[Capsule]:
    """The thumb's capsules: the base rotation ``R_y(pitch) R_x(-abduct) R_z(roll)``, then the flexion chain."""
    geom = GEOMETRY["thumb"]
    base_rot = rot_y(pose.pitch) @ rot_x(-pose.abduct) @ rot_z(pose.roll)
    return chain_capsules("thumb", geom.base, base_rot, geom, pose.flex)


def _skin(name: str, a: Sequence[float], b: Sequence[float], r: float, palm_dir=(1.0, 0.0, 0.0)) -> Capsule:
    return Capsule(name, tuple(a), tuple(b), r, SKIN_BACK, SKIN_PALM, tuple(palm_dir))  # type: ignore[arg-type]


def palm_capsules() -> list[Capsule]:
    """The palm as a rounded slab: a metacarpal capsule per finger with fillers in between, a knuckle ridge,
    the wrist edge, and the thenar / hypothenar pads that bulge out on the palm side only."""
    caps = []
    knuckles = [GEOMETRY[f].base for f in ("index", "middle", "ring", "pinky")]
    for f, (x, y, z) in zip(("index", "middle", "ring", "pinky"), knuckles):
        caps.append(_skin(f"palm.{f}", (0.0, 0.78 * y, 0.16), (x, y, z - 0.04), 0.12))
    for i in range(3):  # fill the valleys between neighbouring metacarpals
        (x0, y0, z0), (x1, y1, z1) = knuckles[i], knuckles[i + 1]
        ym, zm = 0.5 * (y0 + y1), 0.5 * (z0 + z1)
        caps.append(_skin(f"palm.fill{i}", (0.0, 0.78 * ym, 0.2), (0.0, ym, zm - 0.08), 0.11))
    caps.append(_skin("palm.wrist", (0.0, 0.2, 0.14), (0.0, -0.19, 0.14), 0.13))
    caps.append(_skin("palm.thenar", (0.06, 0.18, 0.16), (0.05, 0.27, 0.52), 0.11))
    caps.append(_skin("palm.hypothenar", (0.05, -0.17, 0.18), (0.05, -0.23, 0.66), 0.1))
    return caps


def wrist_capsules() -> list[Capsule]:
    """The wrist (two side-by-side capsules: wider than deep) and the sleeve cuff below it."""
    caps = [
        _skin("wrist.0", (0.0, 0.09, -0.22), (0.0, 0.09, 0.1), 0.15),
        _skin("wrist.1", (0.0, -0.09, -0.22), (0.0, -0.09, 0.1), 0.15),
    ]
    caps.append(Capsule("sleeve", (0.0, 0.0, -0.3), (0.0, 0.0, -0.5), 0.25, SLEEVE, SLEEVE, (0.0, 0.0, 0.0)))
    return caps


def thenar_capsules(thumb: Sequence[Capsule]) -> list[Capsule]:
    """Soft tissue that follows the thumb: the thenar muscle from the palm to the thumb's first joint and the
    web between thumb and index finger (``thumb`` are the capsules from :func:`thumb_capsules`)."""
    mcp = thumb[0].b
    return [
        _skin("thenar.muscle", (0.06, 0.2, 0.22), mcp, 0.14),
        _skin("thenar.web", (0.0, 0.3, 0.72), mcp, 0.07),
    ]


def hand_capsules(pose: HandPose) -> list[Capsule]:
    """Every capsule of the posed hand, in hand units and the hand frame (see the module docstring)."""
    thumb = thumb_capsules(pose.thumb)
    caps = wrist_capsules() + palm_capsules() + thumb + thenar_capsules(thumb)
    for name in FINGERS[1:]:
        caps += finger_capsules(name, getattr(pose, name))
    return caps


# ---------------------------------------------------------------------------------------------------------
# Scene assembly
# ---------------------------------------------------------------------------------------------------------


def _extent_centre(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Centre of the axis-aligned bounding box of the capsules ``(3,)``."""
    lo = torch.minimum(a, b) - r[:, None]
    hi = torch.maximum(a, b) + r[:, None]
    return 0.5 * (lo.min(dim=0).values + hi.max(dim=0).values)


def build_scene(caps: Sequence[Capsule], scale: float = HAND_SCALE, centre: bool = True) -> Scene:
    """Capsules (hand units) -> a float32 :class:`Scene` in world units, scaled by ``scale`` and, when
    ``centre``, translated so that the centre of its bounding box is at the origin."""
    a = torch.tensor([c.a for c in caps], dtype=torch.float64) * scale
    b = torch.tensor([c.b for c in caps], dtype=torch.float64) * scale
    r = torch.tensor([c.radius for c in caps], dtype=torch.float64) * scale
    if centre:
        shift = _extent_centre(a, b, r)
        a, b = a - shift, b - shift
    palm_dir = torch.tensor([c.palm_dir for c in caps], dtype=torch.float64)
    norm = palm_dir.norm(dim=-1, keepdim=True)
    palm_dir = torch.where(norm > 0, palm_dir / norm.clamp_min(1e-12), palm_dir)
    return Scene(
        a=a.float(),
        b=b.float(),
        radius=r.float(),
        albedo=torch.tensor([c.albedo for c in caps], dtype=torch.float32),
        palm_albedo=torch.tensor([c.palm_albedo for c in caps], dtype=torch.float32),
        palm_dir=palm_dir.float(),
        names=tuple(c.name for c in caps),
    )


def bounding_radius(scene: Scene) -> float:
    """Radius (world units) of the smallest origin-centred sphere holding every capsule of ``scene``:
    ``max_k max(|a_k|, |b_k|) + r_k``. About 0.86 for ``palm`` and ``yeah``, 0.60 for ``fist``."""
    reach = torch.maximum(scene.a.norm(dim=-1), scene.b.norm(dim=-1)) + scene.radius
    return float(reach.max())


def scene_sdf(scene: Scene, points: torch.Tensor) -> torch.Tensor:
    """Signed distance ``(...,)`` from world points ``(..., 3)`` to the union of the scene's capsules
    (negative inside). Used for checks; the renderer intersects analytically."""
    p = points[..., None, :]  # (..., 1, 3)
    ba = scene.b - scene.a  # (K, 3)
    pa = p - scene.a
    h = ((pa * ba).sum(-1) / (ba * ba).sum(-1).clamp_min(1e-20)).clamp(0.0, 1.0)
    d = (pa - h[..., None] * ba).norm(dim=-1) - scene.radius
    return d.min(dim=-1).values
