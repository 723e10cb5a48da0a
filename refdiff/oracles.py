"""Data distributions whose noisy scores are known in closed form: the ground truth for every sampler test.

For x_t = alpha x_0 + sigma eps and a Gaussian component N(mu_k, C_k) with C_k = U_k diag(l_k) U_k^T:

    p_t(x | k)    = N(x; alpha mu_k, S_k),  S_k = alpha^2 C_k + sigma^2 I          (per eigen-direction: v = alpha^2 l + sigma^2)
    E[x_0 | x, k] = mu_k + alpha C_k S_k^{-1} (x - alpha mu_k)                      (Gaussian conditioning)
    E[eps | x, k] = sigma S_k^{-1} (x - alpha mu_k),  score_k = -S_k^{-1} (x - alpha mu_k)
    r_k(x)        = w_k p_t(x | k) / p_t(x)                                          (exact posterior of the component)

Mixture quantities are r-weighted sums (Tweedie: alpha E[x_0|x] = x + sigma^2 grad log p_t). Finite atoms are
components with C_k = 0. Components may carry class labels; then p_t(y | x) = sum_{k in y} r_k(x) is the exact
noisy classifier, for testing classifier and classifier-free guidance.

Shapes: x (B, D); alpha, sigma scalars or (B,); returns (B, D) or (B,). float64 throughout.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from ._validate import as_f64, broadcast_rows, positive_int

__all__ = ["GaussianData", "GaussianMixture", "FiniteAtoms"]

LOG_2PI = float(np.log(2.0 * np.pi))
SYMMETRY_RTOL = 1e-12          # a covariance asymmetric beyond rounding is a user error, not noise


class _Mixture:
    """Shared machinery: a weighted set of Gaussian components stored in their eigenbases."""

    def __init__(self, weights, means, eigvals, eigvecs, labels):
        self.weights = weights
        self.log_weights = np.log(weights)
        self.means = means
        self.eigvals = eigvals            # (K, D), >= 0
        self.eigvecs = eigvecs            # (K, D, D) columns are eigenvectors, or None for the identity
        self.K, self.D = means.shape
        self.labels = labels
        self.n_classes = int(labels.max()) + 1
        for a in (self.weights, self.means, self.eigvals, self.labels):
            a.setflags(write=False)

    # -- validation helpers -----------------------------------------------------------------------
    @staticmethod
    def _weights(weights, K):
        w = as_f64(weights, "weights", ndim=1, finite=True)
        if w.shape[0] != K:
            raise ValueError(f"weights must have one entry per component: got shape {w.shape} for {K} components")
        if np.any(w <= 0):
            raise ValueError("weights must be positive")
        return w / w.sum()

    @staticmethod
    def _labels(labels, K):
        if labels is None:
            return np.arange(K)
        lab = np.asarray(labels)
        if lab.shape != (K,) or not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0:
            raise ValueError(f"labels must be {K} non-negative integers, got {lab!r}")
        missing = np.setdiff1d(np.arange(lab.max() + 1), lab)
        if missing.size:
            raise ValueError(f"labels must use every class 0..{lab.max()}; missing {missing.tolist()}")
        return lab.astype(np.int64)

    @staticmethod
    def _eigen(covs, K, D):
        c = as_f64(covs, "covs", finite=True)
        if c.shape != (K, D, D):
            raise ValueError(f"covs must have shape ({K}, {D}, {D}) to match means, got {c.shape}")
        scale = np.max(np.abs(c), axis=(1, 2), keepdims=True)
        if np.any(np.abs(c - np.swapaxes(c, 1, 2)) > SYMMETRY_RTOL * scale):
            raise ValueError("covariances must be symmetric")
        lam, U = np.linalg.eigh(0.5 * (c + np.swapaxes(c, 1, 2)))
        bad = np.flatnonzero(lam.min(axis=1) <= 0)
        if bad.size:
            raise ValueError(f"covariance {bad[0]} is not positive definite (smallest eigenvalue "
                             f"{lam[bad[0]].min():.3g})")
        return lam, U

    def _xas(self, x, alpha, sigma):
        x = as_f64(x, "x")
        if x.ndim != 2 or x.shape[1] != self.D:
            raise ValueError(f"x must have shape (B, {self.D}), got {x.shape}")
        a = np.broadcast_to(broadcast_rows(alpha, x, "alpha"), (x.shape[0], 1))
        s = np.broadcast_to(broadcast_rows(sigma, x, "sigma"), (x.shape[0], 1))
        if np.any(a < 0) or np.any(s < 0) or not (np.all(np.isfinite(a)) and np.all(np.isfinite(s))):
            raise ValueError("alpha and sigma must be finite and non-negative")
        return x, a, s

    # -- core statistics ------------------------------------------------------------------------
    def _to_eig(self, diff):
        """U_k^T diff for diff (B, K, D)."""
        if self.eigvecs is None:
            return diff
        return np.einsum("kdj,bkd->bkj", self.eigvecs, diff)

    def _from_eig(self, z):
        """U_k z for z (B, K, D)."""
        if self.eigvecs is None:
            return z
        return np.einsum("kdj,bkj->bkd", self.eigvecs, z)

    def _stats(self, x, alpha, sigma):
        """Eigen-coordinates z, variances v = alpha^2 l + sigma^2, log joint log w_k p_t(x|k)."""
        x, a, s = self._xas(x, alpha, sigma)
        diff = x[:, None, :] - a[:, :, None] * self.means[None]            # (B, K, D)
        z = self._to_eig(diff)
        v = (a * a)[:, :, None] * self.eigvals[None] + (s * s)[:, :, None]
        if np.any(v == 0):
            raise ValueError("p_t is degenerate here (sigma = 0 with a zero-variance component): "
                             "finite atoms need sigma > 0")
        log_joint = self.log_weights - 0.5 * np.sum(LOG_2PI + np.log(v) + z * z / v, axis=2)
        return a, s, z, v, log_joint

    def _posterior(self, log_joint):
        return np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))     # (B, K)

    # -- public quantities -------------------------------------------------------------------------
    def log_prob(self, x, alpha, sigma):
        """log p_t(x) where x_t = alpha x_0 + sigma eps; shape (B,)."""
        return logsumexp(self._stats(x, alpha, sigma)[4], axis=1)

    def denoise(self, x, alpha, sigma):
        """The exact denoiser E[x_0 | x_t = x] (Karras et al. 2022, Eq. 3 optimum); shape (B, D)."""
        a, s, z, v, lj = self._stats(x, alpha, sigma)
        r = self._posterior(lj)
        per = self.means[None] + self._from_eig(a[:, :, None] * self.eigvals[None] / v * z)
        return np.einsum("bk,bkd->bd", r, per)

    def eps(self, x, alpha, sigma):
        """E[eps | x_t = x] (the optimal eps prediction), formed without the cancellation of (x - alpha D) / sigma."""
        a, s, z, v, lj = self._stats(x, alpha, sigma)
        r = self._posterior(lj)
        return np.einsum("bk,bkd->bd", r, self._from_eig(s[:, :, None] / v * z))

    def score(self, x, alpha, sigma):
        """grad_x log p_t(x); shape (B, D)."""
        _, _, z, v, lj = self._stats(x, alpha, sigma)
        r = self._posterior(lj)
        return -np.einsum("bk,bkd->bd", r, self._from_eig(z / v))

    def score_divergence(self, x, alpha, sigma):
        """tr grad^2 log p_t(x) (B,): sum_k r_k (-tr S_k^{-1} + |s_k|^2) - |s|^2 with component scores s_k,
        s = sum_k r_k s_k (the Hessian of a log-mixture). The exact divergence the PF-ODE likelihood needs."""
        _, _, z, v, lj = self._stats(x, alpha, sigma)
        r = self._posterior(lj)
        comp = -np.sum(1.0 / v, axis=2) + np.sum(z * z / (v * v), axis=2)          # (B, K), in eigen coords
        s = np.einsum("bk,bkd->bd", r, self._from_eig(-z / v))
        return np.einsum("bk,bk->b", r, comp) - np.sum(s * s, axis=1)

    def score_hvp(self, x, alpha, sigma, vec):
        """grad^2 log p_t(x) @ vec (B, D): sum_k r_k (-S_k^{-1} vec + s_k (s_k . vec)) - s (s . vec)."""
        vec = as_f64(vec, "vec")
        _, _, z, v, lj = self._stats(x, alpha, sigma)
        if vec.shape != (z.shape[0], self.D):
            raise ValueError(f"vec must have shape {(z.shape[0], self.D)}, got {vec.shape}")
        r = self._posterior(lj)
        sk = self._from_eig(-z / v)                                               # (B, K, D)
        vk = self._to_eig(np.broadcast_to(vec[:, None, :], z.shape))
        inv_v = self._from_eig(vk / v)                                            # S_k^{-1} vec
        comp = -inv_v + sk * np.einsum("bkd,bd->bk", sk, vec)[:, :, None]
        s = np.einsum("bk,bkd->bd", r, sk)
        return np.einsum("bk,bkd->bd", r, comp) - s * np.sum(s * vec, axis=1, keepdims=True)

    def v(self, x, alpha, sigma):
        """The optimal v prediction alpha E[eps|x] - sigma E[x_0|x]."""
        x, a, s = self._xas(x, alpha, sigma)
        return a * self.eps(x, a[:, 0], s[:, 0]) - s * self.denoise(x, a[:, 0], s[:, 0])

    def sample(self, n: int, rng: np.random.Generator, return_labels: bool = False):
        """n draws of x_0 (n, D) using the given numpy Generator (no global RNG)."""
        if not isinstance(rng, np.random.Generator):
            raise ValueError("rng must be a numpy.random.Generator (noise is always explicit)")
        n = positive_int(n, "n", minimum=0)
        comp = rng.choice(self.K, size=n, p=self.weights)
        g = rng.standard_normal((n, self.D)) * np.sqrt(self.eigvals[comp])
        x = self.means[comp] + (g if self.eigvecs is None else np.einsum("ndj,nj->nd", self.eigvecs[comp], g))
        return (x, self.labels[comp]) if return_labels else x

    # -- classes ---------------------------------------------------------------------------------
    def _class(self, y) -> int:
        if isinstance(y, bool) or not isinstance(y, (int, np.integer)) or not 0 <= y < self.n_classes:
            raise ValueError(f"class must be an integer in [0, {self.n_classes - 1}], got {y!r}")
        return int(y)

    def log_class_posterior(self, x, alpha, sigma):
        """log p_t(y | x) for every class y: the exact noisy classifier; shape (B, n_classes)."""
        lj = self._stats(x, alpha, sigma)[4]
        lp = logsumexp(lj, axis=1, keepdims=True)
        out = np.full((lj.shape[0], self.n_classes), -np.inf)
        for c in range(self.n_classes):
            out[:, c] = logsumexp(lj[:, self.labels == c], axis=1)
        return out - lp

    def conditional(self, y) -> "_Mixture":
        """The class-conditional data distribution p(x_0 | y) (the components labelled y, renormalised)."""
        keep = self.labels == self._class(y)
        return _Mixture(self.weights[keep] / self.weights[keep].sum(), self.means[keep], self.eigvals[keep],
                        None if self.eigvecs is None else self.eigvecs[keep], np.zeros(int(keep.sum()), np.int64))

    def class_log_prob_grad(self, x, alpha, sigma, y):
        """grad_x log p_t(y | x) = score of p_t(x | y) - score of p_t(x): exact classifier guidance."""
        return self.conditional(y).score(x, alpha, sigma) - self.score(x, alpha, sigma)


class GaussianMixture(_Mixture):
    """sum_k w_k N(mu_k, C_k) with optional class labels per component (default: component k is class k).

    Parameters
    ----------
    weights : (K,) positive (normalised here)
    means : (K, D)
    covs : (K, D, D) symmetric positive definite
    labels : (K,) non-negative ints using every class, optional
    """

    def __init__(self, weights, means, covs, labels=None):
        means = as_f64(means, "means", ndim=2, finite=True)
        K, D = means.shape
        if K == 0 or D == 0:
            raise ValueError(f"means must have at least one component and one dimension, got shape {means.shape}")
        lam, U = self._eigen(covs, K, D)
        super().__init__(self._weights(weights, K), means, lam, U, self._labels(labels, K))


class GaussianData(GaussianMixture):
    """x_0 ~ N(mean, cov): every noisy quantity is linear in x, and the probability-flow ODE is solved exactly."""

    def __init__(self, mean, cov):
        mean = as_f64(mean, "mean", ndim=1, finite=True)
        cov = as_f64(cov, "cov", ndim=2, finite=True)
        super().__init__(np.ones(1), mean[None], cov[None])
        self.mean = self.means[0]
        self.cov = cov

    def pf_ode_solution(self, x_t, alpha_t, sigma_t, alpha_s, sigma_s):
        """Exact probability-flow ODE map from noise level (alpha_t, sigma_t) to (alpha_s, sigma_s), any schedule.

        The PF ODE dx/dt = alpha' E[x_0|x] + sigma' E[eps|x] is linear with drift diagonal in C's eigenbasis;
        its flow carries N(alpha_t mu, alpha_t^2 l + sigma_t^2) to N(alpha_s mu, alpha_s^2 l + sigma_s^2) per
        direction with a positive factor, hence x_s = alpha_s mu + U diag(sqrt(v_s / v_t)) U^T (x_t - alpha_t mu).
        Holds for VP, VE, EDM and flow schedules alike, in either time direction.
        """
        x, a_t, s_t = self._xas(x_t, alpha_t, sigma_t)
        _, a_s, s_s = self._xas(x, alpha_s, sigma_s)
        lam, U = self.eigvals[0], self.eigvecs[0]
        v_t = a_t * a_t * lam + s_t * s_t
        v_s = a_s * a_s * lam + s_s * s_s
        z = (x - a_t * self.mean) @ U
        return a_s * self.mean + (np.sqrt(v_s / v_t) * z) @ U.T


class FiniteAtoms(_Mixture):
    """An empirical distribution sum_k w_k delta(x - p_k): the 'memorising' optimum of a finite data set.

    p_t is a mixture of N(alpha p_k, sigma^2 I); every quantity needs sigma > 0.
    """

    def __init__(self, points, weights=None, labels=None):
        pts = as_f64(points, "points", ndim=2, finite=True)
        K, D = pts.shape
        if K == 0 or D == 0:
            raise ValueError(f"points must hold at least one point of dimension >= 1, got shape {pts.shape}")
        w = np.ones(K) if weights is None else weights
        super().__init__(self._weights(w, K), pts, np.zeros((K, D)), None, self._labels(labels, K))


class ConsistencyOracle:
    """The exact consistency function of Gaussian data (Song et al. 2023, Def. 1): f(x_t, t) is the probability-flow
    ODE solution at the boundary level (the data, or a smallest noise level sigma_min), computed in closed form by
    ``GaussianData.pf_ode_solution``; with a ``target`` level, the exact trajectory-consistency map t -> target
    (Kim et al. 2024 CTM; Zheng et al. 2024 TCD).

    ``model(...)`` gives it as a network would be queried: x0 / eps / v outputs that, after a sampler's boundary
    parametrization D = c_skip x + c_out F (refdiff.samplers.consistency.boundary_scalings), yield exactly f.
    ``log_snr_error`` makes an imperfect consistency function: the map is taken from a level whose log-SNR is off
    by that much (a network's time conditioning error), which biases the output law by a known factor.
    """

    def __init__(self, data: GaussianData, boundary=(1.0, 0.0), log_snr_error: float = 0.0):
        if not isinstance(data, GaussianData):
            raise ValueError(f"the exact consistency function is closed-form for GaussianData, got "
                             f"{type(data).__name__}")
        a_e, s_e = (float(v) for v in boundary)
        if not (a_e > 0 and s_e >= 0):
            raise ValueError(f"the boundary level needs alpha > 0 and sigma >= 0, got ({a_e}, {s_e})")
        if not np.isfinite(log_snr_error):
            raise ValueError(f"log_snr_error must be finite, got {log_snr_error}")
        self.data, self.boundary, self.log_snr_error = data, (a_e, s_e), float(log_snr_error)

    def _source(self, alpha, sigma):
        """The level the map starts from: (alpha, sigma), or the VP-normalised level at log-SNR + error."""
        if self.log_snr_error == 0.0:
            return alpha, sigma
        a, s = np.asarray(alpha, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
        lam = 2.0 * (np.log(a) - np.log(s)) + self.log_snr_error
        scale = np.hypot(a, s)                       # keep the level's own scale: only its SNR is off
        return scale * np.sqrt(1.0 / (1.0 + np.exp(-lam))), scale * np.sqrt(1.0 / (1.0 + np.exp(lam)))

    def consistency(self, x, alpha, sigma, target=None):
        """f(x) at (alpha, sigma): the PF-ODE solution at ``target`` (alpha_s, sigma_s), default the boundary."""
        a_s, s_s = self.boundary if target is None else target
        a, s = self._source(alpha, sigma)
        return self.data.pf_ode_solution(x, a, s, a_s, s_s)

    def model(self, prediction: str = "x0", scalings=None):
        """(x, level) -> the output F of ``prediction`` type whose boundary-parametrized data prediction
        c_skip x + c_out x0(F) is exactly f(x). ``scalings(level) -> (c_skip, c_out)`` is the sampler's boundary
        condition (default none: c_skip = 0, c_out = 1). A level carrying a ``target`` (TCD's intermediate level)
        gets the exact map to that target instead: its output, read as the sampler reads it (DDIM to the
        target), lands on the PF-ODE solution there."""
        from .parametrization import from_x0_eps

        def call(x, level):
            a, s = level.alpha, level.sigma
            target = getattr(level, "target", None)
            if target is not None:
                # (x0, eps) with x = a x0 + s eps and, read as DDIM to the target, a_t x0 + s_t eps = Phi(x): a 2 x 2
                # system, regular whenever the levels' SNRs differ (a = 0, pure noise, included: eps = x / s)
                phi = self.consistency(x, a, s, (target.alpha, target.sigma))
                a_t = np.asarray(target.alpha, dtype=np.float64)
                s_t = np.asarray(target.sigma, dtype=np.float64)
                det = a * s_t - a_t * s
                eps = (a * phi - a_t * x) / det
                x0 = (s_t * x - s * phi) / det
                return from_x0_eps(x0, eps, prediction, a, s)
            f = self.consistency(x, a, s)
            c_skip, c_out = (0.0, 1.0) if scalings is None else scalings(level)
            x0 = (f - c_skip * x) / c_out
            with np.errstate(divide="ignore", invalid="ignore"):
                eps = (x - a * x0) / s
            return from_x0_eps(x0, eps, prediction, a, s)
        return call
