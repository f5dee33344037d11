"""Parameter counts of the real checkpoints' components, from their configs alone.

``src/precise_rl/assets/model_configs/<file>.json`` holds, for one checkpoint, each pipeline
component (transformer(s), text encoders, VAE) as its library (``diffusers`` or ``transformers``),
class (the one the diffusers pipeline loads) and the config keys that differ from the class defaults
or shape the weights, with the file each one comes from (``source``). :func:`component_parameters`
builds a component on the meta device from that config and counts its parameters: nothing is
downloaded and no weight memory is allocated. :func:`model_sizes` does it for every component of
every shipped file; ``precise-rl models --memory`` prints the result as the models page's table of what the
memory options take off the device.

A component's bytes are its parameter count times the bytes of the dtype (2 in bfloat16); shared
(tied) parameters count once, as they take memory once.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

__all__ = [
    "ROLES",
    "ComponentSize",
    "ModelSize",
    "config_files",
    "load_model_config",
    "build_on_meta",
    "component_parameters",
    "model_size",
    "model_sizes",
]

# The pipeline attributes a file may describe, and what each one is.
ROLES = {
    "transformer": "transformer",
    "transformer_2": "transformer",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder",
    "text_encoder_3": "text_encoder",
    "vae": "vae",
}
LIBRARIES = ("diffusers", "transformers")


@dataclass(frozen=True)
class ComponentSize:
    """One component: its pipeline attribute, class, parameter count and the config's source."""

    role: str
    library: str
    class_name: str
    parameters: int
    source: str

    @property
    def kind(self) -> str:
        """``transformer``, ``text_encoder`` or ``vae``."""
        return ROLES[self.role]

    def gigabytes(self, bytes_per_parameter: int = 2) -> float:
        """Its parameter bytes in GB (10^9 bytes)."""
        return self.parameters * bytes_per_parameter / 1e9


@dataclass(frozen=True)
class ModelSize:
    """A checkpoint's components, in the file's order."""

    name: str
    adapter: str
    checkpoint: str
    components: tuple[ComponentSize, ...] = ()

    def parameters(self, kind: str) -> int:
        """The parameters of its components of one kind (``transformer``, ``text_encoder``, ``vae``)."""
        return sum(c.parameters for c in self.components if c.kind == kind)

    def of_kind(self, kind: str) -> list[ComponentSize]:
        return [c for c in self.components if c.kind == kind]


def _config_dir() -> Path:
    return Path(str(resources.files("precise_rl") / "assets" / "model_configs"))


def config_files() -> list[Path]:
    """The shipped config files, sorted by name."""
    return sorted(_config_dir().glob("*.json"))


def _fail(path: Path, what: str) -> UserError:
    return UserError(f"model config file {path}: {what}")


def load_model_config(path: str | Path) -> dict[str, Any]:
    """Read and check one config file: ``adapter``, ``checkpoint`` and its ``components``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, f"cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise _fail(path, f"is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise _fail(path, "must hold a JSON object")
    for key in ("adapter", "checkpoint"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise _fail(path, f"needs a string {key!r}")
    components = data.get("components")
    if not isinstance(components, dict) or not components:
        raise _fail(path, "needs a non-empty object 'components'")
    for role, spec in components.items():
        if role not in ROLES:
            raise _fail(path, f"component {role!r} is none of {', '.join(ROLES)}")
        if not isinstance(spec, dict):
            raise _fail(path, f"component {role!r} must be an object")
        if spec.get("library") not in LIBRARIES:
            raise _fail(path, f"component {role!r} needs 'library' one of {', '.join(LIBRARIES)}")
        for key in ("class", "source"):
            if not isinstance(spec.get(key), str) or not spec[key]:
                raise _fail(path, f"component {role!r} needs a string {key!r}")
        if not isinstance(spec.get("config", {}), dict):
            raise _fail(path, f"component {role!r}: 'config' must be an object")
    return data


def _model_class(library: str, class_name: str) -> Any:
    module = __import__(library)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(f"the installed {library} {module.__version__} has no {class_name}")
    return cls


def build_on_meta(library: str, class_name: str, config: dict[str, Any]) -> torch.nn.Module:
    """Construct ``library.class_name`` from ``config`` on the meta device (shapes only, no memory)."""
    cls = _model_class(library, class_name)
    with torch.device("meta"):
        if library == "diffusers":
            return cls.from_config(dict(config))
        return cls(cls.config_class(**config))


def count_parameters(module: torch.nn.Module) -> int:
    """Distinct parameters' elements (a tied weight counts once)."""
    return sum(p.numel() for p in module.parameters())


def component_parameters(library: str, class_name: str, config: dict[str, Any]) -> int:
    """The parameter count of the component ``class_name`` built from ``config``."""
    return count_parameters(build_on_meta(library, class_name, config))


def model_size(path: str | Path) -> ModelSize:
    """Every component of one config file, counted."""
    path = Path(path)
    data = load_model_config(path)
    sizes = []
    for role, spec in data["components"].items():
        try:
            n = component_parameters(spec["library"], spec["class"], spec.get("config", {}))
        except UserError as exc:
            raise _fail(path, f"component {role!r}: {exc}") from None
        except Exception as exc:  # a config the class rejects
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise _fail(path, f"component {role!r} ({spec['class']}) does not build: {first}") from None
        sizes.append(ComponentSize(role, spec["library"], spec["class"], n, spec["source"]))
    return ModelSize(path.stem, data["adapter"], data["checkpoint"], tuple(sizes))


@functools.lru_cache(maxsize=1)
def model_sizes() -> tuple[ModelSize, ...]:
    """Every shipped config file, counted, in file-name order (counted once per process)."""
    return tuple(model_size(p) for p in config_files())
