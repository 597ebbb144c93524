"""The detector's statistics and the detectors made of them, as data.

A :class:`Statistic` is one number the detector measures on a slice
(:meth:`recon.detect.cyclic.CyclicDetector.score`), with what it costs: the cycle's K
passes are always run; ``folds``, ``sensitive`` and ``shift`` name the extra passes it
needs. A :class:`Combination` is a detector: the largest of its components, each over its
clean scale (its quantile at the target false-positive rate; a backstop's scale is its
largest clean value, so it takes no share of the false-positive budget; a gate keeps its
own clean threshold beside, for the mitigation).

The product ships two detectors (:data:`DETECTORS`): ``null_first_union``, the default,
and ``null_noise_union``, opt-in; and the paper's ``cyclic`` statistic as its baseline
(:data:`PRODUCT_CHOICES`, what ``cycguard calibrate --statistic`` offers). Each statistic's
reasoning and measured behaviour is in ``docs/DESIGN.md``, section 3. Other
combinations of the same statistics, studied in the benchmarks, are added with
:func:`register`; a calibration file of a combination this registry does not hold is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

CYCLE = "cycle"  # from the cycle's outputs (K alternative-mask passes)
RESIDUAL = "residual"  # from the received data and the network's image alone (no extra pass)
DATA = "data"  # of the received data alone, with extra passes: the same for any rewrite of the image


@dataclass(frozen=True)
class Statistic:
    """One consistency statistic of a slice (higher means less consistent)."""

    name: str
    summary: str
    source: str  # CYCLE, RESIDUAL or DATA
    folds: bool = False  # needs the held-out folds (F passes)
    sensitive: bool = False  # needs the sensitive directions (2 K iterations more)
    shift: bool = False  # needs the pass with a raised prior weight


@dataclass(frozen=True)
class Combination:
    """A detector: the largest of ``components``, each over its clean scale."""

    name: str
    summary: str
    components: tuple[str, ...]
    backstops: tuple[str, ...] = ()  # scaled by their largest clean value
    gates: tuple[str, ...] = ()  # backstops whose clean threshold the calibration also keeps

    def __post_init__(self) -> None:
        unknown = [name for name in self.components if name not in STATISTICS]
        if unknown:
            raise ValueError(f"combination {self.name!r}: {', '.join(unknown)} not among the statistics ({', '.join(STATISTICS)})")
        if not set(self.gates) <= set(self.backstops) <= set(self.components):
            raise ValueError(f"combination {self.name!r}: gates must be backstops and backstops components")


STATISTICS: dict[str, Statistic] = {
    s.name: s
    for s in (
        Statistic("cyclic", "the paper's: mean over K alternative masks of ||y - r_k|| / ||r_k||", CYCLE),
        Statistic("cycle_image", "the network's disagreement with itself across masks, ||x2_k - x1|| / ||x1||", CYCLE),
        Statistic("dc", "data-consistency residual ||y - E x1|| / ||y|| (baseline)", RESIDUAL),
        Statistic("cyclic_noise", "the cyclic residual in acquisition-noise norms", CYCLE),
        Statistic("dc_noise", "the data-consistency residual in acquisition-noise norms", RESIDUAL),
        Statistic("holdout_noise", "cross-validation of the acquired lines: prediction error of held-out folds, noise norms", DATA, folds=True),
        Statistic(
            "holdout_sensitive", "share of that prediction error along the network's most sensitive data directions", DATA,
            folds=True, sensitive=True,
        ),
        Statistic("prior_shift", "how far the image moves when the prior weighs prior_gain times more, noise norms", DATA, shift=True),
        Statistic("dc_spike", "largest single-sample data residual over its neighbours' median", RESIDUAL),
        Statistic("null_shift", "that move on the lines not acquired over its size on the acquired ones outside the ACS", DATA, shift=True),
        Statistic("noise_excess", "data residual on the readout periphery, in noise sigmas (about 0.96 when clean)", RESIDUAL),
    )
}

COMBINATIONS: dict[str, Combination] = {}


def register(combination: Combination) -> Combination:
    """Add a combination of the statistics (the same name must mean the same combination)."""
    known = COMBINATIONS.get(combination.name)
    if known is not None and known != combination:
        raise ValueError(f"combination {combination.name!r} is already registered as {known}")
    if combination.name in STATISTICS:
        raise ValueError(f"{combination.name!r} is a statistic, not a combination")
    COMBINATIONS[combination.name] = combination
    return combination


DETECTORS: tuple[Combination, ...] = (
    register(Combination(
        "null_first_union", "the default: null_shift holds the false-positive budget; dc_spike and prior_shift are backstops",
        ("null_shift", "dc_spike", "prior_shift"), backstops=("dc_spike", "prior_shift"), gates=("prior_shift",),
    )),
    register(Combination(
        "null_noise_union", "opt-in: null_first_union with noise_excess as a third backstop (for prewhitened data only)",
        ("null_shift", "dc_spike", "prior_shift", "noise_excess"), backstops=("dc_spike", "prior_shift", "noise_excess"), gates=("prior_shift",),
    )),
)
DEFAULT_STATISTIC = DETECTORS[0].name
# what a site chooses from (cycguard calibrate --statistic): the two detectors and the paper's statistic
PRODUCT_CHOICES = (*(d.name for d in DETECTORS), "cyclic")


@dataclass(frozen=True)
class Needs:
    """The extra network passes a statistic or a combination needs beyond the cycle's."""

    folds: bool
    sensitive: bool
    shift: bool


def needs(name: str) -> Needs:
    """What scoring ``name`` (a statistic or a registered combination) needs."""
    parts = [STATISTICS[c] for c in COMBINATIONS[name].components] if name in COMBINATIONS else [lookup(name)]
    return Needs(any(p.folds for p in parts), any(p.sensitive for p in parts), any(p.shift for p in parts))


def lookup(name: str) -> Statistic:
    """The named statistic.

    Raises:
        ValueError: a combination, or a name that is neither.
    """
    if name in COMBINATIONS:
        raise ValueError(f"statistic {name!r} combines {' and '.join(COMBINATIONS[name].components)} on a calibration's scales (Calibration.score_of)")
    if name not in STATISTICS:
        raise ValueError(f"statistic {name!r} is not one of {', '.join(STATISTICS)}")
    return STATISTICS[name]


def judges_image(name: str) -> bool:
    """Whether ``name`` is one statistic that depends on the image (not a combination, and not
    of the received data alone): one that can judge a rewrite against the original."""
    return name in STATISTICS and STATISTICS[name].source != DATA


def of_source(source: str) -> tuple[str, ...]:
    """The statistics computed from ``source`` (CYCLE, RESIDUAL or DATA), in registry order."""
    return tuple(name for name, s in STATISTICS.items() if s.source == source)
