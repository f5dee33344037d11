"""The ``ocr`` reward side by side: images per second of recognition alone and of detection + recognition, by
batch size, workers and onnxruntime threads; and how the way images are fed to the recogniser changes the reward.

Run with ``python benchmarks/ocr_reward.py`` (``--quick`` for a smoke run, ``--repeats N`` timed passes,
``--images N`` images per pass, ``--skip-quality`` / ``--skip-speed`` for one table alone). Needs the ``ocr``
extra.

Speed: ``--images`` one-line images of 256x64 pixels (a word of ``tests/text_renders.py`` in a DejaVu font,
as large as fits 90% of the image), and as many 128x32 renders of the signs task's pretraining words, each
set scored by ``reward(images, prompts, metadata)`` in one call, the whole reward included (quantisation,
detection, recognition, the Levenshtein score). Both sizes reach the recogniser as 192x48 lines. Each variant is warmed
up once, then the timed passes go round the variants in turn, so that a change in the machine's load
falls on all of them; the table gives the median images per second and the images per CPU-second of this
process (``time.process_time``), which shows what a core gives when the machine is shared. The load
average before and after is printed: on a shared machine the wall-clock numbers are a lower bound.

Feeding: the mean reward and the exact reads (spaces and case aside) of 36 one-line renders (256x64,
384x128, 512x128) and 24 square ones (256x256, 512x512): random words, fonts and dark-on-light colours,
at between half and all of the font size that fits (:func:`tests.text_renders.render_set`), under each way
of feeding the images: detection with PaddleOCR's input size (the default) or RapidOCR's, recognition of
the whole image with either resize, with PaddleOCR's padding to 320 pixels or without; with the
milliseconds per image of the whole pass (first calls included, so the sessions' start-up too).

Text size: recognition alone against detection on 24 renders of 256x64 (six words in the four fonts),
the text as large as fits 90% down to 30% of the width and height.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _results import write

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' text renders

from precise_rl.rewards import build_reward  # noqa: E402
from precise_rl.rewards.ocr import normalise, ocr_score, target_text  # noqa: E402
from tests.text_renders import FONTS, LINE_SHAPES, SQUARE_SHAPES, WORDS, fitting_size, render, render_set  # noqa: E402


def _prompt(text: str) -> str:
    return f'a sign that says "{text}"'


def _signs_batch(images: int) -> tuple[torch.Tensor, list[str]]:
    """``images`` renders of the signs task (32x128, pretraining words), as its model is taught to draw them."""
    import random

    from precise_rl.tasks.signs import pretrain_words, render_signs

    words = list(pretrain_words()[:images])
    return torch.from_numpy(render_signs(words, random.Random(0))).float() / 255.0, words


def speed(images: int, repeats: int) -> list[str]:
    texts = [WORDS[k % len(WORDS)] for k in range(images)]
    batch = torch.stack([render(t, 256, 64, None, *FONTS[k % len(FONTS)]) for k, t in enumerate(texts)])
    signs, sign_words = _signs_batch(images)
    inputs = {
        "line": (batch, [_prompt(t) for t in texts], [{} for _ in texts]),
        "signs": (signs, [_prompt(w) for w in sign_words], [{} for _ in sign_words]),
    }
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    variants: dict[str, tuple[str, dict[str, Any]]] = {
        f"recognition only (default: batch 1, {cpus} workers)": ("line", {"detect": False}),
        "recognition only, 32x128 signs": ("signs", {"detect": False}),
        "recognition only, batch 8": ("line", {"detect": False, "batch_size": 8}),
        "recognition only, batch 32": ("line", {"detect": False, "batch_size": 32}),
        "recognition only, batch 32, 1 worker": ("line", {"detect": False, "batch_size": 32, "workers": 1}),
        "recognition only, 1 worker": ("line", {"detect": False, "workers": 1}),
        "recognition only, 1 worker, threads all": ("line", {"detect": False, "workers": 1, "threads": 0}),
        f"detection + recognition (default: {cpus} workers)": ("line", {"detect": True}),
        "detection + recognition, 1 worker": ("line", {"detect": True, "workers": 1}),
    }
    rewards = {name: build_reward("ocr", **options) for name, (_, options) in variants.items()}
    means = {}
    for name, reward in rewards.items():  # warm-up: sessions made, first shapes seen
        means[name] = float(reward(*inputs[variants[name][0]])["ocr"].mean())
    wall: dict[str, list[float]] = {name: [] for name in rewards}
    cpu: dict[str, list[float]] = {name: [] for name in rewards}
    load_before = os.getloadavg()
    for _ in range(repeats):
        for name, reward in rewards.items():
            c0, t0 = time.process_time(), time.perf_counter()
            reward(*inputs[variants[name][0]])
            wall[name].append(images / (time.perf_counter() - t0))
            cpu[name].append(images / max(time.process_time() - c0, 1e-9))
    load_after = os.getloadavg()
    base = next(iter(rewards))
    print(
        f"speed: {images} one-line images (256x64; signs: 128x32) per call, {repeats} timed passes, "
        f"{os.cpu_count()} CPUs; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print(f"{'variant':52s} {'images/s':>9s} {'ratio':>6s} {'img/CPU-s':>10s} {'mean reward':>12s}")
    table = [
        f"Speed: {images} images per call, {repeats} timed passes, medians (load average {load_before[0]:.1f} "
        f"before, {load_after[0]:.1f} after):",
        "",
        "| variant | images/s | x the first | images per CPU-second | mean reward |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in rewards:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        ratio = w / statistics.median(wall[base])
        print(f"{name:52s} {w:9.1f} {ratio:6.2f} {c:10.1f} {means[name]:12.3f}")
        table.append(f"| {name} | {w:.1f} | {ratio:.2f} | {c:.1f} | {means[name]:.3f} |")
    return table


def quality(per_shape: int) -> list[str]:
    renders = render_set(LINE_SHAPES + SQUARE_SHAPES, per_shape=per_shape)
    variants: dict[str, dict[str, Any]] = {
        "detection, PaddleOCR's size (max 960; default)": {"detect": True},
        "detection, RapidOCR's size (min 736)": {"detect": True, "det_limit": "min", "det_side": 736},
        "detection, area resize": {"detect": True, "resize": "area"},
        "recognition only, linear resize": {"detect": False},
        "recognition only, area resize": {"detect": False, "resize": "area"},
        "recognition only, linear, padded to 320": {"detect": False, "pad_width": 320},
    }
    print(f"\nfeeding: mean reward (exact reads) on {len(renders)} PIL renders")
    print(f"{'variant':52s} {'one-line':>16s} {'square':>16s} {'ms/image':>9s}")
    table = [
        f"Feeding: mean reward (exact reads) on {len(renders)} PIL renders:",
        "",
        "| variant | one-line | square | ms per image |",
        "| --- | --- | --- | --- |",
    ]
    for name, options in variants.items():
        reward = build_reward("ocr", **options)
        cells = []
        t0 = time.perf_counter()
        for shapes in (LINE_SHAPES, SQUARE_SHAPES):
            scores: list[float] = []
            exact = 0
            group = [r for r in renders if r.shape in shapes]
            for shape in shapes:  # one call per image size: a batch holds images of one size
                part = [r for r in group if r.shape == shape]
                reads = reward.read(torch.stack([r.image for r in part]))
                scores += [ocr_score(read, target_text(_prompt(r.text))) for read, r in zip(reads, part, strict=True)]
                exact += sum(normalise(read) == normalise(r.text) for read, r in zip(reads, part, strict=True))
            cells.append(f"{sum(scores) / len(scores):.3f} ({exact:>2d}/{len(group):>2d})")
        ms = 1000 * (time.perf_counter() - t0) / len(renders)
        print(f"{name:52s} {cells[0]:>16s} {cells[1]:>16s} {ms:9.1f}")
        table.append(f"| {name} | {cells[0].replace('( ', '(')} | {cells[1].replace('( ', '(')} | {ms:.1f} |")
    return table


def text_size() -> list[str]:
    """Recognition alone against detection as the text shrinks in a 256x64 image."""
    words = ["MOON", "hello", "coffee", "river stone", "ZEBRA", "bakery"]
    rewards = {"detection": build_reward("ocr", detect=True), "recognition only": build_reward("ocr", detect=False)}
    print("\ntext size: mean reward (exact reads) of 24 renders on 256x64, the text as large as fits the share given")
    print(f"{'share':>6s} " + " ".join(f"{name:>18s}" for name in rewards))
    table = [
        "Text size: mean reward (exact reads) of 24 renders on 256x64, the text as large as fits the share given:",
        "",
        "| share | " + " | ".join(rewards) + " |",
        "| --- " * (len(rewards) + 1) + "|",
    ]
    for share in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3):
        texts = [w for _ in FONTS for w in words]
        fonts = [f for f in FONTS for _ in words]
        images = torch.stack(
            [render(t, 256, 64, fitting_size(t, 256, 64, *f, share), *f) for t, f in zip(texts, fonts, strict=True)]
        )
        cells = []
        for reward in rewards.values():
            reads = reward.read(images)
            scores = [ocr_score(read, text) for read, text in zip(reads, texts, strict=True)]
            exact = sum(normalise(read) == normalise(text) for read, text in zip(reads, texts, strict=True))
            cells.append(f"{sum(scores) / len(scores):.3f} ({exact:>2d}/{len(texts)})")
        print(f"{share:6.1f} " + " ".join(f"{cell:>18s}" for cell in cells))
        table.append(f"| {share:.1f} | " + " | ".join(c.replace("( ", "(") for c in cells) + " |")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 16 images, 1 pass, 2 renders per shape")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over every variant")
    parser.add_argument("--images", type=int, default=64, help="images scored per call")
    parser.add_argument("--skip-quality", action="store_true", help="the speed table alone")
    parser.add_argument("--skip-speed", action="store_true", help="the feeding table alone")
    args = parser.parse_args()
    images, repeats, per_shape = (16, 1, 2) if args.quick else (args.images, args.repeats, 12)
    tables = []
    if not args.skip_speed:
        tables.append(speed(images, repeats))
    if not args.skip_quality:
        tables += [quality(per_shape), text_size()]
    if not args.quick:
        write("ocr_reward", "\n\n".join("\n".join(t) for t in tables))


if __name__ == "__main__":
    main()
