"""Standalone reproducer scripts for findings: a short Python file per case with an unexplained finding, written
next to the report, that shows the disagreement without refdiff (numpy, torch and the target itself only), ready
to attach to an upstream issue.

A diffusers-scheduler case's script rebuilds the scheduler from its configuration and feeds step() the recorded
model outputs, comparing the sample after each step with the stored reference. A sampler-function case's script
replays the run refdiff recorded: the model returns the recorded outputs in call
order (the target is deterministic given them, so it retraces its own run), the noise sampler the recorded draws;
it prints every model call whose sigma differs from the sampler's stage level and every step whose state differs
from the reference value refdiff computed in float64 from the target's own previous state, by more than the stated
rounding bound (4 u times the running error bound of the paper-form step; u = 2^-24), and exits 1 when it
reproduces the finding.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .._io import write_text

__all__ = ["write_reproducers", "kfunction_payload", "kadaptive_payload", "diffusers_payload"]


def diffusers_payload(build: dict, config: dict, x_T, seed: int, recorded: dict) -> dict:
    """What a scheduler reproducer needs: how to build it (``{"scheduler": diffusers class name, "config": its full
    configuration}`` or ``{"factory": "module:callable", "config": the dict it is called with}``), the number of
    steps, the dtype, the recorded model output of every call, and after each step the reference value and bound."""
    cfg = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in build["config"].items()}
    return {"kind": "diffusers", "build": {**build, "config": json.loads(json.dumps(cfg, default=str))},
            "steps": int(config["steps"]), "dtype": config.get("dtype", "float32"), "seed": int(seed),
            "x_T": np.asarray(x_T, dtype=np.float64).tolist(), "generator": bool(recorded["generator"]),
            "step_kwargs": recorded["step_kwargs"], "outputs": [np.asarray(m).tolist() for m in recorded["outputs"]],
            "reference": [[int(k), v.tolist(), b.tolist()] for k, v, b, _ in recorded["refs"]],
            "starts": [[int(k0), x0.tolist()] for _, _, _, (k0, x0) in recorded["refs"]]}


def kfunction_payload(source: dict, sigmas, x_T, kwargs, trace, judgement, direct_draws) -> dict:
    """What a sampler-function reproducer needs (JSON-serialisable)."""
    return {"kind": "kfunction", "source": source, "direct_draws": [np.asarray(z).tolist() for z in direct_draws], "sigmas": np.asarray(sigmas, dtype=np.float64).tolist(),
            "x_T": np.asarray(x_T, dtype=np.float64).tolist(), "kwargs": kwargs,
            "outputs": [np.asarray(c.out).tolist() for c in trace.calls],
            "call_sigmas": [float(c.sigma) for c in trace.calls], "expected_sigmas": judgement.call_levels,
            "draws": [np.asarray(z).tolist() for z in trace.draws],
            "reference": {str(i): [v.tolist(), b.tolist()] for i, (v, b) in judgement.reference.items()}}


def kadaptive_payload(source: dict, sigma_min, sigma_max, x_T, kwargs, trace, draws, references) -> dict:
    """What an adaptive-sampler reproducer needs: the recorded outputs and noise in call order, and the reference
    value and bound of every accepted attempt's sample."""
    return {"kind": "kadaptive", "source": source, "sigma_min": float(sigma_min), "sigma_max": float(sigma_max),
            "x_T": np.asarray(x_T, dtype=np.float64).tolist(), "kwargs": kwargs,
            "outputs": [np.asarray(c.out).tolist() for c in trace.calls],
            "draws": [np.asarray(z).tolist() for z in draws],
            "reference": [[int(i), v.tolist(), b.tolist()] for i, v, b in references]}


_LOADER = '''
def load(source):
    """The target, as refdiff check loaded it (a file alone: its package-relative / missing imports stubbed)."""
    import importlib, importlib.abc, importlib.machinery, importlib.util, sys, types
    if "module" in source:
        return getattr(importlib.import_module(source["module"]), source["function"])

    class Stub(types.ModuleType):
        def __init__(self, name):
            super().__init__(name)
            self.__path__ = []

        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            helpers = {"append_dims": lambda x, n: x[(...,) + (None,) * (n - x.ndim)],
                       "model_trange": lambda *a, **k: range(*a), "trange": lambda *a, **k: range(*a)}
            value = helpers.get(attr) or (type(attr, (), {}) if attr[:1].isupper() else Stub(self.__name__ + "." + attr))
            setattr(self, attr, value)
            return value

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ["_repro_pkg"] + source["stubbed"]:
                return importlib.machinery.ModuleSpec(name, self, is_package=True)

        def create_module(self, spec):
            return Stub(spec.name)

        def exec_module(self, module):
            pass
    sys.modules["_repro_pkg"] = Stub("_repro_pkg")
    spec = importlib.util.spec_from_file_location("_repro_pkg.sampling", source["path"])
    module = importlib.util.module_from_spec(spec)
    finder = Finder()
    sys.meta_path.append(finder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.meta_path.remove(finder)
    return getattr(module, source["function"])
'''

_KFUNCTION = '''#!/usr/bin/env python
"""Reproducer written by refdiff check: {title}

{summary}

Runs {target} once with the model outputs and noise recorded by the check (the model returns them in call order,
so the run retraces itself) and compares every model call's sigma with the sampler's stage level, and every state
the callback reports (and the result) with the reference value refdiff computed in float64 from the target's
previous state, against the stated float32 rounding bound. Needs only numpy, torch and the target.
Exit status 1: the disagreement is reproduced.
"""
import inspect
import json
import sys

import numpy as np
import torch

DATA = json.loads({data!r})
{loader}

def main():
    fn = load(DATA["source"])
    outputs = iter(DATA["outputs"])
    draws = iter(DATA["draws"])
    sigmas_called = []

    class Model:                       # with the attributes ComfyUI-style samplers read off the model
        def __init__(self):
            import types
            ms = types.SimpleNamespace(noise_scale=1.0)
            self.inner_model = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_sampling=ms),
                                                     model_patcher=types.SimpleNamespace(
                                                         get_model_object=lambda name: ms), model_sampling=ms)

        def __call__(self, x, sigma, **kwargs):
            sigmas_called.append(float(sigma.reshape(-1)[0]))
            return torch.tensor(next(outputs), dtype=x.dtype)
    model = Model()

    def noise_sampler(sigma, sigma_next):
        return torch.tensor(next(draws), dtype=torch.float32)
    states = {{}}

    def callback(d):
        if "sigma_hat" not in d or float(d["sigma_hat"]) == float(d["sigma"]):
            states[int(d["i"])] = d["x"].double().numpy()
    kwargs = dict(DATA["kwargs"], extra_args={{}}, callback=callback, disable=True)
    if "noise_sampler" in inspect.signature(fn).parameters:
        kwargs["noise_sampler"] = noise_sampler
    direct = iter(DATA["direct_draws"])               # draws made with torch.randn_like (EDM churn)
    torch.randn_like = lambda t, *a, **k: torch.tensor(next(direct), dtype=t.dtype)
    sigmas = torch.tensor(DATA["sigmas"], dtype=torch.float32)
    out = fn(model, torch.tensor(DATA["x_T"], dtype=torch.float32), sigmas, **kwargs)
    states[len(DATA["sigmas"]) - 1] = (out[0] if isinstance(out, tuple) else out).double().numpy()
    bad = 0
    for k, (got, want) in enumerate(zip(sigmas_called, DATA["expected_sigmas"])):
        if abs(got - want) > 1e-5 * abs(want):
            print(f"model call {{k}}: sigma {{got:.9g}}, the sampler evaluates at {{want:.9g}}")
            bad += 1
    for i, (ref, bound) in sorted(DATA["reference"].items(), key=lambda kv: int(kv[0])):
        i = int(i)
        if i not in states:
            continue
        err = np.abs(states[i] - np.asarray(ref))
        ratio = float(np.max(err / (np.asarray(bound) + 1e-300)))
        flag = "  <-- beyond the rounding bound" if ratio > 1 else ""
        print(f"state {{i}}: max |target - reference| = {{err.max():.3e}}, {{ratio:.3g}} x the bound{{flag}}")
        bad += ratio > 1
    print("reproduced" if bad else "not reproduced")
    if bad:
        print("(the function owns its loop, so the replay cannot restart a step from its recorded state: the first "
              "state beyond the bound is the finding, later ones inherit it)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
'''


_DIFFUSERS = '''#!/usr/bin/env python
"""Reproducer written by refdiff check: {title}

{summary}

Builds {target} with the configuration of the case, feeds step() the model outputs recorded by the check
(float{bits} samples; the generator seeded as in the check), starting each step from the scheduler's own sample of
the recorded run, and compares the sample after each step with the reference value computed in float64 from that
same start, against the stated rounding bound
(4 u times the running error bound of the paper-form step). Needs numpy, torch and the scheduler's package only.
Exit status 1: the disagreement is reproduced.
"""
import json
import sys

import numpy as np
import torch

DATA = json.loads({data!r})


def build(spec):
    if "factory" in spec:                       # a step-protocol factory, imported from the working directory
        import importlib
        module, _, name = spec["factory"].partition(":")
        sys.path.insert(0, "")
        return getattr(importlib.import_module(module), name)(spec["config"])
    import diffusers
    return getattr(diffusers, spec["scheduler"]).from_config(spec["config"])


def main():
    sched = build(DATA["build"])
    sched.set_timesteps(DATA["steps"], **DATA["build"].get("set_timesteps", {{}}))
    call = DATA["build"].get("call", "plain")
    calls = list(sched.timesteps)
    if call in ("drop-last", "batched-t"):     # a list that ends with the final level (SCM, Wuerstchen)
        calls = calls[:-1]
    begin = DATA["build"].get("begin", 0)
    if begin:                                  # img2img: the run starts at the begin index
        sched.set_begin_index(begin)
        calls = calls[begin:]
    if call.startswith("score-sde-pc:"):       # ScoreSdeVe: the pipeline's n corrector calls, then the predictor
        n_corr = int(call.split(":")[1])
        sched.set_sigmas(DATA["steps"])
        calls = [t for t in calls for _ in range(n_corr + 1)]
    dtype = getattr(torch, DATA["dtype"])
    x = torch.tensor(DATA["x_T"], dtype=torch.float32).to(dtype)
    gen = torch.Generator().manual_seed(DATA["seed"])
    refs = {{k: (np.asarray(v), np.asarray(b)) for k, v, b in DATA["reference"]}}
    starts = {{k: x0 for k, x0 in DATA["starts"]}}
    previous = {{}}
    bad = 0
    for k, (t, m) in enumerate(zip(calls, DATA["outputs"])):
        if k in starts:                # each step from the target's own state in the recorded run, as the check
            x = torch.tensor(starts[k], dtype=torch.float64).to(dtype)
        if hasattr(sched, "scale_model_input"):
            sched.scale_model_input(x, t)
        kw = dict(DATA["step_kwargs"], **({{"generator": gen}} if DATA["generator"] else {{}}))
        m = torch.tensor(m, dtype=torch.float64).to(dtype)
        if call == "previous-x0":     # CogVideoX's DPM: step(output, old x0, t, t_back, x)
            out, x0 = sched.step(m, previous.get("x0"), t, previous.get("t"), x, return_dict=False, **kw)
            previous.update(x0=x0, t=t)
        elif call == "batched-t":           # Wuerstchen: one timestep per sample
            out = sched.step(m, t.reshape(1).expand(x.shape[0]), x, **kw)
            out = out.prev_sample if hasattr(out, "prev_sample") else out[0]
        elif call.startswith("score-sde-pc:"):
            pred = k % (n_corr + 1) == n_corr
            out = (sched.step_pred(m, t, x, **kw) if pred else sched.step_correct(m, x, **kw)).prev_sample
        else:
            out = sched.step(m, t, x, **kw)
            out = out.prev_sample if hasattr(out, "prev_sample") else out[0]
        x = out.to(dtype)
        if k + 1 in refs:
            ref, bound = refs[k + 1]
            err = np.abs(x.double().numpy() - ref)
            ratio = float(np.max(err / (bound + 1e-300)))
            flag = "  <-- beyond the rounding bound" if ratio > 1 or not np.all(np.isfinite(x.double().numpy())) else ""
            print(f"after call {{k + 1}} (t = {{float(t):g}}): max |target - reference| = {{err.max():.3e}}, "
                  f"{{ratio:.3g}} x the bound{{flag}}")
            bad += bool(flag)
    print("reproduced" if bad else "not reproduced")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
'''


_KADAPTIVE = '''#!/usr/bin/env python
"""Reproducer written by refdiff check: {title}

{summary}

Runs {target} once with the model outputs and noise recorded by the check (the model returns them in call order,
so the run retraces itself) and compares the sample of every accepted attempt its callback reports with the
reference value refdiff computed in float64 from the target's previous state, against the stated float32 rounding
bound. Needs only numpy, torch and the target. Exit status 1: the disagreement is reproduced.
"""
import json
import sys

import numpy as np
import torch

DATA = json.loads({data!r})
{loader}

def main():
    fn = load(DATA["source"])
    outputs = iter(DATA["outputs"])
    draws = iter(DATA["draws"])

    def model(x, sigma, **kwargs):
        return torch.tensor(next(outputs), dtype=x.dtype)

    def noise_sampler(sigma, sigma_next):
        z = next(draws, None)
        return torch.zeros(len(DATA["x_T"]), len(DATA["x_T"][0])) if z is None else torch.tensor(z)

    attempts = []

    def callback(d):
        attempts.append(d["x"].double().numpy())
    fn(model, torch.tensor(DATA["x_T"], dtype=torch.float32), DATA["sigma_min"], DATA["sigma_max"], extra_args={{}},
       callback=callback, disable=True, noise_sampler=noise_sampler, **DATA["kwargs"])
    bad = 0
    for i, ref, bound in DATA["reference"]:
        if i >= len(attempts):
            print(f"attempt {{i}}: not reached")
            bad += 1
            continue
        err = np.abs(attempts[i] - np.asarray(ref))
        ratio = float(np.max(err / (np.asarray(bound) + 1e-300)))
        flag = "  <-- beyond the rounding bound" if ratio > 1 else ""
        print(f"attempt {{i}}: max |target - reference| = {{err.max():.3e}}, {{ratio:.3g}} x the bound{{flag}}")
        bad += ratio > 1
    print("reproduced" if bad else "not reproduced")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
'''


def write_reproducers(doc: dict, out_dir) -> list:
    """One ``repro_NNN_NAME.py`` per case with an unexplained finding and a recorded run; returns the paths."""
    from pathlib import Path

    out, paths = Path(out_dir), []
    for stale in out.glob("repro_*.py"):
        stale.unlink()
    for k, c in enumerate(doc["cases"]):
        pay = c.get("reproducer")
        unexplained = [f for f in c.get("findings", []) if not f.get("explained")]
        if not pay or not unexplained or pay.get("kind") not in ("kfunction", "kadaptive", "diffusers"):
            continue
        name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(c["scheduler"]))
        path = out / f"repro_{k:03d}_{name}.py"
        f = unexplained[0]
        title = f"{c['scheduler']} [{c.get('variant', '')}], {c.get('steps')} steps"
        if pay["kind"] == "kadaptive":
            text = _KADAPTIVE.format(title=title, summary=f"[{f['kind']}] {f['summary']}", target=c["scheduler"],
                                     data=json.dumps(pay), loader=_LOADER)
        elif pay["kind"] == "kfunction":
            text = _KFUNCTION.format(title=title, summary=f"[{f['kind']}] {f['summary']}", target=c["scheduler"],
                                     data=json.dumps(pay), loader=_LOADER)
        else:
            bits = {"float32": 32, "float16": 16, "bfloat16": 16}.get(pay["dtype"], 32)
            text = _DIFFUSERS.format(title=title, summary=f"[{f['kind']}] {f['summary']}", target=c["scheduler"],
                                     bits=bits, data=json.dumps(pay))
        write_text(path, text)
        os.chmod(path, 0o755)
        paths.append(path)
    return paths
