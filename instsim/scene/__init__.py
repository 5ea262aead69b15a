"""Procedural hand gestures rendered by instsim's own capsule renderer.

* :mod:`.hand`: the articulated hand (skeleton, joint angles, forward kinematics -> capsules, :class:`Scene`).
* :mod:`.gestures`: :data:`GESTURES` and :func:`make_hand`.
* :mod:`.render`: :func:`render_scene` (RGBA, straight alpha) and :func:`render_alpha_depth`.
"""

from .gestures import GESTURES, make_hand
from .hand import Scene, bounding_radius
from .render import render_alpha_depth, render_scene

__all__ = ["GESTURES", "make_hand", "render_scene", "render_alpha_depth", "Scene", "bounding_radius"]
