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
protocol) replay it step by step (refdiff.check.replay); targets that own their loop (k-diffusion-style functions,
pipelines) are run once and their recorded trace is judged (refdiff.check.trace). Adding a target is one file: a
module with a target object, run as ``refdiff check module:Class`` (the README's "Adding a check target"); the
built-in ones below are resolved by name in ``refdiff.check.runner.resolve``.

Specs
-----
kdiffusion[:sample_NAME]       the installed k-diffusion's sampling functions (targets.kdiffusion)
PATH.py[:sample_NAME]          a k-diffusion-style sampling file loaded alone (ComfyUI's comfy/k_diffusion/sampling.py)
module:function                a function with k-diffusion's signature (model, x, sigmas, ...), or a scheduler
                               factory of the step protocol (targets.protocol)
module:Class                   a target object of its own (cases, run_case)
diffusers-pipeline[:NAME]      whole diffusers pipelines (SD, SD img2img, SDXL, SD3, Flux) with an oracle backbone
                               (targets.pipelines)
diffusers[:NAME], kernels      diffusers' schedulers (targets.diffusers), the Triton kernels (targets.kernels)
"""

from . import kdiffusion, pipelines

__all__ = ["kdiffusion", "pipelines", "is_kdiffusion_spec"]       # diffusers, protocol, kernels: imported on use


def is_kdiffusion_spec(spec: str) -> bool:
    """``kdiffusion``, ``kdiffusion:NAME`` or a ``.py`` path (with an optional ``:NAME``)."""
    head = spec.split(":", 1)[0]
    return head == "kdiffusion" or spec.endswith(".py") or ".py:" in spec
