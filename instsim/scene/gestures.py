"""The hand gestures instsim renders as object classes: ``fist``, ``yeah`` (index and middle finger up in a V)
and ``palm`` (open hand).

Each gesture is a :class:`~instsim.scene.hand.HandPose` (joint angles in radians, see :mod:`instsim.scene.hand`
for the hand frame); :func:`make_hand` turns it into a centred :class:`~instsim.scene.hand.Scene` in world units.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from .hand import FingerPose, HandPose, Scene, ThumbPose, build_scene, hand_capsules

__all__ = ["GESTURES", "gesture_pose", "make_hand"]

GESTURES = ("fist", "yeah", "palm")

_D = math.radians

# fingers curled into the palm (MCP, PIP, DIP flexion)
_CURLED = (_D(98), _D(108), _D(72))

_POSES: dict[str, HandPose] = {
    "fist": HandPose(
        thumb=ThumbPose(abduct=_D(4), pitch=_D(36), roll=_D(-53), flex=(_D(-22), _D(50), _D(28))),
        index=FingerPose(_CURLED, _D(2)),
        middle=FingerPose(_CURLED, _D(0)),
        ring=FingerPose(_CURLED, _D(-2)),
        pinky=FingerPose(_CURLED, _D(-4)),
    ),
    "yeah": HandPose(
        thumb=ThumbPose(abduct=_D(55), pitch=_D(-2), roll=_D(-44), flex=(_D(45), _D(54), _D(20))),
        index=FingerPose((_D(4), _D(3), _D(2)), _D(12)),
        middle=FingerPose((_D(4), _D(3), _D(2)), _D(-9)),
        ring=FingerPose(_CURLED, _D(-2)),
        pinky=FingerPose(_CURLED, _D(-4)),
    ),
    "palm": HandPose(
        thumb=ThumbPose(abduct=_D(42), pitch=_D(12), roll=_D(-70), flex=(_D(0), _D(8), _D(8))),
        index=FingerPose((_D(5), _D(5), _D(3)), _D(9)),
        middle=FingerPose((_D(5), _D(5), _D(3)), _D(1)),
        ring=FingerPose((_D(5), _D(5), _D(3)), _D(-6)),
        pinky=FingerPose((_D(5), _D(5), _D(3)), _D(-14)),
    ),
}


def _check(gesture: str) -> None:
    if gesture not in GESTURES:
        raise InputError(None, "gesture", f"unknown gesture {gesture!r}; choose one of {', '.join(GESTURES)}")


def gesture_pose(gesture: str) -> HandPose:
    """The canonical joint angles of ``gesture`` (one of :data:`GESTURES`)."""
    _check(gesture)
    return _POSES[gesture]


def make_hand(gesture: str, *, jitter: float = 0.0, seed: int = 0) -> Scene:
    """The hand doing ``gesture`` as a scene of capsules in world units, centred at the origin, bounding
    radius < 1 (see :func:`~instsim.scene.hand.bounding_radius`).

    Args:
        gesture: one of :data:`GESTURES`; anything else raises :class:`~instsim.errors.InputError` (field
            ``gesture``).
        jitter: standard deviation in radians of a random perturbation of every joint angle (0: the canonical
            pose, no randomness).
        seed: seed of that perturbation; the same ``(gesture, jitter, seed)`` always gives the same scene.
    """
    pose = gesture_pose(gesture)
    if jitter > 0:
        pose = pose.jittered(jitter, torch.Generator().manual_seed(int(seed)))
    return build_scene(hand_capsules(pose))
