r"""Shapes of the GPO losses and their second-order Taylor expansions.

Claim (Tang et al. 2024, "Generalized Preference Optimization", arXiv:2402.05749, Section 4;
slides 002, "Understanding the trade-offs"): every offline loss ``E[f(beta rho)]`` expands as

.. math:: f(0) + f'(0)\,\beta\,\mathbb{E}[\rho] + \tfrac{f''(0)}{2}\,\beta^2\,\mathbb{E}[\rho^2]
          + O(\rho^3).

All six convex losses have ``f'(0) < 0``, so they agree to first order up to scale (the
preference-optimisation term); they differ in the offline-regularisation term ``f''(0)/2``.
Normalising each by ``|f'(0)|`` makes the slopes at 0 equal to ``-1`` and leaves the curvature
``f''(0) / (2 |f'(0)|)`` as the only second-order difference (0 for the hinge: SLiC has no
offline regulariser near ``x = 0``).

The computation is exact and cheap: the functions of :data:`toyrlhf.losses.GPO_FAMILY` on a grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..losses import GPO_FAMILY

__all__ = ["NAME", "TITLE", "Config", "Result", "run", "figure", "plot_losses", "plot_taylor",
           "plot_normalised"]

NAME = "loss_shapes"
TITLE = "GPO losses agree to first order up to scale; they differ in f''(0)/2"


@dataclass(frozen=True)
class Config:
    """Grid and members for the loss-shape figure."""

    x_max: float = 3.0
    """Half-width of the grid of x = beta * rho, drawn on [-x_max, x_max]."""
    n_points: int = 601
    """Number of grid points (odd, so that x = 0 is on the grid)."""
    members: tuple[str, ...] = tuple(GPO_FAMILY)
    """GPO_FAMILY members to draw."""
    normalised_x_max: float = 1.0
    """Half-width of the grid of the normalised panel (f(x) - f(0)) / |f'(0)|."""

    def __post_init__(self) -> None:
        for name in ("x_max", "normalised_x_max"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        if (isinstance(self.n_points, bool) or not isinstance(self.n_points, int)
                or self.n_points < 3 or self.n_points % 2 == 0):
            raise ValueError(f"n_points must be an odd integer >= 3, got {self.n_points!r}")
        if not self.members:
            raise ValueError("members must name at least one GPO_FAMILY member")
        unknown = [m for m in self.members if m not in GPO_FAMILY]
        if unknown:
            raise ValueError(f"members has unknown names {unknown}; known: "
                             f"{', '.join(GPO_FAMILY)}")

    @classmethod
    def quick(cls) -> Config:
        """A tiny grid for tests."""
        return cls(n_points=41)


@dataclass(frozen=True)
class Result:
    """Loss curves on the grid.  Row ``k`` of every 2-D array belongs to ``members[k]``."""

    config: Config
    members: tuple[str, ...]
    methods: tuple[str, ...]
    """Method each member gives (DPO, IPO, SLiC, ...)."""
    x: np.ndarray
    """Grid of x = beta * rho, shape (n,)."""
    f: np.ndarray
    """f(x), shape (k, n)."""
    taylor: np.ndarray
    """f(0) + f'(0) x + f''(0)/2 x^2, shape (k, n)."""
    f0: np.ndarray
    """f(0), shape (k,)."""
    df0: np.ndarray
    """f'(0), shape (k,)."""
    d2f0: np.ndarray
    """f''(0), shape (k,)."""
    x_normalised: np.ndarray
    """Grid of the normalised panel, shape (n,)."""
    normalised: np.ndarray
    """(f(x) - f(0)) / |f'(0)| on x_normalised, shape (k, n)."""
    curvature: np.ndarray
    """Normalised regulariser coefficient f''(0) / (2 |f'(0)|), shape (k,)."""


def run(config: Config, progress: bool = False) -> Result:
    """Evaluate each member's ``f`` and its second-order Taylor polynomial at 0 on a grid.

    Parameters
    ----------
    config : Config
    progress : bool
        Ignored (the computation is instant).

    Returns
    -------
    Result
    """
    members = tuple(config.members)
    losses = [GPO_FAMILY[m] for m in members]
    x = np.linspace(-config.x_max, config.x_max, config.n_points)
    xn = np.linspace(-config.normalised_x_max, config.normalised_x_max, config.n_points)
    f0 = np.array([c.f0 for c in losses])
    df0 = np.array([c.df0 for c in losses])
    d2f0 = np.array([c.d2f0 for c in losses])
    f = np.stack([c.f(x) for c in losses])
    taylor = f0[:, None] + df0[:, None] * x + 0.5 * d2f0[:, None] * x**2
    normalised = np.stack([(c.f(xn) - c.f0) / abs(c.df0) for c in losses])
    return Result(
        config=config, members=members, methods=tuple(c.method for c in losses), x=x, f=f,
        taylor=taylor, f0=f0, df0=df0, d2f0=d2f0, x_normalised=xn, normalised=normalised,
        curvature=d2f0 / (2.0 * np.abs(df0)),
    )


def _label(result: Result, k: int) -> str:
    name, method = result.members[k], result.methods[k]
    return name if name.replace("_", " ") == method.lower() else f"{name} ({method})"


def _twin(result: Result, k: int, curve: np.ndarray) -> str | None:
    """The earlier member whose ``curve`` row is identical to row ``k`` on the grid, if any."""
    for i in range(k):
        if np.array_equal(curve[i], curve[k]):
            return result.members[i]
    return None


def _style(result: Result, k: int, curve: np.ndarray, base: str = "-") -> dict:
    """Line style of member ``k``: a dotted line with markers where it coincides with an earlier member."""
    if _twin(result, k, curve) is None and not (result.members[k] == "truncated_quadratic" and curve is result.f):
        return dict(ls=base)
    return dict(ls=(0, (1, 1.5)), marker="o", ms=3.5, markevery=(k * 7 % 40, 40), lw=2.2)


def plot_losses(result: Result, ax) -> None:
    """Draw f(x) of every member (the truncated quadratic equals the squared loss for x < 1)."""
    for k in range(len(result.members)):
        label = _label(result, k)
        if result.members[k] == "truncated_quadratic":
            label += ", = squared for x < 1"
        ax.plot(result.x, result.f[k], color=f"C{k}", label=label, **_style(result, k, result.f))
    ax.set_ylim(-0.3, 8.0)
    ax.set_xlabel(r"$x = \beta\rho$")
    ax.set_ylabel(r"$f(x)$ (loss per pair)")
    ax.set_title("Convex losses $f$, all decreasing at 0")
    ax.legend(loc="upper right", fontsize=8)


def plot_taylor(result: Result, ax) -> None:
    """Draw each member's second-order Taylor polynomial at 0 (dashed) over f (faint).

    Members with the same Taylor terms (squared and truncated quadratic) would draw the same curve:
    the later one is dotted with markers and says so in the legend.
    """
    for k in range(len(result.members)):
        ax.plot(result.x, result.f[k], color=f"C{k}", alpha=0.3)
        twin = _twin(result, k, result.taylor)
        label = rf"{result.members[k]}: $f''(0)/2 = {0.5 * result.d2f0[k]:.3g}$"
        if twin is not None:
            label += f" (= {twin})"
        ax.plot(result.x, result.taylor[k], color=f"C{k}", label=label, **_style(result, k, result.taylor, "--"))
    ax.set_ylim(-2.2, 8.0)
    ax.set_xlabel(r"$x = \beta\rho$")
    ax.set_ylabel(r"$f(0) + f'(0)x + \frac{f''(0)}{2}x^2$")
    ax.set_title("Second-order Taylor (dashed) differs in $f''(0)/2$")
    ax.legend(loc="upper right", fontsize=8)


def plot_normalised(result: Result, ax) -> None:
    """Draw (f(x) - f(0)) / |f'(0)|: equal slopes at 0, different curvature."""
    for k in range(len(result.members)):
        twin = _twin(result, k, result.normalised)
        label = rf"{result.members[k]}: $f''(0)/(2|f'(0)|) = {result.curvature[k]:.3g}$"
        if twin is not None:
            label += f" (= {twin})"
        ax.plot(result.x_normalised, result.normalised[k], color=f"C{k}", label=label,
                **_style(result, k, result.normalised))
    ax.plot(result.x_normalised, -result.x_normalised, color="k", lw=0.8, ls=":",
            label="$-x$ (first order)")
    ax.set_xlabel(r"$x = \beta\rho$")
    ax.set_ylabel(r"$(f(x) - f(0)) / |f'(0)|$")
    ax.set_title("Normalised by $|f'(0)|$: same slope at 0")
    ax.legend(loc="lower left", fontsize=8)


def figure(result: Result):
    """Three panels: the losses, their Taylor polynomials, and the normalised losses."""
    from ..plotting import new_figure, style

    with style():
        fig, axes = new_figure(1, 3, figsize=(15.0, 4.6))
        plot_losses(result, axes[0])
        plot_taylor(result, axes[1])
        plot_normalised(result, axes[2])
        fig.suptitle("All GPO losses agree to first order up to scale; they differ in the "
                     "offline-regulariser term $f''(0)/2$")
    return fig
