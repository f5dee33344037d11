"""``ocr``: Flow-GRPO's OCR reward, read by PP-OCRv4 on onnxruntime (``rapidocr-onnxruntime`` 1.4.4).

The definition is Flow-GRPO's (``flow_grpo/ocr.py`` of yifan123/flow_grpo, commit
ac4c86e8cae021841f1fde853d340e0db67690dd):

- the target is the text between the prompt's first two double quotes (``prompt.split('"')[1]``; with
  a single quote, the rest of the prompt). A prompt without a double quote has no target: Flow-GRPO
  then fails the whole batch with an ``IndexError``, here a ``UserError`` names the prompt. A target
  that is empty once spaces are removed fails there with a division by zero, here with a ``UserError``;
- the recognised text and the target both lose their spaces (``" "`` only) and are lower-cased;
- the distance is 0 when the target occurs in the recognised text, else the Levenshtein distance
  (unit costs, as ``Levenshtein.distance``; written here, no small package for it being installed),
  capped at the target's length;
- the reward is ``1 - d / len(target)``, in [0, 1]; ``max_score`` is 1.

The recogniser is not Flow-GRPO's. Flow-GRPO runs PaddleOCR (``lang="en"``, so the English PP-OCRv4
recognition model) with text detection; here the models are the ones the ``rapidocr-onnxruntime``
1.4.4 wheel ships inside the package (PP-OCRv4 detection, and the PP-OCRv4 recognition model for Chinese
and Latin text, about 15 MB), so nothing is downloaded at run time. Its vocabulary holds Chinese
characters, which it sometimes reads in an empty margin (``"東MOON"``): the containment rule forgives
such extra characters. As in PaddleOCR, a line read with a mean character confidence under
``min_confidence`` (0.5, PaddleOCR's ``drop_score``) counts as nothing read, and the lines of an image
are joined without a separator, top to bottom and left to right. Images are quantised to 8 bits as
Flow-GRPO does and handed to the models in BGR order, the order they were trained on (Flow-GRPO hands
PaddleOCR RGB arrays, which it takes for BGR: the two differ for coloured text only).

How the images are fed changes the reward. Measured by ``benchmarks/ocr_reward.py`` on 60 PIL renders
(36 one-line images of 256x64, 384x128 and 512x128, 24 square ones of 256x256 and 512x512; random words,
DejaVu fonts and dark-on-light colours, the font between half and all of the size that fits), as mean
reward (renders read exactly, spaces and case aside):

======================================================  ===============  ==============  ========
feeding                                                 one-line         square          ms/image
======================================================  ===============  ==============  ========
``detect=True`` (default: PaddleOCR's detector size)    1.000 (36/36)    1.000 (24/24)       88
``detect=True, det_limit="min", det_side=736``          0.801 (21/36)    1.000 (24/24)      899
``detect=False`` (the whole image as one line)          0.976 (30/36)    0.144 (1/24)        32
``detect=False, resize="area"``                         0.979 (29/36)    0.184 (1/24)        31
``detect=False, pad_width=320``                         0.972 (29/36)    0.192 (3/24)        53
======================================================  ===============  ==============  ========

- ``detect=True`` (Flow-GRPO's pipeline): text detection finds the lines, each is cropped and
  recognised. With ``det_limit="max"`` and ``det_side=960`` (PaddleOCR's defaults, so Flow-GRPO's) an
  image is only shrunk when its longer side exceeds 960 pixels. RapidOCR's own default (``"min"``,
  736: the shorter side is enlarged to 736) is ten times slower and splits or doubles letters of small
  one-line images (``"ZEEBRA"``; a 256x64 ``"MOON"`` in DejaVu Sans Bold read as ``"MO"`` + ``"DON"``).
  Detection is not flawless either: a tight crop read ``"OPEN 24 HOURS"`` in DejaVu Sans Mono as
  ``"OPEN 24H0URS"``.
- ``detect=False``: the whole image is recognised as one line, 1.7 (256x64) to 2.7 (the mix above)
  times faster. On 24 renders of 256x64 it read all exactly with the text as large as fits 80-90% of
  the image, and scored 1 on all down to half that size (below 80% it adds characters in the empty
  margins, which the containment rule forgives), 0.98 at 40% and 0.80 at 30%, where detection still
  scored 1. On a square image the text is a few pixels tall at the recogniser's 48-pixel height and the
  reward collapses. It is for tasks whose images are one text line that fills them.
- ``resize``: how a line (the whole image or a detected crop) is brought to the recogniser's 48-pixel
  height: ``"linear"`` (PaddleOCR's and RapidOCR's ``cv2.resize``, bilinear without antialiasing) or
  ``"area"`` (OpenCV's pixel averaging when shrinking, bilinear when enlarging). It mattered little here.
- ``pad_width``: PaddleOCR pads every line to at least 320 pixels wide; padding a line only to its own
  width (rounded up to a multiple of 8, the default) read as well and is faster.

Recognition is batched: the lines of a call (whole images, or every detected crop of every image) are
sorted by width and ``batch_size`` lines of the same padded width go through the model together. A
line's padded width depends on that line alone, so its reading does not depend on the rest of the
batch. ``workers`` calls run in parallel threads (made once per reward and kept), each on ``threads``
onnxruntime threads. Speed of recognition alone (``benchmarks/ocr_reward.py``, 64 images a call; every
line reaches the recogniser as 192x48, from a 256x64 render or a 128x32 signs image), on this project's
2-core machine with its cores free (load average 0.2-0.5): 168 images per second (256x64) and 176 (signs)
with the default two workers, 86 and 91 per CPU-second; one worker 88; detection + recognition 94. The
machine is shared, and at load average 8-9.5 the same benchmark measured 27 (signs: 24), 17 with one
worker and 15 with detection. One line per call stays the fastest per image on a CPU (8 and 32 per call:
0.72x and 0.63x with the cores free): the model's per-line work does not shrink in a batch here, while
its buffers grow out of the caches. onnxruntime runs on the CPU, or on the GPU when ``device`` is a
CUDA device and the CUDA provider is installed (``onnxruntime-gpu``). Needs the ``ocr`` extra:
``pip install 'precise-rl[ocr]'``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .base import Reward, register_reward
from .hub import LazyModel, check_batch_size

__all__ = ["OcrReward", "target_text", "normalise", "levenshtein", "ocr_score", "REC_HEIGHT"]

#: the recogniser's input height (PP-OCRv4 recognition, ``rec_img_shape`` 3 x 48 x 320)
REC_HEIGHT = 48
_PACKAGE = "rapidocr_onnxruntime"


def _missing_package(name: str) -> UserError:
    if sys.version_info >= (3, 13):  # the wheel declares Python < 3.13: the extra installs nothing there
        return UserError(
            f"reward {name!r} needs rapidocr-onnxruntime 1.4.4, whose wheel needs Python 3.12 or older: "
            "pip install 'precise-rl[ocr]' in an environment of such a Python"
        )
    return UserError(f"reward {name!r} needs rapidocr-onnxruntime: pip install 'precise-rl[ocr]'")


def target_text(prompt: str) -> str:
    """The text an image must show: between the prompt's first two double quotes, as Flow-GRPO reads it.

    Flow-GRPO's ``prompt.split('"')[1]``: with one quote only, the rest of the prompt; with none, a
    ``UserError`` (Flow-GRPO raises ``IndexError``).
    """
    parts = str(prompt).split('"')
    if len(parts) < 2:
        raise UserError(
            f"reward 'ocr' scores the text between double quotes in the prompt, and prompt {prompt!r} has none"
        )
    return parts[1]


def normalise(text: str) -> str:
    """Flow-GRPO's comparison form: spaces removed, lower-cased."""
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """The edit distance of ``a`` and ``b`` with unit costs (insertion, deletion, substitution)."""
    # no small Levenshtein package comes with the project's dependencies, and the strings here are short
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _check_target(target: str) -> str:
    want = normalise(target)
    if not want:  # Flow-GRPO divides by zero here
        raise UserError(f"reward 'ocr' has nothing to score: the quoted text {target!r} is empty once spaces go")
    return want


def ocr_score(recognised: str, target: str) -> float:
    """``1 - d / len(target)`` on the normalised strings, ``d`` 0 when the target occurs in the recognised text."""
    read, want = normalise(recognised), _check_target(target)
    distance = 0 if want in read else min(levenshtein(read, want), len(want))
    return 1.0 - distance / len(want)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _padded_width(width: int, pad_width: int) -> int:
    # a width that depends on the line alone keeps its reading independent of the batch it is in
    return max(pad_width, 8 * math.ceil(width / 8))


_DET_MODEL, _REC_MODEL = "ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx"


def _session(path: Path, threads: int, cuda_device: int | None) -> Any:
    """An onnxruntime session of one of the wheel's models, with ``threads`` intra-op threads (0: all cores)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    # onnxruntime's idle threads spin by default: on a CPU shared with training (or other jobs) two spinning
    # threads halved the images per second here, while two threads without spinning lose about 10%
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list[Any] = ["CPUExecutionProvider"]
    if cuda_device is not None:
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": cuda_device}))
    return onnxruntime.InferenceSession(str(path), options, providers=providers)


class _Engine:
    """RapidOCR's detection pipeline and recognition decoder, over sessions made here; recognition's input made here."""

    def __init__(self, det_side: int, det_limit: str, threads: int, cuda_device: int | None) -> None:
        import rapidocr_onnxruntime
        from rapidocr_onnxruntime import RapidOCR

        models = Path(rapidocr_onnxruntime.__file__).resolve().parent / "models"
        # RapidOCR's own sessions take no session options beyond thread counts (no spinning switch); its
        # wrappers call ``.session.run``, so they get sessions made with this reward's threads and device instead
        self.ocr = RapidOCR(intra_op_num_threads=1)
        self.ocr.text_det.infer.session = _session(models / _DET_MODEL, threads, cuda_device)
        self.ocr.text_rec.session.session = _session(models / _REC_MODEL, threads, cuda_device)
        # read at every detection call
        self.ocr.text_det.limit_side_len = det_side
        self.ocr.text_det.limit_type = det_limit
        self.providers: list[str] = self.ocr.text_rec.session.session.get_providers()

    def lines(self, image: np.ndarray) -> list[np.ndarray]:
        """The detected text lines of one BGR ``uint8`` image, cropped, in reading order (RapidOCR's pipeline)."""
        ocr = self.ocr
        img, _, _ = ocr.preprocess(image)
        img, _ = ocr.maybe_add_letterbox(img, {})
        boxes, _ = ocr.auto_text_det(img)
        if boxes is None:
            return []
        return list(ocr.get_crop_img_list(img, boxes))

    def recognise(
        self, lines: Sequence[np.ndarray], resize: str, pad_width: int, batch_size: int, pool: _Pool
    ) -> list[tuple[str, float]]:
        """``(text, mean character confidence)`` of each BGR ``uint8`` line."""
        # a resize of a line takes microseconds: handing it to a thread costs more than it saves
        inputs = [_rec_input(line, resize) for line in lines]
        widths = [_padded_width(x.shape[2], pad_width) for x in inputs]
        order = sorted(range(len(lines)), key=lambda k: widths[k])
        chunks: list[list[int]] = []  # at most batch_size lines of one padded width each
        for k in order:
            if chunks and len(chunks[-1]) < batch_size and widths[chunks[-1][0]] == widths[k]:
                chunks[-1].append(k)
            else:
                chunks.append([k])

        def run(chunk: list[int]) -> list[tuple[str, float]]:
            batch = np.zeros((len(chunk), 3, REC_HEIGHT, widths[chunk[0]]), dtype=np.float32)
            for row, k in enumerate(chunk):
                batch[row, :, :, : inputs[k].shape[2]] = inputs[k]
            preds = self.ocr.text_rec.session(batch)[0]
            return [(str(text), float(conf)) for text, conf in self.ocr.text_rec.postprocess_op(preds)]

        out: list[tuple[str, float]] = [("", 0.0)] * len(lines)
        for chunk, reads in zip(chunks, pool.map(run, chunks), strict=True):
            for k, read in zip(chunk, reads, strict=True):
                out[k] = read
        return out


class _Pool:
    """``map`` over ``workers`` threads (onnxruntime and OpenCV let go of the GIL), or in this thread for one.

    The threads are made once and kept: starting them for every call cost more than a small batch's work.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ThreadPoolExecutor | None = None

    def map(self, fn: Any, items: Sequence[Any]) -> list[Any]:
        if self.workers <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="ocr")
        return list(self._executor.map(fn, items))


def _rec_input(line: np.ndarray, resize: str) -> np.ndarray:
    """One BGR ``uint8`` line as the recogniser's input: height 48, aspect kept, ``(x / 255 - 0.5) / 0.5``."""
    import cv2

    h, w = line.shape[:2]
    width = max(1, math.ceil(REC_HEIGHT * w / h))
    shrink = h > REC_HEIGHT
    interpolation = cv2.INTER_AREA if resize == "area" and shrink else cv2.INTER_LINEAR
    resized = cv2.resize(line, (width, REC_HEIGHT), interpolation=interpolation)
    return (resized.astype(np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5


@register_reward("ocr")
class OcrReward(Reward):
    """Flow-GRPO's OCR reward: ``1 - min(d, len) / len`` between the prompt's quoted text and what PP-OCRv4 reads.

    Options: ``detect`` (find the text lines first, Flow-GRPO's pipeline; false reads the whole image as
    one line, for images that are one text line), ``resize`` (``"linear"`` or ``"area"``: how a line is
    brought to the recogniser's height), ``det_side`` and ``det_limit`` (the detector's input size:
    ``"max"`` shrinks an image whose longer side exceeds ``det_side``, ``"min"`` enlarges one whose
    shorter side is under it), ``min_confidence`` (a line read less confidently counts as nothing read),
    ``batch_size`` (lines per recogniser call; default 1 on the CPU, 32 on a GPU), ``pad_width`` (the
    least padded width of a line; PaddleOCR pads to 320), ``threads`` (onnxruntime's threads per call, 0
    for one per core), ``workers`` (calls run in parallel; default one per CPU, 1 on a GPU) and ``device``
    (a CUDA device uses onnxruntime's CUDA provider where it is installed).
    """

    def __init__(
        self,
        detect: bool = True,
        resize: str = "linear",
        det_side: int = 960,
        det_limit: str = "max",
        min_confidence: float = 0.5,
        batch_size: int | None = None,
        pad_width: int = 0,
        threads: int = 1,
        workers: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.name = "ocr"
        if importlib.util.find_spec(_PACKAGE) is None:
            raise _missing_package(self.name)
        if not isinstance(detect, bool):
            raise UserError(f"reward 'ocr': detect must be true or false, got {detect!r}")
        if resize not in ("linear", "area"):
            raise UserError(f"reward 'ocr': resize must be 'linear' or 'area', got {resize!r}")
        if det_limit not in ("max", "min"):
            raise UserError(f"reward 'ocr': det_limit must be 'max' or 'min', got {det_limit!r}")
        ints = [("det_side", det_side, 32), ("pad_width", pad_width, 0), ("threads", threads, 0)]
        ints += [("workers", workers, 1)] if workers is not None else []
        for key, value, least in ints:
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"reward 'ocr': {key} must be an integer of at least {least}, got {value!r}")
        if (
            isinstance(min_confidence, bool)
            or not isinstance(min_confidence, (int, float))
            or not (0.0 <= float(min_confidence) <= 1.0)
        ):
            raise UserError(f"reward 'ocr': min_confidence must be a number in [0, 1], got {min_confidence!r}")
        self.detect, self.resize, self.det_side, self.det_limit = detect, resize, det_side, det_limit
        self.min_confidence = float(min_confidence)
        self.device = torch.device(device)
        # one line per call was the fastest per image on this project's CPU (benchmarks/ocr_reward.py)
        default_batch = 32 if self.device.type == "cuda" else 1
        self.batch_size = check_batch_size(default_batch if batch_size is None else batch_size)
        self.pad_width, self.threads = pad_width, threads
        # images and lines go through the models in parallel, each call on `threads` onnxruntime threads: one
        # call per core kept 97% of a core's throughput here, two threads within one call about 75%
        self.workers = workers if workers is not None else (1 if self.device.type == "cuda" else _cpus())
        self._engine = LazyModel(self._load)
        self._pool = _Pool(self.workers)

    def _load(self) -> _Engine:
        try:
            import onnxruntime
        except ImportError:
            raise _missing_package(self.name) from None
        cuda_device = None
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                cuda_device = self.device.index or 0
            else:
                warnings.warn(
                    "reward 'ocr' runs on the CPU: onnxruntime has no CUDA provider here (install onnxruntime-gpu)",
                    stacklevel=2,
                )
        return _Engine(self.det_side, self.det_limit, self.threads, cuda_device)

    @property
    def model(self) -> _Engine:
        """The OCR engine (its sessions are made on first access)."""
        return self._engine.get()

    def read(self, images: torch.Tensor) -> list[str]:
        """The text read in each image ``(B, 1 or 3, H, W)`` in [0, 1], its lines joined as Flow-GRPO joins them."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise UserError(f"reward {self.name!r} needs images shaped (B, 1 or 3, H, W), got {tuple(images.shape)}")
        engine = self.model
        # Flow-GRPO's quantisation; then BGR, the channel order PaddleOCR's models were trained on
        pixels = (images.detach().float() * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        if pixels.shape[1] == 1:
            pixels = np.repeat(pixels, 3, axis=1)
        bgr = [np.ascontiguousarray(p[::-1].transpose(1, 2, 0)) for p in pixels]
        pool = self._pool
        per_image = pool.map(engine.lines, bgr) if self.detect else [[img] for img in bgr]
        flat = [line for lines in per_image for line in lines]
        reads = engine.recognise(flat, self.resize, self.pad_width, self.batch_size, pool) if flat else []
        texts, start = [], 0
        for lines in per_image:
            mine = reads[start : start + len(lines)]
            # PaddleOCR drops a line under its drop_score (0.5); Flow-GRPO then keeps confidences above 0
            texts.append("".join(text for text, conf in mine if conf >= self.min_confidence and conf > 0))
            start += len(lines)
        return texts

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        if len(prompts) != images.shape[0]:
            raise UserError(f"reward {self.name!r} got {images.shape[0]} images and {len(prompts)} prompts")
        targets = [target_text(p) for p in prompts]
        for target in targets:  # a prompt without a target fails before any model runs
            _check_target(target)
        reads = self.read(images)
        scores = [ocr_score(read, target) for read, target in zip(reads, targets, strict=True)]
        return {self.name or "ocr": torch.tensor(scores, dtype=torch.float32, device=images.device)}

    def max_score(self, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """1 for every prompt: the quoted text read exactly, or within more text."""
        return torch.ones(len(prompts), dtype=torch.float32)
