"""Where the CLS, register and patch tokens sit in a backbone's token sequence."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .errors import BackboneError


@dataclass(frozen=True)
class TokenLayout:
    """Token positions of one image's sequence ``(n_tokens, d_model)``.

    ``cls_index`` is None for models without a CLS token (SigLIP). Patches are the
    ``grid[0] * grid[1]`` tokens from ``patch_start`` on, in row-major order (row = image y).
    ``extra_indices`` are the other non-patch tokens (DINOv2 registers). The last
    ``n_prompts`` tokens are prompt tokens added by an adapter (MaPLe vision prompts): token
    mode ``all`` leaves them out, ``all_with_prompts`` keeps them.
    """

    n_tokens: int
    cls_index: int | None
    patch_start: int
    grid: tuple[int, int]
    extra_indices: tuple[int, ...] = ()
    n_prompts: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))
        object.__setattr__(self, "extra_indices", tuple(int(i) for i in self.extra_indices))
        if min(self.grid) < 1 or self.patch_start < 0:
            raise BackboneError(
                f"invalid token layout {self}: grid must be positive and patch_start >= 0"
            )
        if self.n_prompts < 0:
            raise BackboneError(f"invalid token layout {self}: n_prompts must be >= 0")
        if self.patch_start + self.n_patches > self.n_tokens - self.n_prompts:
            raise BackboneError(
                f"invalid token layout {self}: patch_start + grid cells "
                f"({self.patch_start} + {self.n_patches}) exceeds n_tokens {self.n_tokens}"
                + (f" less the {self.n_prompts} prompt tokens" if self.n_prompts else "")
            )
        special = ([] if self.cls_index is None else [self.cls_index]) + list(self.extra_indices)
        patches = self.patch_indices
        for index in special:
            if not 0 <= index < self.n_tokens - self.n_prompts or index in patches:
                raise BackboneError(
                    f"invalid token layout {self}: CLS/extra index {index} must be a non-patch "
                    f"position in 0..{self.n_tokens - 1}"
                )

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patch_indices(self) -> range:
        return range(self.patch_start, self.patch_start + self.n_patches)

    @property
    def prompt_indices(self) -> range:
        return range(self.n_tokens - self.n_prompts, self.n_tokens)

    def with_prompts(self, n_prompts: int) -> TokenLayout:
        """This layout with ``n_prompts`` prompt tokens appended after every other token."""
        if n_prompts == 0:
            return self
        return replace(
            self, n_tokens=self.n_tokens + n_prompts, n_prompts=self.n_prompts + n_prompts
        )

    def positions(self, tokens: str) -> slice:
        """Positions kept by a token mode: ``all`` (every token but prompt tokens),
        ``all_with_prompts``, ``cls`` (the CLS token) or ``patches``."""
        if tokens == "all":
            return slice(0, self.n_tokens - self.n_prompts)
        if tokens == "all_with_prompts":
            return slice(0, self.n_tokens)
        if tokens == "cls":
            if self.cls_index is None:
                raise BackboneError(
                    "tokens='cls', but this backbone has no CLS token; use 'all' or 'patches'"
                )
            return slice(self.cls_index, self.cls_index + 1)
        if tokens == "patches":
            return slice(self.patch_start, self.patch_start + self.n_patches)
        raise BackboneError(
            f"tokens must be 'all', 'all_with_prompts', 'cls' or 'patches', got {tokens!r}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists; ``n_prompts`` only when non-zero)."""
        out = {
            "n_tokens": self.n_tokens,
            "cls_index": self.cls_index,
            "patch_start": self.patch_start,
            "grid": list(self.grid),
            "extra_indices": list(self.extra_indices),
        }
        if self.n_prompts:
            out["n_prompts"] = self.n_prompts
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenLayout:
        """Inverse of ``to_dict``; a missing or unknown key raises BackboneError."""
        required = {"n_tokens", "cls_index", "patch_start", "grid"}
        allowed = required | {"extra_indices", "n_prompts"}
        if not required <= set(data) <= allowed:
            raise BackboneError(
                f"token layout dict has keys {sorted(data)}; expected {sorted(required)} "
                f"and optionally 'extra_indices' and 'n_prompts'"
            )
        return cls(
            n_tokens=int(data["n_tokens"]),
            cls_index=None if data["cls_index"] is None else int(data["cls_index"]),
            patch_start=int(data["patch_start"]),
            grid=tuple(data["grid"]),
            extra_indices=tuple(data.get("extra_indices", ())),
            n_prompts=int(data.get("n_prompts", 0)),
        )
