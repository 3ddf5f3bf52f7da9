"""The one LinUCB of the project (design §4).

Why a single class: the reference implementation had six divergent copies; the CPM
service, the strategies and the simulator all use this one, so a fix lands everywhere.
Ridge regression of the z-scored reward (Eq. 3) on the pair context φ, with a
Sherman–Morrison inverse (re-inverted every ``reinvert_every`` updates against round-off),
an optional discount γ_d (the ``(1 − γ_d)·λI`` share keeps A ⪰ λI, so the exploration
width never collapses on old directions) and β_t schedules. The reward itself is
``cpm.reward`` (the round engine scores every feedback with it, for every strategy); a
LinUCB owns one, so its z-score statistics are saved with the θ fitted to them. The
model, the defaults (λ = 0.3 and how it was chosen, on which seeds) and the reward's
normalisation: docs/matchmaking.md §LinUCB and §Synthetic benchmark.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import structlog

from cpm.reward import DELTA_PER_KB, Reward

log = structlog.get_logger(__name__)

BETA_SCHEDULES = ("sqrt", "exp", "const")


class LinUCB:
    """Disjoint-free (shared-θ) LinUCB over pair contexts."""

    def __init__(
        self,
        d: int,
        *,
        lam: float = 0.3,
        beta0: float = 1.0,
        beta_schedule: str = "sqrt",
        tau: float = 200.0,
        decay: float = 0.999,
        discount: float = 1.0,
        gamma: float = 1.0,
        delta_per_kb: float = DELTA_PER_KB,
        eps: float = 1e-6,
        reinvert_every: int = 256,
    ) -> None:
        if d <= 0:
            raise ValueError("d must be positive")
        if lam <= 0:
            raise ValueError("lam must be > 0")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}")
        if not 0.0 < discount <= 1.0:
            raise ValueError("discount must be in (0, 1]")
        self.d = d
        self.lam = float(lam)
        self.beta0 = float(beta0)
        self.beta_schedule = beta_schedule
        self.tau = float(tau)
        self.decay = float(decay)
        self.discount = float(discount)
        self.reward = Reward(gamma, delta_per_kb, eps)  # Eq. 3 and the z-score statistics θ is fitted to
        self.reinvert_every = int(reinvert_every)
        self.A = np.eye(d) * self.lam
        self.Ainv = np.eye(d) / self.lam
        self.b = np.zeros(d)
        self.t = 0
        self._theta: np.ndarray | None = None

    # ---- model ------------------------------------------------------------------
    @property
    def theta(self) -> np.ndarray:
        if self._theta is None:
            self._theta = self.Ainv @ self.b
        return self._theta

    def beta(self, t: int | None = None) -> float:
        t = self.t if t is None else t
        if self.beta_schedule == "sqrt":
            return self.beta0 / math.sqrt(1.0 + t / self.tau)
        if self.beta_schedule == "exp":
            return self.beta0 * self.decay**t
        return self.beta0

    def mean(self, X: np.ndarray) -> np.ndarray:
        """θᵀφ for each row of X (M, d)."""
        return np.asarray(X, dtype=float) @ self.theta

    def width(self, X: np.ndarray) -> np.ndarray:
        """sqrt(φᵀA⁻¹φ) for each row, as rowsum((X@A⁻¹)∘X)."""
        X = np.asarray(X, dtype=float)
        q = np.einsum("ij,ij->i", X @ self.Ainv, X)
        return np.sqrt(np.maximum(q, 0.0))

    def ucb(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, dtype=float))
        return self.mean(X) + self.beta() * self.width(X)

    def update(self, phi: np.ndarray, r: float) -> None:
        """One z-scored reward (``self.reward.observe``) for context φ."""
        x = np.asarray(phi, dtype=float).reshape(-1)
        if x.shape[0] != self.d:
            raise ValueError(f"context has dim {x.shape[0]}, expected {self.d}")
        if not math.isfinite(r) or not np.all(np.isfinite(x)):
            raise ValueError("non-finite reward or context")
        g = self.discount
        if g < 1.0:
            self.A = g * self.A + (1.0 - g) * self.lam * np.eye(self.d) + np.outer(x, x)
            self.b = g * self.b + r * x
            self.Ainv = np.linalg.inv(self.A)
        else:
            self.A += np.outer(x, x)
            self.b += r * x
            ax = self.Ainv @ x
            self.Ainv -= np.outer(ax, ax) / (1.0 + x @ ax)
        self.t += 1
        if g == 1.0 and self.reinvert_every > 0 and self.t % self.reinvert_every == 0:
            self.Ainv = np.linalg.inv(self.A)
        self.Ainv = 0.5 * (self.Ainv + self.Ainv.T)
        self._theta = None

    # ---- state ------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """Plain-typed state (lists, floats, ints, str) for JSON/msgpack/SQLite."""
        return {
            "d": self.d,
            "lam": self.lam,
            "beta0": self.beta0,
            "beta_schedule": self.beta_schedule,
            "tau": self.tau,
            "decay": self.decay,
            "discount": self.discount,
            "gamma": self.reward.gamma,
            "delta_per_kb": self.reward.delta_per_kb,
            "reinvert_every": self.reinvert_every,
            "t": self.t,
            "A": [float(v) for v in self.A.reshape(-1)],
            "b": [float(v) for v in self.b],
            "z_n": self.reward.z.n,
            "z_mean": self.reward.z.mean,
            "z_m2": self.reward.z.m2,
            "z_eps": self.reward.z.eps,
        }

    def embed(self, index: np.ndarray, d: int) -> LinUCB:
        """This bandit in a larger context layout: old dim i becomes new dim ``index[i]``;
        the new dims get the prior (λ on A's diagonal, 0 in b and off the diagonal).

        Exact, not an approximation: it is the state this bandit would have reached had
        its contexts carried those dims as zeros all along (λI + Σφφᵀ, also with the
        discount, whose (1 − γ_d)·λI share keeps a never-seen dim at λ). So θ is 0 on the
        new dims and unchanged elsewhere, and what was learnt is kept."""
        index = np.asarray(index, dtype=np.int64)
        if index.shape != (self.d,) or np.unique(index).size != self.d or index.min() < 0 or index.max() >= d:
            raise ValueError(f"index must map {self.d} dims to distinct dims in 0..{d - 1}")
        state = self.to_state()
        A = np.eye(d) * self.lam
        A[np.ix_(index, index)] = self.A
        b = np.zeros(d)
        b[index] = self.b
        state.update(d=d, A=[float(v) for v in A.reshape(-1)], b=[float(v) for v in b])
        return LinUCB.from_state(state)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LinUCB:
        d = int(state["d"])
        bandit = cls(
            d,
            lam=float(state["lam"]),
            beta0=float(state["beta0"]),
            beta_schedule=str(state["beta_schedule"]),
            tau=float(state["tau"]),
            decay=float(state["decay"]),
            discount=float(state["discount"]),
            gamma=float(state["gamma"]),
            delta_per_kb=float(state["delta_per_kb"]),
            eps=float(state["z_eps"]),
            reinvert_every=int(state["reinvert_every"]),
        )
        A = np.asarray(state["A"], dtype=float)
        if A.size != d * d or len(state["b"]) != d:
            raise ValueError("bandit state has inconsistent dimensions")
        bandit.A = A.reshape(d, d)
        bandit.Ainv = np.linalg.inv(bandit.A)
        bandit.b = np.asarray(state["b"], dtype=float)
        bandit.t = int(state["t"])
        z = bandit.reward.z
        z.n, z.mean, z.m2 = int(state["z_n"]), float(state["z_mean"]), float(state["z_m2"])
        return bandit
