"""The memory options of the diffusers adapters (``offload_text_encoders``, ``offload_vae``, ``cache_prompts``,
``free_text_encoders``) on the tiny pipelines.

Where a module sits is read from its recorded ``.to`` calls. This machine has no accelerator, so the compute
device is faked as ``cpu:0``: a device that compares unequal to ``cpu`` (the move in and the move back are
told apart) while tensors sent to it stay in the CPU's memory. Numbers are checked against policies with the
default options, loaded from the same directory: they must be equal bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers.utils import logging as diffusers_logging
from torch import nn

from precise_rl.cli import main
from precise_rl.errors import UserError
from precise_rl.policies.diffusers_base import DiffusersPolicy
from precise_rl.policies.flux import Flux1Policy
from precise_rl.policies.flux2 import Flux2KleinPolicy
from precise_rl.policies.flux_kontext import FluxKontextPolicy
from precise_rl.policies.sd3 import SD3Policy
from precise_rl.sde import rollout
from precise_rl.tasks.registry import read_prompt_file

from . import tiny_edit_pipelines as te
from . import tiny_pipelines as tp

diffusers_logging.disable_progress_bar()

KINDS = ["flux2_klein", "sd3", "flux1"]
CLASSES = {"flux2_klein": Flux2KleinPolicy, "sd3": SD3Policy, "flux1": Flux1Policy}
#: the text encoders each tiny pipeline has (SD3's third is its T5)
ENCODERS = {"flux2_klein": ["text_encoder"], "sd3": ["text_encoder", "text_encoder_2", "text_encoder_3"]}
ENCODERS["flux1"] = ["text_encoder", "text_encoder_2"]
ALL_ON = {"offload_text_encoders": True, "offload_vae": True, "cache_prompts": True}
COMPUTE = torch.device("cpu", 0)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("memory_pipelines")
    return {kind: tp.save_pipeline(kind, root / kind) for kind in KINDS}


def _policy(kind: str, dirs: dict[str, Path], **extra) -> DiffusersPolicy:
    return CLASSES[kind].from_pretrained(str(dirs[kind]), **tp.adapter_options(kind, **extra))


@pytest.fixture
def fake_compute_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DiffusersPolicy, "device", property(lambda self: COMPUTE))


class Recorder:
    """The ``.to`` calls (with their device) and the forward calls of named modules, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: dict[int, str] = {}
        self.events: list[tuple[str, str, torch.device | None]] = []
        original = nn.Module.to
        recorder = self

        def to(module: nn.Module, *args, **kwargs):
            if id(module) in recorder.names:
                device = kwargs.get("device", args[0] if args else None)
                recorder.events.append(("to", recorder.names[id(module)], torch.device(device)))
            return original(module, *args, **kwargs)

        monkeypatch.setattr(nn.Module, "to", to)

    def watch(self, name: str, module: nn.Module, forward_of: nn.Module | None = None) -> None:
        """Record ``module``'s moves and the forward calls of ``forward_of`` (``module`` itself by default)."""
        self.names[id(module)] = name
        (forward_of or module).register_forward_hook(lambda *_: self.events.append(("forward", name, None)))

    def of(self, name: str) -> list[tuple[str, torch.device | None]]:
        return [(kind, device) for kind, who, device in self.events if who == name]

    def clear(self) -> None:
        self.events.clear()


def _moved_around_work(events: list[tuple[str, torch.device | None]]) -> bool:
    """Exactly: onto the compute device, at least one forward, back to the CPU."""
    return (
        len(events) >= 3
        and events[0] == ("to", COMPUTE)
        and events[-1] == ("to", CPU)
        and all(e == ("forward", None) for e in events[1:-1])
    )


@pytest.mark.parametrize("kind", KINDS)
def test_offloaded_modules_are_on_the_device_only_while_they_work(
    kind: str, pipeline_dirs, fake_compute_device, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder(monkeypatch)
    policy = _policy(kind, pipeline_dirs)  # defaults: nothing moves
    for name in ENCODERS[kind]:
        rec.watch(name, getattr(policy.pipe, name))
    rec.watch("vae", policy.pipe.vae, forward_of=policy.pipe.vae.decoder)
    policy.encode_prompts(["a cat"])
    policy.decode(torch.zeros(1, *policy.latent_shape))
    assert [e for e in rec.events if e[0] == "to"] == []
    rec.clear()
    offloaded = CLASSES[kind](policy.pipe, **tp.adapter_options(kind, offload_text_encoders=True, offload_vae=True))
    assert sorted(rec.of(n) for n in [*ENCODERS[kind], "vae"]) == [[("to", CPU)]] * (len(ENCODERS[kind]) + 1)
    rec.clear()
    offloaded.encode_prompts(["a cat", "a dog", "a cat"])
    for name in ENCODERS[kind]:
        assert _moved_around_work(rec.of(name)), (name, rec.of(name))
    assert rec.of("vae") == []
    rec.clear()
    offloaded.decode(torch.randn(3, *offloaded.latent_shape))
    assert _moved_around_work(rec.of("vae")), rec.of("vae")
    assert all(rec.of(name) == [] for name in ENCODERS[kind])


def _images(policy: DiffusersPolicy, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """A stochastic rollout's latents and log-probs and its decoded images, flattened into one tensor."""
    x1 = policy.sample_noise(2, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    traj = rollout(policy.velocity, x1, policy.time_grid(3), "precise", cond=cond, generator=gen)
    parts = [traj.latents, traj.log_probs.nan_to_num(), policy.decode(traj.latents[:, -1])]
    return torch.cat([p.flatten() for p in parts])


def _assert_equal(cond: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: object) -> None:
    assert cond.keys() == expected.keys(), what
    for k in expected:
        assert cond[k].dtype == expected[k].dtype and torch.equal(cond[k], expected[k]), (what, k)


#: batches that overlap: later ones mix prompts cached from an earlier batch of another size with new ones
BATCHES = [["a cat", "a dog", "a cat"], ["a dog", "a red bird on a long branch"], ["a dog"]]


@pytest.mark.parametrize("kind", KINDS)
def test_offloading_gives_the_defaults_conditioning_rollouts_and_images_exactly(kind: str, pipeline_dirs) -> None:
    guided = {"guidance_scale": 3.0, "negative_prompt": "blurry"} if kind == "sd3" else {}
    default = _policy(kind, pipeline_dirs, **guided)
    offloaded = _policy(kind, pipeline_dirs, **guided, offload_text_encoders=True, offload_vae=True)
    for batch in BATCHES:
        _assert_equal(offloaded.encode_prompts(batch), default.encode_prompts(batch), batch)
    cond = default.encode_prompts(BATCHES[1])
    assert torch.equal(_images(offloaded, offloaded.encode_prompts(BATCHES[1])), _images(default, cond))


@pytest.mark.parametrize("kind", KINDS)
def test_a_cached_prompt_is_its_own_encoding_by_the_defaults(kind: str, pipeline_dirs) -> None:
    """With ``cache_prompts`` each prompt is encoded on its own, the first time it is seen: a batch's
    conditioning is the defaults' encoding of each of its prompts alone, exactly, whatever batch first held
    it. (A batched matmul can round differently from a single row's: the defaults' batched encoding agrees
    to float rounding; on the tiny SD3 here its pooled CLIP projection differs by one unit in the last place.)"""
    guided = {"guidance_scale": 3.0, "negative_prompt": "blurry"} if kind == "sd3" else {}
    default = _policy(kind, pipeline_dirs, **guided)
    cached = _policy(kind, pipeline_dirs, **guided, **ALL_ON)
    for batch in BATCHES:
        alone = [default.encode_prompts([p]) for p in batch]
        expected = {k: torch.cat([a[k] for a in alone]) for k in alone[0]}
        cond = cached.encode_prompts(batch)
        _assert_equal(cond, expected, batch)
        batched = default.encode_prompts(batch)
        for k in batched:
            torch.testing.assert_close(cond[k], batched[k], rtol=0, atol=1e-6)
    cond = cached.encode_prompts(BATCHES[1])
    assert torch.equal(_images(cached, cond), _images(default, cond))


def _count_encoder_calls(policy: DiffusersPolicy) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(policy.pipe, name, None) is not None:
            getattr(policy.pipe, name).register_forward_hook(hook)
    return calls


def test_a_cached_prompt_runs_no_encoder(pipeline_dirs) -> None:
    policy = _policy("flux1", pipeline_dirs, cache_prompts=True)
    calls = _count_encoder_calls(policy)
    policy.encode_prompts(["a cat", "a dog"])
    per_prompt = calls[0] // 2
    assert per_prompt == 2  # CLIP and T5, once each per prompt
    policy.encode_prompts(["a dog", "a cat", "a dog"])  # a later epoch, another order
    assert calls[0] == 2 * per_prompt
    policy.encode_prompts(["a cat", "a cow"])
    assert calls[0] == 3 * per_prompt  # only the new prompt


def test_free_text_encoders_keeps_the_precomputed_prompts_only(pipeline_dirs) -> None:
    default = _policy("sd3", pipeline_dirs)
    policy = _policy("sd3", pipeline_dirs, cache_prompts=True, free_text_encoders=True)
    assert policy.pipe.text_encoder is not None
    policy.precompute_prompts(["a cat", "a dog"])
    assert all(getattr(policy.pipe, name) is None for name in ENCODERS["sd3"])
    alone = [default.encode_prompts([p]) for p in ["a dog", "a cat", "a dog"]]
    expected = {k: torch.cat([a[k] for a in alone]) for k in alone[0]}
    _assert_equal(policy.encode_prompts(["a dog", "a cat", "a dog"]), expected, "after freeing")
    with pytest.raises(UserError) as err:
        policy.encode_prompts(["a cat", "a cow"])
    message = str(err.value)
    assert "'a cow'" in message and "free_text_encoders" in message and "\n" not in message
    assert message.count(". ") == 0 and not message.endswith(".")  # one sentence


def test_kontext_moves_the_vae_in_to_encode_a_source_and_caches_by_instruction_and_image(
    tmp_path: Path, fake_compute_device, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(te.save_pipeline("flux1_kontext", tmp_path / "kontext"))
    prompts = read_prompt_file(te.write_edit_prompts(tmp_path, [("make it red", (32, 16)), ("make it red", (24, 24))]))
    default = FluxKontextPolicy.from_pretrained(path, **te.adapter_options("flux1_kontext"))
    expected = default.encode_prompts([prompts[0], prompts[1], prompts[0]])
    rec = Recorder(monkeypatch)
    policy = FluxKontextPolicy.from_pretrained(path, **te.adapter_options("flux1_kontext", **ALL_ON))
    rec.watch("vae", policy.pipe.vae, forward_of=policy.pipe.vae.encoder)
    calls = _count_encoder_calls(policy)
    cond = policy.encode_prompts([prompts[0], prompts[1], prompts[0]])
    assert _moved_around_work(rec.of("vae")), rec.of("vae")
    assert cond.keys() == expected.keys() and all(torch.equal(cond[k], expected[k]) for k in expected)
    assert cond["image_latents"].shape[1] == 36  # the 24x24 source's tokens: the 32x16 one's (32) are padded
    assert calls[0] == 2 * 2  # one instruction on two images is two prompts
    rec.clear()
    policy.encode_prompts([prompts[1]])
    assert calls[0] == 4 and rec.of("vae") == []


def test_qwen_image_edit_with_every_option_gives_the_defaults_conditioning_exactly(
    tmp_path: Path, fake_compute_device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Qwen-Image-Edit adapter has its own ``encode_prompts`` (each text encoded alone, with its image,
    and with its default true CFG the negative prompt with each image): the options wrap it all the same."""
    from precise_rl.policies.qwen_image_edit import QwenImageEditPlusPolicy

    with te.processor_without_video():
        path = str(te.save_pipeline("qwen_image_edit", tmp_path / "qwen"))
        entries = [("make it red", (32, 16)), ("make it blue", (24, 24)), ("make it red", (24, 24))]
        prompts = read_prompt_file(te.write_edit_prompts(tmp_path, entries))
        batch = [prompts[0], prompts[1], prompts[0], prompts[2]]
        default = QwenImageEditPlusPolicy.from_pretrained(path, **te.adapter_options("qwen_image_edit"))
        expected = default.encode_prompts(batch)
        rec = Recorder(monkeypatch)
        policy = QwenImageEditPlusPolicy.from_pretrained(path, **te.adapter_options("qwen_image_edit", **ALL_ON))
        rec.watch("text_encoder", policy.pipe.text_encoder)
        rec.watch("vae", policy.pipe.vae, forward_of=policy.pipe.vae.encoder)
        _assert_equal(policy.encode_prompts(batch), expected, batch)
        assert _moved_around_work(rec.of("text_encoder")) and _moved_around_work(rec.of("vae"))
        rec.clear()
        _assert_equal(policy.encode_prompts(batch[::-1]), default.encode_prompts(batch[::-1]), "reversed")
        assert rec.of("text_encoder") == [] and rec.of("vae") == []  # every prompt cached


def _config(tmp_path: Path, pipe: Path) -> Path:
    cfg = {
        "seed": 1,
        "model": {"name": "sd3", "path": str(pipe), "options": tp.adapter_options("sd3")},
        "sampler": {"name": "precise", "num_steps": 2},
        "reward": {"weights": {"jpeg_compressibility": 1.0}},
        "train": {
            "epochs": 1,
            "groups_per_epoch": 2,
            "group_size": 2,
            "batch_size": 4,
            "lora": {"enabled": True, "rank": 2, "alpha": 2},
        },
        "eval": {"every": 0},
        "logging": {"tensorboard": False, "progress": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_train_command_with_every_option_and_bad_values_in_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One epoch of ``precise-rl train`` trains with the text encoders freed after the set-up precomputed its
    prompts; bad option values end the command with exit code 2 and one error line."""
    pipe = tp.save_pipeline("sd3", tmp_path / "pipe")
    config = str(_config(tmp_path, pipe))
    freed: list[bool] = []
    precompute = DiffusersPolicy.precompute_prompts

    def spy(self: DiffusersPolicy, prompts) -> None:
        precompute(self, prompts)
        freed.append(all(getattr(self.pipe, name) is None for name in ENCODERS["sd3"]))

    monkeypatch.setattr(DiffusersPolicy, "precompute_prompts", spy)
    on = [f"model.options.{k}=true" for k in [*ALL_ON, "free_text_encoders"]]
    assert main(["train", config, "--output", str(tmp_path / "run"), *on]) == 0
    assert freed == [True]
    assert (tmp_path / "run").is_dir()
    assert (tmp_path / "run").is_dir()
    cases = [
        (["model.options.offload_vae=maybe"], "model option 'offload_vae' must be true or false, got 'maybe'"),
        (["model.options.cache_prompts=1"], "model option 'cache_prompts' must be true or false, got 1"),
        (["model.options.free_text_encoders=true"], "'free_text_encoders' needs 'cache_prompts: true'"),
    ]
    for k, (overrides, message) in enumerate(cases):
        capsys.readouterr()
        assert main(["train", config, "--output", str(tmp_path / f"bad{k}"), *overrides]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("precise-rl train: error: ") and message in err[-1], err[-1]
        assert sum("error" in line for line in err) == 1
