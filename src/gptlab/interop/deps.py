"""Optional dependencies of the interop commands, imported only when a command needs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from gptlab.errors import GptlabError


def require(module: str) -> ModuleType:
    """Import `module`, or GptlabError telling how to install it (the [hf] extra)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise GptlabError(f"{package} is not installed; run pip install 'gptlab[hf]'") from None
