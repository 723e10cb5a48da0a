"""refdiff's DDIM and DPM-Solver++ 2M against diffusers' schedulers, step by step, under matching conventions.

Both sides get the same float32 input x_i and model output at every step, and refdiff uses diffusers' own float32
tables converted to float64; the per-step rule (refdiff.check: a running float32 rounding bound of the step's
formula) then only allows diffusers' float32 arithmetic. The comparison machinery is refdiff.check's; these are the
two samplers' cases, kept as their own tests.
"""

import pytest

pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from refdiff.check.targets import diffusers as DS  # noqa: E402

SD = dict(beta_schedule="scaled_linear", prediction_type="epsilon", dtype="float32")


def _case(name, spacing, n, **kwargs):
    return DS.run_case(DS.SCHEDULERS[name](diffusers), dict(SD, timestep_spacing=spacing, steps=n,
                                                              scheduler_kwargs=kwargs))


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [1, 10, 50])
@pytest.mark.parametrize("alpha_to_one", [False, True])
def test_ddim_matches_diffusers_step_by_step(spacing, n, alpha_to_one):
    case = _case("DDIMScheduler", spacing, n, set_alpha_to_one=alpha_to_one)
    assert max(case["per_step_ratio"]) <= 1.0, case


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("n", [1, 5, 20])
def test_dpmsolver_pp_2m_matches_diffusers_step_by_step(spacing, n):
    case = _case("DPMSolverMultistepScheduler", spacing, n)
    assert max(case["per_step_ratio"]) <= 1.0, case


def test_ddim_linspace_reads_the_wrong_alpha_bar_prev():
    """diffusers #12633 / #11347: with linspace spacing DDIM's step uses prev_t = t - T // N, not the next grid
    timestep: far beyond float32 rounding at the first step (999 -> 899 instead of 999 -> 888)."""
    case = _case("DDIMScheduler", "linspace", 10)
    assert case["per_step_ratio"][0] > 1e3
    assert [f["id"] for f in case["findings"]] == ["diffusers-12633"] and case["findings"][0]["explained"]
