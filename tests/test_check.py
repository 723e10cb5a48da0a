"""refdiff check: diffusers' schedulers against the reference, findings explained, bad targets, failing targets."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from refdiff import cli  # noqa: E402
from refdiff.check.targets import diffusers as DS  # noqa: E402
from refdiff.check.runner import run_check  # noqa: E402

CONFIG = dict(beta_schedule="scaled_linear", prediction_type="epsilon", dtype="float32")


def _config(adapter, steps, **kw):
    """The adapter's first schedule / spacing / prediction (EDM and flow matching have their own axes)."""
    base = dict(variant=next(iter(adapter.variants)), beta_schedule="scaled_linear" if "scaled_linear" in
                adapter.schedules else adapter.schedules[0], timestep_spacing="trailing" if "trailing" in
                adapter.spacings else adapter.spacings[0], steps=steps, prediction_type=adapter.predictions[0],
                dtype="float32")
    return {**base, **kw}


def _ids(case):
    """The ids of a case's findings (explained ones name their explanation, unexplained ones their kind)."""
    return [f["id"] for f in case["findings"]]


def _plant_scaled_output(monkeypatch, cls, method="step", factor=1 + 1e-4):
    """Patch ``cls.method`` so its prev_sample comes out scaled by ``factor`` (a planted error; functools.wraps keeps
    the signature, so the check still passes the generator it takes)."""
    import functools

    real = getattr(cls, method)

    @functools.wraps(real)
    def off(self, *a, **kw):
        out = real(self, *a, **kw)
        out.prev_sample = out.prev_sample * factor
        return out
    monkeypatch.setattr(cls, method, off)


def _explained(case, fid):
    """The case fails only with the explained finding ``fid``."""
    return case["verdict"] == "known" and _ids(case) == [fid] and case["findings"][0]["explained"]


# the 3M, churn and UniPC bh1 variants, TCD (its last step stops at t = 0) and CM (float32 noise at the boundary)
# disagree by design (findings, tested below)
# the DPM-Solver inverse on its default trailing spacing ends with a null step, and IPNDM drops the model's x0 at
# its alpha = 0 start, SA-Solver's order-2 steps carry its released Taylor weights, ScoreSdeVe's one step runs at
# sigma_min, and DDIM's clipped x0 goes with the unclipped eps by default (findings, tested below)
AGREEING = [(name, variant) for name, cls in DS.SCHEDULERS.items() for variant in cls.variants
            if variant not in ("3M", "churn", "order 3") and not variant.startswith("bh1") and not (name.startswith("DDIM") and variant in (
                "clip_sample", "thresholding")) and name not in (
                "TCDScheduler", "CMStochasticIterativeScheduler", "DPMSolverMultistepInverseScheduler",
                "IPNDMScheduler", "SASolverScheduler", "ScoreSdeVeScheduler")]


@pytest.mark.parametrize("name,variant", AGREEING, ids=lambda v: v or "default")
@pytest.mark.parametrize("steps", [1, 10, 25])
def test_mapped_schedulers_agree_to_float32_rounding(name, variant, steps):
    """Every mapped scheduler (one- and two-stage, multistep, stochastic, VE / EDM / flow spaces) agrees with its
    refdiff sampler step by step under the rounding rule; its float32 trajectory stays near the float64 one."""
    adapter = DS.SCHEDULERS[name](diffusers)
    case = DS.run_case(adapter, _config(adapter, steps, variant=variant))
    assert case["verdict"] == "pass", case
    assert case["nonfinite"] == 0 and case["duplicate_timesteps"] == 0
    assert case["end_to_end_max_abs"] < 1e-3                 # float32 trajectory vs float64 reference


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
                                  "DPMSolverSinglestepScheduler", "FlowMatchEulerDiscreteScheduler"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_samples_agree_at_their_unit_roundoff(name, dtype):
    adapter = DS.SCHEDULERS[name](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10, dtype=dtype))
    assert case["verdict"] == "pass", case


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                  "UniPCMultistepScheduler"])
def test_zero_terminal_snr_with_v_prediction(name):
    """alpha_bar_T = 0 (Lin et al. 2024): the first level has alpha = 0 and log-SNR -inf; v prediction defines x0."""
    adapter = DS.SCHEDULERS[name](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10, beta_schedule="zero_snr", prediction_type="v_prediction"))
    assert max(case["per_step_ratio"]) <= 1.0 and case["nonfinite"] == 0, case
    if name == "DDIMScheduler":
        assert case["verdict"] == "pass" and case["sigmas"][0] == np.inf
    else:     # diffusers keeps alpha_bar_T = 2^-24 (first sigma 4096) in these: a known schedule finding, steps agree
        assert _explained(case, "diffusers-zero-snr-clamp") and case["sigmas"][0] == pytest.approx(4096.0)


def test_zero_snr_grid_has_no_eps_cases():
    cases = DS.default_cases(DS.SCHEDULERS["DDIMScheduler"](diffusers))
    assert any(c["beta_schedule"] == "zero_snr" for c in cases)
    assert all(c["prediction_type"] == "v_prediction" for c in cases if c["beta_schedule"] == "zero_snr")


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_other_prediction_types(prediction):
    case = DS.run_case(DS.SCHEDULERS["DPMSolverMultistepScheduler"](diffusers),
                       dict(CONFIG, beta_schedule="linear", prediction_type=prediction, timestep_spacing="trailing",
                            steps=10))
    assert case["verdict"] == "pass", case


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EDMEulerScheduler"])
def test_churn_after_the_model_call_is_a_finding(name):
    """EDM's stochastic Euler evaluates the model at the churned x_hat, sigma_hat; diffusers' step() adds the churn
    after the pipeline's model call at (x, sigma) and reads that output at (x_hat, sigma_hat). Steps without churn
    (sigma outside [S_tmin, S_tmax]) agree; churned steps disagree far beyond rounding, and feeding the reference
    the pre-churn output reproduces diffusers under the rule."""
    adapter = DS.SCHEDULERS[name](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10, variant="churn"))
    assert max(case["per_step_ratio"]) > 100 and _explained(case, "diffusers-churn-after-model")
    if name == "EDMEulerScheduler":               # sigma_max 80 > S_tmax = 50: the first step is not churned
        assert case["per_step_ratio"][0] <= 1.0


def test_unipc_bh1_nan_at_the_final_step_is_explained():
    """UniPC with solver_type bh1 and the default final sigma 0: B(h) = -h = -inf on the last step, times a zero
    corrector residual, gives NaN. Every earlier step agrees with refdiff's UniPC-2(bh1)."""
    adapter = DS.SCHEDULERS["UniPCMultistepScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10, variant="bh1"))
    assert case["nonfinite"] > 0 and _explained(case, "diffusers-unipc-bh1-final-nan")
    assert max(case["per_step_ratio"][:-1]) <= 1.0 and np.isnan(case["per_step_ratio"][-1])


def test_dpmsolver_3m_finding_is_explained():
    """diffusers' 3M update (from the released DPM-Solver code) halves the D'' term: the correct third-order step
    disagrees far beyond rounding once the third order is used; the halved-D2 hypothesis reproduces it exactly."""
    adapter = DS.SCHEDULERS["DPMSolverMultistepScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10, variant="3M"))
    assert max(case["per_step_ratio"][:2]) <= 1.0 < case["per_step_ratio"][2]
    assert _explained(case, "dpmsolver-3m-halved-d2")


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "DPMSolverSinglestepScheduler", "LMSDiscreteScheduler",
                                  "DEISMultistepScheduler", "DDPMScheduler", "DPMSolverSDEScheduler"])
def test_a_small_error_in_the_target_is_caught(name, monkeypatch):
    """Mutation: the target's output scaled by 1 + 1e-4 (~1700 float32 units) must fail, unexplained."""
    adapter = DS.SCHEDULERS[name](diffusers)
    _plant_scaled_output(monkeypatch, adapter.cls)
    case = DS.run_case(adapter, _config(adapter, 10))
    assert case["verdict"] == "fail" and _ids(case) == ["step"] and not case["findings"][0]["explained"], case


def test_brownian_tree_noise_is_replayed():
    """DPMSolverSDEScheduler draws two overlapping Brownian increments per step from a torchsde tree; the check
    records them for the reference. Fresh Gaussian draws instead would disagree far beyond rounding."""
    adapter = DS.SCHEDULERS["DPMSolverSDEScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10))
    assert case["verdict"] == "pass" and len(case["timesteps"]) == 2 * 10 - 1
    adapter.noise_recorder = lambda sched, x: None       # diffusers keeps its tree; the reference draws torch.randn
    case = DS.run_case(adapter, _config(adapter, 10))
    assert case["verdict"] == "fail"


def test_two_stage_schedulers_consume_one_call_per_stage():
    adapter = DS.SCHEDULERS["HeunDiscreteScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10))
    assert len(case["timesteps"]) == 2 * 10 - 1 and len(case["per_step_ratio"]) == 10


@pytest.mark.parametrize("spacing,steps", [("linspace", 10), ("trailing", 3)])
def test_ddim_prev_timestep_bug_is_found_and_explained(spacing, steps):
    """diffusers' DDIM step() uses prev_t = t - T // N: wrong for linspace, and for trailing when T / N is not an
    integer (999, 666, 332 at 3 steps)."""
    case = DS.run_case(DS.SCHEDULERS["DDIMScheduler"](diffusers), dict(CONFIG, timestep_spacing=spacing, steps=steps))
    assert _explained(case, "diffusers-12633")


def test_cli_writes_reports_and_saves_failing_inputs(tmp_path):
    code = cli.main(["check", "diffusers:DDIMScheduler", "--quick", "--out", str(tmp_path), "--save-inputs",
                     "incorrect"])
    doc = json.loads((tmp_path / "check.json").read_text())
    assert doc["schema"] == "refdiff.check/1" and doc["refdiff_version"] and doc["env"]
    assert all(c["verdict"] in ("pass", "known", "fail") for c in doc["cases"])
    assert doc["verdict"] == "known" and code == cli.EXIT_KNOWN == doc["exit_code"]     # DDIM's prev_t finding
    assert doc["headline"].startswith("PASS with") and "known finding" in doc["headline"]
    failing = [c for c in doc["cases"] if c["verdict"] != "pass"]
    saved = sorted(tmp_path.glob("case_*.npz"))
    assert len(saved) == len(failing) and failing
    assert "| scheduler |" in (tmp_path / "check.md").read_text()
    # a saved case reruns to the same verdict and per-step ratios
    from refdiff.check.runner import rerun_case
    again = rerun_case("diffusers:DDIMScheduler", saved[0])
    assert again["verdict"] == failing[0]["verdict"] and again["per_step_ratio"] == failing[0]["per_step_ratio"]
    assert cli.main(["check", "diffusers:DDIMScheduler", "--rerun", str(saved[0])]) == cli.EXIT_KNOWN
    assert cli.main(["check", "diffusers:EulerDiscreteScheduler", "--rerun", str(saved[0])]) == cli.EXIT_USAGE


@pytest.mark.parametrize("target", ["collections:OrderedDict", "diffusers:NoSuchScheduler", "no_such_module:x",
                                    "diffusers:PiflowScheduler", "protocol_scheduler:NoSampler"])
def test_unknown_targets_exit_2(target, capsys):
    assert cli.main(["check", target]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    if target.startswith("collections"):
        assert "found []" in err and "missing ['set_timesteps', 'step'" in err
    if target.endswith("NoSampler"):
        assert "missing ['refdiff_sampler']" in err
    if target.startswith("diffusers:"):
        assert "mapped: [" in err


def test_a_protocol_target_is_checked(tmp_path):
    """A scheduler outside diffusers (tests/protocol_scheduler.py) following the documented step protocol."""
    assert cli.main(["check", "protocol_scheduler:ddim", "--quick", "--out", str(tmp_path)]) == cli.EXIT_PASS
    doc = run_check("protocol_scheduler:ddim_off_by_one", quick=True)
    fp32 = [c for c in doc["cases"] if c["dtype"] == "float32"]
    assert fp32 and all(c["verdict"] == "fail" and "step" in _ids(c) for c in fp32)


def test_a_target_that_raises_fails_only_its_case(monkeypatch):
    adapter_cls = DS.SCHEDULERS["EulerDiscreteScheduler"]
    real = adapter_cls.make

    def flaky(self, config, variant):
        if config["timestep_spacing"] == "trailing":
            raise RuntimeError("boom")
        return real(self, config, variant)

    monkeypatch.setattr(adapter_cls, "make", flaky)
    doc = run_check("diffusers:EulerDiscreteScheduler", quick=True)
    trailing = [c for c in doc["cases"] if c["timestep_spacing"] == "trailing"]
    assert trailing and all(c["verdict"] == "fail" and _ids(c) == ["exception"] and "boom" in c["finding"]
                            for c in trailing)
    assert not any("boom" in c.get("finding", "") for c in doc["cases"] if c["timestep_spacing"] != "trailing")
    assert any(c["verdict"] == "pass" for c in doc["cases"])


def test_karras_sigmas_on_the_cosine_schedule_duplicate_timesteps():
    """diffusers #12771: Karras sigmas on squaredcos_cap_v2 map several sigmas to t = 998; the run starts at the
    second occurrence and raises IndexError at its end. Found with the real code and explained, not hidden."""
    adapter = DS.SCHEDULERS["DPMSolverMultistepScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10, variant="2M Karras", beta_schedule="squaredcos_cap_v2"))
    assert case["duplicate_timesteps"] > 0 and _explained(case, "diffusers-12771")
    assert "IndexError" in case["findings"][0]["summary"]


def test_euler_ancestral_nan_is_found_and_explained():
    """diffusers #14213 reproduced with the real code: squaredcos_cap_v2 (sigma_max ~ 2e4), trailing, 3 steps."""
    case = DS.run_case(DS.SCHEDULERS["EulerAncestralDiscreteScheduler"](diffusers),
                       dict(CONFIG, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", steps=3))
    assert case["nonfinite"] > 0 and _explained(case, "diffusers-14213")


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_euler_v_prediction_is_translated_between_vp_and_ve(name):
    """diffusers' models predict the VP v; the VE-grid reference reads v / alpha. Without that translation every
    case would disagree; with it they agree to diffusers' own float32 bound, long first steps included."""
    for b, sp, n in (("linear", "trailing", 1), ("scaled_linear", "leading", 10)):
        case = DS.run_case(DS.SCHEDULERS[name](diffusers), dict(CONFIG, beta_schedule=b, prediction_type="v_prediction",
                                                                timestep_spacing=sp, steps=n))
        assert case["verdict"] == "pass", case


def test_kernels_target(tmp_path):
    assert cli.main(["check", "kernels", "--out", str(tmp_path)]) == cli.EXIT_PASS
    doc = json.loads((tmp_path / "check.json").read_text())
    names = [c["scheduler"] for c in doc["cases"]]
    assert any(n.startswith("sampler_step") for n in names) and any(n.startswith("attention") for n in names)
    assert all(c["verdict"] == "pass" and c["ratio_to_rule"] <= 1.0 for c in doc["cases"])
    assert "| case | ratio to the rule | verdict |" in (tmp_path / "check.md").read_text()


# -- targets that misbehave: each fails its own cases, named, and the run goes on ------------------------------

def test_a_wrong_shape_target_fails_instead_of_broadcasting():
    doc = run_check("protocol_scheduler:wrong_shape", quick=True)
    assert doc["cases"] and all(c["verdict"] == "fail" and _ids(c) == ["exception"] and
                                "returned shape (1, 4)" in c["finding"]
                                for c in doc["cases"])


def test_a_hanging_target_times_out_and_the_run_goes_on():
    doc = run_check("protocol_scheduler:sleeper", quick=True, case_timeout=1.0)
    half = [c for c in doc["cases"] if c["dtype"] != "float32"]
    assert half and all(c["verdict"] == "fail" and _ids(c) == ["timeout"] for c in half)
    assert all(c["verdict"] == "pass" for c in doc["cases"] if c["dtype"] == "float32")


def test_a_target_calling_sys_exit_fails_its_case(tmp_path):
    assert cli.main(["check", "protocol_scheduler:exiter", "--quick", "--quiet", "--out", str(tmp_path)]) == \
        cli.EXIT_FAIL
    doc = json.loads((tmp_path / "check.json").read_text())
    half = [c for c in doc["cases"] if c["dtype"] != "float32"]
    assert half and all(_ids(c) == ["exit"] and "sys.exit(0)" in c["finding"] for c in half)


def test_a_target_failing_at_import_is_a_usage_error(capsys):
    assert cli.main(["check", "raising_target:ddim"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "RuntimeError: this module cannot be imported" in err


def test_rerun_refuses_a_pickled_case_file_without_running_it(tmp_path, capsys):
    """--rerun loads with allow_pickle=False: an object array whose unpickling would run code is refused."""
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "case.npz"
    np.savez(path, x_T=np.zeros((2, 4)), config=np.array([Payload()], dtype=object), scheduler="DDIMScheduler",
             seed=0)
    assert cli.main(["check", "diffusers", "--rerun", str(path)]) == cli.EXIT_USAGE
    assert not marker.exists()
    assert "not a case file" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"not a zip file", b"PK\x03\x04 truncated"], ids=["empty", "text", "zip"])
def test_rerun_of_a_malformed_file_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "case.npz"
    path.write_bytes(content)
    assert cli.main(["check", "diffusers", "--rerun", str(path)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--rerun" in err


def test_stale_case_files_of_an_earlier_run_are_removed(tmp_path):
    (tmp_path / "case_999_Old.npz").write_bytes(b"stale")
    assert cli.main(["check", "protocol_scheduler:ddim_off_by_one", "--quick", "--quiet", "--out", str(tmp_path),
                     "--save-inputs", "incorrect"]) == cli.EXIT_FAIL
    files = sorted(p.name for p in tmp_path.glob("case_*.npz"))
    assert files and "case_999_Old.npz" not in files
    assert not list(tmp_path.glob(".*tmp"))


# -- the schedule and the grid are judged too; exit codes a CI gate can use -----------------------------------

def test_a_target_with_the_wrong_betas_is_a_schedule_finding():
    """A target building a linear table whatever beta_schedule asks: every step is right for its own levels, so only
    the schedule comparison can catch it."""
    doc = run_check("protocol_scheduler:wrong_betas", quick=True)
    asked_other = [c for c in doc["cases"] if c["beta_schedule"] != "linear"]
    assert asked_other and all("schedule" in _ids(c) for c in asked_other)
    assert all(max(c["per_step_ratio"]) <= 1.0 for c in asked_other)          # the steps themselves agree
    assert doc["exit_code"] == cli.EXIT_FAIL


def test_a_target_ignoring_timestep_spacing_is_a_grid_finding():
    doc = run_check("protocol_scheduler:ignores_spacing", quick=True)
    other = [c for c in doc["cases"] if c["timestep_spacing"] != "linspace" and c["steps"] > 1]
    assert other and all(_ids(c) == ["grid"] for c in other)
    assert doc["exit_code"] == cli.EXIT_FAIL


def test_the_paper_ddim_passes_every_spacing_and_schedule():
    doc = run_check("protocol_scheduler:ddim", quick=True)
    assert doc["verdict"] == "pass" and doc["exit_code"] == cli.EXIT_PASS and doc["headline"] == "PASS"


def test_exit_codes_known_findings_and_accept(tmp_path):
    """4 with only explained findings; 0 once they are accepted (by id, or through a file); 1 for unexplained ones."""
    ddim = ["check", "diffusers:DDIMScheduler", "--quick", "--quiet", "--out", str(tmp_path)]
    assert cli.main(ddim) == cli.EXIT_KNOWN
    assert cli.main(ddim + ["--accept", "diffusers-12633"]) == cli.EXIT_KNOWN         # the clip convention remains
    assert cli.main(ddim + ["--accept", "diffusers-12633", "diffusers-ddim-unclipped-eps"]) == cli.EXIT_PASS
    doc = json.loads((tmp_path / "check.json").read_text())
    assert doc["headline"].startswith("PASS with 27 known findings (27 accepted)")
    (tmp_path / "accept.txt").write_text("# known upstream\ndiffusers-12633  # DDIM prev_t\n"
                                         "diffusers-ddim-unclipped-eps  # clipped x0, raw eps\n")
    assert cli.main(ddim + ["--accept-file", str(tmp_path / "accept.txt")]) == cli.EXIT_PASS
    off = ["check", "protocol_scheduler:ddim_off_by_one", "--quick", "--quiet", "--out", str(tmp_path)]
    assert cli.main(off) == cli.EXIT_FAIL
    assert cli.main(off + ["--accept", "step"]) == cli.EXIT_PASS                  # a kind can be accepted too


def test_current_diffusers_passes_the_gate_with_its_explained_findings_accepted(tmp_path):
    """The quick grid over every mapped scheduler: no unexplained finding, and --accept of the explained ones
    (the known upstream bugs and conventions) exits 0."""
    argv = ["check", "diffusers", "--quick", "--quiet", "--out", str(tmp_path)]
    assert cli.main(argv) == cli.EXIT_KNOWN
    doc = json.loads((tmp_path / "check.json").read_text())
    ids = sorted({f["id"] for c in doc["cases"] for f in c["findings"]})
    assert all(f["explained"] for c in doc["cases"] for f in c["findings"])
    assert {"diffusers-12633", "dpmsolver-3m-halved-d2", "diffusers-churn-after-model",
            "diffusers-unipc-bh1-final-nan", "diffusers-zero-snr-clamp"} <= set(ids)
    assert cli.main(argv + ["--accept", *ids]) == cli.EXIT_PASS


def test_unmapped_diffusers_schedulers_and_typos_are_named(capsys):
    assert cli.main(["check", "diffusers:PiflowScheduler"]) == cli.EXIT_USAGE
    assert "does not map yet" in capsys.readouterr().err
    assert cli.main(["check", "diffusers:EulerDiscreteSchedular"]) == cli.EXIT_USAGE
    assert "did you mean 'EulerDiscreteScheduler'" in capsys.readouterr().err


def test_the_progress_callback_advances_once_per_case():
    seen, totals = [], []
    doc = run_check("protocol_scheduler:ddim", quick=True, progress=seen.append, on_total=totals.append)
    assert totals == [len(doc["cases"])] and len(seen) == len(doc["cases"]) > 0


def test_the_cli_bar_advances_although_a_zero_total_tqdm_is_falsy(tmp_path, monkeypatch):
    """tqdm(total=0) has length 0 and so is falsy: 'if bar' once left the bar at 0it for the whole run."""
    from refdiff import _progress

    class Bar:
        def __init__(self, *a, **k):
            self.n, self.total = 0, 0

        def __len__(self):
            return self.total

        def update(self, k=1):
            self.n += k

        def reset(self, total=None):
            self.total = total

        def close(self):
            pass
    bars = []
    monkeypatch.setattr(_progress, "progress_bar", lambda *a, **k: bars.append(Bar()) or bars[-1])
    assert cli.main(["check", "protocol_scheduler:ddim", "--quick", "--out", str(tmp_path)]) == cli.EXIT_PASS
    assert bars and bars[0].total > 0 and bars[0].n == bars[0].total


@pytest.mark.parametrize("schedule,spacing,steps,pred,fid", [
    ("linear", "linspace", 2, "epsilon", "diffusers-kdpm2a-sigma-down-nan"),
    ("squaredcos_cap_v2", "linspace", 10, "epsilon", "diffusers-kdpm2a-sigma-down-nan"),
    ("squaredcos_cap_v2", "trailing", 10, "v_prediction", "diffusers-kdpm2a-cancelling-sigma-down"),
])
def test_kdpm2_ancestral_findings_are_explained(schedule, spacing, steps, pred, fid):
    """KDPM2AncestralDiscreteScheduler forms sigma_down = sqrt(sigma_next^2 - sigma_up^2) in float32: for sigma >>
    sigma_next it is 0 / NaN (NaN sigma_interpol and timestep), or off by (sigma / sigma_next)^2 u, which the
    float32 table re-run as the reference reproduces."""
    adapter = DS.SCHEDULERS["KDPM2AncestralDiscreteScheduler"](diffusers)
    case = DS.run_case(adapter, dict(variant="", beta_schedule=schedule, timestep_spacing=spacing, steps=steps,
                                     prediction_type=pred, dtype="float32"))
    assert _explained(case, fid), case["finding"]


def _lcm_case(name, steps, prediction="epsilon", dtype="float32"):
    adapter = DS.SCHEDULERS[name](diffusers)
    return DS.run_case(adapter, dict(variant="", beta_schedule="scaled_linear", timestep_spacing="-", steps=steps,
                                     prediction_type=prediction, dtype=dtype))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_lcm_with_the_exact_consistency_function_agrees(prediction):
    """The model is the exact consistency function of a Gaussian (boundary c_skip x + c_out F with timestep
    scaling 10): each LCM step is D = f(x) exactly, then fresh noise to the next level."""
    case = _lcm_case("LCMScheduler", 5, prediction)          # 5 divides 50: diffusers' grid is the paper's
    assert case["verdict"] == "pass", case["finding"]
    assert max(case["per_step_ratio"]) <= 1.0


def test_lcm_even_spacing_is_an_explained_grid_finding():
    case = _lcm_case("LCMScheduler", 3)
    assert _explained(case, "diffusers-lcm-even-spacing"), case["finding"]
    assert case["findings"][0]["evidence"]["paper"] == [999, 679, 359]


def test_lcm_boundary_scaling_error_is_caught(monkeypatch):
    real = diffusers.LCMScheduler.get_scalings_for_boundary_condition_discrete

    def off(self, timestep):
        c_skip, c_out = real(self, timestep)
        return c_skip, c_out * 1.0001
    monkeypatch.setattr(diffusers.LCMScheduler, "get_scalings_for_boundary_condition_discrete", off)
    case = _lcm_case("LCMScheduler", 5)
    assert case["verdict"] == "fail" and case["findings"][0]["kind"] == "step"


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_tcd_stops_at_t0_instead_of_the_data(steps):
    """diffusers' TCD maps its last step to s' = floor((1 - gamma) 0) = 0: the sample at alpha_bar_0 < 1 is
    returned (sigma_0 / alpha_0 ~ 0.03 of noise left), which the re-run with that last level reproduces."""
    case = _lcm_case("TCDScheduler", steps)
    assert case["verdict"] == "known" and "diffusers-tcd-ends-at-t0" in _ids(case), case["finding"]


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_consistency_model_sampling_agrees_up_to_its_boundary_noise(steps):
    """CMStochasticIterative with the exact consistency function (EDM boundary at sigma_min = 0.002): every step
    agrees; the last adds sqrt(float32(0.002)^2 - 0.002^2) = 6.7e-7 of noise at the boundary (one step: none)."""
    adapter = DS.SCHEDULERS["CMStochasticIterativeScheduler"](diffusers)
    case = DS.run_case(adapter, dict(variant="", beta_schedule="karras", timestep_spacing="-", steps=steps,
                                     prediction_type="sample", dtype="float32"))
    if steps == 1:
        assert case["verdict"] == "pass", case["finding"]
    else:
        assert _explained(case, "diffusers-cm-last-step-noise"), case["finding"]
        assert max(case["per_step_ratio"][:-1]) <= 1.0


def test_a_scheduler_finding_writes_a_reproducer_that_runs_without_the_checker(tmp_path):
    """The protocol target's off-by-one: the script rebuilds it from its factory, replays the recorded model
    outputs and shows the step beyond the bound (exit 1)."""
    import os
    import subprocess
    import sys

    tests_dir = os.path.dirname(__file__)
    assert cli.main(["check", "protocol_scheduler:ddim_off_by_one", "--quick", "--quiet", "--out",
                     str(tmp_path)]) == cli.EXIT_FAIL
    script = sorted(tmp_path.glob("repro_*.py"))[0]
    assert "import refdiff" not in script.read_text()
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tests_dir)
    assert res.returncode == 1 and "beyond the rounding bound" in res.stdout, res.stdout + res.stderr


def test_a_diffusers_reproducer_rebuilds_the_scheduler_from_its_config(tmp_path, monkeypatch):
    """A planted error (Euler's step scaled by 1 + 1e-4) is recorded with diffusers' own configuration; the script,
    run against the unpatched diffusers, rebuilds the same scheduler and agrees with the stored reference at every
    step (exit 0): the recorded outputs and reference values are the run's."""
    import subprocess
    import sys

    from refdiff.check.reproducer import write_reproducers

    _plant_scaled_output(monkeypatch, diffusers.EulerDiscreteScheduler)
    adapter = DS.SCHEDULERS["EulerDiscreteScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 6))
    assert case["verdict"] == "fail" and case["reproducer"]["build"]["scheduler"] == "EulerDiscreteScheduler"
    monkeypatch.undo()
    (script,) = write_reproducers({"cases": [case]}, tmp_path)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "not reproduced" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("name", ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"])
def test_cogvideox_schedulers_agree_on_their_released_configuration(name):
    """CogVideoX's own setting: SNR shifted by 3, zero terminal SNR, v prediction, trailing spacing (50 steps divide
    T = 1000, so t - T // N is the next timestep): the shifted table, the grid and every step agree."""
    adapter = DS.SCHEDULERS[name](diffusers)
    case = DS.run_case(adapter, _config(adapter, 50, beta_schedule="zero_snr", prediction_type="v_prediction"))
    assert case["verdict"] == "pass", case["finding"]
    assert case["sigmas"][0] == np.inf


@pytest.mark.parametrize("name", ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"])
def test_cogvideox_steps_to_t_minus_T_over_N(name):
    """3 trailing steps: timesteps 999, 666, 332, but each step goes to t - 333 (665, 333): the #12633 convention,
    for the multistep SDE solver too (r still from the previous start, as its timestep_back)."""
    adapter = DS.SCHEDULERS[name](diffusers)
    case = DS.run_case(adapter, _config(adapter, 3))
    assert _explained(case, "diffusers-12633"), case["finding"]


def test_a_scheduler_ignoring_the_snr_shift_is_a_schedule_finding(monkeypatch):
    """The configuration asks snr_shift_scale = 3; a scheduler that builds the plain table is caught before any
    step (the shift's float32 bound: relative error scaled by s / (s + (1 - s) alpha_bar), plus three roundings)."""
    adapter = DS.SCHEDULERS["CogVideoXDDIMScheduler"](diffusers)
    real = adapter.make
    monkeypatch.setattr(adapter, "make", lambda config, variant: real({**config, "snr_shift_scale": 1.0}, variant))
    case = DS.run_case(adapter, _config(adapter, 10))
    assert case["verdict"] == "fail" and "schedule" in [f["kind"] for f in case["findings"]], case["finding"]


def test_cogvideox_dpm_reproducer_calls_step_with_the_previous_prediction(tmp_path, monkeypatch):
    """CogVideoX's DPM step() takes (output, previous x0, t, previous t, sample) and draws twice in a second-order
    step. A planted error is recorded; the script, run against the unpatched diffusers, drives step() the way the
    pipeline does (its own generator draws) and agrees with the stored reference at every step (exit 0)."""
    import subprocess
    import sys

    from refdiff.check.reproducer import write_reproducers

    import functools

    real = diffusers.CogVideoXDPMScheduler.step

    @functools.wraps(real)                   # keeps step()'s signature: it takes a generator
    def off(self, *a, **kw):
        out, x0 = real(self, *a, **kw)
        return out * (1 + 1e-4), x0
    monkeypatch.setattr(diffusers.CogVideoXDPMScheduler, "step", off)
    adapter = DS.SCHEDULERS["CogVideoXDPMScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 6, timestep_spacing="leading"))
    assert case["verdict"] == "fail" and case["reproducer"]["build"]["call"] == "previous-x0"
    monkeypatch.undo()
    (script,) = write_reproducers({"cases": [case]}, tmp_path)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "not reproduced" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("name,variant", [("DDIMInverseScheduler", ""), ("DPMSolverMultistepInverseScheduler", "2M")])
@pytest.mark.parametrize("steps", [1, 10, 25])
def test_inversion_schedulers_agree_running_towards_the_noise(name, variant, steps):
    """DDIM inversion and DPM-Solver++ 2M on a grid of increasing noise (leading spacing, h < 0), the model output
    passed at each step's start: every step agrees under the rule."""
    adapter = DS.SCHEDULERS[name](diffusers)
    case = DS.run_case(adapter, _config(adapter, steps, variant=variant, timestep_spacing="leading"))
    assert case["verdict"] == "pass", case["finding"]
    assert case["sigmas"][0] < case["sigmas"][-1]


def test_ddim_inversion_steps_from_t_minus_T_over_N():
    """Trailing, 3 steps: timesteps 332, 666, 999; the step to 666 starts at 333 where the last one ended at 332."""
    adapter = DS.SCHEDULERS["DDIMInverseScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 3))
    assert _explained(case, "diffusers-12633"), case["finding"]


def test_dpm_inverse_trailing_ends_with_a_null_step():
    """Trailing spacing: the closing level repeats the last timestep (999), so the last step goes nowhere (checked
    by running it: the sample comes back unchanged); every other step agrees."""
    adapter = DS.SCHEDULERS["DPMSolverMultistepInverseScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10, variant="2M"))
    assert _explained(case, "diffusers-dpm-inverse-trailing"), case["finding"]
    assert max(case["per_step_ratio"]) <= 1.0 and len(case["per_step_ratio"]) == 9


def test_dpm_inverse_3m_trailing_with_15_steps_or_more_returns_nan():
    """From 15 steps on the null last step is third order (no lower_order_final): r0 = h0 / 0 = inf and
    r0 / (r0 + r1) = NaN, so the inverted latent is NaN. Found by running the step; named with its mechanism."""
    adapter = DS.SCHEDULERS["DPMSolverMultistepInverseScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 20, variant="3M"))
    ids = _ids(case)
    assert "diffusers-dpm-inverse-trailing-3m-nan" in ids and case["verdict"] == "known", case["finding"]


@pytest.mark.parametrize("steps", [1, 3, 25])
def test_ipndm_drops_the_models_x0_at_its_snr_zero_start(steps):
    """IPNDMScheduler's first level has alpha = 0 (sigma = sin^2(pi / 2) = 1): its x0 prediction there is
    (x - 1 * x) / 1e-8 = 0 whatever the model says; the re-run with x0 = 0 at that level reproduces every step.
    With one step the output is exactly 0."""
    adapter = DS.SCHEDULERS["IPNDMScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, steps))
    assert _explained(case, "diffusers-ipndm-snr0-x0"), case["finding"]
    assert case["per_step_ratio"][0] > 1e3 and max(case["per_step_ratio"][1:] or [0.0]) <= 1.0


def test_ipndm_transfer_form_is_refdiffs_ipndm():
    """The check's transfer-form iPNDM equals refdiff.samplers.IPNDM(4) (AB on d = eps in x / alpha) wherever
    alpha > 0: one Gaussian-mixture run on a VP grid, to float64 rounding."""
    from refdiff import schedules as S
    from refdiff.samplers import IPNDM, Grid
    from refdiff.solve import sample

    grid = Grid.from_discrete(S.DiscreteSchedule(S.scaled_linear_betas(1000)), np.linspace(980, 20, 12).astype(int),
                              final="data")
    model = DS.oracle_model(DS.ORACLE, "x0")
    x_T = np.random.default_rng(3).standard_normal((2, 4)) * grid.levels[0].sigma
    ours = sample(DS._IPNDMTransfer(), model, grid, x_T, prediction="x0", progress=False).x
    ref = sample(IPNDM(4), model, grid, x_T, prediction="x0", progress=False).x
    np.testing.assert_allclose(ours, ref, rtol=1e-11, atol=1e-11)


def test_cogvideox_ddim_ignores_clip_sample_and_eta():
    """The README's statement, measured: with an x0 prediction far outside [-1, 1], clip_sample=True (its default)
    gives the unclipped step of clip_sample=False, and eta = 1 with a generator gives the deterministic eta = 0."""
    import torch

    out = {}
    for clip in (True, False):
        for eta in (0.0, 1.0):
            sched = diffusers.CogVideoXDDIMScheduler(clip_sample=clip)
            sched.set_timesteps(10)
            x = torch.full((1, 4), 5.0)
            out[clip, eta] = sched.step(torch.zeros(1, 4), sched.timesteps[3], x, eta=eta,
                                        generator=torch.Generator().manual_seed(0)).prev_sample
    assert all(torch.equal(v, out[False, 0.0]) for v in out.values())
    ddim = {}                                                    # the plain DDIM does clip: the probe can tell
    for clip in (True, False):
        sched = diffusers.DDIMScheduler(clip_sample=clip)
        sched.set_timesteps(10)
        ddim[clip] = sched.step(torch.zeros(1, 4), sched.timesteps[3], torch.full((1, 4), 5.0)).prev_sample
    assert not torch.allclose(ddim[True], ddim[False])


def test_pndm_plms_agrees_on_stable_diffusions_setting():
    """PLMS as Stable Diffusion runs it (leading spacing, steps_offset 1, eps, set_alpha_to_one=False): the Heun
    warm-up's two calls and AB2..AB4 agree step by step; the repeated warm-up timestep is one level."""
    adapter = DS.SCHEDULERS["PNDMScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 25, timestep_spacing="leading"))
    assert case["verdict"] == "pass", case["finding"]
    assert len(case["per_step_ratio"]) == 25 and len(case["timesteps"]) == 26


def test_pndm_combines_raw_v_outputs():
    """With v prediction diffusers' PLMS combines the raw v outputs and converts the combination at the step's start:
    the first (Heun) step agrees, the multistep ones need the raw-v hypothesis."""
    adapter = DS.SCHEDULERS["PNDMScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10, timestep_spacing="leading", prediction_type="v_prediction"))
    assert _explained(case, "diffusers-pndm-raw-v"), case["finding"]


def test_pndm_linspace_one_step_returns_the_noise():
    adapter = DS.SCHEDULERS["PNDMScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 1, timestep_spacing="linspace"))
    assert _explained(case, "diffusers-pndm-linspace-null-step") and "x_T comes back" in case["finding"]


def test_pndm_planted_coefficient_error_is_caught(monkeypatch):
    real = diffusers.PNDMScheduler._get_prev_sample

    def off(self, sample, timestep, prev_timestep, model_output):
        return real(self, sample, timestep, prev_timestep, model_output * (1 + 1e-4))
    monkeypatch.setattr(diffusers.PNDMScheduler, "_get_prev_sample", off)
    adapter = DS.SCHEDULERS["PNDMScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10, timestep_spacing="leading"))
    assert case["verdict"] == "fail" and case["findings"][0]["kind"] == "step", case["finding"]


@pytest.mark.parametrize("variant", ["2/2", "3/3"])
@pytest.mark.parametrize("steps", [1, 10, 25])
def test_sa_solver_agrees_with_its_released_order_2_weights(variant, steps):
    """diffusers' SA-Solver (tau = 1 on timesteps 200..800: stochastic steps with the recorded noise) agrees with
    refdiff's stochastic Adams predictor-corrector once its order-2 steps use the released code's Taylor weights;
    one step (first order, no corrector) agrees with the paper form as it is."""
    adapter = DS.SCHEDULERS["SASolverScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, steps, variant=variant))
    if steps == 1:
        assert case["verdict"] == "pass", case["finding"]
    else:
        assert _explained(case, "sa-solver-order2-taylor"), case["finding"]
        assert max(case["findings"][0]["evidence"]["per_step_ratio_under_hypothesis"]) <= 1.0


def test_sa_solver_planted_error_is_caught(monkeypatch):
    import functools

    real = diffusers.SASolverScheduler.stochastic_adams_bashforth_update

    @functools.wraps(real)
    def off(self, *a, **k):
        return real(self, *a, **k) * (1 + 1e-4)
    monkeypatch.setattr(diffusers.SASolverScheduler, "stochastic_adams_bashforth_update", off)
    adapter = DS.SCHEDULERS["SASolverScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10, variant="3/3"))
    assert case["verdict"] == "fail" and case["findings"][0]["kind"] == "step", case["finding"]


def test_flow_match_lcm_wrong_renoising_is_caught(monkeypatch):
    """FlowMatchLCM agrees (the mapped-scheduler test); re-noising with sigma' scaled by 1 + 1e-4 is a step
    finding: the recorded noise makes the stochastic step as exact as a deterministic one."""
    import functools

    real = diffusers.FlowMatchLCMScheduler.step

    @functools.wraps(real)
    def off(self, model_output, timestep, sample, **kw):
        i = self.step_index or 0
        self.sigmas[i + 1] = self.sigmas[i + 1] * (1 + 1e-4)
        return real(self, model_output, timestep, sample, **kw)
    monkeypatch.setattr(diffusers.FlowMatchLCMScheduler, "step", off)
    adapter = DS.SCHEDULERS["FlowMatchLCMScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 4))
    assert case["verdict"] == "fail" and case["findings"][0]["kind"] == "step", case["finding"]


@pytest.mark.parametrize("steps", [2, 10, 50])
def test_score_sde_ve_predictor_corrector_agrees(steps):
    """ScoreSdeVe driven as its pipeline does (a Langevin corrector call, then the reverse-diffusion predictor, per
    level; the score as the model output): every step within the bound, the step size's norms included."""
    adapter = DS.SCHEDULERS["ScoreSdeVeScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, steps))
    assert case["verdict"] == "pass", case["finding"]
    assert case["sigmas"][0] == pytest.approx(1348.0, rel=1e-6)


def test_score_sde_ve_one_step_runs_at_sigma_min():
    adapter = DS.SCHEDULERS["ScoreSdeVeScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 1))
    assert _explained(case, "diffusers-score-sde-ve-one-step"), case["finding"]
    assert case["sigmas"][0] == pytest.approx(0.01, rel=1e-6)


def test_score_sde_ve_per_sample_step_sizes_are_caught(monkeypatch):
    """Langevin step sizes from per-sample norm ratios (refdiff.samplers.PredictorCorrector's form) instead of
    score_sde's batch means: the corrector disagrees beyond the bound."""
    from diffusers.schedulers import scheduling_sde_ve as M

    def per_sample(self, model_output, sample, generator=None, return_dict=True):
        noise = M.randn_tensor(sample.shape, generator=generator)         # the module's: the check records it
        ratio = noise.norm(dim=-1, keepdim=True) / model_output.norm(dim=-1, keepdim=True)
        step = 2.0 * (self.config.snr * ratio) ** 2
        return diffusers.schedulers.scheduling_utils.SchedulerOutput(
            prev_sample=sample + step * model_output + (2.0 * step) ** 0.5 * noise)
    monkeypatch.setattr(diffusers.ScoreSdeVeScheduler, "step_correct", per_sample)
    adapter = DS.SCHEDULERS["ScoreSdeVeScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10))
    assert case["verdict"] == "fail" and case["findings"][0]["kind"] == "step", case["finding"]


def test_score_sde_ve_reproducer_drives_corrector_and_predictor(tmp_path, monkeypatch):
    import subprocess
    import sys

    from refdiff.check.reproducer import write_reproducers

    _plant_scaled_output(monkeypatch, diffusers.ScoreSdeVeScheduler, "step_pred")
    adapter = DS.SCHEDULERS["ScoreSdeVeScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 5))
    assert case["verdict"] == "fail" and case["reproducer"]["build"]["call"] == "score-sde-pc:1"
    monkeypatch.undo()
    (script,) = write_reproducers({"cases": [case]}, tmp_path)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "not reproduced" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("steps", [1, 2, 4, 25])
def test_scm_trigflow_multistep_agrees(steps):
    """sCM on TrigFlow (sigma_d = 0.5) from just below pi / 2: x0 = cos(s) x - sin(s) F with the exact consistency
    function of a Gaussian, re-noised with the recorded float32 draws; two steps through its t = 1.3."""
    adapter = DS.SCHEDULERS["SCMScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, steps))
    assert case["verdict"] == "pass", case["finding"]
    assert case["end_to_end_max_abs"] < 1e-5


def test_scm_planted_error_is_caught_and_reproduced(tmp_path, monkeypatch):
    """A step scaled by 1 + 1e-4 is a step finding; the reproducer script (its own set_timesteps arguments, the
    list's final t = 0 not called, the generator's float32 draws) agrees with the unpatched diffusers."""
    import subprocess
    import sys

    from refdiff.check.reproducer import write_reproducers

    _plant_scaled_output(monkeypatch, diffusers.SCMScheduler)
    adapter = DS.SCHEDULERS["SCMScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 4))
    assert case["verdict"] == "fail" and case["findings"][0]["kind"] == "step", case["finding"]
    monkeypatch.undo()
    (script,) = write_reproducers({"cases": [case]}, tmp_path)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "not reproduced" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("variant", ["clip_sample", "thresholding"])
def test_clipped_and_thresholded_x0(name, variant):
    """clip_sample (x0 clamped to [-1, 1]) and dynamic thresholding (s = clamp(quantile_0.9 |x0|, 1, 1.5) per
    sample, x0 clamped to [-s, s] and divided by s): DDPM's posterior with the transformed x0 agrees; DDIM pairs
    the transformed x0 with the model's unclipped eps by default (its use_clipped_model_output=True agrees: the
    mapped-scheduler test). The transform is active: the reference without it disagrees."""
    adapter = DS.SCHEDULERS[name](diffusers)
    config = _config(adapter, 10, variant=variant, timestep_spacing="leading")
    case = DS.run_case(adapter, config)
    if name == "DDPMScheduler":
        assert case["verdict"] == "pass", case["finding"]
    else:
        assert _explained(case, "diffusers-ddim-unclipped-eps"), case["finding"]
    plain = DS.SCHEDULERS[name](diffusers)
    plain.sampler = lambda sched, table, grid, variant="": (DS.DDPM("fixed_small") if name == "DDPMScheduler"
                                                            else DS.DDIM(0.0))
    plain.hypotheses = lambda *a: {}
    assert DS.run_case(plain, config)["verdict"] == "fail"


@pytest.mark.parametrize("name", [n for n, a in DS.SCHEDULERS.items() if a.img2img and n != "LMSDiscreteScheduler"])
def test_img2img_runs_started_with_set_begin_index_agree(name):
    """Started at step 5 of 10 (strength 0.5) with set_begin_index, as the img2img pipelines do: the first five
    timesteps are not called and every step agrees with the sampler started there (multistep warm-up included)."""
    adapter = DS.SCHEDULERS[name](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10, begin=5))
    assert case["verdict"] == "pass", case["finding"]
    assert len(case["per_step_ratio"]) == 5 and len(case["sigmas"]) == 6


def test_lms_started_part_way_uses_the_wrong_weights():
    """LMSDiscreteScheduler after set_begin_index(5): its order comes from the global step index (4) and its weights
    from nodes at skipped levels, applied to the one derivative it has: the first step disagrees far beyond
    rounding; the global-index hypothesis reproduces every step."""
    adapter = DS.SCHEDULERS["LMSDiscreteScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10, begin=5))
    assert _explained(case, "diffusers-lms-begin-index-order"), case["finding"]
    assert case["findings"][0]["evidence"]["per_step_ratio"][0] > 1e3


@pytest.mark.parametrize("schedule", ["mu 1.15", "mu 0.8 linear"])
def test_flow_dynamic_shifting(schedule, monkeypatch):
    """use_dynamic_shifting with set_timesteps(n, mu=...): the sigmas are refdiff.grids.flow_sigmas(n, mu=...)
    (exponential or linear time shift) and every step agrees; a time shift at mu + 0.01 is a grid finding."""
    adapter = DS.SCHEDULERS["FlowMatchEulerDiscreteScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10, beta_schedule=schedule))
    assert case["verdict"] == "pass", case["finding"]
    real = diffusers.FlowMatchEulerDiscreteScheduler.time_shift
    monkeypatch.setattr(diffusers.FlowMatchEulerDiscreteScheduler, "time_shift",
                        lambda self, mu, sigma, t: real(self, mu + 0.01, sigma, t))
    case = DS.run_case(adapter, _config(adapter, 10, beta_schedule=schedule))
    assert case["verdict"] == "fail" and case["findings"][0]["kind"] == "grid", case["finding"]


def test_a_wrong_intermediate_stage_input_is_caught():
    """DPM-Solver++(2S) with x0 prediction: the final update reads the model at the intermediate level but not the
    intermediate sample itself, so an intermediate off by 1e-3 leaves the step's formula consistent with the output
    the model gave there. The replay compares where the target evaluates the model with the reference's stage
    input: caught."""
    import functools

    real = diffusers.DPMSolverSinglestepScheduler.singlestep_dpm_solver_update

    @functools.wraps(real)
    def off(self, *a, **kw):                      # the first-order halves of the 2S pairs, not the last steps
        out = real(self, *a, **kw)
        return out * (1 + 1e-3) if kw.get("order") == 1 and self.step_index < len(self.timesteps) - 2 else out
    adapter = DS.SCHEDULERS["DPMSolverSinglestepScheduler"](diffusers)
    config = _config(adapter, 10, prediction_type="sample")      # x0 read without the stage input
    assert DS.run_case(adapter, config)["verdict"] == "pass"
    try:
        diffusers.DPMSolverSinglestepScheduler.singlestep_dpm_solver_update = off
        case = DS.run_case(adapter, config)
    finally:
        diffusers.DPMSolverSinglestepScheduler.singlestep_dpm_solver_update = real
    assert case["verdict"] == "fail" and case["findings"][0]["kind"] == "step", case["finding"]


@pytest.mark.parametrize("steps", [3, 10, 25])
def test_dpm_singlestep_order_3(steps):
    """DPMSolverSinglestep with solver_order=3: its 1, 2, 3 groups are DPM-Solver++(3S) steps through the two grid
    points inside them. It reaches the second intermediate with the 2S midpoint update, not DPM-Solver's phi_2 form:
    the stage-input check sees it (both second order; refdiff.samplers.DPMSolverPP3S(second="midpoint") reproduces
    every step and stage). Three steps are one 2S pair and a last first-order step: no 3S group, plain agreement."""
    adapter = DS.SCHEDULERS["DPMSolverSinglestepScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, steps, variant="order 3"))
    if steps == 3:
        assert case["verdict"] == "pass", case["finding"]
    else:
        assert _explained(case, "diffusers-dpm-3s-midpoint-u2"), case["finding"]


def test_ltx_euler_ancestral_rf_wrong_eta_is_caught(monkeypatch):
    """LTXEulerAncestralRF agrees (the mapped-scheduler test, eta = 1 and 0.5 with recorded float32 noise); a
    target that steps with eta = 0.9 while configured with 1 is a step finding."""
    real = diffusers.LTXEulerAncestralRFScheduler.step

    def off(self, *a, **kw):
        self.register_to_config(eta=0.9)
        return real(self, *a, **kw)
    adapter = DS.SCHEDULERS["LTXEulerAncestralRFScheduler"](diffusers)
    config = _config(adapter, 10)
    monkeypatch.setattr(diffusers.LTXEulerAncestralRFScheduler, "step", off)
    case = DS.run_case(adapter, config)
    assert case["verdict"] == "fail" and case["findings"][0]["kind"] == "step", case["finding"]


def test_minimax_h3_reads_a_data_ward_velocity(monkeypatch):
    """MiniMaxH3's x0 = x + sigma v: with diffusers' flow convention (x0 = x - sigma v) fed the same outputs the
    steps disagree; its own grid (linspace(1, 0, n + 1) through shift 12, duplicates collapsed) agrees."""
    adapter = DS.SCHEDULERS["MiniMaxH3Scheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, 10))
    assert case["verdict"] == "pass" and len(case["sigmas"]) == 11, case["finding"]
    monkeypatch.setattr(adapter, "coeffs", lambda prediction, level: (1.0, -float(np.asarray(level.sigma))))
    assert DS.run_case(adapter, _config(adapter, 10))["verdict"] == "fail"


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_flow_map_euler_lands_on_the_exact_ode_map(steps, monkeypatch):
    """FlowMapEuler with the exact flow map of a Gaussian (the average velocity over [r, t] from
    refdiff.oracles.ConsistencyOracle): every step agrees and the float32 run ends on the PF-ODE solution; a step
    scaled by 1 + 1e-4 is a finding."""
    adapter = DS.SCHEDULERS["FlowMapEulerDiscreteScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, steps, beta_schedule="shift 3"))
    assert case["verdict"] == "pass" and case["end_to_end_max_abs"] < 1e-5, case["finding"]
    _plant_scaled_output(monkeypatch, diffusers.FlowMapEulerDiscreteScheduler)
    assert DS.run_case(adapter, _config(adapter, steps, beta_schedule="shift 3"))["verdict"] == "fail"


@pytest.mark.parametrize("steps", [1, 10, 50])
def test_wuerstchen_ddpm_on_its_clamped_cosine(steps, monkeypatch):
    """DDPMWuerstchen: ancestral DDPM steps between its clamped cosine levels (alpha_bar 1e-4 .. 0.9999), the last
    one the posterior mean, its step() given one timestep per sample; a step scaled by 1 + 1e-4 is a finding."""
    adapter = DS.SCHEDULERS["DDPMWuerstchenScheduler"](diffusers)
    case = DS.run_case(adapter, _config(adapter, steps))
    assert case["verdict"] == "pass", case["finding"]
    _plant_scaled_output(monkeypatch, diffusers.DDPMWuerstchenScheduler)
    assert DS.run_case(adapter, _config(adapter, steps))["verdict"] == "fail"


def test_scm_defaults_lie_past_pi_over_2_and_raise_for_n_other_than_2():
    """The README's statement, measured: SCMScheduler's default max_timesteps 1.5708 gives alpha = cos t < 0 (about
    -3.7e-6), and set_timesteps(n) with the default intermediate_timesteps raises for every n != 2."""
    import torch

    sched = diffusers.SCMScheduler()
    sched.set_timesteps(2)
    alpha = float(torch.cos(sched.timesteps[0]))
    assert -4e-6 < alpha < -3e-6
    for n in (1, 3, 10):
        with pytest.raises(ValueError, match="num_inference_steps != 2"):
            diffusers.SCMScheduler().set_timesteps(n)
