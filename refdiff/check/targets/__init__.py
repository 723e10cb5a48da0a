"""Check targets: one module per kind of implementation, behind one small protocol.

A target is an object with

    name : str                                   how the report names it ("diffusers:DDIMScheduler", ...)
    cases(quick: bool) -> list[dict]             the configurations to run (each a JSON-serialisable dict with the
                                                 report's columns: variant, beta_schedule, timestep_spacing, steps,
                                                 prediction_type, dtype)
    run_case(config, seed=0, x_T=None) -> dict   one case: its numbers and ``findings`` (refdiff.check.findings
                                                 .Finding dicts) with ``verdict`` = case_verdict(findings)

``refdiff.check.runner`` runs every case of every target the spec names under the same guards (per-case timeout,
exceptions and sys.exit become findings) and writes one report. Targets that step a scheduler (diffusers, the step
protocol) replay it step by step (refdiff.check.replay); targets that own their loop (k-diffusion-style functions)
are run once and their recorded trace is judged (refdiff.check.trace). Adding a target is one module here with a
``resolve(spec)`` and an entry in ``SPECS``; the README's "Adding a check target" shows one end to end.

Specs
-----
kdiffusion[:sample_NAME]       the installed k-diffusion's sampling functions (targets.kdiffusion)
PATH.py[:sample_NAME]          a k-diffusion-style sampling file loaded alone (ComfyUI's comfy/k_diffusion/sampling.py)
module:function                a function with k-diffusion's signature (model, x, sigmas, ...), or a scheduler
                               factory of the step protocol (refdiff.check.runner)
diffusers-pipeline[:NAME]      whole diffusers pipelines (SD, SD img2img, SDXL, SD3, Flux) with an oracle backbone
                               (targets.pipelines)
diffusers[:NAME], kernels      diffusers' schedulers (refdiff.check.diffusers_schedulers), the Triton kernels
"""

from . import kdiffusion, pipelines

__all__ = ["kdiffusion", "pipelines", "is_kdiffusion_spec"]


def is_kdiffusion_spec(spec: str) -> bool:
    """``kdiffusion``, ``kdiffusion:NAME`` or a ``.py`` path (with an optional ``:NAME``)."""
    head = spec.split(":", 1)[0]
    return head == "kdiffusion" or spec.endswith(".py") or ".py:" in spec
