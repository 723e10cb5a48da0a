"""Target: k-diffusion-style sampler functions, which own their loop.

    sample_NAME(model, x, sigmas, extra_args=None, callback=None, disable=None, [eta, s_noise, noise_sampler,
                s_churn, s_tmin, s_tmax, solver_type, r, order, ...])

Specs: ``kdiffusion`` / ``kdiffusion:sample_NAME`` (the installed k-diffusion's sampling module), ``PATH.py`` /
``PATH.py:sample_NAME`` (a sampling file loaded alone, e.g. ComfyUI's comfy/k_diffusion/sampling.py), and
``module:function`` (any function with this signature: a user's own sampler; it names the refdiff sampler it
implements with ``function.refdiff_sampler = "euler_ancestral"`` unless its name is ``sample_`` + a refdiff sampler
name).

Each case runs the function once with the oracle as its model and records a ``refdiff.check.trace.Trace``:

* the model is ``OracleDenoiser``: ``model(x, sigma, **extra_args) -> D(x; sigma)``, the exact data prediction of
  the check's Gaussian mixture at the float32 sample and sigma it is given (a k-diffusion denoiser: x = x0 + sigma
  eps, the output is x0), returned in x's dtype; every call is recorded. It carries the attributes ComfyUI's
  samplers read to pick their variant (``inner_model.inner_model.model_sampling``: an eps / EDM-type object, not
  flow's CONST; ``inner_model.model_patcher.get_model_object``);
* the noise: a recording ``noise_sampler(sigma, sigma_next)`` (standard normal draws from a seeded generator, in
  place of k-diffusion's default and Brownian-tree samplers, whose draws are standard normal too), and
  ``torch.randn_like`` recorded during the call (EDM churn in sample_euler / heun / dpm_2 draws with it);
* the states: the callback's sample at each step start (``sigma_hat == sigma``; a churned step reports x_hat and
  the reference carries on from its own value there) and the returned sample.

``refdiff.check.trace.judge`` replays the refdiff sampler on the same sigmas against that trace.

Loading a sampling file alone (``load_sampling_file``): the file runs as a module of a synthetic package with no
path, so its package-relative imports (``from . import utils``) and the modules it imports that are not installed
(``comfy.*``, ``torchsde``, ``torchdiffeq`` where missing: found by reading its import statements) are stubs; nothing
else is (other libraries' optional imports still see ImportError), and the stubs leave sys.modules after the load. A stub's attributes are empty classes (``isinstance`` against
them is False: ComfyUI's flow check ``isinstance(model_sampling, comfy.model_sampling.CONST)`` takes the non-flow
path); the few helpers the samplers call are real: ``utils.append_dims``, ``comfy.utils.model_trange`` and
``trange`` (a plain range). A sampler that needs anything else from a stub fails its case with an error naming the
stub.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import os
import sys
import types

import numpy as np

from ..findings import Finding, case_verdict
from ..trace import Call, Trace, judge

__all__ = ["load_sampling_file", "KFunction", "OracleDenoiser", "MAPPED", "NOT_MAPPED", "resolve_kdiffusion",
           "looks_like_sampler_function"]

SIGMA_MIN, SIGMA_MAX, RHO = 0.03, 14.6, 7.0          # the Karras grid the cases run on (SD-like sigma range)
SIGNATURE = ("model", "x", "sigmas")

# k-diffusion name -> refdiff sampler name (refdiff.samplers.SAMPLER_NAMES), and the keyword arguments each passes on
MAPPED = {
    "euler": "euler", "euler_ancestral": "euler_ancestral", "heun": "heun", "dpm_2": "dpm_2",
    "dpm_2_ancestral": "dpm_2_ancestral", "lms": "lms", "dpmpp_2s_ancestral": "dpmpp_2s_ancestral",
    "dpmpp_sde": "dpmpp_sde", "dpmpp_2m": "dpmpp_2m", "dpmpp_2m_sde": "dpmpp_2m_sde", "dpmpp_3m_sde": "dpmpp_3m_sde",
    "dpm_fast": "dpm_fast",
}
# functions that take (sigma_min, sigma_max, n) and choose their own levels: judged on refdiff's grid for the same
# arguments (DPM-fast: uniform in t = -log sigma; the function forms it in float32, within the level rule)
OWN_LEVELS = ("dpm_fast",)
CHURNED = ("euler", "heun", "dpm_2")
NOT_MAPPED: dict = {}
# functions that choose their steps from the sample (an error controller): judged attempt by attempt
# (refdiff.check.adaptive), with these configurations beyond the defaults
ADAPTIVE = {"dpm_adaptive": [{"order": 2}, {"rtol": 0.01, "atol": 0.001}, {"eta": 0.5}]}
# the configurations beyond the defaults that each function is also run with
VARIANTS = {
    "euler": [{"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 10.0}],
    "heun": [{"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 10.0}],
    "euler_ancestral": [{"eta": 0.5}], "dpm_2_ancestral": [{"eta": 0.5}], "dpmpp_2s_ancestral": [{"eta": 0.5}],
    "dpmpp_sde": [{"eta": 0.5}, {"r": 0.3}], "dpmpp_2m_sde": [{"solver_type": "heun"}, {"eta": 0.5}],
    "dpmpp_3m_sde": [{"eta": 0.5}], "lms": [{"order": 2}], "dpm_fast": [{"eta": 0.5}],
}
_PASS_ON = ("eta", "s_noise", "solver_type", "r", "order")
# refdiff sampler arguments fixed by the k-diffusion calling convention: the model passed is a denoiser whose output
# already is the consistency function (ComfyUI applies LCM's boundary condition inside its model wrapper)
FIXED = {"lcm": {"boundary": "none"}}


def _base(name: str) -> str:
    """ComfyUI's *_gpu samplers are their base sampler with a Brownian tree built on the GPU (noise is the check's)."""
    return name[:-len("_gpu")] if name.endswith("_gpu") else name
# known conventions of the released code, re-run as the reference when a case disagrees: (id, what, sampler flags)
HYPOTHESES = {
    "dpmpp_3m_sde": [("dpmsolver-3m-halved-d2", "the released DPM-Solver++ 3M update halves the D'' term (local "
                      "error O(h^3): global order 2)", {"halved_d2": True})],
}
_KNOWN_HELPERS = {
    "append_dims": lambda x, n: x[(...,) + (None,) * (n - x.ndim)],
    "model_trange": lambda *a, **k: range(*a),
    "trange": lambda *a, **k: range(*a),
}


class _StubModule(types.ModuleType):
    """A module that is not there: attributes are empty classes named after it (or a known helper)."""

    def __init__(self, name):
        super().__init__(name)
        self.__path__ = []                     # a package: submodules are stubs too
        self.__refdiff_stub__ = True

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr in _KNOWN_HELPERS:
            value = _KNOWN_HELPERS[attr]
        elif attr[:1].isupper():                   # a class (isinstance against it is False)
            value = type(attr, (), {"__module__": self.__name__,
                                    "__doc__": f"stub of {self.__name__}.{attr} (refdiff's sampling-file loader)"})
        else:                                      # a submodule or a function: a stub that says so when called
            value = _StubModule(f"{self.__name__}.{attr}")
        setattr(self, attr, value)
        return value

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"{self.__name__} is a stub of refdiff's sampling-file loader (the module is not "
                                  "installed or is package-relative); the sampler needs the real one")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on sys.meta_path while a file loads: the file's own missing imports (``roots``: the top-level names it
    imports that no other finder has, and its package) become stubs. Nothing else is stubbed: other libraries'
    optional imports (torch probing for dill) must still see ImportError."""

    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, name, path=None, target=None):
        if name.split(".", 1)[0] not in self.roots:
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        pass


def load_sampling_file(path):
    """Load a k-diffusion-style sampling.py alone, stubbing its package-relative and missing imports (module
    docstring). Returns the module; ImportError (or the file's own error) when it cannot load."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file {path!r}")
    package = f"_refdiff_sampling_{abs(hash(path)):x}"
    pkg = _StubModule(package)
    sys.modules[package] = pkg
    spec = importlib.util.spec_from_file_location(f"{package}.sampling", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = package
    sys.modules[spec.name] = module
    finder = _StubFinder({package, *_missing_imports(path)})
    sys.meta_path.append(finder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.meta_path.remove(finder)
        # the module keeps its references; the process keeps no fake ``comfy`` (a real one may be imported later)
        for name in [n for n, m in sys.modules.items() if isinstance(m, _StubModule) or n == spec.name]:
            del sys.modules[name]
    return module


def _missing_imports(path) -> set:
    """Top-level names the file imports absolutely (at any depth of its code) that are not installed."""
    import ast

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".", 1)[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".", 1)[0])
    return {n for n in names if n not in sys.modules and importlib.util.find_spec(n) is None}


def looks_like_sampler_function(obj) -> bool:
    """A function whose first three parameters are (model, x, sigmas)."""
    if not inspect.isfunction(obj):
        return False
    names = list(inspect.signature(obj).parameters)[:3]
    return tuple(names) == SIGNATURE


class _ModelSampling:
    """What ComfyUI's samplers read off the model to choose their variant: an eps / EDM-type model (not CONST),
    with its VE noise scaling (ComfyUI's EPS.noise_scaling: latent + sigma noise) and sigma range."""

    noise_scale = 1.0
    sigma_min, sigma_max = SIGMA_MIN, SIGMA_MAX

    @staticmethod
    def noise_scaling(sigma, noise, latent_image, max_denoise=False):
        return latent_image + noise * sigma

    @staticmethod
    def inverse_noise_scaling(sigma, latent):
        return latent


class OracleDenoiser:
    """The check's oracle as a k-diffusion denoiser, recording every call into ``trace``."""

    def __init__(self, trace: Trace, torch):
        from .diffusers import ORACLE

        self.trace, self.torch, self.data = trace, torch, ORACLE
        self.n_states = 0
        ms = _ModelSampling()
        patcher = types.SimpleNamespace(get_model_object=lambda name: ms)
        self.inner_model = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_sampling=ms),
                                                 model_patcher=patcher, model_sampling=ms)

    def __call__(self, x, sigma, **extra_args):
        torch = self.torch
        xs = x.detach().to(torch.float64).cpu().numpy()
        s = torch.as_tensor(sigma).detach().to(torch.float64).cpu().numpy().reshape(-1)
        if s.size not in (1, xs.shape[0]) or not np.all(s == s[0]):
            raise ValueError(f"the check's model takes one sigma for the batch (sigma * ones(B)), got {s}")
        if not s[0] > 0:
            raise ValueError(f"the model was called at sigma {s[0]}: a denoiser is undefined at sigma <= 0")
        D = self.data.denoise(xs, 1.0, float(s[0]))
        out = torch.from_numpy(np.asarray(D)).to(dtype=x.dtype, device=x.device)
        self.trace.calls.append(Call(xs, float(s[0]), out.to(torch.float64).cpu().numpy(), self.n_states))
        return out


class KFunction:
    """One k-diffusion-style sampler function as a check target (name, cases, run_case)."""

    def __init__(self, fn, name: str, refdiff_name: str, source: dict | None = None):
        self.fn, self.name, self.refdiff_name = fn, name, refdiff_name
        # how a reproducer script loads it: {"module", "function"} or {"path", "function", "stubbed"}
        self.source = source or {"module": fn.__module__, "function": fn.__name__}
        params = inspect.signature(fn).parameters
        self.params = params
        self.takes_noise_sampler = "noise_sampler" in params

    def cases(self, quick: bool = False):
        base = _base(self.refdiff_name)
        kws = [{}] + [v for v in VARIANTS.get(base, []) if all(k in self.params for k in v)]
        steps = ((8,) if quick else (4, 12)) if base not in OWN_LEVELS else ((10,) if quick else (6, 10, 14))
        return [{"variant": _variant_label(kw), "kwargs": kw, "steps": n, "beta_schedule": "karras sigmas",
                 "timestep_spacing": "-", "prediction_type": "x0 (denoiser)", "dtype": "float32"}
                for kw in kws for n in steps]

    @staticmethod
    def _recording(seed: int, x_T=None):
        """A run's start: (x_T, its float32 tensor, the Trace, the oracle model recording into it, the seeded
        generator, and a noise_sampler(sigma, sigma_next) that draws standard normals from it and records them)."""
        import torch

        if x_T is None:
            x_T = np.random.default_rng(seed).standard_normal((2, 4)) * SIGMA_MAX
        x = torch.from_numpy(np.asarray(x_T, dtype=np.float32))
        trace = Trace(x.double().numpy())
        gen = torch.Generator().manual_seed(seed)

        def noise_sampler(sigma, sigma_next):
            z = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            trace.draws.append(z.double().numpy())
            return z
        return x_T, x, trace, OracleDenoiser(trace, torch), gen, noise_sampler

    def sampler(self, kwargs):
        from ...samplers import Churn, sampler

        if self.refdiff_name in OWN_LEVELS:
            return sampler(self.refdiff_name, nfe=kwargs["nfe"], **{k: v for k, v in kwargs.items()
                                                                      if k in ("eta", "s_noise")})
        if self.refdiff_name in CHURNED and "s_churn" in kwargs:
            churn = Churn(kwargs.get("s_churn", 0.0), kwargs.get("s_tmin", 0.0), kwargs.get("s_tmax", np.inf),
                          kwargs.get("s_noise", 1.0))
            return sampler(self.refdiff_name, churn=churn)
        return sampler(self.refdiff_name, **FIXED.get(self.refdiff_name, {}),
                       **{k: v for k, v in kwargs.items() if k in _PASS_ON or k == "halved_d2"})

    def run_case(self, config: dict, seed: int = 0, x_T=None) -> dict:
        import torch

        from ... import grids
        from ...samplers import Grid

        n = int(config["steps"])
        own = self.refdiff_name in OWN_LEVELS
        if own:                            # n is the evaluation budget; the grid is DPM-fast's for it
            from ...samplers.dpm_solver import dpm_fast_sigmas

            sig = torch.from_numpy(dpm_fast_sigmas(n, SIGMA_MIN, SIGMA_MAX)).to(torch.float32)
        else:
            sig = torch.from_numpy(grids.sigmas("karras", n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO)
                                   ).to(torch.float32)
        sig64 = sig.double().numpy()
        grid = Grid.from_sigmas(dpm_fast_sigmas(n, SIGMA_MIN, SIGMA_MAX) if own else sig64)
        x_T, x, trace, model, gen, noise_sampler = self._recording(seed, x_T)
        kw = dict(config.get("kwargs", {}))
        direct = []

        def callback(d):
            i = int(d["i"])
            churned = "sigma_hat" in d and float(d["sigma_hat"]) != float(d["sigma"])
            trace.states[i] = None if churned else d["x"].detach().double().cpu().numpy()
            model.n_states = i + 1

        real_randn_like = torch.randn_like

        def randn_like(t, *a, **k):                # EDM churn's draws (sample_euler / heun / dpm_2)
            k.pop("generator", None)
            z = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            direct.append((model.n_states, z.double().numpy()))
            return z
        call_kw = dict(extra_args={}, callback=callback, disable=True, **kw)
        if self.takes_noise_sampler:
            call_kw["noise_sampler"] = noise_sampler
        case = {"scheduler": self.name, **{k: v for k, v in config.items() if k != "kwargs"},
                "kwargs": kw, "x_T": np.asarray(x_T).tolist(), "sigmas": sig64.tolist()}
        smp = self.sampler({**kw, "nfe": n} if own else kw)
        case["refdiff_sampler"] = smp.name
        torch.randn_like = randn_like
        try:
            if own:
                out = self.fn(model, x.clone(), SIGMA_MIN, SIGMA_MAX, n, **call_kw)
            else:
                out = self.fn(model, x.clone(), sig.clone(), **call_kw)
        finally:
            torch.randn_like = real_randn_like
        out = out[0] if isinstance(out, tuple) else out
        trace.final = torch.as_tensor(out).detach().double().cpu().numpy()
        if not self.takes_noise_sampler and direct:
            churn = getattr(smp, "churn", None)
            on = churn is not None and churn.active
            # k-diffusion draws one churn noise per step whether or not the step churns; the sampler draws only
            # where gamma > 0 (ComfyUI's copy draws only there too)
            keep = [z for step, z in direct if on and float(churn.gamma(sig64[step], n)) > 0]
            trace.draws.extend(keep)
        u = float(np.finfo(np.float32).eps) / 2.0
        j = judge(trace, smp, grid, u=u)
        if j.findings and all(f.kind == "step" for f in j.findings):
            for hid, what, flags in HYPOTHESES.get(_base(self.refdiff_name), []):
                again = judge(trace, self.sampler({**kw, **flags}), grid, u=u)
                if not again.findings:
                    j.findings = [Finding("step", f"{what} reproduces the target under the rule", explained=True,
                                          id=hid, evidence={**j.findings[0].evidence,
                                                            "per_step_ratio_under_hypothesis": again.per_step_ratio})]
                    break
        # end to end: the float64 reference run with the exact oracle and the target's noise, against its result
        from ...solve import sample

        replay = iter(trace.draws)
        full = sample(smp, lambda xx, lv: model.data.denoise(xx, 1.0, lv.sigma), grid, trace.x_T,
                      noise=(lambda: next(replay)) if trace.draws else None, prediction="x0", progress=False)
        e2e = float(np.max(np.abs(trace.final - full.x))) if trace.final.shape == full.x.shape else None
        if any(not f.explained for f in j.findings):
            from ..reproducer import kfunction_payload

            case["reproducer"] = kfunction_payload(self.source, sig64, x.double().numpy(), kw, trace, j,
                                                   [z for _, z in direct])
        case.update({"per_step_ratio": [r for r in j.per_step_ratio if r == r], "per_call_ratio": j.per_call_ratio,
                     "level_ratio": j.level_ratio, "end_to_end_max_abs": e2e,
                     "findings": [f.to_dict() for f in j.findings], "verdict": case_verdict(j.findings),
                     "finding": "; ".join(str(f) for f in j.findings), "model_calls": len(trace.calls),
                     "noise_draws": len(trace.draws)})
        return case


class KAdaptive(KFunction):
    """k-diffusion's ``sample_dpm_adaptive(model, x, sigma_min, sigma_max, ..., order, rtol, atol, h_init, pcoeff,
    icoeff, dcoeff, accept_safety, eta, s_noise, noise_sampler)``: run once per case with the oracle; its callback
    reports every attempt (sample, s, E, h, accepts), which refdiff.check.adaptive judges on its own."""

    KEYS = ("order", "rtol", "atol", "h_init", "pcoeff", "icoeff", "dcoeff", "accept_safety", "eta", "s_noise")

    def cases(self, quick: bool = False):
        kws = [{}] + ([] if quick else [v for v in ADAPTIVE.get(self.refdiff_name, []) if all(
            k in self.params for k in v)])
        return [{"variant": _variant_label(kw), "kwargs": kw, "steps": 0, "beta_schedule": "adaptive",
                 "timestep_spacing": "-", "prediction_type": "x0 (denoiser)", "dtype": "float32"} for kw in kws]

    def run_case(self, config: dict, seed: int = 0, x_T=None) -> dict:
        import torch

        from ...samplers.dpm_adaptive import dpm_adaptive
        from ..adaptive import Attempt, judge_adaptive

        x_T, x, trace, model, _, noise_sampler = self._recording(seed, x_T)
        kw = dict(config.get("kwargs", {}))
        attempts = []

        def callback(d):
            accepted = int(d["n_accept"]) > sum(a.accepted for a in attempts)
            attempts.append(Attempt(d["x"].detach().double().cpu().numpy(), float(d["t"]), float(d["error"]),
                                    float(d["h"]), accepted))
        case = {"scheduler": self.name, **{k: v for k, v in config.items() if k != "kwargs"}, "kwargs": kw,
                "x_T": np.asarray(x_T).tolist(), "refdiff_sampler": "dpm_adaptive"}
        out = self.fn(model, x.clone(), SIGMA_MIN, SIGMA_MAX, extra_args={}, callback=callback, disable=True,
                      noise_sampler=noise_sampler, **kw)
        out = out[0] if isinstance(out, tuple) else out
        final = torch.as_tensor(out).detach().double().cpu().numpy()
        args = {k: v for k, v in kw.items() if k in self.KEYS}
        eta = float(args.get("eta", 0.0))
        # k-diffusion calls noise_sampler on every accepted attempt, eta = 0 too (scaled by 0): those are not noise
        draws = trace.draws if eta > 0 else []
        findings, ratios = judge_adaptive(trace.x_T, [(c.x, c.sigma, c.out) for c in trace.calls], attempts, draws,
                                          sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, **args)
        if attempts and not np.array_equal(final, attempts[-1].x):
            findings.append(Finding("step", "the returned sample is not the last attempt's"))
        # end to end: refdiff's float64 run with the exact oracle (its own decisions) against the result
        it = iter(draws)
        ref = dpm_adaptive(lambda xx, lv: model.data.denoise(xx, 1.0, float(lv.sigma)), trace.x_T, SIGMA_MAX,
                           SIGMA_MIN, prediction="x0", noise=(lambda: next(it)) if eta > 0 else None, **args)
        if any(not f.explained for f in findings):
            from ..reproducer import kadaptive_payload

            case["reproducer"] = kadaptive_payload(self.source, SIGMA_MIN, SIGMA_MAX, x.double().numpy(), kw, trace,
                                                   trace.draws, judge_adaptive.references)
        case.update({**ratios, "end_to_end_max_abs": float(np.max(np.abs(final - ref.x))),
                     "attempts": len(attempts), "accepted": int(sum(a.accepted for a in attempts)),
                     "refdiff_nfe": ref.nfe, "model_calls": len(trace.calls), "noise_draws": len(draws),
                     "findings": [f.to_dict() for f in findings], "verdict": case_verdict(findings),
                     "finding": "; ".join(str(f) for f in findings)})
        return case


def _variant_label(kw: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults"


def _functions(module, only: str | None, label: str, path: str | None = None, stubbed=()):
    """[KFunction] of a sampling module: every sample_* function refdiff maps (or the one named)."""
    from ...samplers import SAMPLER_NAMES

    names = [n for n in dir(module) if n.startswith("sample_") and inspect.isfunction(getattr(module, n))]
    if only is not None:
        if only not in names:
            from ..runner import UsageError, did_you_mean
            raise UsageError(f"{label} has no function {only!r}{did_you_mean(only, names)}; it has {names}")
        names = [only]
    out, skipped = [], {}
    for n in names:
        short = n[len("sample_"):]
        fn = getattr(module, n)
        if short in NOT_MAPPED:
            skipped[f"{label}:{n}"] = NOT_MAPPED[short]
        elif short in ADAPTIVE and inspect.isfunction(fn) and \
                list(inspect.signature(fn).parameters)[:4] == ["model", "x", "sigma_min", "sigma_max"]:
            src = {"path": path, "function": n, "stubbed": sorted(stubbed)} if path else None
            out.append(KAdaptive(fn, f"{label}:{n}", short, src))
        elif short in OWN_LEVELS and inspect.isfunction(fn) and \
                list(inspect.signature(fn).parameters)[:5] == ["model", "x", "sigma_min", "sigma_max", "n"]:
            src = {"path": path, "function": n, "stubbed": sorted(stubbed)} if path else None
            out.append(KFunction(fn, f"{label}:{n}", short, src))
        elif not looks_like_sampler_function(fn):
            skipped[f"{label}:{n}"] = f"signature {inspect.signature(fn)} is not (model, x, sigmas, ...)"
        elif short in MAPPED or (short in SAMPLER_NAMES and "cfg_pp" not in short):
            src = {"path": path, "function": n, "stubbed": sorted(stubbed)} if path else None
            out.append(KFunction(fn, f"{label}:{n}", MAPPED.get(short, short), src))
        elif "cfg_pp" in short:
            skipped[f"{label}:{n}"] = ("CFG++ reads the unconditional prediction through the model's options hooks; "
                                       "the check's model has one prediction (not mapped yet)")
        else:
            skipped[f"{label}:{n}"] = "no refdiff sampler of this name (not mapped yet)"
    if only is not None and not out:
        from ..runner import UsageError
        raise UsageError(f"{label}:{only} is not checked: {skipped.get(f'{label}:{only}')}")
    return out, skipped


def resolve_kdiffusion(spec: str):
    """(targets, not-mapped reasons) for ``kdiffusion[:NAME]`` or ``PATH.py[:NAME]``."""
    from ..runner import UsageError

    head, _, only = spec.partition(":") if not spec.endswith(".py") else (spec, "", "")
    if spec.count(".py:") == 1:
        head, only = spec.split(".py:")
        head += ".py"
    only = only or None
    if head == "kdiffusion":
        found = importlib.util.find_spec("k_diffusion")
        if found is None or not found.submodule_search_locations:
            raise UsageError("k-diffusion is not installed: `pip install --no-deps k-diffusion==0.1.1.post1` (only "
                             "its sampling module is loaded, so none of its heavy dependencies is needed), or give "
                             "the path of a sampling.py")
        path = os.path.join(list(found.submodule_search_locations)[0], "sampling.py")
        label = "kdiffusion"
    else:
        path, label = head, os.path.basename(head)
    try:
        module = load_sampling_file(path)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    except Exception as exc:
        raise UsageError(f"loading {path!r} raised {type(exc).__name__}: {exc}") from None
    return _functions(module, only, label, os.path.abspath(path), _missing_imports(path))


def function_target(fn, spec: str):
    """A user's own k-diffusion-style function (``module:function``)."""
    from ...samplers import SAMPLER_NAMES
    from ..runner import UsageError, did_you_mean

    name = getattr(fn, "refdiff_sampler", None)
    short = fn.__name__[len("sample_"):] if fn.__name__.startswith("sample_") else fn.__name__
    if name is None:
        name = MAPPED.get(short, short if short in SAMPLER_NAMES else None)
    if name is None or (name not in SAMPLER_NAMES and name not in MAPPED):
        raise UsageError(f"{spec}: say which sampler the function implements: set {fn.__name__}.refdiff_sampler to "
                         f"one of {sorted(SAMPLER_NAMES)}"
                         + (did_you_mean(str(name), SAMPLER_NAMES) if name else ""))
    return KFunction(fn, spec, MAPPED.get(name, name))
