"""mobilevit_deploy: efficient vision transformers from a training recipe to a phone.

Importing the package is light: it pulls in neither torch's heavy exporters nor coremltools,
executorch or onnxruntime. Those load inside the stage that needs them.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "get_deploy_cfg", "UserError", "__version__"]

from .errors import UserError


def __getattr__(name):  # lazy: `import mobilevit_deploy` must not import torch
    if name in ("create_model", "list_models", "get_deploy_cfg"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'mobilevit_deploy' has no attribute {name!r}")
