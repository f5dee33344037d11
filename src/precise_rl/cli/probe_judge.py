"""Check a vision-language judge before training with it: ``precise-rl probe-judge --url URL [--model NAME]``.

For each ``--url`` (a server's root or ``/v1`` URL, as the ``vlm_judge`` reward takes it): ``GET /health``
answers 200 (a server without that route, 404, is let through: not every OpenAI-compatible server has it),
``GET /v1/models`` lists ``--model``, and one image (``--image``, or a drawn red disc on blue; two for a
pairwise template) scored with ``--template`` gives an answer that parses. It prints one line per server
with the score and the answer; the first failure ends it with one sentence and exit code 2, so a wrong
URL, model or template is found before a run starts. The key is read as the reward reads it
(``--api-key-env``, default ``PRECISE_RL_JUDGE_API_KEY``, or ``--api-key-file``). Needs the ``judge`` extra.
"""

from __future__ import annotations

import argparse
import time
import urllib.error
import urllib.request
from typing import Any

from ..errors import UserError

__all__ = ["add_arguments", "run"]

#: the drawn image's caption, which a working judge should find well aligned
PROBE_PROMPT = "a red disc on a blue background"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", action="append", required=True, help="judge server URL (repeatable: every one is probed)")
    p.add_argument("--model", default="UnifiedReward", help="served model name (default UnifiedReward)")
    p.add_argument(
        "--template",
        default="unifiedreward_v2",
        help="unifiedreward_v2 (default), score_1_10 or pair_rank (pairwise)",
    )
    p.add_argument("--template-file", default=None, help="a template of your own ({prompt} for the prompt)")
    p.add_argument("--score-pattern", default=None, help="the score's regular expression, for --template-file")
    p.add_argument("--api-key-env", default="PRECISE_RL_JUDGE_API_KEY", help="environment variable holding the key")
    p.add_argument("--api-key-file", default=None, help="file holding the key (instead of --api-key-env)")
    p.add_argument("--image", default=None, help="an image file to score (default: a drawn red disc on blue)")
    p.add_argument("--prompt", default=None, help=f"its caption (default: {PROBE_PROMPT!r} for the drawn image)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each answer (default 60)")


def _probe_image() -> Any:
    import torch

    y, x = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256), indexing="ij")
    disc = (x**2 + y**2 < 0.4).float()
    return torch.stack([disc, torch.zeros_like(disc), 1 - disc])


def _load_image(path: str) -> Any:
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read --image {path!r} ({exc.__class__.__name__})") from None
    return torch.from_numpy(array).permute(2, 0, 1)


def _health(root: str, timeout: float) -> str:
    try:
        with urllib.request.urlopen(f"{root}/health", timeout=timeout) as response:
            return f"/health {response.status}"
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return "no /health route"
        raise UserError(f"judge server {root} answers /health with HTTP {exc.code}; it is not ready") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot reach judge server {root} ({reason}); check --url and that the server runs") from None


def _models(judge: Any, k: int, root: str) -> list[str]:
    import openai

    try:
        return [m.id for m in judge.client.clients()[k].models.list()]
    except openai.AuthenticationError:
        raise UserError(f"judge server {root} refused the API key; set --api-key-env or --api-key-file") from None
    except openai.APIStatusError as exc:
        raise UserError(f"judge server {root} answers /v1/models with HTTP {exc.status_code}") from None
    except openai.APIConnectionError:
        raise UserError(f"cannot reach judge server {root}/v1/models; check --url") from None


def run(args: argparse.Namespace) -> int:
    if not args.timeout > 0:  # before the reward's imports (torch), so a mistyped flag answers at once
        raise UserError(f"--timeout must be positive, got {args.timeout}")
    from ..rewards.judge import VLMJudge
    from ..rewards.judge_client import encode_image

    judge = VLMJudge(
        url=args.url,
        model=args.model,
        template=args.template,
        template_file=args.template_file,
        score_pattern=args.score_pattern,
        api_key_env=args.api_key_env,
        api_key_file=args.api_key_file,
        timeout=args.timeout,
        retries=0,
    )
    judge.name = "vlm_judge"
    image = _load_image(args.image) if args.image else _probe_image()
    prompt = args.prompt or (PROBE_PROMPT if not args.image else "")
    if not prompt:
        raise UserError("--image needs --prompt: the caption the judge compares it with")
    urls = [encode_image(image, judge.resolution, judge.image_format)]
    if judge.pairwise:  # the image against itself with its colours swapped: the judge must pick one or call a tie
        urls.append(encode_image(image.flip(0), judge.resolution, judge.image_format))
        template_name, text = judge.pair_template.name, judge.pair_template.text(prompt)
    else:
        template_name, text = judge.template.name, judge.template.text(prompt)
    try:
        for k, root in enumerate(judge.client.urls):
            health = _health(root, args.timeout)
            models = _models(judge, k, root)
            if args.model not in models:
                raise UserError(
                    f"judge server {root} serves models {models}, not {args.model!r}: set --model "
                    "(reward.options.vlm_judge.model) to one of them"
                )
            t0 = time.perf_counter()
            answer = judge.client.ask(urls, text, k)
            seconds = time.perf_counter() - t0
            if answer.text is None:
                raise UserError(f"judge server {root} (model {args.model!r}) gave no answer ({answer.reason})")
            parsed = judge.pair_template.parse(answer.text) if judge.pairwise else judge.template.parse(answer.text)
            shown = answer.text if len(answer.text) <= 200 else answer.text[:200] + "..."
            if parsed is None:
                raise UserError(
                    f"judge server {root} (model {args.model!r}) answered {shown!r}, which does not parse as "
                    f"template {template_name!r}"
                )
            if judge.pairwise:
                score = f"verdict {parsed:g} (1: the first image wins)"
            else:
                score = " ".join(f"{key}={value:.3f}" for key, value in parsed.items())
            print(
                f"{root}: ok ({health}; model {args.model!r} listed; {template_name} answered in {seconds:.2f} s: "
                f"{score}; answer {shown!r})",
                flush=True,
            )
    finally:
        judge.close()
    return 0
