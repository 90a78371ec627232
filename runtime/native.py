"""Functions of C libraries this process has already loaded (glibc, torch's OpenMP runtime)."""

from __future__ import annotations

import ctypes
import functools
from typing import Callable, Optional


@functools.lru_cache(maxsize=None)
def loaded_function(name: str) -> Optional[Callable]:
    """The C function ``name`` among the libraries already loaded, or None; looked up once, and
    nothing is loaded to find it (``dlopen(NULL)``: the process's own symbol table)."""
    try:
        return getattr(ctypes.CDLL(None), name, None)
    except (OSError, TypeError):  # no process symbol table this way (Windows)
        return None
