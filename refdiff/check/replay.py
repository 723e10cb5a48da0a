"""Run a third-party scheduler and the float64 reference side by side with identical inputs, and judge each step.

Every refdiff step is the sampler's paper form run on ``Bounded`` values (refdiff.check.rounding): each time the
paper form evaluates the model, the target's ``step`` is called once on its own current sample and the model output
it gets is the one the reference uses (so multi-stage samplers such as Heun, KDPM2 and DPM-Solver++(2S) consume one
target call per stage). The step then yields the reference value and a running bound e of the float32 rounding of
the same formula; the rule is

    |target - refdiff| <= R u (e + formula terms),   R = 4, u = unit roundoff of the sample dtype,

where R allows the coefficients the target forms in float32 (up to three operations each: a ratio, a square root,
an exponential) and the formula terms add what the paper form does not see: float32 differences of levels that
cancel (sigma_next - sigma, 1 - alpha_bar_t / alpha_bar_s, the adapter's ``formula_terms``) and the float32 error of
each level's log-SNR propagated through the step (``lambda_terms``, by finite differences). Per-step inputs are
resynchronised (the target's sample, and state it keeps such as UniPC's corrected sample), so a step is judged on
its own; end-to-end errors are reported beside. Multi-stage steps are also judged where the target evaluates the
model: its sample at each later stage against the reference's stage input, under the same rule (the stage's own
level terms), so an intermediate that only the model sees is not taken on trust. When a step disagrees, the
adapter's hypotheses (a known convention or bug) are re-run as references; one that reproduces the target under the
same rule is the explanation.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from ..samplers import Grid, Level
from ..samplers.base import NumericContext, State
from ..solve import sample
from .findings import Finding, case_verdict
from .rounding import Bounded, BoundedContext, exact

__all__ = ["R", "run_case", "Hypothesis", "level_sensitivity", "dt_stage_terms"]

R = 4                               # coefficient roundings per term (see the module docstring)


class Hypothesis(NamedTuple):
    """A known convention or upstream bug, re-run as a reference: kind "sampler" (``what`` an alternative sampler),
    "pairs" (``what`` the (cur, nxt) levels the target steps between, or (those pairs, the sampler to step with)) or
    "same-output" (the model output read at the level the target reads it)."""

    label: str
    kind: str
    what: object


class _Mismatch(Exception):
    pass


class _Diffusers:
    """diffusers' side of a run: its scheduler, current sample, call list and noise generator."""

    def __init__(self, adapter, sched, x, dtype, seed, stochastic: bool, step_kwargs=None):
        import torch

        self.torch, self.adapter, self.sched = torch, adapter, sched
        self.dtype = getattr(torch, dtype)
        self.x = torch.from_numpy(np.asarray(x, dtype=np.float32)).to(self.dtype)
        self.calls = [t if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t))
                      for t in adapter.calls(sched)]
        self.k = 0
        self.gen = torch.Generator().manual_seed(seed)
        self.recorded = adapter.noise_recorder(sched, self.x)
        self.step_kwargs = dict(step_kwargs or {})
        self.outputs = []                  # the model output of every call, as the target got it (for reproducers)
        # the target draws from the generator passed to step(): stochastic samplers, and the churn of step_kwargs
        takes_generator = "generator" in inspect.signature(sched.step).parameters
        self.pass_generator = takes_generator and stochastic

    def call(self, model, level):
        """One diffusers step on its own sample with the model output there; returns that output (float64)."""
        if self.k >= len(self.calls):
            raise _Mismatch(f"refdiff evaluates the model more often than diffusers' {len(self.calls)} timesteps")
        t = self.calls[self.k]
        m = self.torch.from_numpy(np.asarray(model(self.x.double().numpy(), level), dtype=np.float64)).to(self.dtype)
        if self.adapter.space == "ve":
            self.sched.scale_model_input(self.x, t)
        kw = {"generator": self.gen, **self.step_kwargs} if self.pass_generator else dict(self.step_kwargs)
        out = self.adapter.call_step(self.sched, m, t, self.x, kw)
        out = out.prev_sample if hasattr(out, "prev_sample") else out[0] if isinstance(out, tuple) else out
        out = self.torch.as_tensor(out)
        if tuple(out.shape) != tuple(self.x.shape):        # compared before any arithmetic: it would broadcast
            raise ValueError(f"the target's step() returned shape {tuple(out.shape)} for a sample of shape "
                             f"{tuple(self.x.shape)}")
        self.x = out.to(self.dtype)
        self.k += 1
        self.outputs.append(m.double().numpy())
        return m.double().numpy()


def _replay(adapter, sched, grid, smp, config, x_T, seed, step_grids=None, same_output=False):
    """Run diffusers and the bounded reference side by side; per-step ratios to the rule, draws, final sample.

    Both sides read the model output the target got at its own sample, except where the target adds noise after
    the model call (``adapter.model_first``): there each side's model is evaluated where its algorithm says (the
    target: the sample before the noise, at the step's start level), unless ``same_output``."""
    import torch

    pred, variant = config["prediction_type"], config["variant"]
    model = adapter.model(pred)
    side = _Diffusers(adapter, sched, x_T, config.get("dtype", "float32"), seed, smp.stochastic,
                      adapter.step_kwargs(variant))
    own = adapter.model_first(variant) and not same_output
    ref_gen = torch.Generator().manual_seed(seed)
    u = float(torch.finfo(side.dtype).eps) / 2.0
    bstate, ratios, draws, nonfinite = State(), [], [], 0
    refs = []                  # (calls made so far, reference value, bound) after each step (for reproducers)
    n_steps = len(step_grids) if step_grids is not None else len(grid)
    for i in range(n_steps):
        g = Grid(step_grids[i], grid.schedule, grid.inversion) if step_grids is not None else grid
        st = State() if step_grids is not None else adapter.sync(sched, bstate)
        cur, nxt = g.levels[st.step], g.levels[st.step + 1]

        outputs = []             # the model output each stage read, with the level it read it at
        stage_inputs = []        # (the reference's stage input, the target's sample there) of each stage

        def denoise(x_in, level):
            stage_inputs.append((x_in, side.x.double().numpy()))
            m = side.call(model, cur if own else level)
            if own:      # the reference's model at its own stage input, stored in the sample dtype as the target's
                m = torch.from_numpy(np.asarray(model(x_in.v, level))).to(side.dtype).double().numpy()
            read = adapter.read_level(pred, level, cur) if adapter.model_first(variant) and same_output else level
            outputs.append(m)
            c_x, c_m = adapter.coeffs(pred, read)
            return x_in * c_x + exact(m) * c_m

        def noise():
            if side.recorded is not None:
                return side.recorded.pop(0)
            return torch.randn(tuple(side.x.shape), generator=ref_gen, dtype=side.dtype).double().numpy()

        start = (side.k, side.x.double().numpy())          # the target's own state at the step's start
        ctx = BoundedContext(exact(side.x.double().numpy()), denoise, noise, st.history, g)
        out, extra = smp.step(ctx, cur, nxt, st)
        theirs = side.x.double().numpy()
        terms = adapter.formula_terms(ctx, cur, nxt, st, extra)
        stage_terms = [0.0] * len(stage_inputs)
        if adapter.lambda_terms:
            lam_out, lam_stages = _lambda_sensitivity(smp, g, st, ctx, outputs, adapter, pred)
            terms = terms + lam_out
            stage_terms = [a + (lam_stages[k] if k < len(lam_stages) else 0.0) for k, a in enumerate(stage_terms)]
        bound = R * u * (out.e + terms)
        with np.errstate(invalid="ignore"):
            ratio = float(np.max(np.abs(theirs - out.v) / (bound + 1e-300)))
            # the later stages' inputs: where the target evaluated the model against the reference's stage input
            # (Euler-type stages form sigma_next - sigma in float32: |x - D| per stage before, as formula_terms)
            if not own:
                dt = dt_stage_terms(ctx.stages) if adapter.dt_terms else [0.0] * len(stage_inputs)
                for j in range(1, len(stage_inputs)):
                    x_in, at = stage_inputs[j]
                    b = R * u * (x_in.e + stage_terms[j] + sum(dt[:j]))
                    ratio = max(ratio, float(np.max(np.abs(at - x_in.v) / (b + 1e-300))))
            ratios.append(ratio)
        refs.append((side.k, np.asarray(out.v, dtype=np.float64), np.broadcast_to(bound, np.shape(out.v)).copy(),
                     start))
        nonfinite += int(np.count_nonzero(~np.isfinite(theirs)))
        draws.extend(ctx.draws)
        history = tuple((list(reversed(ctx.evaluated)) + list(st.history))[:2])
        bstate = replace(st, step=st.step + 1, history=history, orders=st.orders + (extra.get("order", 0),),
                         extra=extra)
    if side.k != len(side.calls):
        raise _Mismatch(f"diffusers has {len(side.calls)} timesteps, refdiff's sampler evaluated {side.k}")
    _replay.last = {"outputs": side.outputs, "refs": refs, "step_kwargs": side.step_kwargs,
                    "generator": side.pass_generator}
    return ratios, draws, nonfinite, side.x.double().numpy()


LAMBDA_FD = 1e-7                  # relative size of the finite-difference perturbation of a level's log-SNR


def _moved_level(lv: Level, log_snr) -> Level:
    """The level at another log-SNR in the same family: VE (alpha = 1, sigma = e^(-log_snr / 2)) or VP."""
    if np.all(np.asarray(lv.alpha) == 1.0):
        return Level(lv.t, lv.alpha, np.exp(-0.5 * log_snr), log_snr)
    return Level(lv.t, np.sqrt(1.0 / (1.0 + np.exp(-log_snr))), np.sqrt(1.0 / (1.0 + np.exp(log_snr))), log_snr)


def perturbed_grids(grid, i):
    """The finite-difference probes of the float32 log-SNR error of each level step i reads (levels i - 2 .. i + 1
    with a finite log-SNR): yields (weight, (grid_plus, grid_minus)), the level moved by +-delta in log-SNR, where
    weight |out_plus - out_minus| is that level's term |d out / d lambda_l| Lambda_l in units of u. Lambda_l =
    |log alpha_l| + |log sigma_l| + 1 is the float32 error of lambda_l = log_snr / 2, so log_snr carries 2 Lambda_l
    and the central difference divides by 2 delta."""
    for j in range(max(0, i - 2), min(len(grid.levels), i + 2)):
        lv = grid.levels[j]
        lam = np.asarray(lv.log_snr, dtype=np.float64)
        if not np.all(np.isfinite(lam)):
            continue
        Lam = np.abs(np.log(np.asarray(lv.alpha, dtype=np.float64))) + np.abs(
            np.log(np.asarray(lv.sigma, dtype=np.float64))) + 1.0
        delta = LAMBDA_FD * (np.abs(lam) + 1.0)
        grids = []
        for sgn in (1.0, -1.0):
            levels = list(grid.levels)
            levels[j] = _moved_level(lv, lam + sgn * delta)
            grids.append(Grid(levels, grid.schedule, grid.inversion))
        yield 2.0 * Lam / (2.0 * delta), grids


def level_sensitivity(smp, grid, state, x, outputs, draws, i, to_d):
    """Sum over the levels step i reads of |d(result)/d lambda_l| Lambda_l (units of u) for the step output and for
    every stage input (``perturbed_grids``): central differences of the float64 paper step from ``x`` with the
    replayed model outputs (read as D by ``to_d(x_in, level, output)``) and noise; ``state`` holds float64 values.
    Returns (output term, [stage input terms]) (an empty list where no level has a finite log-SNR)."""
    out_total, stage_total = 0.0, None
    for weight, grids in perturbed_grids(grid, i):
        outs, stages = [], []
        for g in grids:
            it, dr, seen = iter(outputs), iter(draws), []

            def denoise(x_in, level, it=it, seen=seen):
                seen.append(np.asarray(x_in, dtype=np.float64))
                return to_d(x_in, level, next(it))
            ctx = NumericContext(x, denoise, lambda dr=dr: next(dr), state.history, g)
            outs.append(np.asarray(smp.step(ctx, g.levels[i], g.levels[i + 1], state)[0], dtype=np.float64))
            stages.append(seen)
        out_total = out_total + np.abs(outs[0] - outs[1]) * weight
        per = [np.abs(a - b) * weight for a, b in zip(stages[0], stages[1])]
        stage_total = per if stage_total is None else [s + p for s, p in zip(stage_total, per)]
    return out_total, stage_total or []


def dt_stage_terms(stages) -> list:
    """Per stage (x, level, D) of an Euler-type update x + d (sigma_next - sigma), the float32 error of the level
    difference sigma_next - sigma (u sigma) times |d| = |x - D| / sigma: |x| + |x - D| in units of u (the |x| is the
    stage's own rounding)."""
    return [np.abs(x.v) + np.abs(x.v - d.v) for x, _, d in stages]


def _lambda_sensitivity(smp, grid, state, ctx, outputs, adapter, pred):
    """``level_sensitivity`` of a replayed step: the outputs read with the adapter's coefficients, from the
    reference's own (bounded) start and state."""
    fstate = replace(state, history=tuple(_unbounded(v) for v in state.history),
                     extra={k: _unbounded(v) for k, v in state.extra.items()})

    def to_d(x_in, level, m):
        c_x, c_m = adapter.coeffs(pred, level)
        return x_in * c_x + m * c_m
    return level_sensitivity(smp, grid, fstate, ctx.x.v, outputs, ctx.draws, state.step, to_d)


def _unbounded(v):
    if isinstance(v, Bounded):
        return v.v
    if isinstance(v, tuple):
        return tuple(_unbounded(w) for w in v)
    if isinstance(v, dict):
        return {k: _unbounded(w) for k, w in v.items()}
    return v


def _prepared(adapter, config, variant):
    """The target built for the case, its timesteps set; with ``config["begin"] = k`` the run starts at the k-th
    step (img2img: ``set_begin_index(k)``, the first k timesteps not called)."""
    sched = adapter.make(adapter.scheduler_config(config), variant)
    sched.set_timesteps(config["steps"], **adapter.set_timesteps_kwargs(config))
    begin = int(config.get("begin", 0))
    if begin:
        sched.set_begin_index(begin)
        sched._refdiff_begin = begin
    return sched


def _begun(grid, config):
    """The grid from the case's begin index on."""
    begin = int(config.get("begin", 0))
    return Grid(grid.levels[begin:], grid.schedule, grid.inversion) if begin else grid


def run_case(adapter, config: dict, seed: int = 0, x_T=None) -> dict:
    """One configuration: the target's schedule and grid against the configuration's, then per-step ratios to the
    rule on the target's own levels, the end-to-end error, non-finite and duplicate checks. Every disagreement is a
    typed Finding in ``case["findings"]``; ``case["verdict"]`` is pass / known (all explained) / fail."""
    variant = config.get("variant", next(iter(adapter.variants)))
    config = {**config, "variant": variant}
    sched = _prepared(adapter, config, variant)
    table = adapter.table(sched)
    ts = np.asarray(sched.timesteps)
    case = {"scheduler": adapter.name, **config, "variant": variant, "timesteps": ts.tolist(),
            "duplicate_timesteps": int(len(adapter.step_starts(ts)) - len(np.unique(adapter.step_starts(ts))))}
    findings = list(adapter.table_findings(sched, config))
    if not adapter.calls(sched):           # nothing to replay (e.g. a run whose only step is null): the findings say
        case["findings"] = [f.to_dict() for f in findings]
        return {**case, "per_step_ratio": [], "nonfinite": 0, "end_to_end_max_abs": None,
                "verdict": case_verdict(findings), "finding": "; ".join(str(f) for f in findings)}
    grid = _begun(adapter.grid(sched, table), config)
    case["sigmas"] = [float(np.asarray(lv.sigma_ve)) for lv in grid.levels]        # refdiff's levels (sigma / alpha)
    if hasattr(sched, "sigmas"):
        case["target_sigmas"] = np.asarray(sched.sigmas, dtype=np.float64).tolist()
    smp = adapter.sampler(sched, table, grid, variant=variant)
    case["refdiff_sampler"] = smp.name
    if x_T is None:
        x_T = np.random.default_rng(seed).standard_normal(adapter.sample_shape(variant)) * \
            adapter.x_T_scale(sched, grid)
    x_T = np.asarray(x_T, dtype=np.float32).astype(np.float64)
    case["x_T"] = x_T.tolist()

    def done(extra):
        case.update(extra)
        case["findings"] = [f.to_dict() for f in findings]
        case["verdict"] = case_verdict(findings)
        case["finding"] = "; ".join(str(f) for f in findings)
        return case

    try:
        ratios, draws, nonfinite, x_final = _replay(adapter, sched, grid, smp, config, x_T, seed)
        recorded = _replay.last
    except _Mismatch as exc:
        findings.append(Finding("structure", f"step structure differs: {exc}"))
        return done({"per_step_ratio": [], "nonfinite": 0, "end_to_end_max_abs": None})
    except Exception as exc:                          # the target raised mid-run
        known = adapter.explain_exception(sched, exc)
        if known is None:
            raise
        findings.append(known)
        return done({"per_step_ratio": [], "nonfinite": 0, "end_to_end_max_abs": None})
    pred = config["prediction_type"]
    model = adapter.model(pred)

    def model_x0(x, level):
        c_x, c_m = adapter.coeffs(pred, level)
        return c_x * x + c_m * model(x, level)
    replay = iter(draws)
    full = sample(smp, model_x0, grid, x_T, noise=(lambda: next(replay)) if draws else None, prediction="x0",
                  progress=False)
    extra = {"per_step_ratio": ratios, "nonfinite": nonfinite,
             "end_to_end_max_abs": float(np.max(np.abs(x_final - full.x)))}
    if nonfinite:
        findings.append(adapter.explain_nonfinite(sched, ratios) or Finding(
            "nonfinite", f"{nonfinite} non-finite values in the target's samples where the reference is finite",
            evidence={"per_step_ratio": ratios}))
    elif max(ratios) > 1.0:
        findings.append(_explain(adapter, config, table, grid, x_T, seed, ratios))
    if any(not f.explained for f in findings):
        from .reproducer import diffusers_payload

        if getattr(adapter, "factory", None) is not None:        # a step-protocol factory: rebuilt by its name
            build = {"factory": adapter.name, "config": adapter.scheduler_config(config)}
        else:
            build = {"scheduler": adapter.name, "config": dict(sched.config),
                     "call": getattr(adapter, "step_call", "plain"),
                     "set_timesteps": adapter.set_timesteps_kwargs(config), "begin": int(config.get("begin", 0))}
        extra["reproducer"] = diffusers_payload(build, config, x_T, seed, recorded)
    return done(extra)


def _explain(adapter, config, table, grid, x_T, seed, ratios) -> Finding:
    """Re-run under each alternative hypothesis; the first that reproduces the target under the rule explains."""
    variant = config["variant"]
    first = int(np.argmax(np.asarray(ratios) > 1.0))
    sched = _prepared(adapter, config, variant)
    for hid, hyp in adapter.hypotheses(sched, table, config, variant).items():
        sched = _prepared(adapter, config, variant)
        try:
            if hyp.kind == "sampler":
                again = _replay(adapter, sched, grid, hyp.what, config, x_T, seed)[0]
            elif hyp.kind == "same-output":
                again = _replay(adapter, sched, grid, adapter.sampler(sched, table, grid, variant=variant), config,
                                x_T, seed, same_output=True)[0]
            else:                   # "pairs": [(cur, nxt)], or ([(cur, nxt)], sampler) to step with another one
                pairs, smp_h = hyp.what if isinstance(hyp.what, tuple) else \
                    (hyp.what, adapter.sampler(sched, table, grid, variant=variant))
                again = _replay(adapter, sched, grid, smp_h, config, x_T, seed,
                                step_grids=[[cur, nxt] for cur, nxt in pairs])[0]
        except (_Mismatch, ValueError):
            continue
        if max(again) <= 1.0:
            return Finding("step", f"{hyp.label} reproduces the target under the rule", explained=True, id=hid,
                           evidence={"per_step_ratio": ratios, "first_step": first,
                                     "per_step_ratio_under_hypothesis": again})
    return Finding("step", f"step {first} disagrees with the sampler's paper form beyond the rounding rule (ratio "
                           f"{ratios[first]:.3g}); no known convention or bug reproduces it",
                   evidence={"per_step_ratio": ratios, "first_step": first})
