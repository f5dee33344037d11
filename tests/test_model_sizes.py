"""The component sizes behind the README's memory table (``precise_rl.policies.sizes``).

A meta-device build from a module's config has that module's parameter count (checked on the tiny
pipelines, whose modules are really built); every shipped config file parses, builds and names its
sources; a bad file is one clear sentence; the counts of the real checkpoints match their published
sizes; and ``precise-rl models --memory`` prints the table of the models page (``docs/models.md``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from precise_rl.cli import main
from precise_rl.errors import UserError
from precise_rl.policies.registry import ADAPTERS
from precise_rl.policies.sizes import (
    ROLES,
    ModelSize,
    component_parameters,
    config_files,
    count_parameters,
    load_model_config,
    model_size,
    model_sizes,
)

from . import tiny_pipelines as tp
from . import tiny_t2i_pipelines as t2i
from . import tiny_video_pipelines as tv

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "flux1": tp.flux1_pipeline,
    "flux2_klein": tp.flux2_klein_pipeline,
    "flux2_klein_9b": t2i.flux2_klein_9b_pipeline,
    "flux2_dev": t2i.flux2_dev_pipeline,
    "sd3": tp.sd3_pipeline,
    "qwen_image": t2i.qwen_image_pipeline,
    "z_image": t2i.z_image_pipeline,
    "wan21": lambda: tv.wan_pipeline("wan21"),
    "wan22_5b": lambda: tv.wan_pipeline("wan22_5b"),
}


def _spec(module) -> tuple[str, str, dict]:
    """The library, class and config a config file would state for ``module``."""
    from diffusers import ModelMixin

    if isinstance(module, ModelMixin):
        return "diffusers", type(module).__name__, dict(module.config)
    return "transformers", type(module).__name__, module.config.to_dict()


@pytest.mark.parametrize("kind", sorted(TINY))
def test_a_meta_build_from_the_config_has_the_real_modules_parameter_count(kind: str) -> None:
    pipe = TINY[kind]()
    checked = []
    for role in ROLES:
        module = getattr(pipe, role, None)
        if module is None:
            continue
        library, cls, config = _spec(module)
        real = sum(p.numel() for p in module.parameters())
        assert component_parameters(library, cls, config) == real == count_parameters(module), (kind, role)
        checked.append(role)
    assert {"transformer", "vae", "text_encoder"} <= set(checked), checked


@pytest.fixture(scope="module")
def sizes() -> dict[str, ModelSize]:
    return {m.name: m for m in model_sizes()}


def test_every_shipped_config_file_parses_builds_and_names_its_sources(sizes: dict[str, ModelSize]) -> None:
    files = config_files()
    assert len(files) >= 10 and set(sizes) == {p.stem for p in files}
    for path in files:
        data = load_model_config(path)
        assert data["adapter"] in ADAPTERS, path
        roles = set(data["components"])
        assert {"transformer", "text_encoder", "vae"} <= roles, path
        m = sizes[path.stem]
        assert [c.role for c in m.components] == list(data["components"])
        for c in m.components:
            assert c.parameters > 0, (path, c.role)
            assert c.source.startswith(data["checkpoint"] + " ") and "config.json" in c.source, (path, c.role)


def test_the_shipped_package_data_includes_the_config_files() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"assets/model_configs/*.json"' in pyproject


# Published sizes (billions of parameters) the configs must reproduce within 2%.
PUBLISHED = [
    ("flux1_dev", "transformer", 11.9),
    ("flux1_dev", "text_encoder_2", 4.76),  # T5-XXL encoder
    ("flux1_dev", "text_encoder", 0.123),  # CLIP-L text model
    ("sd35_large", "transformer", 8.1),
    ("sd35_medium", "transformer", 2.24),
    ("sd35_medium", "text_encoder_2", 0.695),  # OpenCLIP bigG text model with projection
    ("wan21_t2v_1_3b", "transformer", 1.42),
    ("wan22_ti2v_5b", "transformer", 5.0),
    ("wan21_t2v_1_3b", "text_encoder", 5.68),  # UMT5-XXL encoder
    ("flux2_klein_4b", "transformer", 4.0 * 0.97),  # "4B": 3.88B in the transformer
    ("flux2_klein_4b", "text_encoder", 4.02),  # Qwen3-4B
    ("flux2_klein_9b", "transformer", 9.08),
    ("flux2_klein_9b", "text_encoder", 8.19),  # Qwen3-8B
    ("flux2_dev", "transformer", 32.2),
    ("flux2_dev", "text_encoder", 24.0),  # Mistral Small 3.x 24B
    ("qwen_image", "transformer", 20.4),
    ("qwen_image", "text_encoder", 8.29),  # Qwen2.5-VL-7B
    ("z_image", "transformer", 6.15),
]


@pytest.mark.parametrize(("name", "role", "billions"), PUBLISHED)
def test_the_counts_match_the_published_sizes(sizes: dict[str, ModelSize], name: str, role: str, billions: float):
    (c,) = [c for c in sizes[name].components if c.role == role]
    assert c.parameters / 1e9 == pytest.approx(billions, rel=0.02), (name, role, c.parameters)


def _write(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "broken.json"
    path.write_text(content)
    return path


GOOD_VAE = {"library": "diffusers", "class": "AutoencoderKL", "source": "x vae/config.json", "config": {}}


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({"checkpoint": "a/b", "components": {"vae": GOOD_VAE}}), "needs a string 'adapter'"),
        (json.dumps({"adapter": "sd3", "checkpoint": "a/b", "components": {}}), "non-empty object 'components'"),
        (json.dumps({"adapter": "sd3", "checkpoint": "a/b", "components": {"unet": GOOD_VAE}}), "'unet' is none of"),
        (
            json.dumps({"adapter": "sd3", "checkpoint": "a/b", "components": {"vae": {**GOOD_VAE, "library": "x"}}}),
            "needs 'library' one of diffusers, transformers",
        ),
        (
            json.dumps({"adapter": "sd3", "checkpoint": "a/b", "components": {"vae": {**GOOD_VAE, "source": ""}}}),
            "needs a string 'source'",
        ),
        (
            json.dumps(
                {"adapter": "sd3", "checkpoint": "a/b", "components": {"vae": {**GOOD_VAE, "class": "NoSuchModel"}}}
            ),
            "has no NoSuchModel",
        ),
        (
            json.dumps(
                {
                    "adapter": "sd3",
                    "checkpoint": "a/b",
                    "components": {"vae": {**GOOD_VAE, "config": {"block_out_channels": "wide"}}},
                }
            ),
            "component 'vae' (AutoencoderKL) does not build",
        ),
    ],
)
def test_a_corrupt_config_file_is_one_clear_error(tmp_path: Path, content: str, fragment: str) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(UserError) as info:
        model_size(path)
    message = str(info.value)
    assert fragment in message and "\n" not in message, message


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model config file .*missing.json: no such file"):
        model_size(tmp_path / "missing.json")


def test_models_memory_prints_the_readmes_table(capsys: pytest.CaptureFixture[str]) -> None:
    from precise_rl.cli.models import memory_rows, memory_table

    assert main(["models", "--memory"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == memory_table()
    page = (ROOT / "docs" / "models.md").read_text()
    memory_section = page.split("### Memory options", 1)[1].split("\n### ", 1)[0]
    assert printed in memory_section
    assert main(["models", "--memory", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == memory_rows()
    for r in rows:
        te = sum(c["parameters"] for role, c in r["components"].items() if role.startswith("text_encoder"))
        assert r["text_encoders_bytes"] == 2 * te
