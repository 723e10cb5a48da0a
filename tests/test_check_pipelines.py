"""refdiff check diffusers-pipeline:NAME: real diffusers pipelines (SD, SD img2img, SDXL, SD3, Flux) built offline
with an oracle backbone, their whole denoising loop judged from the trace: timesteps / sigmas passed to the model,
scale_model_input, the CFG combine and guidance_rescale, img2img strength and noising, every step, the result."""

import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from refdiff import cli  # noqa: E402
from refdiff.check.runner import UsageError, run_check  # noqa: E402
from refdiff.check.targets import pipelines as P  # noqa: E402

FAMILIES = ["StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"]


@pytest.fixture(scope="module")
def doc():
    return run_check("diffusers-pipeline")


@pytest.mark.parametrize("name", FAMILIES)
def test_one_pipeline_per_family_agrees_quickly(name):
    t0 = time.perf_counter()
    d = run_check(f"diffusers-pipeline:{name}", quick=True)
    assert time.perf_counter() - t0 < 60.0           # the acceptance's budget per family (typically ~1 s)
    assert d["exit_code"] == cli.EXIT_PASS and d["cases"], [c["finding"] for c in d["cases"]]


def test_every_pipeline_case_agrees_or_is_explained(doc):
    """54 cases: schedulers (DDIM, Euler, DPM-Solver++ 2M, Euler ancestral with its step noise recorded, flow Euler
    with SD3's shift and Flux's dynamic mu), 4
    and 10 steps, guidance 1 / 7.5 / 5 with rescale 0.7; every model call's input and level and every step within
    the rule. The one explained finding: img2img swallows guidance_rescale in **kwargs and ignores it."""
    assert len(doc["cases"]) == 54
    for c in doc["cases"]:
        if c["verdict"] == "known":
            assert "Img2Img" in c["scheduler"] and c["guidance_rescale"] > 0
            assert c["findings"][0]["id"] == "diffusers-pipeline-ignores-guidance-rescale"
            continue
        assert c["verdict"] == "pass", (c["scheduler"], c["variant"], c["finding"])
        assert max(c["per_step_ratio"]) <= 1.0 and max(c["per_call_ratio"]) <= 1.0 and max(c["level_ratio"]) <= 1.0
        assert c["model_calls"] == (c["steps"] if "Img2Img" not in c["scheduler"]
                                    else min(int(c["steps"] * c["strength"]), c["steps"]))


CASE = {"variant": "EulerDiscreteScheduler", "scheduler_class": "EulerDiscreteScheduler", "steps": 6,
        "guidance_scale": 5.0, "guidance_rescale": 0.7, "beta_schedule": "scaled_linear",
        "timestep_spacing": "leading", "prediction_type": "epsilon", "dtype": "float32"}


def test_a_wrong_guidance_rescale_is_caught(monkeypatch):
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion as M

    real = M.rescale_noise_cfg
    monkeypatch.setattr(M, "rescale_noise_cfg", lambda n, t, guidance_rescale=0.0: real(n, t, guidance_rescale) * 1.001)
    case = P.PipelineTarget("StableDiffusionPipeline").run_case(CASE)
    assert case["verdict"] == "fail" and case["findings"][0]["kind"] == "step"


def test_a_missing_scale_model_input_is_a_call_finding(monkeypatch):
    import diffusers

    monkeypatch.setattr(diffusers.EulerDiscreteScheduler, "scale_model_input", lambda self, sample, t: sample)
    case = P.PipelineTarget("StableDiffusionPipeline").run_case(CASE)
    f = case["findings"][0]
    assert f["kind"] == "call" and "sample passed to the model" in f["summary"]


def test_a_guidance_scale_off_by_0_1_percent_is_caught(monkeypatch):
    real = P._PipelineReading.__init__
    monkeypatch.setattr(P._PipelineReading, "__init__",
                        lambda self, a, p, s, r, c, sp: real(self, a, p, s * 1.001, r, c, sp))
    case = P.PipelineTarget("StableDiffusionPipeline").run_case({**CASE, "variant": "DDIMScheduler",
                                                                 "scheduler_class": "DDIMScheduler"})
    assert case["verdict"] == "fail" and case["findings"][0]["kind"] == "step"


def test_the_oracle_refuses_fractional_timesteps():
    bb = P.OracleBackbone("unet", 4, table=np.linspace(0.99, 0.01, 1000))
    with pytest.raises(ValueError, match="integer timesteps"):
        bb.level(10.5)


@pytest.mark.parametrize("target,fragment", [
    ("diffusers-pipeline:StableDiffusionPipelin", "did you mean 'StableDiffusionPipeline'"),
    ("diffusers-pipeline:KandinskyPipeline", "does not check yet"),
    ("diffusers-pipeline:NoSuchThing", "has no pipeline"),
])
def test_pipeline_names_that_are_not_checked_exit_2(target, fragment, capsys):
    assert cli.main(["check", target, "--quiet"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err


def test_without_transformers_the_error_says_so(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_transformers(name, *a, **k):
        if name == "transformers":
            raise ImportError("No module named 'transformers'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(UsageError, match="needs diffusers and transformers"):
        P.resolve_pipeline("StableDiffusionPipeline")
