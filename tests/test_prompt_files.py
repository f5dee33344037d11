"""The JSON-lines prompt format of the editing models: each prompt with its source image.

Read by ``read_prompt_file`` for a name ending in ``.jsonl`` (config keys prompts.train / prompts.eval,
``precise-rl sample --prompt-file``); every bad line is one sentence naming the file and the line.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from precise_rl.errors import UserError
from precise_rl.policies.edit import EditPrompt, edit_key, source_metadata
from precise_rl.tasks import edits
from precise_rl.tasks.registry import TaskSpec, read_prompt_file

from . import tiny_edit_pipelines as te


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_pairs_each_prompt_with_its_image_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "data" / "img").mkdir(parents=True)
    te.source_image(8, 12, seed=1).save(tmp_path / "data" / "img" / "a.png")
    elsewhere = tmp_path / "b.png"
    te.source_image(6, 6, seed=2).save(elsewhere)
    path = _write(
        tmp_path / "data" / "edits.jsonl",
        [
            json.dumps({"prompt": "make it blue", "image": "img/a.png", "tag": "colour", "count": 2}),
            "",
            json.dumps({"prompt": "  make it blue ", "image": str(elsewhere)}),  # an absolute path, same instruction
        ],
    )
    prompts = read_prompt_file(path, "prompts.train")
    assert [str(p) for p in prompts] == ["make it blue", "make it blue"]
    assert all(isinstance(p, EditPrompt) for p in prompts)
    assert prompts[0].image == (tmp_path / "data" / "img" / "a.png").resolve() and prompts[1].image == elsewhere
    assert prompts[0].origin == f"{path}:1" and prompts[1].origin == f"{path}:3"
    # the same instruction on two images: equal as text, two prompts for the encoders
    assert prompts[0] == prompts[1] and edit_key(prompts[0]) != edit_key(prompts[1])
    # the rewards' metadata: the source pixels as the file holds them, its path, the line's other keys
    meta = source_metadata([*prompts, "a plain prompt"])
    pixels = np.asarray(Image.open(prompts[0].image).convert("RGB"), dtype=np.float32) / 255
    torch.testing.assert_close(meta[0]["source_image"], torch.from_numpy(pixels).permute(2, 0, 1))
    assert meta[0]["source_image_path"] == str(prompts[0].image)
    assert meta[0]["tag"] == "colour" and meta[0]["count"] == 2 and "tag" not in meta[1]
    assert meta[1]["source_image"].shape == (3, 6, 6) and meta[2] == {}
    # an EditPrompt survives pickling (process pools, spawn) with its image
    again = pickle.loads(pickle.dumps(prompts[0]))
    assert isinstance(again, EditPrompt) and again.image == prompts[0].image and again.extra == prompts[0].extra


def test_a_text_file_still_gives_plain_prompts(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.txt", ["# a comment", "a cat", "", "a dog"])
    prompts = read_prompt_file(path)
    assert prompts == ["a cat", "a dog"] and not any(isinstance(p, EditPrompt) for p in prompts)


def test_task_metadata_gets_the_source_image_beside_its_own_keys(tmp_path: Path) -> None:
    path = te.write_edit_prompts(tmp_path, [("make it red", (8, 8))])
    (prompt,) = read_prompt_file(path)
    task = TaskSpec(
        policy=None, train_prompts=[prompt], eval_prompts=[prompt], metadata=lambda ps: [{"own": 1}] * len(ps)
    )
    (meta,) = task.metadata([prompt])
    assert meta["own"] == 1 and meta["source_image"].shape == (3, 8, 8)
    assert TaskSpec(policy=None, train_prompts=[], eval_prompts=[]).metadata(["plain"]) == [{}]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "x", "image": "missing.png"}'], r"line 1 of prompt file '.*': source image '.*' does not exist"),
        (['{"prompt": "x", "image": "ok.png"}', '{"prompt": "x", "image": "bad.png"}'],
         r"line 2 of prompt file '.*': source image '.*bad.png' is not a readable image"),
        (['{"prompt": "x", "image": "ok.png"}', "", '{"prompt": "x" "image"}'], r"line 3 of .* is not JSON"),
        (['["x", "ok.png"]'], r"line 1 of prompt file '.*' is not a JSON object"),
        (['{"image": "ok.png"}'], r"line 1 of prompt file '.*' has no 'prompt'"),
        (['{"prompt": "  ", "image": "ok.png"}'], r"line 1 of prompt file '.*' has no 'prompt'"),
        (['{"prompt": "x"}'], r"line 1 of prompt file '.*' has no 'image'"),
        (["", "  "], r"prompt file '.*' holds no prompts"),
    ],
)  # fmt: skip
def test_a_bad_line_is_one_sentence_naming_the_file_and_line(lines: list[str], message: str, tmp_path: Path) -> None:
    te.source_image(8, 8, seed=0).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    path = _write(tmp_path / "edits.jsonl", lines)
    with pytest.raises(UserError, match=message) as err:
        read_prompt_file(path, "prompts.train")
    assert "\n" not in str(err.value)


def test_the_builtin_edit_examples_are_the_drawn_scenes(tmp_path: Path) -> None:
    """The shipped example files are what ``write_examples`` draws (so they can be regenerated), and read back
    as editing prompts on disjoint train and eval scenes."""
    fresh = edits.write_examples(tmp_path)
    for split in ("train", "eval"):
        assert fresh[split].read_text() == (edits.ASSETS / f"{split}.jsonl").read_text()
    for png in (tmp_path / "images").iterdir():
        shipped = edits.ASSETS / "images" / png.name
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(shipped))), png.name
    train, held_out = edits.train_prompts(), edits.eval_prompts()
    assert train and held_out and all(isinstance(p, EditPrompt) for p in [*train, *held_out])
    assert not {p.image for p in train} & {p.image for p in held_out}
    assert Image.open(train[0].image).size == (512, 512)


def test_a_remote_reward_receives_the_source_image_as_a_png(tmp_path: Path) -> None:
    """The metadata a reward server gets is JSON: an edit's source pixels go as a base64 PNG, as the images do,
    decoding to the same 8-bit pixels; the other keys pass unchanged."""
    from precise_rl.rewards.protocol import decode_images
    from precise_rl.rewards.remote import _images_as_png

    path = te.write_edit_prompts(tmp_path, [("make it red", (12, 20))])
    (meta,) = source_metadata(read_prompt_file(path))
    sent = _images_as_png({**meta, "tag": "colors"})
    json.dumps(sent)  # JSON as it stands
    assert sent["tag"] == "colors" and sent["source_image_path"] == meta["source_image_path"]
    back = decode_images([sent["source_image"]])[0]
    torch.testing.assert_close(back, meta["source_image"], rtol=0, atol=0.5 / 255)
