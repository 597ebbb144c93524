"""Cartesian 1-D phase-encode sampling mask families, seeded.

A family is a kind, an acceleration R and a fixed block of ``acs_lines`` central
auto-calibration lines. Masks are ``(ky,)`` bool arrays. Every draw takes an explicit
``numpy.random.Generator``; nothing touches global RNG state.

Kinds:

* ``equispaced``: every R-th line from a random offset in ``[0, R)``, plus the ACS block.
  The family has exactly R members, which gives the cyclic defense its R - 1 alternatives.
* ``random``: the ACS block plus a uniform draw, without replacement, of as many outer
  lines as an equispaced mask of the same R would have.
* ``variable_density``: like ``random`` with a Gaussian density over ky (sigma = ny / 4),
  favouring lines near the centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("equispaced", "random", "variable_density")


@dataclass(frozen=True)
class MaskFamily:
    """A family of Cartesian line masks.

    Attributes:
        kind: one of ``equispaced``, ``random``, ``variable_density``.
        acceleration: nominal acceleration R of the outer k-space (integer >= 1).
        acs_lines: width of the fully sampled central calibration block (lines).
    """

    kind: str = "equispaced"
    acceleration: int = 4
    acs_lines: int = 16

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"mask kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if int(self.acceleration) != self.acceleration or self.acceleration < 1:
            raise ValueError(f"acceleration must be an integer >= 1, got {self.acceleration}")
        if self.acs_lines < 0:
            raise ValueError(f"acs_lines must be >= 0, got {self.acs_lines}")

    def acs_mask(self, ny: int) -> np.ndarray:
        """The ACS block: ``acs_lines`` lines centred on ``ny // 2``."""
        if self.acs_lines > ny:
            raise ValueError(f"acs_lines={self.acs_lines} exceeds the {ny} phase-encode lines")
        acs = np.zeros(ny, dtype=bool)
        start = ny // 2 - self.acs_lines // 2
        acs[start : start + self.acs_lines] = True
        return acs

    def _outer_count(self, ny: int, acs: np.ndarray) -> int:
        equispaced = np.zeros(ny, dtype=bool)
        equispaced[:: self.acceleration] = True
        return int(np.count_nonzero(equispaced & ~acs))

    def sample(self, ny: int, rng: np.random.Generator) -> np.ndarray:
        """Draw one mask of ``ny`` lines from the family."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError("rng must be a numpy.random.Generator (explicit seeding)")
        if self.kind == "equispaced":
            return self.equispaced(ny, int(rng.integers(self.acceleration)))
        acs = self.acs_mask(ny)
        candidates = np.flatnonzero(~acs)
        count = min(self._outer_count(ny, acs), candidates.size)
        if self.kind == "random":
            weights = np.ones(candidates.size)
        else:
            sigma = ny / 4.0
            weights = np.exp(-0.5 * ((candidates - ny // 2) / sigma) ** 2)
        chosen = rng.choice(candidates, size=count, replace=False, p=weights / weights.sum())
        mask = acs.copy()
        mask[chosen] = True
        return mask

    def equispaced(self, ny: int, offset: int) -> np.ndarray:
        """The equispaced member with the given offset (``0 <= offset < R``)."""
        if not 0 <= offset < self.acceleration:
            raise ValueError(f"offset must be in [0, {self.acceleration}), got {offset}")
        mask = self.acs_mask(ny)
        mask[offset :: self.acceleration] = True
        return mask

    def max_alternatives(self, default: int) -> int:
        """How many alternatives to a mask the family can give, at most ``default`` (equispaced:
        the R - 1 other offsets; the random kinds: any number)."""
        return min(default, self.acceleration - 1) if self.kind == "equispaced" else default

    def alternatives(self, mask: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
        """``count`` masks of the family other than ``mask`` (the cycle's Delta_k).

        For ``equispaced`` these are the other offsets (at most R - 1 distinct ones, taken
        in a random order); for the random kinds they are fresh draws that differ from
        ``mask``.
        """
        ny = mask.shape[0]
        if self.kind == "equispaced":
            others = [m for o in range(self.acceleration) if not np.array_equal(m := self.equispaced(ny, o), mask)]
            if count > len(others):
                raise ValueError(
                    f"an equispaced R={self.acceleration} family has only {len(others)} "
                    f"alternatives to a mask, {count} asked"
                )
            order = rng.permutation(len(others))[:count]
            return [others[i] for i in order]
        out: list[np.ndarray] = []
        while len(out) < count:
            candidate = self.sample(ny, rng)
            if not np.array_equal(candidate, mask):
                out.append(candidate)
        return out
