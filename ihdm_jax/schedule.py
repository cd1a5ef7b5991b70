"""The forward process's numbers as a config sets them: K, t_k, σ and δ, computed in one place."""

import dataclasses

import jax

from ihdm_jax import errors
from ihdm_jax import heat


@dataclasses.dataclass(frozen=True)
class Schedule:
    K: int  # number of levels
    t: jax.Array  # heat times t_0..t_K, t_k = σ_B,k²/2 (App. B.5)
    sigma: float  # training noise σ (Eq. 4)
    delta: float  # sampling noise δ (Eq. 8), the KDE prior's bandwidth

    @property
    def t_K(self) -> jax.Array:
        return self.t[-1]


def from_config(config) -> Schedule:
    m = config.model
    return Schedule(
        K=m.K,
        t=heat.heat_times(m.K, m.blur_sigma_min, m.blur_sigma_max),
        sigma=m.sigma,
        delta=config.sampling.delta,
    )


def analysis_levels(config) -> list:
    """The levels k = max(1, round(f K)) of the fractions f in config.analysis.level_fractions
    (fractions, so that one setting suits every K)."""
    fractions = tuple(config.analysis.level_fractions)
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise errors.UserError(
            f'config.analysis.level_fractions={fractions} must be fractions of K in (0, 1].'
        )
    return [max(1, round(f * config.model.K)) for f in fractions]
