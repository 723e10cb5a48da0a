"""How each diffusers scheduler maps onto a refdiff sampler (adapters), and the grid of configurations to check.

Each case: a scheduler configuration (beta schedule, timestep spacing, step count, prediction type, sample dtype),
an oracle (Gaussian mixture) as the model, the same noise (diffusers' torch.Generator draws or its Brownian tree,
replayed for the reference). refdiff.check.replay runs the two side by side and states the rule.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import replace

import numpy as np

from ... import schedules as S
from ...convergence import oracle_model
from ...grids import flow_sigmas
from ...oracles import ConsistencyOracle, GaussianData, GaussianMixture
from ...samplers import (CMMultistep, Churn, DDIM, DDPM, DEIS, DPM2, DPM2Ancestral, DPMSolverPP, DPMSolverPP2MSDE,
                         DPMSolverPP3S, FlowEulerAncestral,
                         DPMSolverPPSDE, PNDM, SASolver,
                         DPMSolverPPSinglestep, Euler, EulerAncestral, FlowHeun, Grid, Heun, LCM, LMS, Level,
                         SDEDPMSolverPP2M, TCD, UniPC, model_coeffs)
from ...samplers.base import Sampler, State
from ...samplers.ddim import _posterior_keep
from ...samplers.dpm_solver import multistep_order
from ...samplers.pndm import AB_WEIGHTS, adams_bashforth
from ...samplers.consistency import boundary_scalings
from ...samplers.karras import _ancestral
from .. import tables as TB
from ..findings import Finding
from ..replay import R, Hypothesis, dt_stage_terms, run_case
from ..rounding import exact

__all__ = ["SCHEDULERS", "UNMAPPED", "R", "run_case", "default_cases", "ProtocolAdapter", "PROTOCOL_SAMPLERS",
           "NOT_MAPPED_REASONS", "scheduler_listing"]

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow": "flow"}   # diffusers' -> refdiff's
BETAS = {"linear": dict(beta_start=1e-4, beta_end=2e-2), "scaled_linear": dict(beta_start=8.5e-4, beta_end=1.2e-2),
         "squaredcos_cap_v2": {},
         # Lin et al. 2024: scaled_linear rescaled to alpha_bar_T = 0 (only v / x0 prediction is defined there)
         "zero_snr": dict(beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=1.2e-2,
                          rescale_betas_zero_snr=True)}
DTYPES = ("float32", "float16", "bfloat16")
# diffusers schedulers named by the check but not run, with the reason (none at present: DPMSolverSDEScheduler needs
# torchsde, and without it its cases fail with the import error rather than being skipped)
UNMAPPED: dict = {}


def _oracle():
    rng = np.random.default_rng(0)
    covs = np.stack([B @ B.T + 0.2 * np.eye(4) for B in rng.standard_normal((3, 4, 4)) * 0.3])
    return GaussianMixture([0.5, 0.3, 0.2], rng.uniform(-1, 1, (3, 4)), covs)


ORACLE = _oracle()


def _level(table, t) -> Level:
    t = int(t)
    return Level(t, table.alpha(t), table.sigma(t), table.log_snr(t))


def _vp_levels(sched):
    """VP levels at diffusers' own float32 sigmas (sigma_ve; alpha = 1 / sqrt(1 + s^2)), labelled by its timesteps;
    sigma 0 is the data. Karras / exponential sigmas fall between the table's entries, so the table cannot give them."""
    sig = sched.sigmas.double().numpy()
    ts = list(np.asarray(sched.timesteps)) + [-1] * (len(sig) - len(sched.timesteps))
    out = []
    for s, t in zip(sig, ts):
        if s == 0:
            out.append(Level(-1, 1.0, 0.0, np.inf))
        else:
            a = 1.0 / np.sqrt(1.0 + s * s)
            out.append(Level(t, a, s * a, -2.0 * np.log(s)))
    return out


def _numpy(a) -> np.ndarray:
    """A torch tensor, list or array as float64 numpy."""
    if hasattr(a, "detach"):
        return a.detach().double().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _vp_sigma_grid(kw, steps, ref, family, final: str = "zero", karras: str | None = None):
    """(sigmas, relative bound) of a VP table's sampling grid in VE sigmas, with its final level.

    ref: a tables.RefTable; family: "ddim" / "dpmsolver" (integer timesteps) or "sigma" (fractional linspace,
    diffusers' Euler-type schedulers); karras: None, "table" (Karras between the whole table's sigmas, DPM-Solver) or
    "grid" (between the spacing's first and last sigma, Euler-type); final: "zero" or "first" (the table's index 0,
    DEIS)."""
    ab, ab_bound = ref.alphas_cumprod, ref.bound
    T = kw["num_train_timesteps"]
    spacing, offset = kw.get("timestep_spacing", "linspace"), kw.get("steps_offset", 0)
    ts = TB.fractional_timesteps(T, steps, spacing, offset) if family == "sigma" else \
        S.timesteps(T, steps, spacing, offset, family=family)
    sig, bound = TB.table_sigmas(ab, ts), TB.table_sigma_bound(ab, ab_bound, ts)
    if karras is not None:
        ends = np.array([0.0, T - 1.0]) if karras == "table" else np.array([ts[-1], ts[0]])
        lo, hi = TB.table_sigmas(ab, ends)
        sig = S.karras_sigmas(steps, lo, hi) if steps > 1 else np.array([hi])
        bound = np.full(steps, np.max(TB.table_sigma_bound(ab, ab_bound, ends)) + TB.U32)
    last = 0.0 if final == "zero" else TB.table_sigmas(ab, [0.0])[0]
    last_bound = 0.0 if final == "zero" else TB.table_sigma_bound(ab, ab_bound, [0.0])[0]
    return np.append(sig, last), np.append(bound, last_bound)


def _dedupe(sigmas):
    """diffusers' two-stage schedulers list each inner sigma twice: the distinct levels, in order."""
    sig = np.asarray(sigmas, dtype=np.float64)
    return np.concatenate([sig[:1], sig[1:][np.diff(sig) != 0]])


class _Adapter:
    """How one diffusers scheduler maps onto a refdiff sampler: construction, grid, model-output reading, noise.

    space "vp": diffusers' sample is the VP x and its model sees it as is; "ve": the sample is x / alpha (sigmas
    grid) and the model sees x / sqrt(1 + sigma^2) (``scale_model_input``); "flow": x = (1 - s) x0 + s eps.
    """

    space = "vp"
    dt_terms = False               # diffusers forms sigma_next - sigma in float32 (Euler-type updates)
    lambda_terms = False           # diffusers forms lambda = log alpha - log sigma in float32 (exponential integrators)
    variants = {"": {}}            # label -> scheduler kwargs: each variant is its own set of cases
    img2img = False                # also run cases that start part-way (set_begin_index), as img2img pipelines do
    predictions = ("epsilon", "v_prediction", "sample")
    schedules = tuple(BETAS)
    spacings = ("leading", "trailing", "linspace")

    def __init__(self, diffusers):
        self.diffusers = diffusers

    @property
    def cls(self):
        return getattr(self.diffusers, self.name)

    def scheduler_config(self, config: dict) -> dict:
        kw = dict(num_train_timesteps=1000, beta_schedule=config["beta_schedule"],
                  prediction_type=config["prediction_type"])
        if config["timestep_spacing"] != "-":
            kw["timestep_spacing"] = config["timestep_spacing"]
        kw.update(BETAS[config["beta_schedule"]])
        if config["timestep_spacing"] == "leading":
            kw["steps_offset"] = 1
        kw.update(config.get("scheduler_kwargs", {}))
        return kw

    def supports(self, config: dict) -> bool:
        """Whether the scheduler accepts the configuration (zero terminal SNR needs rescale_betas_zero_snr)."""
        if config["beta_schedule"] == "zero_snr":
            return "rescale_betas_zero_snr" in inspect.signature(self.cls.__init__).parameters
        return True

    def make(self, config: dict, variant: str):
        return self.cls(**config, **self.variants[variant])

    def table(self, sched):
        return S.DiscreteSchedule.from_alphas_cumprod(sched.alphas_cumprod.double().numpy())

    def grid(self, sched, table):
        return Grid.from_discrete(table, sched.timesteps.numpy(), final="data")

    def sampler(self, sched, table, grid, variant=""):
        raise NotImplementedError

    def coeffs(self, prediction: str, level: Level):
        """(c_x, c_m): diffusers' data prediction x0 = c_x x + c_m m at ``level``, in the reference's space."""
        return model_coeffs(PREDICTIONS[prediction], level.alpha, level.sigma)

    def model(self, prediction: str):
        """The oracle as diffusers' model: (x in diffusers' space, level) -> output in diffusers' convention."""
        exact_vp = oracle_model(ORACLE, PREDICTIONS[prediction])

        def model(x, level):                  # samples of shape (b, ..., 4): the oracle sees (b', 4)
            x = np.asarray(x)
            out = exact_vp(x.reshape(-1, x.shape[-1]), Level(None, level.alpha, level.sigma, None))
            return np.asarray(out).reshape(x.shape)
        return model

    def x_T_scale(self, sched, grid) -> float:
        return float(np.asarray(grid.levels[0].sigma))

    def sample_shape(self, variant: str) -> tuple:
        """The shape of the case's sample (its last axis is the oracle's data dimension)."""
        return (2, 4)

    def formula_terms(self, ctx, cur: Level, nxt: Level, state: State, extra: dict):
        """Magnitudes (units of u) the paper form does not see: level differences diffusers forms in float32 that
        cancel. Euler-type updates x + d (sigma_next - sigma): dt has error u sigma, i.e. u |x - D| per stage."""
        if not self.dt_terms:
            return 0.0
        return sum(dt_stage_terms(ctx.stages))

    def step_starts(self, ts):
        """The timesteps at which steps start (two-stage schedulers list the inner ones twice by design)."""
        return ts

    # -- the schedule and the grid the configuration asks for ------------------------------------------------
    timestep_family = "ddim"       # refdiff.schedules.timesteps' convention for the spacing (ddim or dpmsolver)

    def table_findings(self, sched, config):
        """'schedule' and 'grid' Findings: the target's alphas_cumprod against the configuration's table, and its
        timesteps / sigmas against the reference grid for the spacing asked (refdiff.check.tables)."""
        kw = {"num_train_timesteps": 1000, **self.scheduler_config(config)}
        betas = TB.reference_betas(kw)
        ref, out = None, []
        if betas is not None:
            ref = TB.RefTable(*betas)
            if getattr(sched, "alphas_cumprod", None) is not None:
                target = _numpy(sched.alphas_cumprod)
                f = TB.compare_alphas_cumprod(target, ref)
                if f is not None and ref.zero_snr and TB.compare_alphas_cumprod(target, ref.clamped()) is None:
                    ref = ref.clamped()                   # the grid is then judged on the clamped table
                    f = Finding("schedule", "alpha_bar_T is clamped to 2^-24 instead of 0 (diffusers' zero-SNR "
                                            "convention in its sigma-based and DPM-Solver schedulers: the first sigma "
                                            "is 4096, not inf); every other entry agrees",
                                explained=True, id="diffusers-zero-snr-clamp",
                                evidence={"alpha_bar_T": float(target[-1])})
                if f is not None:
                    out.append(f)
        out.extend(f for f in self.grid_findings(sched, config, kw, ref) if f is not None)
        return out

    def grid_findings(self, sched, config, kw, ref):
        """Integer timesteps of the spacing asked (``timestep_family``)."""
        spacing = kw.get("timestep_spacing", "linspace")
        want = S.timesteps(kw["num_train_timesteps"], config["steps"], spacing, kw.get("steps_offset", 0),
                           family=self.timestep_family)
        return [TB.compare_timesteps(_numpy(sched.timesteps), want)]

    def step_kwargs(self, variant: str) -> dict:
        """Keyword arguments of the target's step() for a variant (e.g. EDM churn)."""
        return {}

    def model_first(self, variant: str) -> bool:
        """True when the target's step adds noise after the model call (diffusers' churn): a pipeline evaluates
        the model at the sample before it, where the reference evaluates it at the churned sample."""
        return False

    def read_level(self, prediction: str, level: Level, start: Level) -> Level:
        """The level at which the target converts a model output evaluated at the step's ``start`` into x0 when it
        applies it at ``level`` (only differs for model_first variants)."""
        return level

    def sync(self, sched, bstate: State) -> State:
        """Resynchronise state diffusers keeps beyond the sample (e.g. UniPC's corrected sample)."""
        return bstate

    def set_timesteps_kwargs(self, config: dict) -> dict:
        """Keyword arguments of set_timesteps for a case beyond the step count (e.g. Flux's mu)."""
        return {}

    def calls(self, sched) -> list:
        """The timesteps at which the replay calls the target's step(), in order (all of them by default, from the
        begin index of an img2img case)."""
        return list(sched.timesteps)[getattr(sched, "_refdiff_begin", 0):]

    def call_step(self, sched, m, t, x, kw):
        """One call of the target's step() (an adapter whose step takes more than (output, t, sample) supplies it)."""
        return sched.step(m, t, x, **kw)

    def noise_recorder(self, sched, x):
        """A list that collects the noise diffusers draws from its own sampler (replayed in order for the reference),
        or None when it draws from the torch.Generator passed to step()."""
        return None

    def hypotheses(self, sched, table, config, variant):
        """id -> Hypothesis(label, kind, what): kind "sampler" (an alternative sampler), "pairs" ([(cur, nxt) per
        step] for a single-stage sampler) or "same-output" (the model output read where the target reads it)."""
        return {}

    def explain_nonfinite(self, sched, ratios):
        """A known cause of non-finite outputs, checked directly: an explained 'nonfinite' Finding, or None."""
        return None

    def explain_exception(self, sched, exc):
        """A known cause of the target raising mid-run, checked directly: an explained 'exception' Finding, or None."""
        ts = np.asarray(sched.timesteps)
        if len(ts) > 1 and ts[0] == ts[1] and hasattr(sched, "index_for_timestep"):
            start = sched.index_for_timestep(sched.timesteps[0])
            if start != 0:
                k = int(np.sum(ts == ts[0]))
                return Finding("exception", f"duplicate timesteps (diffusers #12771): {k} sigmas round to t = "
                                            f"{ts[0]:g}; diffusers' index_for_timestep starts the run at the second "
                                            f"occurrence (index {start}), skipping sigma_0, and steps past the end "
                                            f"({type(exc).__name__}: {exc})",
                               explained=True, id="diffusers-12771",
                               evidence={"duplicates": k, "timestep": float(ts[0]), "start_index": int(start)})
        return None


class _OwnLevels(_Adapter):
    """A scheduler with levels of its own (EDM sigmas, flow, trigonometric, continuous schedules): no beta table, no
    spacing axis, every configuration of its grid supported; nothing to pass beyond what an adapter adds."""

    spacings = ("-",)

    def scheduler_config(self, config):
        return {}

    def supports(self, config):
        return True

    def table(self, sched):
        return None


class _RecordedStepNoise:
    """A scheduler whose step() draws its own noise (randn_tensor in diffusers' ``module``), possibly more draws than
    the method uses: each call is recorded and the draw the step uses (the last; only where ``_keep``) is replayed for
    the reference, in the dtype the target drew it."""

    module = ""

    def _step(self, sched, m, t, x, kw):
        return sched.step(m, t, x, **kw)

    def _keep(self, sched, t) -> bool:
        return True

    def call_step(self, sched, m, t, x, kw):
        import importlib

        from .pipelines import _record_randn

        draws = []
        restore = _record_randn(importlib.import_module(f"diffusers.schedulers.{self.module}"), draws)
        try:
            out = self._step(sched, m, t, x, kw)
        finally:
            restore()
        if draws and self._keep(sched, t) and getattr(sched, "_refdiff_drawn", None) is not None:
            sched._refdiff_drawn.append(draws[-1])
        return out

    def noise_recorder(self, sched, x):
        sched._refdiff_drawn = []
        return sched._refdiff_drawn


class _X0Context:
    """A sampler context whose model reads pass through ``transform`` (clip_sample / dynamic thresholding of the
    data prediction); everything else is the wrapped context's."""

    def __init__(self, ctx, transform):
        self._ctx, self._transform = ctx, transform

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def denoise(self, x, level):
        return self._transform(self._ctx.denoise(x, level))


class _X0Transformed(Sampler):
    """``base`` with every data prediction passed through ``transform`` before the step uses it (the denoiser
    replaced by the clipped / thresholded one: Imagen's formulation, and diffusers' with use_clipped_model_output)."""

    def __init__(self, base, transform, label):
        self.base, self.transform = base, transform
        self.name = f"{base.name} + {label}"
        for attr in ("stochastic", "history_needed", "snr_zero_start", "order", "weak_order"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))

    def step_order(self, state, grid):
        return self.base.step_order(state, grid)

    def step(self, ctx, cur, nxt, state):
        return self.base.step(_X0Context(ctx, self.transform), cur, nxt, state)


class _DDIMClippedX0RawEps(DDIM):
    """DDIM(0) with the x0 term from the transformed prediction and the direction term from the model's own noise
    prediction (diffusers' default use_clipped_model_output=False; a hypothesis of the check)."""

    def __init__(self, transform):
        super().__init__(0.0)
        self.transform = transform
        self.name = "DDIM(clipped x0, unclipped eps)"

    def step(self, ctx, cur, nxt, state):
        D = ctx.denoise(ctx.x, cur)
        eps = (ctx.x - D * cur.alpha) * (1.0 / np.asarray(cur.sigma))
        if nxt.is_data:
            return self.transform(D) * nxt.alpha, {}
        return self.transform(D) * nxt.alpha + eps * nxt.sigma, {}


def _clip(r: float):
    """x0 clamped to [-r, r] (clip_sample). Clamping is 1-Lipschitz: a bounded value keeps its bound."""
    from ..rounding import Bounded

    def f(D):
        if isinstance(D, Bounded):
            return Bounded(np.clip(D.v, -r, r), D.e)
        return np.clip(D, -r, r)
    return f


def _threshold(ratio: float, max_value: float):
    """diffusers' _threshold_sample: per sample s = clamp(quantile(|x0|, ratio), 1, max_value), x0 <- clamp(x0, -s,
    s) / s (refdiff.guidance.dynamic_threshold with max_value 1 and ceiling ``max_value``). The quantile (linear
    interpolation between order statistics) moves by at most the largest bound of the sample's entries, plus its
    own rounding; the division adds the relative error of s."""
    from ...guidance import dynamic_threshold
    from ..rounding import Bounded

    def f(D):
        if not isinstance(D, Bounded):
            return dynamic_threshold(D, ratio, 1.0, max_value)
        flat = np.abs(D.v.reshape(D.v.shape[0], -1))
        q = np.quantile(flat, ratio, axis=1)
        s = np.clip(q, 1.0, max_value)
        es = np.max(D.e.reshape(D.e.shape[0], -1), axis=1) + q           # units of u
        es = np.where((q > 1.0) & (q < max_value), es, 0.0)             # clamped s is exact
        shape = (-1,) + (1,) * (D.v.ndim - 1)
        s_, es_ = s.reshape(shape), es.reshape(shape)
        v = np.clip(D.v, -s_, s_) / s_
        return Bounded(v, (D.e + es_) / s_ + np.abs(v) * (es_ / s_ + 1.0))
    return f


def _x0_option(sched):
    """(transform, label) of the scheduler's clip_sample / thresholding configuration, or None."""
    c = sched.config
    if getattr(c, "thresholding", False):
        return _threshold(c.dynamic_thresholding_ratio, c.sample_max_value), \
            f"dynamic thresholding (p = {c.dynamic_thresholding_ratio:g}, max {c.sample_max_value:g})"
    if getattr(c, "clip_sample", False):
        return _clip(c.clip_sample_range), f"clip_sample [-{c.clip_sample_range:g}, {c.clip_sample_range:g}]"
    return None


_X0_VARIANTS = {"": dict(clip_sample=False), "clip_sample": dict(clip_sample=True, clip_sample_range=1.0),
                "thresholding": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)}


def _with_x0_option(smp, sched):
    opt = _x0_option(sched)
    return smp if opt is None else _X0Transformed(smp, *opt)


class _DDIM(_Adapter):
    name = "DDIMScheduler"
    # clip_sample / thresholding with the default use_clipped_model_output=False (a named convention), and with it
    # True (the paper form: the clipped denoiser throughout)
    variants = {**_X0_VARIANTS, "clip_sample, clipped eps": _X0_VARIANTS["clip_sample"]}

    def step_kwargs(self, variant):
        return {"use_clipped_model_output": True} if variant.endswith("clipped eps") else {}

    def make(self, config, variant):
        return self.cls(**{"set_alpha_to_one": True, **config}, **self.variants[variant])

    def sample_shape(self, variant):
        return (2, 1, 4) if variant == "thresholding" else (2, 4)    # diffusers' quantile needs (b, c, ...)

    def sampler(self, sched, table, grid, variant=""):
        return _with_x0_option(DDIM(0.0), sched)

    def grid(self, sched, table):
        # set_alpha_to_one: the last step goes to the data; otherwise to alpha_bar_0 (diffusers' final_alpha_cumprod)
        final = "data" if sched.config.set_alpha_to_one or sched.timesteps[-1] == 0 else "first"
        return Grid.from_discrete(table, sched.timesteps.numpy(), final=final)

    def hypotheses(self, sched, table, config, variant):
        """diffusers #12633 / #11347: step() reads alpha_bar_prev at t - T // N, not at the next grid timestep."""
        pairs = list(zip(Grid.from_discrete(table, sched.timesteps.numpy()).levels, _t_minus_T_over_N(sched, table)))
        out = {"diffusers-12633": Hypothesis("prev_t = t - T // N (diffusers #12633, #11347)", "pairs", pairs)}
        opt = _x0_option(sched)
        if opt is not None:
            what = f"the {opt[1]} x0 with the model's unclipped noise prediction in the direction term " \
                   "(use_clipped_model_output=False, the default)"
            out["diffusers-ddim-unclipped-eps"] = Hypothesis(what, "sampler", _DDIMClippedX0RawEps(opt[0]))
            out["diffusers-ddim-unclipped-eps+12633"] = Hypothesis(
                f"{what}; prev_t = t - T // N (diffusers #12633)", "pairs", (pairs, _DDIMClippedX0RawEps(opt[0])))
        return out


def _t_minus_T_over_N(sched, table) -> list:
    """The level each step of a DDIM-family scheduler goes to when it steps to t - T // N (the data below 0)."""
    T, n = sched.config.num_train_timesteps, sched.num_inference_steps
    data = Level(-1, 1.0, 0.0, np.inf)
    return [data if t - T // n < 0 else _level(table, t - T // n) for t in np.asarray(sched.timesteps)]


class _DDPM(_Adapter):
    name = "DDPMScheduler"
    variants = _X0_VARIANTS

    def make(self, config, variant):
        return self.cls(**config, variance_type="fixed_small", **self.variants[variant])

    def sample_shape(self, variant):
        return (2, 1, 4) if variant == "thresholding" else (2, 4)

    def sampler(self, sched, table, grid, variant=""):
        return _with_x0_option(DDPM("fixed_small"), sched)

    def formula_terms(self, ctx, cur, nxt, state, extra):
        """diffusers forms beta = 1 - alpha_bar_t / alpha_bar_s in float32: absolute error u r (r the ratio), relative
        u r / beta; both the x0 coefficient and the posterior variance are proportional to beta."""
        if nxt.is_data:
            return 0.0
        r = (np.asarray(cur.alpha) / np.asarray(nxt.alpha)) ** 2
        beta = 1.0 - r
        D = ctx.evaluated[0].v
        c_D = np.asarray(nxt.alpha) * beta / np.asarray(cur.sigma) ** 2
        std = np.sqrt(np.asarray(nxt.sigma) ** 2 / np.asarray(cur.sigma) ** 2 * beta)
        z = ctx.draws[0] if ctx.draws else 0.0
        return (np.abs(c_D * D) + std * np.abs(z)) * r / beta


class _DPMMultistep(_Adapter):
    name = "DPMSolverMultistepScheduler"
    img2img = True
    lambda_terms = True
    variants = {"2M": dict(algorithm_type="dpmsolver++", solver_order=2),
                "2M Karras": dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
                "3M": dict(algorithm_type="dpmsolver++", solver_order=3),
                "sde-dpmsolver++": dict(algorithm_type="sde-dpmsolver++", solver_order=2)}

    timestep_family = "dpmsolver"

    def make(self, config, variant):
        return self.cls(**config, **self.variants[variant], final_sigmas_type="zero")

    def grid(self, sched, table):
        return Grid(_vp_levels(sched))

    def grid_findings(self, sched, config, kw, ref):
        karras = bool(sched.config.use_karras_sigmas)
        out = [] if karras else super().grid_findings(sched, config, kw, ref)
        if ref is not None:
            sig, bound = _vp_sigma_grid(kw, config["steps"], ref, "dpmsolver", "zero", "table" if karras else None)
            out.append(TB.compare_sigmas(_numpy(sched.sigmas), sig, bound))
        return out

    def sampler(self, sched, table, grid, variant=""):
        if sched.config.algorithm_type == "sde-dpmsolver++":
            return SDEDPMSolverPP2M()
        return DPMSolverPP(sched.config.solver_order)

    def hypotheses(self, sched, table, config, variant):
        if sched.config.solver_order != 3 or sched.config.algorithm_type != "dpmsolver++":
            return {}
        return {"dpmsolver-3m-halved-d2": Hypothesis(
            "the released DPM-Solver++ 3M update halves the D'' term (local error O(h^3): global order 2)",
            "sampler", DPMSolverPP(3, halved_d2=True))}


class _DPMSinglestep(_Adapter):
    name = "DPMSolverSinglestepScheduler"
    lambda_terms = True
    spacings = ("-",)              # its own timesteps: linspace over the lambda-clipped range
    timestep_family = "dpmsolver"
    variants = {"order 2": dict(solver_order=2), "order 3": dict(solver_order=3)}

    def make(self, config, variant):
        return self.cls(**config, algorithm_type="dpmsolver++", **self.variants[variant], final_sigmas_type="zero")

    def grid_findings(self, sched, config, kw, ref):
        kw = {**kw, "timestep_spacing": "linspace"}          # no lambda clipping: linspace over the whole table
        out = super().grid_findings(sched, config, kw, ref)
        if ref is not None:
            out.append(TB.compare_sigmas(_numpy(sched.sigmas), *_vp_sigma_grid(kw, config["steps"], ref, "dpmsolver")))
        return out

    @staticmethod
    def _plan(sched):
        """diffusers' order list ([1, 2, 1, 2, ..., 1] or [1, 2, 3, 1, 2, 3, ..., 1]): 1, 2, 3 is one 3S step whose
        intermediate levels are the two grid points inside it, 1, 2 one 2S step, a lone 1 a first-order step.
        Returns (start positions, mids: None, a position or a pair of positions)."""
        orders, n = list(sched.order_list), len(sched.timesteps)
        starts, mids, i = [], [], 0
        while i < n:
            triple = orders[i] == 1 and i + 2 < n and orders[i + 1] == 2 and orders[i + 2] == 3
            pair = not triple and orders[i] == 1 and i + 1 < n and orders[i + 1] == 2
            starts.append(i)
            mids.append((i + 1, i + 2) if triple else i + 1 if pair else None)
            i += 3 if triple else 2 if pair else 1
        return starts, mids

    def grid(self, sched, table):
        levels = _vp_levels(sched)
        return Grid([levels[i] for i in self._plan(sched)[0]] + [levels[-1]])

    def _mid_levels(self, sched):
        levels = _vp_levels(sched)
        return [None if m is None else tuple(levels[j] for j in m) if isinstance(m, tuple) else levels[m]
                for m in self._plan(sched)[1]]

    def sampler(self, sched, table, grid, variant=""):
        mids = self._mid_levels(sched)
        if sched.config.solver_order == 3:
            return DPMSolverPP3S(intermediate=lambda step, cur, nxt: mids[step])
        return DPMSolverPPSinglestep(intermediate=lambda step, cur, nxt: mids[step])

    def hypotheses(self, sched, table, config, variant):
        if sched.config.solver_order != 3:
            return {}
        mids = self._mid_levels(sched)
        return {"diffusers-dpm-3s-midpoint-u2": Hypothesis(
            "its 3S step reaches the second intermediate with the 2S midpoint update (-(r2 / r1) alpha_2 (e^{-r2 h} - "
            "1) / 2 (D(u1) - D)) where DPM-Solver's third-order update uses (r2 / r1) alpha_2 phi_2(r2 h) (D(u1) - D): "
            "both second order, a different intermediate", "sampler",
            DPMSolverPP3S(intermediate=lambda step, cur, nxt: mids[step], second="midpoint"))}


class _UniPC(_Adapter):
    name = "UniPCMultistepScheduler"
    img2img = True
    lambda_terms = True
    variants = {"bh2": dict(solver_type="bh2"), "bh1": dict(solver_type="bh1"),
                "bh2 order 3": dict(solver_type="bh2", solver_order=3),
                "bh1 order 3": dict(solver_type="bh1", solver_order=3)}
    timestep_family = "dpmsolver"

    def grid_findings(self, sched, config, kw, ref):
        out = super().grid_findings(sched, config, kw, ref)
        if ref is not None:
            out.append(TB.compare_sigmas(_numpy(sched.sigmas), *_vp_sigma_grid(kw, config["steps"], ref, "dpmsolver")))
        return out

    def make(self, config, variant):
        return self.cls(**config, **{"solver_order": 2, **self.variants[variant]}, predict_x0=True,
                        final_sigmas_type="zero")

    def sampler(self, sched, table, grid, variant=""):
        # diffusers' UniPC lowers the last steps to n - i whatever n (UniPC's own rule)
        return UniPC(sched.config.solver_order, sched.config.solver_type, lower_order_final="always")

    def explain_nonfinite(self, sched, ratios):
        """bh1 takes B(h) = -h; on the step into sigma = 0 (final_sigmas_type "zero", the default) h = inf, and the
        first-order predictor forms alpha_t B(h) * pred_res with pred_res = 0: -inf * 0 = NaN. Checked: bh1, a final
        sigma of 0, every earlier step finite, B(h) at the last step -inf in float32."""
        import torch

        sig = sched.sigmas.to(torch.float32)
        finite_before = all(np.isfinite(r) and r <= 1.0 for r in ratios[:-1])      # every earlier step agrees
        if sched.config.solver_type != "bh1" or float(sig[-1]) != 0.0 or not finite_before:
            return None
        alpha_t, sigma_t = sched._sigma_to_alpha_sigma_t(sig[-1])
        alpha_s, sigma_s = sched._sigma_to_alpha_sigma_t(sig[-2])
        h = (torch.log(alpha_t) - torch.log(sigma_t)) - (torch.log(alpha_s) - torch.log(sigma_s))
        if torch.isinf(h) and torch.isnan(-h * 0.0):
            return Finding("nonfinite", "UniPC bh1 with final_sigmas_type='zero': on the last step B(h) = -h = -inf "
                                        "and the first-order predictor's alpha_t B(h) * 0 is NaN (every earlier step "
                                        "agrees)", explained=True, id="diffusers-unipc-bh1-final-nan",
                           evidence={"step": len(ratios) - 1})
        return None

    def grid(self, sched, table):
        return Grid(_vp_levels(sched))

    def sync(self, sched, bstate):
        """diffusers corrects from its stored float32 last_sample, not from the sample it returned: use it."""
        if bstate.step > 0 and getattr(sched, "last_sample", None) is not None:
            return replace(bstate, extra={**bstate.extra, "x_corrected": exact(sched.last_sample.double().numpy())})
        return bstate


class _DEIS(_Adapter):
    name = "DEISMultistepScheduler"
    img2img = True
    lambda_terms = True
    variants = {"order 2": dict(solver_order=2), "order 3": dict(solver_order=3)}
    timestep_family = "dpmsolver"

    def grid_findings(self, sched, config, kw, ref):
        out = super().grid_findings(sched, config, kw, ref)
        if ref is not None:                 # DEIS ends at the table's first level, not at the data
            sig, bound = _vp_sigma_grid(kw, config["steps"], ref, "dpmsolver", final="first")
            out.append(TB.compare_sigmas(_numpy(sched.sigmas), sig, bound))
        return out

    def grid(self, sched, table):
        # diffusers ends at sigma_last = sqrt((1 - alpha_bar_0) / alpha_bar_0), the table's index 0
        return Grid(_vp_levels(sched))

    def sampler(self, sched, table, grid, variant=""):
        return DEIS(sched.config.solver_order)

    def formula_terms(self, ctx, cur, nxt, state, extra):
        """diffusers forms the DEIS coefficients A_j(log rho_t) - A_j(log rho_s) in float32: the polynomial numerator
        of each A_j sums terms up to (sum |log rho| + 2)^(k-1) over the product of node differences, and the two
        values of A_j then cancel. (The float32 error of the log rho nodes themselves is the lambda_terms part.)"""
        k = extra["order"]
        nodes = [np.log(np.asarray(cur.sigma_ve))] + list(state.extra.get("log_rho", ())[:k - 1])
        eps = [extra["eps"][0]] + list(state.extra.get("eps", ())[:k - 1])
        with np.errstate(divide="ignore"):
            ends = [np.log(np.asarray(nxt.sigma_ve)), nodes[0]]
        total = 0.0
        for end in ends:
            if np.isneginf(end):
                continue
            mags = sum(np.abs(n) for n in nodes) + np.abs(end) + 2.0
            for j in range(k):
                den = np.prod([nodes[j] - nodes[m] for m in range(k) if m != j])
                err = np.exp(end) * mags ** (k - 1) / np.abs(den)
                total = total + np.asarray(nxt.alpha) * np.abs(eps[j].v) * err
        return total


class _VE(_Adapter):
    """diffusers' sigma-space schedulers: sample x / alpha, model input x / sqrt(1 + sigma^2)."""

    space = "ve"
    dt_terms = True

    def grid(self, sched, table):
        return Grid.from_sigmas(_dedupe(sched.sigmas.double().numpy()))

    def grid_findings(self, sched, config, kw, ref):
        """The step levels (two-stage schedulers list inner sigmas twice: compared once) of the spacing asked."""
        if ref is None:
            return []
        karras = "grid" if getattr(sched.config, "use_karras_sigmas", False) else None
        sig, bound = _vp_sigma_grid(kw, config["steps"], ref, "sigma", "zero", karras)
        return [TB.compare_sigmas(_dedupe(_numpy(sched.sigmas)), sig, bound)]

    def coeffs(self, prediction, level):
        """diffusers' models predict the VP v = alpha eps - sigma_vp x0; on the VE grid (alpha = 1) refdiff's v is
        eps - sigma_ve x0 = v_vp / alpha, alpha = 1 / sqrt(1 + sigma_ve^2). eps and x0 are the same in both."""
        c_x, c_m = model_coeffs(PREDICTIONS[prediction], level.alpha, level.sigma)
        if prediction == "v_prediction":
            c_m = c_m * np.sqrt(1.0 + np.asarray(level.sigma, dtype=np.float64) ** 2)
        return c_x, c_m

    def model(self, prediction):
        vp = super().model(prediction)

        def ve(x, level):
            a = 1.0 / np.sqrt(1.0 + np.asarray(level.sigma) ** 2)
            return vp(x * a, Level(None, a, np.asarray(level.sigma) * a, None))
        return ve

    def x_T_scale(self, sched, grid):
        return float(sched.init_noise_sigma)


class _Churned:
    """EDM's stochastic Euler (Karras et al. 2022, Alg. 2 with S_churn, S_tmin, S_tmax): diffusers takes the churn as
    step() arguments and adds the noise inside step(), after the model was evaluated at the un-churned sample."""

    CHURN = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0)

    def step_kwargs(self, variant):
        return dict(self.CHURN) if variant == "churn" else {}

    def model_first(self, variant):
        return variant == "churn"

    def sampler(self, sched, table, grid, variant=""):
        return Euler(Churn(self.CHURN["s_churn"], self.CHURN["s_tmin"], self.CHURN["s_tmax"])) if variant == "churn" \
            else Euler()

    def hypotheses(self, sched, table, config, variant):
        if variant != "churn":
            return {}
        return {"diffusers-churn-after-model": Hypothesis(
            "the model is evaluated before the churn, at (x, sigma), and its output applied at x_hat (diffusers' "
            "step adds the churn noise after the model call; EDM Alg. 2 evaluates at x_hat, sigma_hat)",
            "same-output", None)}


class _Euler(_Churned, _VE):
    name = "EulerDiscreteScheduler"
    img2img = True
    variants = {"": {}, "Karras": dict(use_karras_sigmas=True), "churn": {}}

    def read_level(self, prediction, level, start):
        """diffusers' Euler converts eps with sigma_hat (x_hat - sigma_hat m) but v with the un-churned sigma
        (c_skip(sigma) x_hat + c_out(sigma) m)."""
        return start if prediction == "v_prediction" else level


class _EulerA(_VE):
    name = "EulerAncestralDiscreteScheduler"
    img2img = True
    predictions = ("epsilon", "v_prediction")   # diffusers raises NotImplementedError for "sample"

    def sampler(self, sched, table, grid, variant=""):
        return EulerAncestral()

    def explain_nonfinite(self, sched, ratios):
        """diffusers #14213: sigma_up^2 = sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2 rounded in float32 can
        exceed sigma_to^2 when sigma_from is huge (squaredcos_cap_v2: sigma ~ 2e4), so sigma_down = sqrt(negative)."""
        import torch

        sig = sched.sigmas.to(torch.float32)
        for i in range(len(sig) - 1):
            frm, to = sig[i], sig[i + 1]
            up = (to ** 2 * (frm ** 2 - to ** 2) / frm ** 2) ** 0.5
            if torch.isnan((to ** 2 - up ** 2) ** 0.5):
                return Finding("nonfinite", f"diffusers #14213: at step {i} (sigma {float(frm):.6g} -> "
                                            f"{float(to):.6g}) float32 sigma_up^2 exceeds sigma_to^2, sigma_down = "
                                            "sqrt(negative) = NaN", explained=True, id="diffusers-14213",
                               evidence={"step": i, "sigma_from": float(frm), "sigma_to": float(to)})
        return None


class _Heun(_VE):
    name = "HeunDiscreteScheduler"

    def step_starts(self, ts):
        return ts[::2]

    def sampler(self, sched, table, grid, variant=""):
        return Heun()


class _KDPM2(_VE):
    name = "KDPM2DiscreteScheduler"
    predictions = ("epsilon", "v_prediction")   # diffusers raises NotImplementedError for "sample"

    def sampler(self, sched, table, grid, variant=""):
        return DPM2()


class _Float32Ancestral(DPM2Ancestral):
    """DPM-2 ancestral with the step's sigma_up, sigma_down and sigma_mid as diffusers' set_timesteps forms them in
    float32 (a hypothesis of the check, not a sampler to use)."""

    def __init__(self, sched):
        import torch

        super().__init__()
        sig = torch.tensor(_dedupe(sched.sigmas.double().numpy()), dtype=torch.float32)
        nxt = torch.cat([sig[1:], sig.new_zeros(1)])
        up = (nxt ** 2 * (sig ** 2 - nxt ** 2) / sig ** 2) ** 0.5
        down = (nxt ** 2 - up ** 2) ** 0.5
        mid = sig.log().lerp(down.log(), 0.5).exp()
        self.table = {float(a): (float(u), float(d), float(m)) for a, u, d, m in zip(sig, up, down, mid)}
        self.name = "DPM2Ancestral(float32 sigma_down)"

    def _up_down(self, s, s_next):
        up, down, _ = self.table[float(np.mean(s))]
        return up, down

    def _mid(self, s, down):
        return self.table[float(np.mean(s))][2]


class _KDPM2A(_VE):
    """DPM-2 ancestral (k-diffusion sample_dpm_2_ancestral): DPM-2 to sigma_down, then noise of scale sigma_up drawn
    with the step's generator."""

    name = "KDPM2AncestralDiscreteScheduler"
    predictions = ("epsilon", "v_prediction")   # diffusers raises NotImplementedError for "sample"

    def step_starts(self, ts):
        """Two calls per step; at eta = 1 the midpoint sqrt(sigma sigma_down) is sigma_next itself, so the second
        call's timestep repeats the next step's start by design."""
        return ts[::2]

    def sampler(self, sched, table, grid, variant=""):
        return DPM2Ancestral()

    def formula_terms(self, ctx, cur, nxt, state, extra):
        """diffusers forms sigma_down = sqrt(sigma_next^2 - sigma_up^2) in float32 (set_timesteps): a difference that
        cancels when sigma_up ~ sigma_next, relative error kappa u with kappa = (sigma_next / sigma_down)^2; the
        step moves by d_2 (sigma_down - sigma) and evaluates at sigma_mid = sqrt(sigma sigma_down) (half of it).
        Plus the Euler-type |x - D| per stage (dt_terms)."""
        base = sum(dt_stage_terms(ctx.stages))
        if nxt.is_data or len(ctx.stages) < 2:
            return base
        s, sn = float(np.mean(cur.sigma_ve)), float(np.mean(nxt.sigma_ve))
        down = float(_ancestral(s, sn, 1.0)[1])
        if not down > 0:
            return base
        kappa = (sn / down) ** 2
        (x1, _, d1), (x2, lv2, d2) = ctx.stages[0], ctx.stages[1]
        s_mid = float(np.mean(lv2.sigma_ve))
        return base + kappa * (np.abs(x2.v - d2.v) / s_mid * down + 0.5 * np.abs(x1.v - d1.v) / s * s_mid)

    def hypotheses(self, sched, table, config, variant):
        return {"diffusers-kdpm2a-cancelling-sigma-down": Hypothesis(
            "diffusers' float32 sigma_down = sqrt(sigma_next^2 - sigma_up^2), which cancels for sigma >> sigma_next "
            "(relative error (sigma / sigma_next)^2 u; exactly sigma_next^2 / sigma at eta = 1), and its float32 "
            "sigma_interpol", "sampler", _Float32Ancestral(sched))}

    def explain_nonfinite(self, sched, ratios):
        """In set_timesteps, float32 sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 rounds to
        sigma_next^2 or above when sigma >> sigma_next (2-3 steps, or squaredcos_cap_v2's sigma ~ 2e4): sigma_down
        = sqrt(<= 0) is 0 or NaN, sigma_interpol = exp(lerp(log sigma, log sigma_down, 0.5)) is NaN (torch's lerp
        at weight 0.5 computes end - (end - start) / 2 = -inf + inf), and so is the timestep the model is given."""
        import torch

        interp = sched.sigmas_interpol.to(torch.float32)
        nan_steps = torch.nonzero(torch.isnan(interp)).flatten().tolist()
        if not nan_steps:
            return None
        k = nan_steps[0]
        return Finding("nonfinite", f"sigmas_interpol[{k}] is NaN: float32 sigma_down = sqrt(sigma_next^2 - sigma_up^2) "
                                    f"is 0 or NaN for sigma {float(sched.sigmas[k]):.6g} -> "
                                    f"{float(sched.sigmas[k + 1]):.6g}, and the log-lerp to it gives NaN (the "
                                    "mechanism of diffusers #14213, in KDPM2AncestralDiscreteScheduler.set_timesteps)",
                       explained=True, id="diffusers-kdpm2a-sigma-down-nan",
                       evidence={"index": k, "sigma": float(sched.sigmas[k]), "sigma_next": float(sched.sigmas[k + 1]),
                                 "timesteps_nan": int(torch.isnan(torch.as_tensor(sched.timesteps)).sum())})


class _DPMSDE(_VE):
    """k-diffusion's DPM-Solver++ SDE (eta = 1, r = 1/2) with noise from a torchsde Brownian tree: the check installs
    diffusers' own noise sampler, seeded, and records what each step draws for the reference."""

    name = "DPMSolverSDEScheduler"
    predictions = ("epsilon", "v_prediction")   # diffusers raises NotImplementedError for "sample"
    variants = {"": {}, "Karras": dict(use_karras_sigmas=True)}
    lambda_terms = True            # t = -log sigma and back in float32 (log sigma = -lambda)

    def make(self, config, variant):
        return self.cls(**config, **self.variants[variant], noise_sampler_seed=0)

    def sampler(self, sched, table, grid, variant=""):
        return DPMSolverPPSDE(eta=1.0, r=0.5)

    def noise_recorder(self, sched, x):
        from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

        sig = sched.sigmas
        tree = BrownianTreeNoiseSampler(x, sig[sig > 0].min().item(), sig.max().item(),
                                        getattr(sched.config, "noise_sampler_seed", None) or 0)
        drawn = []

        def recorded(sigma, sigma_next):
            with warnings.catch_warnings():     # torchsde notes float32 query points a rounding outside its interval
                warnings.simplefilter("ignore")
                z = tree(sigma, sigma_next)
            drawn.append(z.double().numpy())
            return z
        sched.noise_sampler = recorded
        return drawn


class _LMSFromGlobalIndex(LMS):
    """LMS started part-way as diffusers' LMSDiscreteScheduler runs it after set_begin_index (a hypothesis of the
    check): the order is min(4, global index + 1) and the Lagrange nodes are the full grid's sigmas before the
    current one, skipped levels included, but only the derivatives collected since the start enter the sum."""

    def __init__(self, sigmas, begin: int):
        super().__init__(4)
        self.sigmas, self.begin = [float(v) for v in sigmas], int(begin)
        self.name = "LMS-4 (order and nodes from the global step index)"

    def step_order(self, state, grid):
        return min(self.order, self.begin + state.step + 1)

    def _nodes(self, state, k, s):
        g = self.begin + state.step
        return [self.sigmas[g - m] for m in range(k)]


class _LMS(_VE):
    name = "LMSDiscreteScheduler"
    img2img = True
    dt_terms = False               # coefficients by quadrature in float64 from the float32 sigmas

    def sampler(self, sched, table, grid, variant=""):
        return LMS(4)

    def hypotheses(self, sched, table, config, variant):
        begin = getattr(sched, "_refdiff_begin", 0)
        if not begin:
            return {}
        return {"diffusers-lms-begin-index-order": Hypothesis(
            f"started at step {begin} (set_begin_index, img2img), its order is min(4, step index + 1) and its "
            "Lagrange weights those of nodes at the skipped levels, applied to the derivatives it has (one on the "
            "first step): the first steps' weights do not sum to the step (inconsistent; diffusers #5630's noisy "
            "img2img results fit this)", "sampler",
            _LMSFromGlobalIndex(_numpy(sched.sigmas), begin))}


class _EDMEuler(_Churned, _OwnLevels, _VE):
    """EDM (Karras et al. 2022): the model is F with D = c_skip x + c_out F and input c_in x; no beta table."""

    name = "EDMEulerScheduler"
    img2img = True
    variants = {"": {}, "churn": {}}
    predictions = ("epsilon", "v_prediction")
    schedules = ("karras", "exponential")

    def scheduler_config(self, config):
        return dict(sigma_schedule=config["beta_schedule"], prediction_type=config["prediction_type"])

    def grid(self, sched, table):
        return Grid.from_sigmas(sched.sigmas.double().numpy())

    # EDM's default sigma range (Karras et al. 2022, Table 1) and rho; diffusers forms the ramp in float32 and raises
    # to the power rho, which multiplies the base's relative rounding (~4 u) by rho
    EDM_RANGE = (0.002, 80.0, 7.0)

    def grid_findings(self, sched, config, kw, ref):
        lo, hi, rho = self.EDM_RANGE
        n = config["steps"]
        if config["beta_schedule"] == "karras":
            sig, rel = S.karras_sigmas(n, lo, hi, rho), (4.0 * rho + 1.0) * TB.U32
        else:
            sig, rel = S.exponential_sigmas(n, lo, hi), 4.0 * np.log(hi / lo) * TB.U32 + TB.U32
        target = _numpy(sched.sigmas)
        f = TB.compare_sigmas(target, np.append(sig, 0.0), np.append(np.full(n, rel), 0.0))
        if f is not None and n == 1 and config["beta_schedule"] == "exponential" and \
                abs(target[0] - lo) <= rel * lo:
            f = Finding("grid", f"one exponential step starts at sigma_min = {lo:g}, not sigma_max = {hi:g}: "
                                "torch.linspace(log sigma_min, log sigma_max, 1) is [log sigma_min], then flipped "
                                "(k-diffusion's get_sigmas_exponential gives sigma_max); the one step barely denoises",
                        explained=True, id="diffusers-edm-exponential-one-step",
                        evidence={"target_sigma_0": float(target[0]), "reference_sigma_0": hi})
        return [f]

    SIGMA_DATA = 0.5                   # diffusers' default sigma_data

    def _skip_out(self, sigma, prediction):
        sd = self.SIGMA_DATA
        s = np.asarray(sigma, dtype=np.float64)
        c_out = s * sd / np.sqrt(s * s + sd * sd)
        return sd * sd / (s * s + sd * sd), (c_out if prediction == "epsilon" else -c_out)

    def coeffs(self, prediction, level):
        return self._skip_out(level.sigma, prediction)

    def model(self, prediction):
        def F(x, level):
            c_skip, c_out = self._skip_out(level.sigma, prediction)
            return (ORACLE.denoise(x, 1.0, float(np.asarray(level.sigma))) - c_skip * x) / c_out
        return F


class _EDMDPM(_EDMEuler):
    """DPM-Solver++ (multistep, data prediction) on EDM's sigmas with EDM's preconditioning (diffusers
    EDMDPMSolverMultistepScheduler): lambda = -log sigma formed in float32."""

    name = "EDMDPMSolverMultistepScheduler"
    variants = {"2M": dict(solver_order=2), "3M": dict(solver_order=3)}
    lambda_terms = True
    dt_terms = False

    def step_kwargs(self, variant):
        return {}

    def model_first(self, variant):
        return False

    def make(self, config, variant):
        return self.cls(**config, **self.variants[variant])

    def sampler(self, sched, table, grid, variant=""):
        return DPMSolverPP(3 if variant == "3M" else 2)

    def hypotheses(self, sched, table, config, variant):
        if variant != "3M":
            return {}
        return {"dpmsolver-3m-halved-d2": Hypothesis(
            "the released DPM-Solver++ 3M update halves the D'' term (local error O(h^3): global order 2)",
            "sampler", DPMSolverPP(3, halved_d2=True))}


class _CosineDPM(_EDMDPM):
    """Stable Audio's CosineDPMSolverMultistepScheduler: SDE-DPM-Solver++(2M) (eta = 1; the midpoint or the heun
    weight of the first divided difference, refdiff.samplers.DPMSolverPP2MSDE) on exponential / Karras sigmas from
    0.3 to 500 with EDM preconditioning at sigma_data = 1 (its timestep is atan(sigma) 2 / pi, fed to the network
    only). Its noise comes from a torchsde Brownian tree, installed seeded and recorded as for DPMSolverSDE."""

    name = "CosineDPMSolverMultistepScheduler"
    variants = {"midpoint": dict(solver_type="midpoint"), "heun": dict(solver_type="heun")}
    predictions = ("v_prediction", "epsilon")
    schedules = ("karras", "exponential")
    EDM_RANGE = (0.3, 500.0, 7.0)          # its default sigma_min, sigma_max, rho
    SIGMA_DATA = 1.0

    def make(self, config, variant):
        return self.cls(**config, **self.variants[variant])

    def sampler(self, sched, table, grid, variant=""):
        return DPMSolverPP2MSDE(1.0, sched.config.solver_type)

    def hypotheses(self, sched, table, config, variant):
        return {}

    def noise_recorder(self, sched, x):
        return _DPMSDE.noise_recorder(self, sched, x)


class _FlowMatchEuler(_OwnLevels):
    """Rectified flow x = (1 - s) x0 + s eps, model v = eps - x0: Euler in s is DDIM on the flow levels."""

    name = "FlowMatchEulerDiscreteScheduler"
    img2img = True
    space = "flow"
    dt_terms = True
    predictions = ("flow",)
    # static shifts (SD3) and dynamic shifting (Flux's exponential time shift at mu, the linear one)
    schedules = ("shift 1", "shift 3", "mu 1.15", "mu 0.8 linear")

    @staticmethod
    def _shift(config) -> dict:
        """flow_sigmas' keyword arguments of the case's schedule name."""
        kind, value, *rest = config["beta_schedule"].split()
        if kind == "shift":
            return {"shift": float(value)}
        return {"mu": float(value), "time_shift_type": rest[0] if rest else "exponential"}

    def scheduler_config(self, config):
        sh = self._shift(config)
        if "shift" in sh:
            return dict(shift=sh["shift"])
        return dict(use_dynamic_shifting=True, time_shift_type=sh["time_shift_type"])

    def set_timesteps_kwargs(self, config):
        return {"mu": self._shift(config)["mu"]} if "mu" in self._shift(config) else {}

    def grid_findings(self, sched, config, kw, ref):
        """SD3 / Flux grids (refdiff.grids.flow_sigmas): a linspace in time, shifted; computed in float64 from a
        float32 table entry and cast once (a few u)."""
        n = config["steps"]
        want = flow_sigmas(n, **self._shift(config))
        return [TB.compare_sigmas(_numpy(sched.sigmas), want, np.append(np.full(n, 4.0 * TB.U32), 0.0))]

    def grid(self, sched, table):
        s = sched.sigmas.double().numpy()
        with np.errstate(divide="ignore"):
            return Grid(Level(v, 1.0 - v, v, 2.0 * (np.log1p(-v) - np.log(v))) for v in s)

    def sampler(self, sched, table, grid, variant=""):
        return DDIM(0.0)


class _FlowMatchHeun(_FlowMatchEuler):
    """Heun on the flow ODE in t (refdiff.samplers.FlowHeun): two calls per step, Euler into t = 0."""

    name = "FlowMatchHeunDiscreteScheduler"
    img2img = False
    schedules = ("shift 1", "shift 3")        # it has no dynamic shifting

    def step_starts(self, ts):
        return ts[::2]

    def grid(self, sched, table):
        s = _dedupe(sched.sigmas.double().numpy())
        with np.errstate(divide="ignore"):
            return Grid(Level(v, 1.0 - v, v, 2.0 * (np.log1p(-v) - np.log(v))) for v in s)

    def grid_findings(self, sched, config, kw, ref):
        n = config["steps"]
        want = flow_sigmas(n, **self._shift(config))
        return [TB.compare_sigmas(_dedupe(_numpy(sched.sigmas)), want, np.append(np.full(n, 4.0 * TB.U32), 0.0))]

    def sampler(self, sched, table, grid, variant=""):
        return FlowHeun()


class _FlowMatchLCM(_RecordedStepNoise, _FlowMatchEuler):
    """diffusers' FlowMatchLCMScheduler: consistency sampling on rectified-flow levels (refdiff.samplers.LCM with no
    boundary scaling): x0 = x - sigma F, then x' = (1 - sigma') x0 + sigma' z. The model is the exact consistency
    function of a Gaussian read as a flow output, F = (x - f(x)) / sigma (refdiff.oracles.ConsistencyOracle). Its
    step casts the sample to float32 and draws the noise there (recorded)."""

    name = "FlowMatchLCMScheduler"
    img2img = False
    module = "scheduling_flow_match_lcm"

    def sampler(self, sched, table, grid, variant=""):
        return LCM("none")

    def model(self, prediction):
        oracle = ConsistencyOracle(_gaussian_oracle()).model("flow")
        return lambda x, level: oracle(x, level)

    def _keep(self, sched, t) -> bool:
        return sched.step_index < len(sched.timesteps)       # the last step's draw is multiplied by sigma' = 0


class _LTXEulerAncestralRF(_RecordedStepNoise, _FlowMatchEuler):
    """diffusers' LTXEulerAncestralRFScheduler (ComfyUI's euler_ancestral_RF; refdiff.samplers.FlowEulerAncestral):
    on FlowMatchEuler's sigmas, an Euler step to t_down = t'(1 + (t'/t - 1) eta) and the forward flow process back
    up to t'. It steps in float32 (its noise drawn there: recorded); eta = 1 (its default) and 0.5."""

    name = "LTXEulerAncestralRFScheduler"
    module = "scheduling_ltx_euler_ancestral_rf"
    img2img = False
    variants = {"eta=1": dict(eta=1.0), "eta=0.5": dict(eta=0.5)}
    schedules = ("shift 1",)              # no shift of its own: FlowMatchEuler's defaults (pipelines pass sigmas)

    def scheduler_config(self, config):
        return {}

    def make(self, config, variant):
        self._eta = self.variants[variant]["eta"]                  # read by formula_terms
        return self.cls(**config, **self.variants[variant])

    def sampler(self, sched, table, grid, variant=""):
        return FlowEulerAncestral(float(sched.config.eta), float(sched.config.s_noise))

    def formula_terms(self, ctx, cur, nxt, state, extra):
        """Besides the Euler dt terms, it forms 1 - t_down / t (|D| u), t'/t - 1 inside t_down (|x - D| u more)
        and the re-noising t'^2 - (t_down (1 - t') / (1 - t_down))^2 in float32 (relative u (a + b) / (a - b),
        halved by the square root, on the noise term)."""
        out = super().formula_terms(ctx, cur, nxt, state, extra)
        (x, _, D), = ctx.stages[:1]
        out = out + np.abs(D.v) + 2.0 * np.abs(x.v - D.v)
        if ctx.draws and not nxt.is_data:
            t, tn, eta = float(cur.sigma), float(nxt.sigma), self._eta
            td = tn * (1.0 + (tn / t - 1.0) * eta)
            a, b = tn ** 2, (td * (1.0 - tn) / (1.0 - td)) ** 2
            if a > b:
                up = np.sqrt(a - b)
                out = out + np.abs(ctx.draws[-1]) * up * ((a + b) / (2.0 * (a - b)) + 2.0)
        return out


class _MiniMaxH3(_FlowMatchEuler):
    """diffusers' MiniMaxH3Scheduler: Euler on rectified-flow levels (refdiff's DDIM there, as FlowMatchEuler), with
    its own conventions: the network's velocity points to the data (x0 = x + sigma v), timesteps are t = 1 - sigma,
    and the grid is linspace(1, 0, n + 1) through the static shift with consecutive duplicates collapsed (n + 1
    points for n model calls; the check's step count is the calls). Shifts 12 (its video schedule) and 3 (audio)."""

    name = "MiniMaxH3Scheduler"
    img2img = False
    schedules = ("shift 12", "shift 3")

    def scheduler_config(self, config):
        return dict(shift=float(config["beta_schedule"].split()[1]))

    def set_timesteps_kwargs(self, config):
        return {}

    def make(self, config, variant):
        sched = self.cls(**config)
        set_timesteps = sched.set_timesteps
        sched.set_timesteps = lambda n, *a, **k: set_timesteps(n + 1, *a, **k)     # n calls: n + 1 grid points
        return sched

    def grid_findings(self, sched, config, kw, ref):
        """shift b / (1 + (shift - 1) b) over b = linspace(1, 0, n + 1) (float32 linspace and three operations)."""
        n, s = config["steps"], float(config["beta_schedule"].split()[1])
        b = np.linspace(1.0, 0.0, n + 1)
        want = s * b / (1.0 + (s - 1.0) * b)
        want = want[np.concatenate([[True], np.diff(want) != 0])]
        return [TB.compare_sigmas(_numpy(sched.sigmas), want, np.full(want.size, 6.0 * TB.U32))]

    def coeffs(self, prediction, level):
        return 1.0, float(np.asarray(level.sigma))              # x0 = x + sigma v: the velocity points to the data

    def model(self, prediction):
        flow = super().model("flow")
        return lambda x, level: -flow(x, level)


class _FlowMapStep(Sampler):
    """One flow-map step (MeanFlow-type models; Geng et al. 2025): the model gives the average velocity u over
    [r, t], and z_r = z_t - (t - r) u. With the exact map as the model (refdiff.oracles.ConsistencyOracle asked at
    a TargetLevel naming r) this is DDIM with the model's map to the next level (TCD's step at gamma = 0)."""

    snr_zero_start = True
    history_needed = 0
    name = "FlowMap(Euler)"

    def step(self, ctx, cur, nxt, state):
        from ...samplers.consistency import TargetLevel

        D = ctx.denoise(ctx.x, TargetLevel(cur.t, cur.alpha, cur.sigma, cur.log_snr, target=nxt))
        if nxt.is_data:
            return D * nxt.alpha, {}
        eps = (ctx.x - D * cur.alpha) * (1.0 / np.asarray(cur.sigma))
        return D * nxt.alpha + eps * nxt.sigma, {}


class _FlowMapEuler(_FlowMatchEuler):
    """diffusers' FlowMapEulerDiscreteScheduler: z_r = z_t - (sigma_t - sigma_r) u with a flow-map model's average
    velocity u(z_t, t, r), r the next sigma. The model is the exact PF-ODE map of a Gaussian from t to r read as a
    flow output (u = (z_t - Phi(z_t)) / (t - r)); each step then lands on the exact ODE solution. Sigmas: the static
    shift of linspace(1, 0, n + 1)[:-1], then 0, in float64."""

    name = "FlowMapEulerDiscreteScheduler"
    img2img = False
    schedules = ("shift 1", "shift 3")

    def grid_findings(self, sched, config, kw, ref):
        n, s = config["steps"], float(config["beta_schedule"].split()[1])
        b = np.linspace(1.0, 0.0, n + 1)[:-1]
        want = np.append(s * b / (1.0 + (s - 1.0) * b), 0.0)
        return [TB.compare_sigmas(_numpy(sched.sigmas), want, np.full(n + 1, 4.0 * TB.U32))]

    def sampler(self, sched, table, grid, variant=""):
        return _FlowMapStep()

    def model(self, prediction):
        oracle = ConsistencyOracle(_gaussian_oracle()).model("flow")
        return lambda x, level: oracle(x, level)


def _gaussian_oracle():
    """The consistency schedulers' data: one Gaussian (the exact consistency function is closed-form for it)."""
    rng = np.random.default_rng(1)
    B = rng.standard_normal((4, 4)) * 0.3
    return GaussianData(rng.uniform(-1, 1, 4), B @ B.T + 0.2 * np.eye(4))


class _LCM(_Adapter):
    """The Latent Consistency Model's multistep sampler (refdiff.samplers.LCM; boundary c_skip x + c_out F with
    diffusers' timestep scaling 10), judged with the exact consistency function of a Gaussian as the model
    (refdiff.oracles.ConsistencyOracle): D = f(x) exactly, then x' = alpha' D + sigma' z with the step's generator."""

    name = "LCMScheduler"
    spacings = ("-",)             # LCM's own skipping-step timesteps over original_inference_steps = 50
    predictions = ("epsilon", "v_prediction", "sample")
    schedules = ("scaled_linear", "linear")
    ORIGINAL_STEPS = 50

    def supports(self, config):
        return config["steps"] <= self.ORIGINAL_STEPS

    def make(self, config, variant):
        return self.cls(**config, original_inference_steps=self.ORIGINAL_STEPS)

    def grid(self, sched, table):
        return Grid.from_discrete(table, np.asarray(sched.timesteps).astype(np.int64), final="data")

    def grid_findings(self, sched, config, kw, ref):
        """Luo et al. 2023's skipping-step schedule: the original N' = 50 timesteps (k T / N' - 1), every
        floor(N' / n)-th from the top, the first n."""
        T, n = kw["num_train_timesteps"], config["steps"]
        origin = np.arange(1, self.ORIGINAL_STEPS + 1) * (T // self.ORIGINAL_STEPS) - 1
        want = origin[::-1][:: len(origin) // n][:n]
        target = _numpy(sched.timesteps)
        f = TB.compare_timesteps(target, want)
        even = origin[::-1][np.floor(np.linspace(0, len(origin), n, endpoint=False)).astype(np.int64)]
        if f is not None and TB.compare_timesteps(target, even) is None:
            f = Finding("grid", f"the {n} steps are spread evenly over the {self.ORIGINAL_STEPS} original timesteps "
                                "(floor of a linspace of indices), not taken with the paper's constant skipping step "
                                f"floor({self.ORIGINAL_STEPS} / n) (Luo et al. 2023, Sec. 4.3): {target.tolist()} "
                                f"instead of {want.tolist()}", explained=True, id="diffusers-lcm-even-spacing",
                        evidence={"target": target.tolist(), "paper": want.tolist()})
        return [f]

    def sampler(self, sched, table, grid, variant=""):
        return LCM("lcm")

    def model(self, prediction):
        oracle = ConsistencyOracle(_gaussian_oracle()).model(PREDICTIONS[prediction],
                                                              scalings=lambda lv: boundary_scalings("lcm", lv))
        return lambda x, level: oracle(x, level)


class _TCDEndsAtT0(TCD):
    """TCD whose step into the data stops at the table's t = 0 instead (a hypothesis of the check)."""

    def __init__(self, gamma, first: Level):
        super().__init__(gamma)
        self.first = first

    def step(self, ctx, cur, nxt, state):
        return super().step(ctx, cur, self.first if nxt.is_data else nxt, state)


class _TCD(_LCM):
    """Trajectory Consistency Distillation's strategic stochastic sampling (refdiff.samplers.TCD, gamma = eta =
    0.3): the model is asked for the trajectory-consistency map to s' = floor((1 - gamma) s) (the exact map of a
    Gaussian, ConsistencyOracle with a target level), then forward noise from s' back to s."""

    name = "TCDScheduler"
    GAMMA = 0.3

    def step_kwargs(self, variant):
        return {"eta": self.GAMMA}

    def sampler(self, sched, table, grid, variant=""):
        return TCD(self.GAMMA)

    def model(self, prediction):
        return ConsistencyOracle(_gaussian_oracle()).model(PREDICTIONS[prediction])

    def hypotheses(self, sched, table, config, variant):
        """diffusers' TCD ends on the table's first entry (t = 0, alpha_bar_0 < 1), not on the data: its last step
        maps to s' = floor((1 - gamma) 0) = 0 and returns that (still noisy) sample."""
        return {"diffusers-tcd-ends-at-t0": Hypothesis(
            "the last step lands on t = 0 (alpha_bar_0 < 1: sigma_0 / alpha_0 ~ 0.03 of noise left) instead of the "
            "data", "sampler", _TCDEndsAtT0(self.GAMMA, _level(table, 0)))}


class _CMLastNoise(CMMultistep):
    """CM multistep sampling whose last step adds ``residue`` z (a hypothesis of the check)."""

    def __init__(self, residue: float):
        super().__init__("edm")
        self.residue = residue

    def step(self, ctx, cur, nxt, state):
        out, extra = super().step(ctx, cur, nxt, state)
        if state.step == len(ctx.grid) - 1:
            out = out + ctx.noise() * self.residue
        return out, extra


class _CM(_OwnLevels):
    """Consistency models' multistep sampling (Song et al. 2023, Alg. 1; refdiff.samplers.CMMultistep): D = c_skip x
    + c_out F with EDM's boundary scalings (sigma_data 0.5, boundary sigma_min 0.002), then D + sqrt(sigma_next^2 -
    sigma_min^2) z. The model is the exact consistency function of a Gaussian mapping to sigma_min. diffusers'
    default clip_denoised=True clamps D to [-1, 1] (a data-range assumption, not part of the method): off here."""

    name = "CMStochasticIterativeScheduler"
    space = "ve"
    predictions = ("sample",)                 # the network's raw output F
    schedules = ("karras",)
    SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0

    def scheduler_config(self, config):
        return dict(sigma_min=self.SIGMA_MIN, sigma_max=self.SIGMA_MAX, rho=self.RHO)

    def supports(self, config):
        return config["steps"] <= 40          # its num_train_timesteps: the grid picks steps from those 40

    def make(self, config, variant):
        return self.cls(**config, clip_denoised=False)

    def grid(self, sched, table):
        return Grid.from_sigmas(sched.sigmas.double().numpy())

    N_TRAIN = 40                 # the Karras discretization the CM was trained on (diffusers' default)

    def grid_findings(self, sched, config, kw, ref):
        """The official consistency_models multistep grid: n of the N = 40 Karras levels, indices k (N // n) for k =
        0 .. n - 1 (sigma_max first), then the boundary sigma_min; float32 Karras powers (rho u per level)."""
        n, N = config["steps"], self.N_TRAIN
        ramp = (np.arange(n) * (N // n)) / (N - 1)
        lo, hi, rho = self.SIGMA_MIN, self.SIGMA_MAX, self.RHO
        want = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        rel = (4.0 * rho + 1.0) * TB.U32
        return [TB.compare_sigmas(_numpy(sched.sigmas), np.append(want, lo), np.full(n + 1, rel))]

    def sampler(self, sched, table, grid, variant=""):
        return CMMultistep("edm")

    def hypotheses(self, sched, table, config, variant):
        import torch

        # diffusers' last step adds z sqrt(sigma_hat^2 - sigma_min^2) with sigma_hat = float32(sigma_min) and
        # sigma_min the configuration's Python float: a float32 residue instead of 0
        s32 = torch.tensor(self.SIGMA_MIN, dtype=torch.float32)
        residue = float((s32 ** 2 - self.SIGMA_MIN ** 2) ** 0.5)
        return {"diffusers-cm-last-step-noise": Hypothesis(
            f"the last step adds z sqrt(float32(sigma_min)^2 - sigma_min^2) = {residue:.3g} z of noise at the boundary "
            "(float32 sigma_min against the Python float) where the method adds none", "sampler",
            _CMLastNoise(residue))}

    def coeffs(self, prediction, level):
        return 0.0, 1.0

    def model(self, prediction):
        oracle = ConsistencyOracle(_gaussian_oracle(), boundary=(1.0, self.SIGMA_MIN)).model(
            "x0", scalings=lambda lv: boundary_scalings("edm", lv))
        return lambda x, level: oracle(x, level)

    def x_T_scale(self, sched, grid):
        return float(sched.init_noise_sigma)


class _SCM(_RecordedStepNoise, _OwnLevels):
    """sCM multistep sampling on TrigFlow (Lu & Song 2024; refdiff.samplers.CMMultistep("trigflow")): levels
    x = cos(t) x0 + sin(t) sigma_d z, x0 = cos(s) x - sin(s) F, then cos(t') x0 + sin(t') sigma_d z'. The model is the
    exact consistency function of a Gaussian. The run starts at the float32 just below pi / 2 (t = 1.5707962):
    diffusers' default max_timesteps = 1.5708 lies past pi / 2, where alpha = cos t = -3.7e-6 < 0 is no noise level
    (its effect on x0 is of that size). Two steps use its default intermediate t = 1.3; other step counts a linspace to
    0 (intermediate_timesteps=None: the default raises for n != 2). Its noise is drawn in float32 (recorded)."""

    name = "SCMScheduler"
    predictions = ("trigflow",)
    schedules = ("trigflow",)
    module = "scheduling_scm"
    T_MAX = 1.5707962                      # float32 1.57079625..., just below pi / 2
    INTERMEDIATE = 1.3

    step_call = "drop-last"                # how the reproducer script drives it

    def set_timesteps_kwargs(self, config) -> dict:
        n = config["steps"]
        return {"max_timesteps": self.T_MAX, "intermediate_timesteps": self.INTERMEDIATE if n == 2 else None}

    def make(self, config, variant):
        return self.cls(**config, sigma_data=self.SIGMA_DATA)

    def grid(self, sched, table):
        sd = self.SIGMA_DATA
        t = sched.timesteps.double().numpy()
        with np.errstate(divide="ignore"):
            return Grid(Level(v, np.cos(v), sd * np.sin(v), 2.0 * (np.log(np.cos(v)) - np.log(sd * np.sin(v))))
                        for v in t)

    def grid_findings(self, sched, config, kw, ref):
        """[t_max, 1.3, 0] for two steps, else linspace(t_max, 0, n + 1), in float32 (a few u)."""
        n = config["steps"]
        want = np.array([self.T_MAX, self.INTERMEDIATE, 0.0]) if n == 2 else np.linspace(self.T_MAX, 0.0, n + 1)
        return [TB.compare_sigmas(_numpy(sched.timesteps), want, np.full(n + 1, 4.0 * TB.U32), what="timesteps")]

    def sampler(self, sched, table, grid, variant=""):
        return CMMultistep("trigflow", sigma_data=self.SIGMA_DATA)

    SIGMA_DATA = 0.5                       # diffusers' default

    def coeffs(self, prediction, level):
        return 0.0, 1.0 / self.SIGMA_DATA   # diffusers' F is sigma_d times refdiff's TrigFlow F

    def model(self, prediction):
        sd = self.SIGMA_DATA
        oracle = ConsistencyOracle(_gaussian_oracle()).model(
            "x0", scalings=lambda lv: boundary_scalings("trigflow", lv, sigma_data=sd))
        return lambda x, level: sd * oracle(x, level)

    def x_T_scale(self, sched, grid):
        return self.SIGMA_DATA

    def calls(self, sched):
        return list(sched.timesteps[:-1])        # its list ends with t = 0, where the pipeline stops

    def _keep(self, sched, t) -> bool:
        return sched.step_index < len(sched.timesteps) - 1   # the last draw is multiplied by sin(0) = 0


class _DDPMMeanLast(DDPM):
    """DDPM (fixed_small) whose last step returns the posterior mean (Ho et al. 2020, Alg. 2: z = 0 at t = 1) also
    when the grid ends above the data."""

    def step(self, ctx, cur, nxt, state):
        if state.step != len(ctx.grid) - 1 or nxt.is_data:
            return super().step(ctx, cur, nxt, state)
        D = ctx.denoise(ctx.x, cur)
        keep = _posterior_keep(cur, nxt)
        ratio = np.asarray(nxt.sigma) ** 2 / np.asarray(cur.sigma) ** 2
        a_ts = np.asarray(cur.alpha) / np.asarray(nxt.alpha)
        return ctx.x * (a_ts * ratio) + D * (np.asarray(nxt.alpha) * keep), {}


class _DDPMWuerstchen(_OwnLevels):
    """Wuerstchen's DDPM: ancestral sampling (fixed_small, eps prediction) on the continuous cosine schedule
    alpha_bar(t) = cos((t + s) / (1 + s) pi / 2)^2 / cos(s / (1 + s) pi / 2)^2 clamped to [1e-4, 0.9999], t from 1 to
    0 in n equal steps (the list holds the final 0, where the pipeline stops). The clamp makes the run start at
    alpha_bar = 1e-4 and end at 0.9999, where its last step adds no noise (Ho et al.'s Alg. 2)."""

    name = "DDPMWuerstchenScheduler"
    predictions = ("epsilon",)
    schedules = ("cosine",)

    def calls(self, sched):
        return list(sched.timesteps[:-1])

    def _ab(self, sched, t):
        return float(sched._alpha_cumprod(_torch_f32([float(t)]), "cpu")[0])

    def grid(self, sched, table):
        out = []
        for t in sched.timesteps:
            ab = self._ab(sched, t)
            out.append(Level(float(t), np.sqrt(ab), np.sqrt(1.0 - ab), np.log(ab / (1.0 - ab))))
        return Grid(out)

    def grid_findings(self, sched, config, kw, ref):
        """t = linspace(1, 0, n + 1) (float32) and the clamped cosine alpha_bar there, within the float32 bound of
        the cosine (large near t = 1, where cos theta -> 0)."""
        n = config["steps"]
        t = np.linspace(1.0, 0.0, n + 1)
        s = 0.008
        want = np.clip(np.cos((t + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2, 1e-4, 0.9999)
        got = np.array([self._ab(sched, v) for v in sched.timesteps])
        with np.errstate(divide="ignore"):
            t_bound = np.where(t > 0, 2.0 * TB.U32, 0.0)                      # torch.linspace in float32
        theta = (t + s) / (1 + s) * np.pi / 2
        # theta formed in float32 (3 u theta; t itself u t), cos' relative error |tan theta| d theta + u, squared,
        # divided: 2 (|tan theta| 4 u theta + u) + 2 u; the clamped ends are exact
        rel = 2.0 * (np.abs(np.tan(theta)) * 4.0 * TB.U32 * theta + TB.U32) + 2.0 * TB.U32
        rel = np.where((want <= 1e-4) | (want >= 0.9999), TB.U32, rel)
        return [TB.compare_sigmas(_numpy(sched.timesteps), t, t_bound, what="timesteps"),
                TB.compare_sigmas(got, want, rel, what="alpha_bar at the timesteps")]

    step_call = "batched-t"                # its step() takes one timestep per sample (the pipeline's t.expand)

    def call_step(self, sched, m, t, x, kw):
        return sched.step(m, t.reshape(1).expand(x.shape[0]), x, **kw)

    def sampler(self, sched, table, grid, variant=""):
        return _DDPMMeanLast("fixed_small")

    def formula_terms(self, ctx, cur, nxt, state, extra):
        return _DDPM.formula_terms(self, ctx, cur, nxt, state, extra)


def _torch_f32(v):
    import torch

    return torch.tensor(v, dtype=torch.float32)


class _DDIMParallel(_DDIM):
    """DDIMScheduler's batched-timestep variant (ParaDiGMS); its step() is DDIM's, so is its #12633 convention."""

    name = "DDIMParallelScheduler"


class _CogVideoXDDIM(_DDIM):
    """CogVideoX's DDIM: DDIM on the table with SNR divided by snr_shift_scale (alpha_bar / (s + (1 - s) alpha_bar),
    before any zero-SNR rescale; refdiff.check.tables.snr_shifted), stepping to t - T // N always (the DDIM #12633
    convention is its definition here: on leading spacing it is the next timestep, elsewhere a hypothesis)."""

    name = "CogVideoXDDIMScheduler"
    SNR_SHIFT = 3.0                       # diffusers' default, passed explicitly so the table check sees it
    variants = {"": {}}                   # its step() ignores clip_sample and eta (tests/test_check.py)

    def scheduler_config(self, config):
        return {**super().scheduler_config(config), "snr_shift_scale": self.SNR_SHIFT}

    def make(self, config, variant):
        return self.cls(**{"set_alpha_to_one": True, **config}, clip_sample=False)

    def step_kwargs(self, variant):
        return {}


class _SDEDPM2MToTMinusTOverN(SDEDPMSolverPP2M):
    """SDE-DPM-Solver++(2M) whose step from t goes to t - T // N (``targets``), with r still from the previous start
    (a hypothesis of the check: CogVideoX's DPM scheduler on spacings where that is not the next timestep)."""

    def __init__(self, targets):
        self.targets = targets

    def step(self, ctx, cur, nxt, state):
        return super().step(ctx, cur, self.targets[state.step], state)


class _CogVideoXDPM(_RecordedStepNoise, _CogVideoXDDIM):
    """CogVideoX's DPM scheduler: SDE-DPM-Solver++(2M) (midpoint form; refdiff.samplers.SDEDPMSolverPP2M) on the
    SNR-shifted table. Its step() takes the previous x0 prediction and the previous timestep (as CogVideoX's
    pipelines pass them); in a second-order step it draws the noise twice and uses the second draw: the recorder
    keeps the draw each step uses."""

    name = "CogVideoXDPMScheduler"
    step_call = "previous-x0"             # how the reproducer script calls its step()
    lambda_terms = True                   # lambda = log sqrt(alpha_bar / (1 - alpha_bar)) formed in float32

    def formula_terms(self, ctx, cur, nxt, state, extra):
        """Its noise coefficient sqrt(1 - alpha_bar_prev) sqrt(1 - exp(-2h)) forms 1 - exp(-2h) in float32 (error u,
        relative u / (1 - e^{-2h})): half that, relative, on the noise term."""
        if nxt.is_data or not ctx.draws:
            return 0.0
        h = float(np.asarray(nxt.lam) - np.asarray(cur.lam))
        one_m = -np.expm1(-2.0 * h)
        return np.abs(ctx.draws[-1]) * float(np.asarray(nxt.sigma)) * np.sqrt(one_m) * (0.5 / one_m + 2.0)

    def sampler(self, sched, table, grid, variant=""):
        return SDEDPMSolverPP2M()

    module = "scheduling_dpm_cogvideox"

    def _step(self, sched, m, t, x, kw):
        old, t_back = getattr(sched, "_refdiff_previous", (None, None))
        out, x0 = sched.step(m, old, t, t_back, x, return_dict=False, **kw)
        sched._refdiff_previous = (x0, t)
        return out

    def hypotheses(self, sched, table, config, variant):
        return {"diffusers-12633": Hypothesis("prev_t = t - T // N (diffusers #12633, #11347)", "sampler",
                                              _SDEDPM2MToTMinusTOverN(_t_minus_T_over_N(sched, table)))}


class _DDIMInverse(_Adapter):
    """DDIM inversion (refdiff.editing.ddim_invert's step: DDIM(eta = 0) on the grid reversed): the timesteps ascend
    and the step at t goes from t - T // N (the table's first level below 0, set_alpha_to_one=False as the Stable
    Diffusion configurations have it) to t. The check passes the model output at the step's start; diffusers'
    inversion pipelines evaluate the network at the target timestep instead (an approximation outside the
    scheduler). From the data (set_alpha_to_one=True) diffusers takes the model's eps as it is, which no noisy-level
    reading defines: not run."""

    name = "DDIMInverseScheduler"
    spacings = ("leading", "trailing")

    def make(self, config, variant):
        return self.cls(**config, set_alpha_to_one=False, clip_sample=False)

    def _starts(self, sched, table):
        T, n = sched.config.num_train_timesteps, sched.num_inference_steps
        return [_level(table, max(int(t) - T // n, 0)) for t in np.asarray(sched.timesteps)]

    def grid(self, sched, table):
        ts = np.asarray(sched.timesteps)
        return Grid([_level(table, 0)] + [_level(table, t) for t in ts], inversion=True)

    def grid_findings(self, sched, config, kw, ref):
        want = S.timesteps(kw["num_train_timesteps"], config["steps"], kw.get("timestep_spacing", "leading"),
                           kw.get("steps_offset", 0), family="ddim")[::-1]
        return [TB.compare_timesteps(_numpy(sched.timesteps), want)]

    def sampler(self, sched, table, grid, variant=""):
        return DDIM(0.0)

    def x_T_scale(self, sched, grid) -> float:
        return 1.0                                 # a data-scale start at the least noisy level

    def hypotheses(self, sched, table, config, variant):
        """The inverse of DDIM's #12633: each step starts from t - T // N, not from where the last one ended."""
        pairs = list(zip(self._starts(sched, table), self.grid(sched, table).levels[1:]))
        return {"diffusers-12633": Hypothesis("each step starts at t - T // N (the inverse of diffusers #12633)",
                                              "pairs", pairs)}


class _DPMSolverPPSkippedLast(DPMSolverPP):
    """DPM-Solver++ whose order plan (lower_order_final below 15 steps) counts one more step than the grid has: the
    target's null last step, which the replay skips."""

    def step_order(self, state, grid):
        return multistep_order(self.order, state.step, len(grid) + 1, grid.levels[state.step + 1].is_data,
                               self.lower_order_final)


class _DPMInverse(_Adapter):
    """DPM-Solver++ multistep run towards the noise (refdiff.samplers.DPMSolverPP on an inversion grid, h < 0): the
    timesteps ascend from the table's start and a last level at the noisiest timestep closes the grid. The model
    output is passed at the step's start level (see _DDIMInverse)."""

    name = "DPMSolverMultistepInverseScheduler"
    lambda_terms = True
    variants = {"2M": dict(algorithm_type="dpmsolver++", solver_order=2),
                "3M": dict(algorithm_type="dpmsolver++", solver_order=3)}

    def make(self, config, variant):
        return self.cls(**config, **self.variants[variant])

    def grid(self, sched, table):
        sig = sched.sigmas.double().numpy()
        ts = list(np.asarray(sched.timesteps)) + [int(sched.noisiest_timestep)]
        if self._null_last_step(sched):
            sig, ts = sig[:-1], ts[:-1]
        a = 1.0 / np.sqrt(1.0 + sig * sig)
        return Grid([Level(int(t), ai, s * ai, -2.0 * np.log(s)) for t, s, ai in zip(ts, sig, a)], inversion=True)

    def _grid_findings(self, sched, config, kw, ref):
        """Its sigmas are the table's at its own timesteps, then the noisiest level (float32 table bound)."""
        if ref is None:
            return []
        ts = np.append(_numpy(sched.timesteps), sched.noisiest_timestep)
        return [TB.compare_sigmas(_numpy(sched.sigmas), TB.table_sigmas(ref.alphas_cumprod, ts),
                                  TB.table_sigma_bound(ref.alphas_cumprod, ref.bound, ts))]

    def sampler(self, sched, table, grid, variant=""):
        if self._null_last_step(sched):          # the order plan counts the skipped step, as diffusers' does
            return _DPMSolverPPSkippedLast(sched.config.solver_order)
        return DPMSolverPP(sched.config.solver_order)

    def x_T_scale(self, sched, grid) -> float:
        return 1.0

    def hypotheses(self, sched, table, config, variant):
        if sched.config.solver_order != 3:
            return {}
        cls = _DPMSolverPPSkippedLast if self._null_last_step(sched) else DPMSolverPP
        return {"dpmsolver-3m-halved-d2": Hypothesis(
            "the released DPM-Solver++ 3M update halves the D'' term (local error O(h^3): global order 2)",
            "sampler", cls(3, halved_d2=True))}

    @staticmethod
    def _null_last_step(sched) -> bool:
        sig = _numpy(sched.sigmas)
        return len(sig) > 1 and sig[-1] == sig[-2]

    def _null_step_change(self, config) -> float:
        """Run the target alone (float32, the oracle's outputs at its own levels) and return max |x_out - x_in| of
        its last step (the null one): 0 when it returns the sample unchanged, inf / nan when it is not finite."""
        import torch

        sched = self.make(self.scheduler_config(config), config.get("variant", next(iter(self.variants))))
        sched.set_timesteps(config["steps"], **self.set_timesteps_kwargs(config))
        model, sig = self.model(config["prediction_type"]), _numpy(sched.sigmas)
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 4))).to(torch.float32)
        change = 0.0
        for i, t in enumerate(sched.timesteps):
            a = 1.0 / np.sqrt(1.0 + sig[i] ** 2)
            m = model(x.double().numpy(), Level(int(t), a, sig[i] * a, None))
            out = sched.step(torch.from_numpy(np.asarray(m)).to(torch.float32), t, x).prev_sample
            with np.errstate(invalid="ignore"):
                change = float(np.max(np.abs(out.double().numpy() - x.double().numpy())))
            x = out
        return change if np.isfinite(change) else float("nan")

    def calls(self, sched) -> list:
        """A last step from the noisiest level to itself (h = 0) is not replayed: grid_findings runs it and checks
        that it returns the sample unchanged."""
        ts = list(sched.timesteps)
        return ts[:-1] if self._null_last_step(sched) else ts

    def grid_findings(self, sched, config, kw, ref):
        out = self._grid_findings(sched, config, kw, ref)
        if self._null_last_step(sched):
            ts = _numpy(sched.timesteps)
            moved = self._null_step_change(config)
            if moved != 0.0:
                import torch

                # the mechanism, checked in float32: a third-order last step (no lower_order_final from 15 steps on)
                # forms r0 = h0 / h = inf and r0 / (r0 + r1) = inf / inf = NaN
                h0 = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(0.0, dtype=torch.float32)
                third = sched.config.solver_order == 3 and len(ts) >= 15
                known = third and not np.isfinite(moved) and bool(torch.isnan(h0 / (h0 + 1.0)))
                out.append(Finding(
                    "nonfinite" if not np.isfinite(moved) else "step",
                    f"with timestep_spacing='trailing' the last step goes from the noisiest level to itself (h = 0), "
                    f"and there the target changes the sample by {moved:.3g} (max abs) instead of returning it"
                    + (": its third-order update forms r0 = h0 / h = inf and r0 / (r0 + r1) = inf / inf = NaN, so "
                       "the whole inverted latent is NaN" if known else ""),
                    explained=known, id="diffusers-dpm-inverse-trailing-3m-nan" if known else None,
                    evidence={"timesteps": ts.tolist(), "change": moved}))
                return out
            out.append(Finding(
                "grid", f"with timestep_spacing='trailing' the timesteps run {ts[0]:g} .. {ts[-1]:g} and the closing "
                        f"level is the noisiest timestep {sched.noisiest_timestep} again: the last step goes from a "
                        "level to itself (h = 0, one model call that changes nothing; with 1 step nothing is "
                        f"inverted), and the first starts at t = {ts[0]:g}, not at the table's start",
                explained=True, id="diffusers-dpm-inverse-trailing",
                evidence={"timesteps": ts.tolist(), "sigmas": _numpy(sched.sigmas).tolist()}))
        return out


class _IPNDMTransfer(Sampler):
    """iPNDM (Zhang & Chen 2023): Adams-Bashforth of order min(4, step + 1) with the fixed equal-step weights over
    the past noise predictions, E = sum_j w_j eps_j, then PNDM's transfer x' = alpha' (x - sigma E) / alpha + sigma' E.
    The same method as refdiff.samplers.IPNDM(4) (there d = eps in x / alpha; tested equal), written so that a first
    level at alpha = 0 is defined: x - sigma eps = alpha D, so the first step's x0 is the model's D.
    ``zero_x0_at_snr0``: the x0 read there as 0 instead (a hypothesis of the check)."""

    history_needed = 0
    order = 4
    snr_zero_start = True

    def __init__(self, zero_x0_at_snr0: bool = False):
        self.zero_x0_at_snr0 = bool(zero_x0_at_snr0)
        self.name = "iPNDM(transfer form)" + (", x0 = 0 at alpha = 0" if zero_x0_at_snr0 else "")

    def step(self, ctx, cur, nxt, state):
        x = ctx.x
        D = ctx.denoise(x, cur)
        eps = (x - D * cur.alpha) * (1.0 / np.asarray(cur.sigma))
        past = tuple(state.extra.get("eps", ()))
        k = min(4, len(past) + 1)
        E = adams_bashforth(eps, past, AB_WEIGHTS[k])
        if np.all(np.asarray(cur.alpha) == 0.0):
            if k != 1:
                raise ValueError("alpha = 0 is only defined at the first level")
            pred = D * 0.0 if self.zero_x0_at_snr0 else D
        else:
            pred = (x - E * cur.sigma) * (1.0 / np.asarray(cur.alpha))
        return pred * nxt.alpha + E * nxt.sigma, {"order": k, "eps": ((eps,) + past)[:3]}


class _IPNDM(_OwnLevels):
    """diffusers' IPNDMScheduler: iPNDM on its own trigonometric levels sigma = sin^2(s pi / 2), alpha =
    sqrt(1 - sigma^2) for s = 1 .. 0 in n equal steps (so the first level has alpha = 0), the network read as v
    (ets = sigma x + alpha v is its eps). No beta table, no prediction_type option."""

    name = "IPNDMScheduler"
    predictions = ("v_prediction",)
    schedules = ("trig",)

    def grid(self, sched, table):
        a, b = sched.alphas.double().numpy(), sched.betas.double().numpy()
        ts = list(_numpy(sched.timesteps)) + [0.0]
        with np.errstate(divide="ignore"):
            return Grid(Level(t, ai, bi, 2.0 * (np.log(ai) - np.log(bi))) for t, ai, bi in zip(ts, a, b))

    def grid_findings(self, sched, config, kw, ref):
        """sigma = sin(s pi / 2)^2 at s = linspace(1, 0, n + 1): float32 s (u s), the sine (u theta cot theta + u)
        and the square (twice that, plus u): within 8 u relative."""
        n = config["steps"]
        want = np.sin(np.linspace(1.0, 0.0, n + 1) * np.pi / 2.0) ** 2
        return [TB.compare_sigmas(_numpy(sched.betas), want, np.full(n + 1, 8.0 * TB.U32), what="sigmas (betas)")]

    def sampler(self, sched, table, grid, variant=""):
        return _IPNDMTransfer()

    def hypotheses(self, sched, table, config, variant):
        return {"diffusers-ipndm-snr0-x0": Hypothesis(
            "at the first level (alpha = 0) the x0 prediction (x - sigma ets) / max(alpha, 1e-8) is 0 / 1e-8 = 0, "
            "dropping the model's D (its v output enters only through ets = x there)", "sampler",
            _IPNDMTransfer(zero_x0_at_snr0=True))}


class _PLMSDiffusers(Sampler):
    """PLMS as diffusers' PNDMScheduler runs it (a hypothesis of the check): every step goes from t to t - T // N
    (``targets``), the Heun warm-up's Euler point too, and its corrected step from t1 + T // N to t1 (``heun_from``);
    with ``raw_v`` the Adams-Bashforth combination is taken over the raw v outputs and converted to eps only at the
    step's start (eps = alpha v + sigma x), where the paper combines noise predictions."""

    history_needed = 0
    order = 4

    def __init__(self, targets, heun_from, raw_v: bool):
        self.targets, self.heun_from, self.raw_v = targets, heun_from, bool(raw_v)
        self.name = "PLMS (diffusers' stepping" + (", AB over raw v)" if raw_v else ")")

    def _out(self, ctx, x, level):
        """The quantity combined: eps, or the raw v = (alpha x - D) / sigma."""
        D = ctx.denoise(x, level)
        if self.raw_v:
            return (x * level.alpha - D) * (1.0 / np.asarray(level.sigma))
        return (x - D * level.alpha) * (1.0 / np.asarray(level.sigma))

    def _eps(self, combo, x, level):
        return combo * level.alpha + x * level.sigma if self.raw_v else combo

    def step(self, ctx, cur, nxt, state):
        from ...samplers.pndm import _transfer

        x, i = ctx.x, state.step
        past = tuple(state.extra.get("m", ()))
        m = self._out(ctx, x, cur)
        if i == 0:                    # Euler to t0 - T // N, the model at t1 there, Heun from t1 + T // N to t1
            x_e = _transfer(x, self._eps(m, x, cur), cur, self.targets[0])
            m2 = self._out(ctx, x_e, nxt)
            start = self.heun_from
            return _transfer(x, self._eps((m + m2) * 0.5, x, start), start, nxt), {"order": 2, "m": (m,)}
        k = min(len(past) + 1, 4)
        combo = adams_bashforth(m, past, AB_WEIGHTS[k])
        return _transfer(x, self._eps(combo, x, cur), cur, self.targets[i]), {"order": k, "m": (m,) + past[:2]}


class _PNDM(_Adapter):
    """PNDMScheduler with skip_prk_steps=True (PLMS, Stable Diffusion's setting; refdiff.samplers.PNDM("plms")): a
    Heun warm-up (two calls), then AB2, AB3, AB4 on the noise prediction with PNDM's transfer (formula (9)). diffusers
    lists the warm-up's second timestep twice (n + 1 calls for n steps); with one step it makes one call, the
    warm-up's Euler (DDIM) step alone, which is what the check runs then."""

    name = "PNDMScheduler"
    predictions = ("epsilon", "v_prediction")          # diffusers raises for "sample"

    def make(self, config, variant):
        self.v_prediction = config.get("prediction_type") == "v_prediction"      # read by formula_terms
        return self.cls(**config, skip_prk_steps=True, set_alpha_to_one=False)

    @staticmethod
    def _null_last_step(sched) -> bool:
        """linspace spacing lists t = 0 last, and with set_alpha_to_one=False its step goes to alpha_bar_0 again."""
        return int(sched.timesteps[-1]) == 0 and not sched.config.set_alpha_to_one

    def calls(self, sched):
        ts = list(sched.timesteps)
        return ts[:-1] if self._null_last_step(sched) else ts

    def grid(self, sched, table):
        starts = self.step_starts(np.asarray(self.calls(sched)))   # the repeated warm-up timestep is one level
        return Grid([_level(table, t) for t in starts] + [_level(table, 0)])

    def step_starts(self, ts):
        return np.concatenate([ts[:1], ts[2:]])

    def table_findings(self, sched, config):
        out = super().table_findings(sched, config)
        if self._null_last_step(sched):
            only = len(sched.timesteps) == 1
            out.append(Finding(
                "grid", "linspace spacing lists t = 0 last and, with set_alpha_to_one=False, that step goes from "
                        "alpha_bar_0 to alpha_bar_0: formula (9) returns the sample unchanged (alpha_bar_prev - "
                        "alpha_bar_t = 0 exactly), " + ("and with one step it is the only one: the noise x_T comes "
                                                         "back as the result" if only else
                                                         "one model call of the n + 1 that does nothing")
                        + "; not replayed",
                explained=True, id="diffusers-pndm-linspace-null-step",
                evidence={"timesteps": _numpy(sched.timesteps).tolist()}))
        return out

    def grid_findings(self, sched, config, kw, ref):
        spacing = kw.get("timestep_spacing", "linspace")
        want = S.timesteps(kw["num_train_timesteps"], config["steps"], spacing, kw.get("steps_offset", 0),
                           family=self.timestep_family)
        return [TB.compare_timesteps(self.step_starts(_numpy(sched.timesteps)), want)]

    def sampler(self, sched, table, grid, variant=""):
        # one step: diffusers lists one timestep and takes the warm-up's Euler step alone, the DDIM step
        return DDIM(0.0) if len(sched.timesteps) == 1 else PNDM("plms")

    def formula_terms(self, ctx, cur, nxt, state, extra):
        """Formula (9) forms alpha_bar_prev - alpha_bar_t in float32 (error u (alpha_bar_prev + alpha_bar_t)) and
        divides by alpha_bar_t sqrt(1 - alpha_bar_prev) + sqrt(alpha_bar_t (1 - alpha_bar_t) alpha_bar_prev): the
        term is |combined eps| (alpha_bar_prev + alpha_bar_t) / that, bounded by sum |w| max |eps_j|."""
        ab_t, ab_p = np.asarray(cur.alpha) ** 2, np.asarray(nxt.alpha) ** 2
        den = ab_t * np.sqrt(1.0 - ab_p) + np.sqrt(ab_t * (1.0 - ab_t) * ab_p)
        eps = [np.abs(e.v) for e in extra.get("eps", ())]
        if not eps:                          # the one-step DDIM: the eps of its one evaluation
            D = ctx.evaluated[0].v
            eps = [np.abs(ctx.x.v - D * np.asarray(cur.alpha)) / np.asarray(cur.sigma)]
        big = np.max(np.stack(eps), axis=0) * sum(abs(w) for w in AB_WEIGHTS[max(1, min(extra.get("order", 1), 4))])
        out = big * (ab_p + ab_t) / den
        if getattr(self, "v_prediction", False):
            # v is turned into eps = alpha v + sigma x in float32 (two rounded coefficients, a product each, a sum:
            # 3 u of |alpha v| + |sigma x| <= |eps| + 2 |sigma x|), then scaled by (9)'s eps coefficient, which
            # cancels against sqrt(alpha_bar_prev / alpha_bar_t) x when alpha_t is small
            c = np.abs(ab_p - ab_t) / den
            out = out + 3.0 * c * (big + 2.0 * np.abs(np.asarray(cur.sigma)) * np.abs(ctx.x.v))
        return out

    def hypotheses(self, sched, table, config, variant):
        T, n = sched.config.num_train_timesteps, sched.num_inference_steps
        grid = self.grid(sched, table)
        if len(grid.levels) == 2 and len(self.calls(sched)) == 1:
            return {}                            # one step: the DDIM step, to t - T // N = the end
        final = grid.levels[-1]
        targets = [final if int(lv.t) - T // n < 0 else _level(table, int(lv.t) - T // n) for lv in grid.levels[:-1]]
        heun_from = _level(table, int(sched.timesteps[1]) + T // n)      # the warm-up's second listed timestep
        stepping = "steps to t - T // N, the warm-up corrected from t1 + T // N (diffusers #12633's convention)"
        raw_v = "the Adams-Bashforth combination taken over raw v outputs, converted to eps at the step's start"
        if config["prediction_type"] != "v_prediction":
            return {"diffusers-12633": Hypothesis(f"PLMS {stepping}", "sampler",
                                                  _PLMSDiffusers(targets, heun_from, False))}
        return {"diffusers-pndm-raw-v": Hypothesis(f"PLMS with {raw_v}", "sampler",
                                                   _PLMSDiffusers(grid.levels[1:], grid.levels[0], True)),
                "diffusers-pndm-raw-v+12633": Hypothesis(f"PLMS with {raw_v}; it {stepping}", "sampler",
                                                         _PLMSDiffusers(targets, heun_from, True))}


class _SASolverOrders(SASolver):
    """SA-Solver (refdiff.samplers.SASolver, data prediction) with diffusers' order plan: with lower_order_final the
    predictor of step i uses min(p, i + 1, n - i) evaluations and the corrector at step i min(c, i + 1, n - i + 2)
    (the order chosen one step earlier); ComfyUI lowers only when the grid ends at the data. ``taylor2``: the order-2
    weights of SA-Solver's released code (diffusers keeps its comment "a modification that does not influence the
    convergence order similar to UniPC"): the exact second-order integral replaced by its leading Taylor term, i.e.
    k alpha_t Q moved from the older to the newer evaluation, Q = h^2 / 2 - (k h - 1 + e^{-k h}) / k^2 over
    (lambda_s - lambda_prev) in the predictor, Q = h / 2 - (k h - 1 + e^{-k h}) / (k^2 h) in the corrector."""

    def __init__(self, p, c, tau, n_steps: int, taylor2: bool = False):
        super().__init__(p, c, tau)
        self.n_steps, self.taylor2 = n_steps, bool(taylor2)
        if taylor2:
            self.name += "(order-2 Taylor weights)"

    def _orders(self, i, n_evals, n_levels, to_data):
        p = min(self.p, i + 1, self.n_steps - i)
        c = 0 if i == 0 else min(self.c, i + 1, self.n_steps - i + 2)
        return p, c

    def step(self, ctx, cur, nxt, state):
        out, extra = super().step(ctx, cur, nxt, state)
        return out, {**extra, "corrector_order": self._orders(state.step, 0, 0, False)[1]}

    def _weights(self, nodes, lam_s, lam_t, tau, alpha_t, corrector):
        b = super()._weights(nodes, lam_s, lam_t, tau, alpha_t, corrector)
        if not self.taylor2 or len(nodes) != 2:
            return b
        k, h = 1.0 + tau * tau, lam_t - lam_s
        rest = (k * h + np.expm1(-k * h)) / (k * k)                     # k h - 1 + e^{-k h}, over k^2
        q = (h / 2.0 - rest / h) if corrector else (h * h / 2.0 - rest) / (nodes[-1] - nodes[-2])
        b = np.array(b, dtype=np.float64)
        b[-1] += k * alpha_t * q
        b[-2] -= k * alpha_t * q
        return b


class _SASolver(_RecordedStepNoise, _Adapter):
    """diffusers' SASolverScheduler (data prediction, predictor and corrector of order 2 by default, tau = 1 for
    timesteps in [200, 800] and 0 outside, evaluated at each step's start): refdiff.samplers.SASolver with diffusers'
    order plan. Its step() corrects the sample it is given with the new model output, then predicts from the
    corrected one: one call per step, the reference's step. It draws noise every step; the draws of steps with
    tau > 0 are the ones used (recorded)."""

    name = "SASolverScheduler"
    lambda_terms = True
    timestep_family = "dpmsolver"
    predictions = ("epsilon", "v_prediction", "sample")
    variants = {"2/2": dict(predictor_order=2, corrector_order=2), "3/3": dict(predictor_order=3, corrector_order=3)}

    def make(self, config, variant):
        return self.cls(**config, **self.variants[variant])

    def grid(self, sched, table):
        return Grid(_vp_levels(sched))

    def grid_findings(self, sched, config, kw, ref):
        out = super().grid_findings(sched, config, kw, ref)
        if ref is not None:                 # it ends at the table's first level, as DEIS
            sig, bound = _vp_sigma_grid(kw, config["steps"], ref, "dpmsolver", final="first")
            out.append(TB.compare_sigmas(_numpy(sched.sigmas), sig, bound))
        return out

    def _tau(self, sched):
        """tau as refdiff's sampler asks it (at the step's target sigma): diffusers' tau at the step's start."""
        # looked up by the nearest target level (the rounding probe moves levels by ~1e-7 in log-SNR)
        log_sig = np.log([float(np.asarray(lv.sigma_ve)) for lv in self.grid(sched, None).levels[1:]])
        taus = [float(sched.tau_func(int(t))) for t in np.asarray(sched.timesteps)]
        return lambda sigma: taus[int(np.argmin(np.abs(log_sig - np.log(float(np.asarray(sigma))))))]

    def sampler(self, sched, table, grid, variant=""):
        c = sched.config
        return _SASolverOrders(c.predictor_order, c.corrector_order, self._tau(sched), len(sched.timesteps))

    def hypotheses(self, sched, table, config, variant):
        c = sched.config
        return {"sa-solver-order2-taylor": Hypothesis(
            "SA-Solver's released order-2 weights (the exact second-order integral replaced by its leading Taylor "
            "term, in predictor and corrector)", "sampler",
            _SASolverOrders(c.predictor_order, c.corrector_order, self._tau(sched), len(sched.timesteps), True))}

    def formula_terms(self, ctx, cur, nxt, state, extra):
        """diffusers forms each weight from moments int e^{k x} x^m dx about 0, e^{k lam_t} (poly_m(k lam_t) -
        poly_m(k lam_s) e^{-k h}) / k^(m+1), in float32, then combines them with the Lagrange basis' monomial
        coefficients: as for DEIS, the error of weight j is alpha_t (k sum |lambda| + 2)^(n-1) / |prod_m (lambda_j -
        lambda_m)| units of u (n nodes), for the corrector's redo of the last step and for the predictor."""
        Ds, lams = extra["D"], extra["lam"]
        k = 1.0 + extra.get("tau", 0.0) ** 2
        stages = []
        c, p = extra.get("corrector_order", 0), extra.get("order", 0)
        if c >= 2:
            stages.append((lams[-c:], Ds[-c:], float(np.asarray(cur.lam)), np.asarray(cur.alpha)))
        if p >= 2 and not nxt.is_data:
            stages.append((lams[-p:], Ds[-p:], float(np.asarray(nxt.lam)), np.asarray(nxt.alpha)))
        total = 0.0
        for nodes, D, end, alpha in stages:
            n = len(nodes)
            mags = k * (sum(abs(v) for v in nodes) + abs(end)) + 2.0
            for j in range(n):
                den = np.prod([nodes[j] - nodes[m] for m in range(n) if m != j])
                total = total + alpha * np.abs(D[j].v) * mags ** (n - 1) / abs(den)
        return total

    module = "scheduling_sasolver"

    def _keep(self, sched, t) -> bool:
        return sched.tau_func(int(t)) > 0


class _VEPredictorCorrector(Sampler):
    """score_sde's PC sampler on the VE SDE as diffusers' ScoreSdeVeScheduler runs it (Song et al. 2021, Alg. 2 with
    the reverse-diffusion predictor): per level, ``n_corrector`` Langevin steps x <- x + e s + sqrt(2 e) z with
    e = 2 (snr mean_b ||z_b|| / mean_b ||s_b||)^2 (norms per sample, averaged over the batch: score_sde's step size),
    then x' = x + (sigma^2 - sigma'^2) s + sqrt(sigma^2 - sigma'^2) z. ``ctx.denoise`` returns the model's score
    itself (the adapter reads the output with coefficients (0, 1)). The step size's float32 error is carried by hand:
    each norm's relative bound (the operands' bounds and the reduction's roundings) doubled by the square."""

    stochastic = True
    history_needed = 0

    def __init__(self, snr: float, n_corrector: int):
        self.snr, self.n_corrector = float(snr), int(n_corrector)
        self.name = f"PC(reverse diffusion + Langevin, snr={snr:g}, n={n_corrector})"

    def _langevin(self, ctx, x, s):
        from ..rounding import Bounded

        z = ctx.noise()
        bounded = isinstance(s, Bounded)
        sv, zv = (s.v, z.v) if bounded else (s, z)
        axes = tuple(range(1, np.ndim(sv)))
        ns = np.sqrt(np.sum(sv ** 2, axis=axes))
        nz = np.sqrt(np.sum(zv ** 2, axis=axes))
        e = 2.0 * (self.snr * np.mean(nz) / np.mean(ns)) ** 2
        if not bounded:                                                  # a plain float64 run
            return x + s * e + z * np.sqrt(2.0 * e)
        m = float(np.prod(np.shape(sv)[1:]))                             # elements per sample (summation roundings)
        ns_e = np.sqrt(np.sum(s.e ** 2, axis=axes)) + (m + 2.0) * ns     # |d||s||| <= ||ds|| + reduction
        rel = 2.0 * (np.mean(ns_e) / np.mean(ns) + (m + 2.0)) + 6.0        # e = 2 (snr nz / ns)^2
        step = s._scaled(e)
        step = Bounded(step.v, step.e + rel * np.abs(step.v))
        kick = z._scaled(np.sqrt(2.0 * e))
        kick = Bounded(kick.v, kick.e + (rel / 2.0 + 2.0) * np.abs(kick.v))
        return x + step + kick

    def step(self, ctx, cur, nxt, state):
        x = ctx.x
        for _ in range(self.n_corrector):
            x = self._langevin(ctx, x, ctx.denoise(x, cur))
        s = ctx.denoise(x, cur)
        var = np.asarray(cur.sigma) ** 2 - np.asarray(nxt.sigma) ** 2
        return x + s * var + ctx.noise() * np.sqrt(var), {}


class _ScoreSdeVe(_RecordedStepNoise, _OwnLevels):
    """diffusers' ScoreSdeVeScheduler (NCSN++ / score_sde's VE sampler): the pipeline's loop, n_corrector
    step_correct calls then one step_pred per timestep, is the adapter's step(); set_timesteps(n) also sets the n
    sigmas, as the pipeline does. The model output is the score; the levels are its discrete sigmas (the ones
    step_pred uses), indexed by (t (n - 1)).long()."""

    name = "ScoreSdeVeScheduler"
    predictions = ("score",)
    schedules = ("ve",)
    module = "scheduling_sde_ve"
    N_CORRECTOR = 1
    step_call = f"score-sde-pc:{N_CORRECTOR}"      # how the reproducer script drives it

    def make(self, config, variant):
        sched = self.cls(**config)
        set_timesteps, n_corr = sched.set_timesteps, self.N_CORRECTOR

        def both(n, *a, **k):                      # the pipeline's set_timesteps + set_sigmas
            set_timesteps(n, *a, **k)
            sched.set_sigmas(n)
        sched.set_timesteps = both

        def step(model_output, timestep, sample, generator=None):
            k = getattr(sched, "_refdiff_call", 0)
            sched._refdiff_call = k + 1
            if k % (n_corr + 1) < n_corr:
                return sched.step_correct(model_output, sample, generator=generator)
            return sched.step_pred(model_output, timestep, sample, generator=generator)
        sched.step = step
        return sched

    def calls(self, sched):
        return [t for t in sched.timesteps for _ in range(self.N_CORRECTOR + 1)]

    def _indices(self, sched):
        import torch

        ts = sched.timesteps.to(torch.float32)
        return (ts * (len(sched.timesteps) - 1)).long().numpy()

    def grid(self, sched, table):
        sig = sched.discrete_sigmas.double().numpy()[self._indices(sched)]
        return Grid([Level(float(s), 1.0, float(s), -2.0 * np.log(s)) for s in sig] + [Level(0.0, 1.0, 0.0, np.inf)])

    def grid_findings(self, sched, config, kw, ref):
        """The discrete sigmas exp(linspace(log sigma_min, log sigma_max, n)) (float32 linspace and exp: relative
        |log sigma| u + 2 u), and step i reading index n - 1 - i."""
        n = config["steps"]
        c = sched.config
        want = np.exp(np.linspace(np.log(c.sigma_min), np.log(c.sigma_max), n))
        bound = (np.abs(np.log(want)) + 2.0) * TB.U32
        out = [TB.compare_sigmas(_numpy(sched.discrete_sigmas), want, bound, what="discrete sigmas")]
        if n == 1 and c.sigma_min != c.sigma_max:
            out.append(Finding("grid", f"one step runs at sigma_min = {c.sigma_min:g}, not sigma_max = "
                                       f"{c.sigma_max:g}: exp(linspace(log sigma_min, log sigma_max, 1)) is "
                                       "[sigma_min], while the pipeline starts from sigma_max noise "
                                       "(init_noise_sigma); the step barely denoises it",
                               explained=True, id="diffusers-score-sde-ve-one-step",
                               evidence={"discrete_sigmas": _numpy(sched.discrete_sigmas).tolist()}))
        idx = self._indices(sched)
        if not np.array_equal(idx, np.arange(n)[::-1]):
            out.append(Finding("grid", f"step_pred reads sigma index (t (n - 1)).long() = {idx.tolist()}, not "
                                       f"n - 1 - i: float32 t = linspace(1, eps, n) times n - 1 truncates below",
                               evidence={"indices": idx.tolist()}))
        return out

    def coeffs(self, prediction, level):
        return 0.0, 1.0                   # the sampler reads the score itself

    def model(self, prediction):
        def score(x, level):
            s = float(np.asarray(level.sigma))
            return (ORACLE.denoise(x, 1.0, s) - x) / (s * s)
        return score

    def x_T_scale(self, sched, grid):
        return float(sched.init_noise_sigma)

    def sampler(self, sched, table, grid, variant=""):
        return _VEPredictorCorrector(sched.config.snr, self.N_CORRECTOR)

    def formula_terms(self, ctx, cur, nxt, state, extra):
        """diffusers forms sigma^2 - sigma'^2 in float32 (error u (sigma^2 + sigma'^2)): in the drift |s| times that,
        in the noise |z| sqrt(var) times half its relative error."""
        s2, n2 = float(np.asarray(cur.sigma)) ** 2, float(np.asarray(nxt.sigma)) ** 2
        s = ctx.evaluated[-1].v
        z = ctx.draws[-1]
        var = s2 - n2
        return np.abs(s) * (s2 + n2) + np.abs(z) * np.sqrt(var) * (s2 + n2) / (2.0 * var)


class _DDPMParallel(_DDPM):
    """DDPMScheduler's batched-timestep variant (ParaDiGMS); its step() is DDPM's."""

    name = "DDPMParallelScheduler"


SCHEDULERS = {a.name: a for a in (_DDIM, _DDPM, _DPMMultistep, _DPMSinglestep, _DPMSDE, _UniPC, _DEIS, _Euler, _EulerA,
                                  _Heun, _KDPM2, _LMS, _EDMEuler, _FlowMatchEuler, _DDIMParallel, _DDPMParallel,
                                  _KDPM2A, _FlowMatchHeun, _EDMDPM, _LCM, _TCD, _CM, _CogVideoXDDIM,
                                  _CogVideoXDPM, _DDIMInverse, _DPMInverse,
                                  _CosineDPM, _IPNDM, _PNDM, _SASolver,
                                  _FlowMatchLCM, _ScoreSdeVe, _SCM,
                                  _LTXEulerAncestralRF, _MiniMaxH3,
                                  _FlowMapEuler, _DDPMWuerstchen)}

_DISCRETE = "discrete-token (masked / uniform corruption) generation over a vocabulary: no continuous diffusion " \
            "maths to judge, out of scope"
# every other scheduler of diffusers 0.42, and why the check does not run it (``refdiff check --list``)
NOT_MAPPED_REASONS = {
    "AmusedScheduler": _DISCRETE, "VQDiffusionScheduler": _DISCRETE, "BlockRefinementScheduler": _DISCRETE,
    "EntropyBoundScheduler": _DISCRETE, "DiscreteDDIMScheduler": _DISCRETE,
    "UnCLIPScheduler": "deprecated by diffusers (\"do not use\"): DDPMScheduler covers it",
    "RePaintScheduler": "inpainting resampling loop (jumps back in time inside a mask): not a sampler on a grid",
    "KarrasVeScheduler": "deprecated stochastic EDM sampler (EDMEulerScheduler with churn is checked)",
    "PiflowScheduler": "PiFlow's network-free policy between model evaluations: no oracle in refdiff yet",
    "RFD4ProteinaScheduler": "protein-structure flow sampler with two coupled modalities: out of scope",
    "HeliosScheduler": "Helios' pyramid sampler: stages over stage_range, each re-noised from the previous stage's "
                       "upsampled result (start_sigmas), Euler or UniPC within a stage; the stage transitions act on "
                       "resolution, which the check's oracle has none of (the within-stage maths is FlowMatchEuler's "
                       "and UniPC's, both mapped)",
    "HeliosDMDScheduler": "Helios' distilled (DMD) pyramid sampler: as HeliosScheduler, stages joined by upsampling "
                          "and re-noising, which the check's oracle cannot model",
}


def scheduler_listing(diffusers) -> list:
    """(name, "mapped" | "not mapped", reason or variants) for every scheduler class diffusers exports."""
    names = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax"))
    out = []
    for n in names:
        if n in SCHEDULERS:
            a = SCHEDULERS[n](diffusers)
            out.append((n, "mapped", "variants: " + (", ".join(v or "default" for v in a.variants))))
        else:
            out.append((n, "not mapped", NOT_MAPPED_REASONS.get(n, "new in this diffusers release: not mapped yet")))
    return out


def default_cases(adapter, quick: bool = False):
    """The configurations to run for one adapter: every variant over schedules x spacings x steps x predictions in
    float32 (zero terminal SNR with v prediction only: eps cannot give x0 at alpha = 0), plus a float16 / bfloat16
    slice. ``quick``: the report's reduced grid."""
    # quick: the first schedule, plus squaredcos_cap_v2 (sigma_max ~ 2e4) and zero terminal SNR where they apply
    schedules = tuple(b for b in adapter.schedules if b in (adapter.schedules[0], "squaredcos_cap_v2", "zero_snr")) \
        if quick else adapter.schedules
    spacings = adapter.spacings[:2] if quick else adapter.spacings
    steps = (1, 3, 10) if quick else (1, 2, 3, 10, 25, 50)
    preds = adapter.predictions[:1] if quick else adapter.predictions
    out = []
    for variant in adapter.variants:
        for b in schedules:
            # at zero terminal SNR alpha_T = 0: only v (or x0) prediction defines x0 there
            for p in (("v_prediction",) if "v_prediction" in adapter.predictions else ()) if b == "zero_snr" else preds:
                out += [dict(variant=variant, beta_schedule=b, timestep_spacing=sp, steps=n, prediction_type=p,
                             dtype="float32") for sp in spacings for n in steps]
        spacing = "trailing" if "trailing" in adapter.spacings else adapter.spacings[0]
        if adapter.img2img:          # img2img: the run starts part-way (strength 0.5, and 0.6 of 25 steps)
            out += [dict(variant=variant, beta_schedule=adapter.schedules[0], timestep_spacing=spacing, steps=n,
                         prediction_type=adapter.predictions[0], dtype="float32", begin=k)
                    for n, k in (((10, 5),) if quick else ((10, 5), (25, 10)))]
        for dt in (DTYPES[1:2] if quick else DTYPES[1:]):
            out += [dict(variant=variant, beta_schedule=adapter.schedules[0], timestep_spacing=spacing, steps=n,
                         prediction_type=adapter.predictions[0], dtype=dt) for n in ((10,) if quick else (3, 10, 25))]
    return [c for c in out if adapter.supports(c)]


# the step protocol's target lives in its own plug-in module (it builds on _Adapter); re-exported for the old name
from .protocol import PROTOCOL_SAMPLERS, ProtocolAdapter  # noqa: E402,F401
