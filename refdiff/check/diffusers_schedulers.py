"""Drive diffusers' schedulers and the float64 reference with identical inputs.

Each case: a scheduler configuration (beta schedule, timestep spacing, step count, prediction type, sample dtype),
an oracle (Gaussian mixture) as the model, the same noise (diffusers' torch.Generator draws, replayed for the
reference). Every refdiff step is the sampler's paper form run on ``Bounded`` values (refdiff.check.rounding): each
time the paper form evaluates the model, diffusers' ``step`` is called once on its own current sample and the model
output it gets is the one the reference uses (so multi-stage samplers such as Heun, KDPM2 and DPM-Solver++(2S)
consume one diffusers call per stage). The step then yields the reference value and a running bound e of the
float32 rounding of the same formula; the rule is

    |diffusers - refdiff| <= R u (e + formula terms),   R = 4, u = unit roundoff of the sample dtype,

where R allows the coefficients diffusers forms in float32 (up to three operations each: a ratio, a square root,
an exponential) and the formula terms add what the paper form does not see: float32 differences of levels that
cancel (sigma_next - sigma, 1 - alpha_bar_t / alpha_bar_s). Per-step inputs are resynchronised (diffusers' sample,
and UniPC's stored corrected sample), so a step is judged on its own; end-to-end errors are reported beside.
When a step disagrees, alternative hypotheses (a known convention or bug) are re-run as references; one that
reproduces diffusers under the same rule is reported as the explanation.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import replace

import numpy as np

from .. import schedules as S
from ..convergence import oracle_model
from ..oracles import GaussianMixture
from ..samplers import (DDIM, DDPM, DEIS, DPM2, LMS, DPMSolverPP, DPMSolverPPSDE, DPMSolverPPSinglestep, Euler,
                        EulerAncestral, Grid, Heun, Level, SDEDPMSolverPP2M, UniPC, model_coeffs)
from ..samplers.base import NumericContext, State
from ..samplers.dpm_solver import lagrange_antiderivatives
from ..solve import sample
from .rounding import Bounded, BoundedContext, exact

__all__ = ["SCHEDULERS", "UNMAPPED", "R", "run_case", "default_cases", "ProtocolAdapter", "PROTOCOL_SAMPLERS"]

R = 4                               # coefficient roundings per term (see the module docstring)
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
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
    stochastic = False
    dt_terms = False               # diffusers forms sigma_next - sigma in float32 (Euler-type updates)
    lambda_terms = False           # diffusers forms lambda = log alpha - log sigma in float32 (exponential integrators)
    variants = {"": {}}            # label -> scheduler kwargs: each variant is its own set of cases
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

    def sampler(self, sched, table, grid):
        raise NotImplementedError

    def coeffs(self, prediction: str, level: Level):
        """(c_x, c_m): diffusers' data prediction x0 = c_x x + c_m m at ``level``, in the reference's space."""
        return model_coeffs(PREDICTIONS[prediction], level.alpha, level.sigma)

    def model(self, prediction: str):
        """The oracle as diffusers' model: (x in diffusers' space, level) -> output in diffusers' convention."""
        exact_vp = oracle_model(ORACLE, PREDICTIONS[prediction])
        return lambda x, level: exact_vp(x, Level(None, level.alpha, level.sigma, None))

    def x_T_scale(self, sched, grid) -> float:
        return float(np.asarray(grid.levels[0].sigma))

    def formula_terms(self, ctx, cur: Level, nxt: Level, state: State, extra: dict):
        """Magnitudes (units of u) the paper form does not see: level differences diffusers forms in float32 that
        cancel. Euler-type updates x + d (sigma_next - sigma): dt has error u sigma, i.e. u |x - D| per stage."""
        if not self.dt_terms:
            return 0.0
        return sum(np.abs(u.v) + np.abs(u.v - d.v) for u, _, d in ctx.stages)

    def step_starts(self, ts):
        """The timesteps at which steps start (two-stage schedulers list the inner ones twice by design)."""
        return ts

    def sync(self, sched, bstate: State) -> State:
        """Resynchronise state diffusers keeps beyond the sample (e.g. UniPC's corrected sample)."""
        return bstate

    def noise_recorder(self, sched, x):
        """A list that collects the noise diffusers draws from its own sampler (replayed in order for the reference),
        or None when it draws from the torch.Generator passed to step()."""
        return None

    def hypotheses(self, sched, table, config, variant):
        """label -> ("sampler", alternative sampler) or ("pairs", [(cur, nxt) per step]) for a single-stage sampler."""
        return {}

    def explain_nonfinite(self, sched):
        """A known cause of non-finite outputs, checked directly; None when there is none to check."""
        return None

    def explain_exception(self, sched, exc):
        """A known cause of the target raising mid-run, checked directly; None when there is none."""
        ts = np.asarray(sched.timesteps)
        if len(ts) > 1 and ts[0] == ts[1] and hasattr(sched, "index_for_timestep"):
            start = sched.index_for_timestep(sched.timesteps[0])
            if start != 0:
                k = int(np.sum(ts == ts[0]))
                return (f"explained: duplicate timesteps (diffusers #12771) — {k} sigmas round to t = {ts[0]:g}; "
                        f"diffusers' "
                        f"index_for_timestep starts the run at the second occurrence (index {start}), skipping "
                        f"sigma_0, and steps past the end ({type(exc).__name__}: {exc})")
        return None


class _DDIM(_Adapter):
    name = "DDIMScheduler"

    def make(self, config, variant):
        return self.cls(**{"set_alpha_to_one": True, **config}, clip_sample=False)

    def sampler(self, sched, table, grid):
        return DDIM(0.0)

    def grid(self, sched, table):
        # set_alpha_to_one: the last step goes to the data; otherwise to alpha_bar_0 (diffusers' final_alpha_cumprod)
        final = "data" if sched.config.set_alpha_to_one or sched.timesteps[-1] == 0 else "first"
        return Grid.from_discrete(table, sched.timesteps.numpy(), final=final)

    def hypotheses(self, sched, table, config, variant):
        """diffusers #12633 / #11347: step() reads alpha_bar_prev at t - T // N, not at the next grid timestep."""
        T, n = sched.config.num_train_timesteps, sched.num_inference_steps
        ts = sched.timesteps.numpy()
        data = Level(-1, 1.0, 0.0, np.inf)
        pairs = [(_level(table, t), data if t - T // n < 0 else _level(table, t - T // n)) for t in ts]
        return {"prev_t = t - T // N (diffusers #12633, #11347)": ("pairs", pairs)}


class _DDPM(_Adapter):
    name = "DDPMScheduler"
    stochastic = True

    def make(self, config, variant):
        return self.cls(**config, variance_type="fixed_small", clip_sample=False)

    def sampler(self, sched, table, grid):
        return DDPM("fixed_small")

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
    lambda_terms = True
    variants = {"2M": dict(algorithm_type="dpmsolver++", solver_order=2),
                "2M Karras": dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
                "3M": dict(algorithm_type="dpmsolver++", solver_order=3),
                "sde-dpmsolver++": dict(algorithm_type="sde-dpmsolver++", solver_order=2)}

    def make(self, config, variant):
        return self.cls(**config, **self.variants[variant], final_sigmas_type="zero")

    def grid(self, sched, table):
        return Grid(_vp_levels(sched), table)

    def sampler(self, sched, table, grid):
        if sched.config.algorithm_type == "sde-dpmsolver++":
            return SDEDPMSolverPP2M()
        return DPMSolverPP(sched.config.solver_order)

    def hypotheses(self, sched, table, config, variant):
        if sched.config.solver_order != 3 or sched.config.algorithm_type != "dpmsolver++":
            return {}
        return {"the released DPM-Solver++ 3M update halves the D'' term (local error O(h^3): global order 2)":
                ("sampler", DPMSolverPP(3, halved_d2=True))}


class _DPMSinglestep(_Adapter):
    name = "DPMSolverSinglestepScheduler"
    lambda_terms = True
    spacings = ("-",)              # its own timesteps: linspace over the lambda-clipped range

    def make(self, config, variant):
        return self.cls(**config, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")

    @staticmethod
    def _plan(sched):
        """diffusers' order list [1, 2, 1, 2, ..., 1]: a 1 followed by a 2 is one 2S step whose intermediate level
        is the grid point between; a lone 1 is a first-order step. Returns (start positions, mid positions)."""
        orders, n = list(sched.order_list), len(sched.timesteps)
        starts, mids, i = [], [], 0
        while i < n:
            pair = orders[i] == 1 and i + 1 < n and orders[i + 1] == 2
            starts.append(i)
            mids.append(i + 1 if pair else None)
            i += 2 if pair else 1
        return starts, mids

    def grid(self, sched, table):
        levels = _vp_levels(sched)
        return Grid([levels[i] for i in self._plan(sched)[0]] + [levels[-1]], table)

    def sampler(self, sched, table, grid):
        levels = _vp_levels(sched)
        mids = [None if i is None else levels[i] for i in self._plan(sched)[1]]
        return DPMSolverPPSinglestep(intermediate=lambda step, cur, nxt: mids[step])


class _UniPC(_Adapter):
    name = "UniPCMultistepScheduler"
    lambda_terms = True

    def make(self, config, variant):
        return self.cls(**config, solver_order=2, solver_type="bh2", predict_x0=True, final_sigmas_type="zero")

    def sampler(self, sched, table, grid):
        return UniPC(2, "bh2")

    def grid(self, sched, table):
        return Grid(_vp_levels(sched), table)

    def sync(self, sched, bstate):
        """diffusers corrects from its stored float32 last_sample, not from the sample it returned: use it."""
        if bstate.step > 0 and getattr(sched, "last_sample", None) is not None:
            return replace(bstate, extra={**bstate.extra, "x_corrected": exact(sched.last_sample.double().numpy())})
        return bstate


class _DEIS(_Adapter):
    name = "DEISMultistepScheduler"
    lambda_terms = True
    variants = {"order 2": dict(solver_order=2), "order 3": dict(solver_order=3)}

    def grid(self, sched, table):
        # diffusers ends at sigma_last = sqrt((1 - alpha_bar_0) / alpha_bar_0), the table's index 0
        return Grid(_vp_levels(sched), table)

    def sampler(self, sched, table, grid):
        return DEIS(sched.config.solver_order)

    def formula_terms(self, ctx, cur, nxt, state, extra):
        """diffusers forms the DEIS coefficients A_j(log rho_t) - A_j(log rho_s) in float32 from float32 logs: each
        A_j divides by differences of log rho (relative error u sum |log rho| / |difference|) and its polynomial
        numerator sums terms up to (sum |log rho| + 2)^(k-1); the two values of A_j then cancel."""
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
            for j, A in enumerate(lagrange_antiderivatives(nodes, end)):
                den = [nodes[j] - nodes[m] for m in range(k) if m != j]
                cond = sum((np.abs(nodes[j]) + np.abs(nodes[m])) / np.abs(nodes[j] - nodes[m])
                           for m in range(k) if m != j)
                err = np.exp(end) * mags ** (k - 1) / np.abs(np.prod(den)) + np.abs(A) * cond
                total = total + np.asarray(nxt.alpha) * np.abs(eps[j].v) * err
        return total


class _VE(_Adapter):
    """diffusers' sigma-space schedulers: sample x / alpha, model input x / sqrt(1 + sigma^2)."""

    space = "ve"
    dt_terms = True

    def grid(self, sched, table):
        return Grid.from_sigmas(_dedupe(sched.sigmas.double().numpy()))

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


class _Euler(_VE):
    name = "EulerDiscreteScheduler"
    variants = {"": {}, "Karras": dict(use_karras_sigmas=True)}

    def sampler(self, sched, table, grid):
        return Euler()


class _EulerA(_VE):
    name = "EulerAncestralDiscreteScheduler"
    predictions = ("epsilon", "v_prediction")   # diffusers raises NotImplementedError for "sample"
    stochastic = True

    def sampler(self, sched, table, grid):
        return EulerAncestral()

    def explain_nonfinite(self, sched):
        """diffusers #14213: sigma_up^2 = sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2 rounded in float32 can
        exceed sigma_to^2 when sigma_from is huge (squaredcos_cap_v2: sigma ~ 2e4), so sigma_down = sqrt(negative)."""
        import torch

        sig = sched.sigmas.to(torch.float32)
        for i in range(len(sig) - 1):
            frm, to = sig[i], sig[i + 1]
            up = (to ** 2 * (frm ** 2 - to ** 2) / frm ** 2) ** 0.5
            if torch.isnan((to ** 2 - up ** 2) ** 0.5):
                return (f"explained: diffusers #14213 — at step {i} (sigma {float(frm):.6g} -> {float(to):.6g}) "
                        "float32 sigma_up^2 exceeds sigma_to^2, sigma_down = sqrt(negative) = NaN")
        return None


class _Heun(_VE):
    name = "HeunDiscreteScheduler"

    def step_starts(self, ts):
        return ts[::2]

    def sampler(self, sched, table, grid):
        return Heun()


class _KDPM2(_VE):
    name = "KDPM2DiscreteScheduler"
    predictions = ("epsilon", "v_prediction")   # diffusers raises NotImplementedError for "sample"

    def sampler(self, sched, table, grid):
        return DPM2()


class _DPMSDE(_VE):
    """k-diffusion's DPM-Solver++ SDE (eta = 1, r = 1/2) with noise from a torchsde Brownian tree: the check installs
    diffusers' own noise sampler, seeded, and records what each step draws for the reference."""

    name = "DPMSolverSDEScheduler"
    predictions = ("epsilon", "v_prediction")   # diffusers raises NotImplementedError for "sample"
    variants = {"": {}, "Karras": dict(use_karras_sigmas=True)}
    stochastic = True
    lambda_terms = True            # t = -log sigma and back in float32 (log sigma = -lambda)

    def make(self, config, variant):
        return self.cls(**config, **self.variants[variant], noise_sampler_seed=0)

    def sampler(self, sched, table, grid):
        return DPMSolverPPSDE(eta=1.0, r=0.5)

    def noise_recorder(self, sched, x):
        from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

        sig = sched.sigmas
        tree = BrownianTreeNoiseSampler(x, sig[sig > 0].min().item(), sig.max().item(), sched.config.noise_sampler_seed)
        drawn = []

        def recorded(sigma, sigma_next):
            with warnings.catch_warnings():     # torchsde notes float32 query points a rounding outside its interval
                warnings.simplefilter("ignore")
                z = tree(sigma, sigma_next)
            drawn.append(z.double().numpy())
            return z
        sched.noise_sampler = recorded
        return drawn


class _LMS(_VE):
    name = "LMSDiscreteScheduler"
    dt_terms = False               # coefficients by quadrature in float64 from the float32 sigmas

    def sampler(self, sched, table, grid):
        return LMS(4)


class _EDMEuler(_VE):
    """EDM (Karras et al. 2022): the model is F with D = c_skip x + c_out F and input c_in x; no beta table."""

    name = "EDMEulerScheduler"
    predictions = ("epsilon", "v_prediction")
    schedules = ("karras", "exponential")
    spacings = ("-",)

    def scheduler_config(self, config):
        return dict(sigma_schedule=config["beta_schedule"], prediction_type=config["prediction_type"])

    def supports(self, config):
        return True

    def table(self, sched):
        return None

    def grid(self, sched, table):
        return Grid.from_sigmas(sched.sigmas.double().numpy())

    def sampler(self, sched, table, grid):
        return Euler()

    def _skip_out(self, sigma, prediction):
        sd = 0.5                      # diffusers' default sigma_data
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


class _FlowMatchEuler(_Adapter):
    """Rectified flow x = (1 - s) x0 + s eps, model v = eps - x0: Euler in s is DDIM on the flow levels."""

    name = "FlowMatchEulerDiscreteScheduler"
    space = "flow"
    dt_terms = True
    predictions = ("flow",)
    schedules = ("shift 1", "shift 3")
    spacings = ("-",)

    def scheduler_config(self, config):
        return dict(shift=float(config["beta_schedule"].split()[1]))

    def supports(self, config):
        return True

    def table(self, sched):
        return None

    def grid(self, sched, table):
        s = sched.sigmas.double().numpy()
        with np.errstate(divide="ignore"):
            return Grid(Level(v, 1.0 - v, v, 2.0 * (np.log1p(-v) - np.log(v))) for v in s)

    def coeffs(self, prediction, level):
        return model_coeffs("flow", level.alpha, level.sigma)

    def model(self, prediction):
        exact_flow = oracle_model(ORACLE, "flow")
        return lambda x, level: exact_flow(x, Level(None, level.alpha, level.sigma, None))

    def sampler(self, sched, table, grid):
        return DDIM(0.0)


# what a ``module:callable`` target may name as its ``refdiff_sampler`` (VP discrete-time schedulers ending at the data)
PROTOCOL_SAMPLERS = {"ddim": lambda: DDIM(0.0), "ddpm": lambda: DDPM("fixed_small"),
                     "dpmsolver++2m": lambda: DPMSolverPP(2), "dpmsolver++3m": lambda: DPMSolverPP(3),
                     "sde-dpmsolver++2m": SDEDPMSolverPP2M, "unipc-bh2": lambda: UniPC(2, "bh2"),
                     "deis2": lambda: DEIS(2)}


class ProtocolAdapter(_Adapter):
    """A ``module:callable`` target following the step protocol (see refdiff.check.runner): ``factory(config)``
    returns a scheduler with set_timesteps(n), timesteps, alphas_cumprod, step(model_output, t, sample, generator=)
    -> .prev_sample (or a tensor) on torch tensors, and refdiff_sampler naming one of PROTOCOL_SAMPLERS. Its
    timesteps index alphas_cumprod, its last step goes to the data, and a stochastic sampler draws its noise as
    torch.randn(sample.shape, generator=generator, dtype=sample.dtype)."""

    schedules = ("linear", "scaled_linear", "squaredcos_cap_v2")
    predictions = ("epsilon", "v_prediction")

    def __init__(self, factory, name: str):
        self.factory, self.name = factory, name
        probe = factory(self.scheduler_config(dict(beta_schedule="scaled_linear", timestep_spacing="trailing",
                                                   prediction_type="epsilon")))
        self.kind = getattr(probe, "refdiff_sampler", None)
        if self.kind not in PROTOCOL_SAMPLERS:
            raise ValueError(f"refdiff_sampler must be one of {sorted(PROTOCOL_SAMPLERS)}, got {self.kind!r}")
        self.stochastic = PROTOCOL_SAMPLERS[self.kind]().stochastic

    def supports(self, config):
        return True

    def make(self, config, variant):
        return self.factory(config)

    def table(self, sched):
        import torch

        ac = sched.alphas_cumprod
        ac = ac.double().numpy() if isinstance(ac, torch.Tensor) else np.asarray(ac, dtype=np.float64)
        return S.DiscreteSchedule.from_alphas_cumprod(ac)

    def grid(self, sched, table):
        return Grid.from_discrete(table, np.asarray(sched.timesteps).astype(np.int64), final="data")

    def sampler(self, sched, table, grid):
        return PROTOCOL_SAMPLERS[self.kind]()


SCHEDULERS = {a.name: a for a in (_DDIM, _DDPM, _DPMMultistep, _DPMSinglestep, _DPMSDE, _UniPC, _DEIS, _Euler, _EulerA,
                                  _Heun, _KDPM2, _LMS, _EDMEuler, _FlowMatchEuler)}


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
        for dt in (DTYPES[1:2] if quick else DTYPES[1:]):
            out += [dict(variant=variant, beta_schedule=adapter.schedules[0], timestep_spacing=spacing, steps=n,
                         prediction_type=adapter.predictions[0], dtype=dt) for n in ((10,) if quick else (3, 10, 25))]
    return [c for c in out if adapter.supports(c)]


class _Mismatch(Exception):
    pass


class _Diffusers:
    """diffusers' side of a run: its scheduler, current sample, call list and noise generator."""

    def __init__(self, adapter, sched, x, dtype, seed):
        import torch

        self.torch, self.adapter, self.sched = torch, adapter, sched
        self.dtype = getattr(torch, dtype)
        self.x = torch.from_numpy(np.asarray(x, dtype=np.float32)).to(self.dtype)
        ts = sched.timesteps
        self.calls = list(ts if isinstance(ts, torch.Tensor) else torch.as_tensor(np.asarray(ts)))
        self.k = 0
        self.gen = torch.Generator().manual_seed(seed)
        self.recorded = adapter.noise_recorder(sched, self.x)
        self.takes_generator = "generator" in inspect.signature(sched.step).parameters

    def call(self, model, level):
        """One diffusers step on its own sample with the model output there; returns that output (float64)."""
        if self.k >= len(self.calls):
            raise _Mismatch(f"refdiff evaluates the model more often than diffusers' {len(self.calls)} timesteps")
        t = self.calls[self.k]
        m = self.torch.from_numpy(np.asarray(model(self.x.double().numpy(), level), dtype=np.float64)).to(self.dtype)
        if self.adapter.space == "ve":
            self.sched.scale_model_input(self.x, t)
        kw = {"generator": self.gen} if self._stochastic() and self.takes_generator else {}
        out = self.sched.step(m, t, self.x, **kw)
        out = out.prev_sample if hasattr(out, "prev_sample") else out[0] if isinstance(out, tuple) else out
        self.x = self.torch.as_tensor(out).to(self.dtype)
        self.k += 1
        return m.double().numpy()

    def _stochastic(self):
        config = getattr(self.sched, "config", None)
        return self.adapter.stochastic or getattr(config, "algorithm_type", "") == "sde-dpmsolver++"


def _replay(adapter, sched, grid, smp, config, x_T, seed, step_grids=None):
    """Run diffusers and the bounded reference side by side; per-step ratios to the rule, draws, final sample."""
    import torch

    pred = config["prediction_type"]
    model = adapter.model(pred)
    side = _Diffusers(adapter, sched, x_T, config.get("dtype", "float32"), seed)
    ref_gen = torch.Generator().manual_seed(seed)
    u = float(torch.finfo(side.dtype).eps) / 2.0
    bstate, ratios, draws, nonfinite = State(), [], [], 0
    n_steps = len(step_grids) if step_grids is not None else len(grid)
    for i in range(n_steps):
        g = Grid(step_grids[i]) if step_grids is not None else grid
        st = State() if step_grids is not None else adapter.sync(sched, bstate)
        cur, nxt = g.levels[st.step], g.levels[st.step + 1]

        def denoise(x_in, level):
            m = side.call(model, level)
            c_x, c_m = adapter.coeffs(pred, level)
            return x_in * c_x + exact(m) * c_m

        def noise():
            if side.recorded is not None:
                return side.recorded.pop(0)
            return torch.randn(tuple(side.x.shape), generator=ref_gen, dtype=side.dtype).double().numpy()

        ctx = BoundedContext(exact(side.x.double().numpy()), denoise, noise, st.history, g)
        out, extra = smp.step(ctx, cur, nxt, st)
        theirs = side.x.double().numpy()
        terms = adapter.formula_terms(ctx, cur, nxt, st, extra)
        if adapter.lambda_terms:
            terms = terms + _lambda_sensitivity(smp, g, st, ctx, adapter, pred)
        bound = R * u * (out.e + terms)
        with np.errstate(invalid="ignore"):
            ratios.append(float(np.max(np.abs(theirs - out.v) / (bound + 1e-300))))
        nonfinite += int(np.count_nonzero(~np.isfinite(theirs)))
        draws.extend(ctx.draws)
        history = tuple((list(reversed(ctx.evaluated)) + list(st.history))[:2])
        bstate = replace(st, step=st.step + 1, history=history, orders=st.orders + (extra.get("order", 0),),
                         extra=extra)
    if side.k != len(side.calls):
        raise _Mismatch(f"diffusers has {len(side.calls)} timesteps, refdiff's sampler evaluated {side.k}")
    return ratios, draws, nonfinite, side.x.double().numpy()


LAMBDA_FD = 1e-7                  # relative size of the finite-difference perturbation of a level's log-SNR


def _moved_level(lv: Level, log_snr) -> Level:
    """The level at another log-SNR in the same family: VE (alpha = 1, sigma = e^(-log_snr / 2)) or VP."""
    if np.all(np.asarray(lv.alpha) == 1.0):
        return Level(lv.t, lv.alpha, np.exp(-0.5 * log_snr), log_snr)
    return Level(lv.t, np.sqrt(1.0 / (1.0 + np.exp(-log_snr))), np.sqrt(1.0 / (1.0 + np.exp(log_snr))), log_snr)


def _lambda_sensitivity(smp, grid, state, ctx, adapter, pred):
    """sum over the levels a step reads of |d out / d lambda_l| Lambda_l (units of u), Lambda_l = |log alpha_l| +
    |log sigma_l| + 1 the float32 error of lambda_l = log alpha_l - log sigma_l; the derivative by a central finite
    difference of the same paper step (float64, the replayed model outputs and noise)."""
    i = state.step
    m_seq = [(d.v - u.v * adapter.coeffs(pred, lv)[0]) / adapter.coeffs(pred, lv)[1] for u, lv, d in ctx.stages]
    base = [_unbounded(v) for v in state.history]
    extra = {k: _unbounded(v) for k, v in state.extra.items()}
    total = 0.0
    for j in range(max(0, i - 2), min(len(grid.levels), i + 2)):
        lv = grid.levels[j]
        lam = np.asarray(lv.log_snr, dtype=np.float64)
        if not np.all(np.isfinite(lam)):
            continue
        Lam = np.abs(np.log(np.asarray(lv.alpha, dtype=np.float64))) + np.abs(
            np.log(np.asarray(lv.sigma, dtype=np.float64))) + 1.0
        delta = LAMBDA_FD * (np.abs(lam) + 1.0)
        outs = []
        for sgn in (1.0, -1.0):
            levels = list(grid.levels)
            levels[j] = _moved_level(lv, lam + sgn * delta)
            g = Grid.__new__(Grid)
            g.levels, g.schedule, g.inversion = levels, grid.schedule, grid.inversion
            it = iter(m_seq)
            draws = iter(ctx.draws)

            def denoise(x_in, level):
                c_x, c_m = adapter.coeffs(pred, level)
                return x_in * c_x + next(it) * c_m
            nctx = NumericContext(ctx.x.v, denoise, lambda: next(draws), tuple(base), g)
            outs.append(smp.step(nctx, levels[i], levels[i + 1], replace(state, history=tuple(base), extra=extra))[0])
        # lambda = log_snr / 2 carries the error Lam, so log_snr carries 2 Lam
        total = total + np.abs(outs[0] - outs[1]) / (2.0 * delta) * 2.0 * Lam
    return total


def _unbounded(v):
    if isinstance(v, Bounded):
        return v.v
    if isinstance(v, tuple):
        return tuple(_unbounded(w) for w in v)
    return v


def run_case(adapter, config: dict, seed: int = 0) -> dict:
    """One configuration: per-step ratios to the rule, end-to-end error, non-finite and duplicate checks."""
    variant = config.get("variant", next(iter(adapter.variants)))
    sched = adapter.make(adapter.scheduler_config(config), variant)
    sched.set_timesteps(config["steps"])
    table = adapter.table(sched)
    ts = np.asarray(sched.timesteps)
    case = {"scheduler": adapter.name, **config, "variant": variant, "timesteps": ts.tolist(),
            "duplicate_timesteps": int(len(adapter.step_starts(ts)) - len(np.unique(adapter.step_starts(ts))))}
    grid = adapter.grid(sched, table)
    case["sigmas"] = [float(np.asarray(lv.sigma_ve)) for lv in grid.levels]        # refdiff's levels (sigma / alpha)
    if hasattr(sched, "sigmas"):
        case["target_sigmas"] = np.asarray(sched.sigmas, dtype=np.float64).tolist()
    smp = adapter.sampler(sched, table, grid)
    case["refdiff_sampler"] = smp.name
    x_T = np.random.default_rng(seed).standard_normal((2, 4)) * adapter.x_T_scale(sched, grid)
    x_T = x_T.astype(np.float32).astype(np.float64)
    try:
        ratios, draws, nonfinite, x_final = _replay(adapter, sched, grid, smp, config, x_T, seed)
    except _Mismatch as exc:
        return {**case, "verdict": "fail", "per_step_ratio": [], "nonfinite": 0, "end_to_end_max_abs": None,
                "finding": f"unexplained: step structure differs: {exc}"}
    except Exception as exc:                          # the target raised mid-run
        reason = adapter.explain_exception(sched, exc)
        if reason is None:
            raise
        return {**case, "verdict": "fail", "per_step_ratio": [], "nonfinite": 0, "end_to_end_max_abs": None,
                "finding": reason}
    case["per_step_ratio"] = ratios
    case["nonfinite"] = nonfinite
    pred = config["prediction_type"]
    model = adapter.model(pred)

    def model_x0(x, level):
        c_x, c_m = adapter.coeffs(pred, level)
        return c_x * x + c_m * model(x, level)
    replay = iter(draws)
    full = sample(smp, model_x0, grid, x_T, noise=(lambda: next(replay)) if draws else None, prediction="x0")
    case["end_to_end_max_abs"] = float(np.max(np.abs(x_final - full.x)))
    case["x_T"] = x_T.tolist()
    case["verdict"] = "pass" if max(ratios) <= 1.0 and nonfinite == 0 else "fail"
    if case["verdict"] == "fail":
        reason = adapter.explain_nonfinite(sched) if nonfinite else None
        case["finding"] = reason or _explain(adapter, config, variant, table, x_T, seed)
    return case


def _explain(adapter, config, variant, table, x_T, seed):
    """Re-run under each alternative hypothesis; the first that reproduces diffusers under the rule explains."""
    sched = adapter.make(adapter.scheduler_config(config), variant)
    sched.set_timesteps(config["steps"])
    grid = adapter.grid(sched, table)
    for label, (kind, what) in adapter.hypotheses(sched, table, config, variant).items():
        sched = adapter.make(adapter.scheduler_config(config), variant)
        sched.set_timesteps(config["steps"])
        try:
            if kind == "sampler":
                ratios = _replay(adapter, sched, grid, what, config, x_T, seed)[0]
            else:
                ratios = _replay(adapter, sched, grid, adapter.sampler(sched, table, grid), config, x_T, seed,
                                 step_grids=[[cur, nxt] for cur, nxt in what])[0]
        except (_Mismatch, ValueError):
            continue
        if max(ratios) <= 1.0:
            return f"explained: {label} reproduces the target under the rule"
    return "unexplained: no known convention or bug reproduces the target; inspect the per-step ratios"
