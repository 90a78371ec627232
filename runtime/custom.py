"""Registries of custom layer and custom model implementations (looked up by className only)."""

from __future__ import annotations

from typing import Any

#: className -> implementation class (see register_custom_layer)
CUSTOM_LAYERS: dict[str, Any] = {}
#: className -> implementation class (see register_custom_model)
CUSTOM_MODELS: dict[str, Any] = {}


def register_custom_layer(class_name: str, impl: Any) -> None:
    """Make ``impl`` the implementation of custom layers named ``class_name``."""
    CUSTOM_LAYERS[str(class_name)] = impl


def register_custom_model(class_name: str, impl: Any) -> None:
    """Make ``impl`` the implementation of custom models named ``class_name``."""
    CUSTOM_MODELS[str(class_name)] = impl
