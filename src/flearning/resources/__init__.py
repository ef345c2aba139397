"""Files shipped inside the package: sample datasets (``samples/``) and run configs (``configs/``).

Found through ``importlib.resources`` so an installed wheel behaves like the checkout (where
``data/samples`` and ``configs`` are links to these directories). ``sample_path("facts.jsonl")`` and
``config_path("demo")`` give the file's path; ``resolve_config`` and ``resolve_sample`` turn what a
user wrote (a path, a shipped name, ``sample:NAME``) into a path.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from flearning.errors import FlearnError

SAMPLE_PREFIX = "sample:"


def _directory(name: str) -> Path:
    # flearning is installed as files (never zip-imported), so the traversable is a real directory.
    return Path(str(files(__name__) / name))


def samples_dir() -> Path:
    """The directory of the shipped sample datasets (with their attribution ``README.md``)."""
    return _directory("samples")


def configs_dir() -> Path:
    """The directory of the shipped run configs (``<method>.yaml``, ``demo.yaml``, ``accelerate/``)."""
    return _directory("configs")


def sample_names() -> list[str]:
    return sorted(p.name for p in samples_dir().iterdir() if p.is_file() and p.name != "README.md")


def config_names() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def sample_path(name: str) -> Path:
    """The shipped sample file ``name`` (e.g. ``facts.jsonl``, ``counterfact-200.json``)."""
    path = samples_dir() / name
    if Path(name).name != name or name == "README.md" or not path.is_file():
        raise FlearnError(f"no shipped sample '{name}'; shipped samples: {', '.join(sample_names())}")
    return path


def config_path(name: str) -> Path:
    """The shipped run config ``name`` (``demo``, ``flearning-ft``, ... with or without ``.yaml``)."""
    stem = name.removesuffix(".yaml")
    path = configs_dir() / f"{stem}.yaml"
    if Path(stem).name != stem or not path.is_file():
        raise FlearnError(f"no shipped config '{name}'; shipped configs: {', '.join(config_names())}")
    return path


def resolve_config(path: Path | str) -> Path:
    """``--config``: an existing file as given; otherwise a bare name (``demo``, ``ft.yaml``) names a
    shipped config. Anything else is returned unchanged, for the reader to report as missing."""
    given = Path(path)
    if given.exists() or given.name != str(path):
        return given
    stem = given.name.removesuffix(".yaml")
    if stem in config_names():
        return config_path(stem)
    return given


def resolve_sample(path: Path | str) -> Path:
    """A data file: ``sample:NAME`` is the shipped sample NAME (an error names it if there is none);
    anything else is a path, returned unchanged."""
    text = str(path)
    if text.startswith(SAMPLE_PREFIX):
        return sample_path(text.removeprefix(SAMPLE_PREFIX))
    return Path(path)
