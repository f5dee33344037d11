"""The built-in prompts of the instruction-editing models: simple drawn scenes and edits of them.

Each scene is a few flat shapes on a plain background, drawn here (:func:`draw_scene`); each
prompt asks for one change (a colour, a shape added or removed). The shipped files under
``assets/edits/`` (``train.jsonl``, ``eval.jsonl`` and their PNGs) are :func:`write_examples`'s
output, so they can be regenerated; they also show the JSON-lines prompt format. Train and eval
scenes are disjoint. Pass ``prompts.train`` / ``prompts.eval`` files of your own for real work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["SCENES", "ASSETS", "draw_scene", "write_examples", "train_prompts", "eval_prompts"]

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "edits"

_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
}

#: split -> [(scene name, background, [(shape, colour, (x0, y0, x1, y1) in fractions of the side)], edits)]
SCENES: dict[str, list[tuple[str, str, list[tuple[str, str, tuple[float, ...]]], list[str]]]] = {
    "train": [
        ("red_circle", "white", [("circle", "red", (0.3, 0.3, 0.7, 0.7))],
         ["make the circle blue", "add a small green square in the top left corner"]),
        ("two_squares", "grey", [("square", "yellow", (0.1, 0.35, 0.4, 0.65)),
                                 ("square", "blue", (0.6, 0.35, 0.9, 0.65))],
         ["remove the blue square", "make both squares red"]),
        ("triangle", "white", [("triangle", "green", (0.2, 0.2, 0.8, 0.8))],
         ["turn the triangle upside down", "make the background black"]),
        ("circle_and_square", "yellow", [("circle", "purple", (0.1, 0.1, 0.45, 0.45)),
                                          ("square", "orange", (0.55, 0.55, 0.9, 0.9))],
         ["swap the colours of the two shapes", "make the circle twice as large"]),
    ],
    "eval": [
        ("blue_square", "white", [("square", "blue", (0.25, 0.25, 0.75, 0.75))],
         ["make the square yellow", "add a red circle inside the square"]),
        ("three_circles", "grey", [("circle", "red", (0.05, 0.4, 0.3, 0.65)),
                                   ("circle", "green", (0.375, 0.4, 0.625, 0.65)),
                                   ("circle", "blue", (0.7, 0.4, 0.95, 0.65))],
         ["remove the middle circle"]),
    ],
}  # fmt: skip


def draw_scene(background: str, shapes: list[tuple[str, str, tuple[float, ...]]], size: int = 512) -> Any:
    """An RGB ``PIL.Image`` of ``size`` pixels a side: flat shapes on a plain background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), _COLOURS[background])
    draw = ImageDraw.Draw(img)
    for shape, colour, box in shapes:
        x0, y0, x1, y1 = (round(v * size) for v in box)
        fill = _COLOURS[colour]
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {shape!r}")
    return img


def write_examples(directory: str | Path = ASSETS, size: int = 512) -> dict[str, Path]:
    """Draw every scene into ``directory/images/`` and write ``train.jsonl`` and ``eval.jsonl`` beside them."""
    import json

    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    files = {}
    for split, scenes in SCENES.items():
        lines = []
        for name, background, shapes, edits in scenes:
            draw_scene(background, shapes, size).save(directory / "images" / f"{name}.png", optimize=True)
            lines += [json.dumps({"prompt": edit, "image": f"images/{name}.png"}) for edit in edits]
        files[split] = directory / f"{split}.jsonl"
        files[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def train_prompts() -> list[str]:
    from .registry import read_prompt_file

    return read_prompt_file(ASSETS / "train.jsonl", "prompts.train")


def eval_prompts() -> list[str]:
    from .registry import read_prompt_file

    return read_prompt_file(ASSETS / "eval.jsonl", "prompts.eval")
