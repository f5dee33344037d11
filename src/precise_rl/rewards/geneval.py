"""GenEval's verdicts (Ghosh et al. 2023) on an object detector's output: the server side of ``geneval``.

A prompt's GenEval entry lists what the image must hold: ``include`` clauses (a class, a count, and
optionally a colour or a position relative to an earlier clause's objects) and ``exclude`` clauses
(fewer than ``count`` objects of a class). The rules are GenEval's ``evaluate_images.py``: detections
are kept above a confidence of 0.3 (0.9 for ``counting`` prompts), at most 16 per class, most
confident first; a colour clause looks at the ``count`` most confident objects; a position clause
compares box centres after shrinking the offset by 0.1 of the two boxes' sizes.

GenEval itself runs Mask2Former (mmdetection) and a CLIP colour classifier, heavy dependencies
that belong in the reward server's own environment: ``geneval_detector`` takes both as import
paths (``detector="my_pkg.det:detect"``), so this module needs neither. Serve it with
``precise-rl serve-reward geneval_detector --set detector=my_pkg.det:detect --set colors=my_pkg.det:color``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .base import Reward, register_reward

__all__ = ["GenEvalDetectorReward", "relative_position", "evaluate_clauses", "select_detections", "COLORS"]

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1

Detection = Mapping[str, Any]  # {"class": str, "score": float, "box": [x0, y0, x1, y1]}


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD) -> set:
    """Where box A lies relative to box B: a subset of {"left of", "right of", "above", "below"}."""
    boxes = np.array([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def select_detections(detections: Sequence[Detection], tag: str) -> dict[str, list[list[float]]]:
    """Boxes kept per class, most confident first (GenEval's threshold and per-class limit; no NMS)."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    by_class: dict[str, list[tuple[float, list[float]]]] = {}
    for det in detections:
        score = float(det["score"])
        if score > threshold:
            by_class.setdefault(str(det["class"]), []).append((score, [float(v) for v in det["box"]]))
    kept = {}
    for name, items in by_class.items():
        items.sort(key=lambda item: -item[0])
        kept[name] = [box for _, box in items[:MAX_OBJECTS]]
    return kept


def evaluate_clauses(
    objects: Mapping[str, list[list[float]]],
    metadata: Mapping[str, Any],
    color_of: Callable[[list[float], str], str] | None = None,
) -> tuple[int, int, list[str]]:
    """(clauses met, clauses in all, reasons) of one image's GenEval entry; all met is GenEval's "correct"."""
    met, total, reasons = 0, 0, []
    groups: list[list[list[float]] | None] = []
    for req in metadata.get("include", []):
        total += 1
        name, count = str(req["class"]), int(req["count"])
        found = list(objects.get(name, []))[:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                if color_of is None:
                    raise UserError("a GenEval colour clause needs a colour classifier (option colors=module:function)")
                colors = [color_of(box, name) for box in found]
                if colors.count(req["color"]) < count:
                    matched = False
                    reasons.append(f"expected {req['color']} {name}>={count}, found {colors.count(req['color'])}")
            if "position" in req and matched:
                relation, target = req["position"]
                if not 0 <= int(target) < len(groups) or groups[int(target)] is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for box in found:
                        if any(relation not in relative_position(box, t) for t in groups[int(target)]):
                            matched = False
                            reasons.append(f"expected {name} {relation} target")
                            break
        groups.append(found if matched else None)
        met += int(matched)
    for req in metadata.get("exclude", []):
        total += 1
        name, count = str(req["class"]), int(req["count"])
        if len(objects.get(name, [])) >= count:
            reasons.append(f"expected {name}<{count}, found {len(objects[name])}")
        else:
            met += 1
    return met, total, reasons


def _import(path: str, what: str) -> Callable[..., Any]:
    module_name, sep, attr = str(path).partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"geneval_detector option {what} must be an import path 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"geneval_detector: cannot import {module_name!r} for {what} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"geneval_detector: module {module_name!r} has no {attr!r} ({what})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"geneval_detector: {path!r} ({what}) is not callable")
    return obj


@register_reward("geneval_detector")
class GenEvalDetectorReward(Reward):
    """GenEval verdicts from a detector: the fraction of an image's clauses met, and ``strict`` (all met).

    ``detector(images)`` takes ``(B, 3, H, W)`` in [0, 1] and returns, per image, a list of
    ``{"class": name, "score": confidence, "box": [x0, y0, x1, y1]}`` in pixels; ``colors(image,
    box, class_name)`` names the colour (one of :data:`COLORS`) of the object in ``box``. Each image's
    metadata is its prompt's GenEval entry (``tag``, ``include``, ``exclude``).
    """

    def __init__(self, detector: str, colors: str | None = None) -> None:
        self.detector = _import(detector, "detector")
        self.colors = _import(colors, "colors") if colors else None

    def _color_of(self, image: torch.Tensor) -> Callable[[list[float], str], str] | None:
        colors = self.colors
        if colors is None:
            return None
        return lambda box, name: str(colors(image, box, name))

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        detections = self.detector(rgb)
        if len(detections) != images.shape[0]:
            raise UserError(f"the detector returned {len(detections)} results for {images.shape[0]} images")
        fraction, strict = [], []
        for image, dets, meta in zip(rgb, detections, metadata, strict=True):
            if "include" not in meta or "tag" not in meta:
                raise UserError(f"GenEval metadata needs 'tag' and 'include', got {dict(meta)!r}")
            objects = select_detections(dets, str(meta["tag"]))
            met, total, _ = evaluate_clauses(objects, meta, self._color_of(image))
            fraction.append(met / total if total else 1.0)
            strict.append(float(met == total))
        name = self.name or "geneval_detector"
        return {name: torch.tensor(fraction), "strict": torch.tensor(strict)}
