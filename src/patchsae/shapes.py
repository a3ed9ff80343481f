"""Shape annotations of tensor functions, checked at run time only when asked.

Tensor functions carry ``jaxtyping`` annotations (``Float[Tensor, "n d_in"]``) that state their
shapes, with the project's dimension names (``n`` tokens, ``d_in`` / ``d_model`` widths, ``d_sae``
latents, ``*batch`` any leading axes). :func:`shaped` checks them with beartype when
``PATCHSAE_CHECK_SHAPES=1`` is set before patchsae is imported (``tests/conftest.py`` sets it, so
the whole suite runs checked); otherwise it returns the function itself, so library runs pay
nothing. Within one call a dimension name binds one size across arguments and result.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

CHECK_SHAPES = os.environ.get("PATCHSAE_CHECK_SHAPES") == "1"


def shaped(fn: F) -> F:
    """``fn`` wrapped by ``jaxtyped(typechecker=beartype)`` when checking is on, else ``fn``."""
    if not CHECK_SHAPES:
        return fn
    from beartype import beartype
    from jaxtyping import jaxtyped

    return jaxtyped(typechecker=beartype)(fn)
