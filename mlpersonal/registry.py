"""The registry decorator every op / layer / model-kind table uses."""

from __future__ import annotations

from typing import Any, Callable, Hashable, MutableMapping


def registrar(table: MutableMapping[Hashable, Any]) -> Callable[..., Callable[[Any], Any]]:
    """``register = registrar(TABLE)``; ``@register(key, ...)`` stores the decorated function or
    class in ``TABLE`` under each key and returns it unchanged."""

    def register(*keys: Hashable) -> Callable[[Any], Any]:
        def deco(obj):
            for key in keys:
                table[key] = obj
            return obj

        return deco

    return register
