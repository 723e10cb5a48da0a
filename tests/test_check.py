"""refdiff check: diffusers' schedulers against the reference, findings explained, bad targets, failing targets."""

import json

import pytest

pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from refdiff import cli  # noqa: E402
from refdiff.check import diffusers_schedulers as DS  # noqa: E402
from refdiff.check.runner import run_check  # noqa: E402

CONFIG = dict(beta_schedule="scaled_linear", prediction_type="epsilon")


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                                  "UniPCMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
@pytest.mark.parametrize("spacing,steps", [("leading", 10), ("trailing", 25), ("leading", 1)])
def test_mapped_schedulers_agree_to_float32_rounding(name, spacing, steps):
    case = DS.run_case(DS.SCHEDULERS[name](diffusers), dict(CONFIG, timestep_spacing=spacing, steps=steps))
    assert case["verdict"] == "pass", case
    assert case["nonfinite"] == 0 and case["duplicate_timesteps"] == 0
    assert case["end_to_end_max_abs"] < 1e-3                 # float32 trajectory vs float64 reference


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_other_prediction_types(prediction):
    case = DS.run_case(DS.SCHEDULERS["DPMSolverMultistepScheduler"](diffusers),
                       dict(beta_schedule="linear", prediction_type=prediction, timestep_spacing="trailing", steps=10))
    assert case["verdict"] == "pass", case


@pytest.mark.parametrize("spacing,steps", [("linspace", 10), ("trailing", 3)])
def test_ddim_prev_timestep_bug_is_found_and_explained(spacing, steps):
    """diffusers' DDIM step() uses prev_t = t - T // N: wrong for linspace, and for trailing when T / N is not an
    integer (999, 666, 332 at 3 steps)."""
    case = DS.run_case(DS.SCHEDULERS["DDIMScheduler"](diffusers), dict(CONFIG, timestep_spacing=spacing, steps=steps))
    assert case["verdict"] == "fail"
    assert case["finding"].startswith("explained: prev_t = t - T // N")


def test_cli_writes_reports_and_saves_failing_inputs(tmp_path):
    code = cli.main(["check", "diffusers:DDIMScheduler", "--quick", "--out", str(tmp_path), "--save-inputs",
                     "incorrect"])
    doc = json.loads((tmp_path / "check.json").read_text())
    assert doc["schema"] == "refdiff.check/1" and doc["refdiff_version"] and doc["env"]
    assert all(c["verdict"] in ("pass", "fail") for c in doc["cases"])
    assert code == (cli.EXIT_FAIL if doc["verdict"] == "fail" else cli.EXIT_PASS)
    failing = [c for c in doc["cases"] if c["verdict"] == "fail"]
    assert len(list(tmp_path.glob("case_*.npz"))) == len(failing)
    assert "| scheduler |" in (tmp_path / "check.md").read_text()


@pytest.mark.parametrize("target", ["collections:OrderedDict", "diffusers:NoSuchScheduler", "no_such_module:x",
                                    "diffusers:HeunDiscreteScheduler"])
def test_unknown_targets_exit_2(target, capsys):
    assert cli.main(["check", target]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    if target.startswith("collections"):
        assert "found []" in err and "missing ['set_timesteps', 'step'" in err


def test_a_target_that_raises_fails_only_its_case(monkeypatch):
    adapter_cls = DS.SCHEDULERS["EulerDiscreteScheduler"]
    real = adapter_cls.make

    def flaky(self, config):
        if config["timestep_spacing"] == "trailing":
            raise RuntimeError("boom")
        return real(self, config)

    monkeypatch.setattr(adapter_cls, "make", flaky)
    doc = run_check("diffusers:EulerDiscreteScheduler", quick=True)
    bad = [c for c in doc["cases"] if c["verdict"] == "fail"]
    assert bad and all(c["timestep_spacing"] == "trailing" and "boom" in c["finding"] for c in bad)
    assert any(c["verdict"] == "pass" for c in doc["cases"])


def test_euler_ancestral_nan_is_found_and_explained():
    """diffusers #14213 reproduced with the real code: squaredcos_cap_v2 (sigma_max ~ 2e4), trailing, 3 steps."""
    case = DS.run_case(DS.SCHEDULERS["EulerAncestralDiscreteScheduler"](diffusers),
                       dict(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", timestep_spacing="trailing",
                            steps=3))
    assert case["verdict"] == "fail" and case["nonfinite"] > 0
    assert case["finding"].startswith("explained: diffusers #14213")


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_euler_v_prediction_is_translated_between_vp_and_ve(name):
    """diffusers' models predict the VP v; the VE-grid reference reads v / alpha. Without that translation every
    case would disagree; with it they agree to diffusers' own float32 bound, long first steps included."""
    for b, sp, n in (("linear", "trailing", 1), ("scaled_linear", "leading", 10)):
        case = DS.run_case(DS.SCHEDULERS[name](diffusers), dict(beta_schedule=b, prediction_type="v_prediction",
                                                                timestep_spacing=sp, steps=n))
        assert case["verdict"] == "pass", case


def test_kernels_target(tmp_path):
    assert cli.main(["check", "kernels", "--out", str(tmp_path)]) == cli.EXIT_PASS
    doc = json.loads((tmp_path / "check.json").read_text())
    names = [c["scheduler"] for c in doc["cases"]]
    assert any(n.startswith("sampler_step") for n in names) and any(n.startswith("attention") for n in names)
    assert all(c["verdict"] == "pass" and c["ratio_to_rule"] <= 1.0 for c in doc["cases"])
    assert "| case | ratio to the rule | verdict |" in (tmp_path / "check.md").read_text()
