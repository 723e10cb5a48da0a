"""Target: whole diffusers pipelines (``diffusers-pipeline:NAME``), their denoising loop judged from a trace.

The pipeline is built offline from tiny parts: no text encoders (prompt embeddings are passed in), a tiny
AutoencoderKL (only its configuration is read: ``output_type="latent"`` never decodes), the scheduler of the case,
and in place of the UNet / transformer an ``OracleBackbone``: a torch module with the configuration attributes the
pipeline reads and the call signature it uses, whose output is the exact model output of the check's Gaussian
mixture at the level of the timestep it is given. Latents are read as independent 4-vectors in memory order (any
layout, Flux's packed tokens included), each drawn from the mixture: a product law whose exact eps / v / flow
velocity is the mixture's per vector. The condition is written into the prompt embeddings (entry [b, 0, 0] = class +
1; the negative / empty prompt 0 = the unconditional mixture), so classifier-free guidance combines two different
exact models.

What is recorded per model call: the sample the pipeline passed (after ``scale_model_input``, duplicated for CFG),
the timestep (as its sigma: the table entry for integer timesteps, t / 1000 on flow levels), the output; per step
the latents from ``callback_on_step_end``; the returned latents. ``refdiff.check.trace.judge`` replays the refdiff
sampler of the pipeline's scheduler (the mapping of ``refdiff check diffusers``) on the scheduler's own levels with

* the model input the pipeline must form: x / sqrt(1 + sigma^2) on sigma grids, x on VP and flow grids, twice for CFG;
* the guided output m_u + s (m_c - m_u), and with ``guidance_rescale`` phi the rescale of Lin et al. 2024 (Alg. 2):
  m <- m (phi std(m_c) / std(m) + 1 - phi), per sample; its float32 rounding is carried as a bound;
* stochastic schedulers (Euler ancestral): the noise their step() draws, recorded and replayed;
* img2img: the start of the grid from ``strength`` (init = min(int(n strength), n) steps of the n-step grid) and
  the noised start sqrt(abar) x0 + sqrt(1 - abar) z with the noise the pipeline drew (recorded).

Cases run in a second or less each on the CPU.
"""

from __future__ import annotations

import contextlib
import types

import numpy as np

from ..findings import Finding, case_verdict
from ..replay import R
from ..rounding import Bounded, exact
from ..trace import Call, Reading, Trace, judge

__all__ = ["PIPELINES", "PipelineTarget", "OracleBackbone", "resolve_pipeline"]

LABEL = 0                       # the class the prompt asks for (the mixture's component 0)
LATENT_HW = 4                   # latent height = width (SD: 4 x 4 x 4 channels; Flux: 2 x 2 packed tokens of 64)

# pipeline -> (backbone kind, latent channels, the schedulers its cases run)
PIPELINES = {
    "StableDiffusionPipeline": ("unet", 4, ("DDIMScheduler", "EulerDiscreteScheduler",
                                            "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler")),
    "StableDiffusionImg2ImgPipeline": ("unet", 4, ("DDIMScheduler", "EulerDiscreteScheduler")),
    "StableDiffusionXLPipeline": ("unet-xl", 4, ("EulerDiscreteScheduler", "DDIMScheduler")),
    "StableDiffusion3Pipeline": ("sd3", 16, ("FlowMatchEulerDiscreteScheduler",)),
    "FluxPipeline": ("flux", 16, ("FlowMatchEulerDiscreteScheduler",)),
}
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


class OracleBackbone:
    """Stands in for a UNet / transformer: exact outputs of the mixture, every call recorded into a Trace."""

    def __init__(self, kind: str, channels: int, table=None, flow: bool = False, prediction: str = "epsilon"):
        import torch

        from .diffusers import ORACLE

        self.torch, self.kind, self.data, self.flow, self.prediction = torch, kind, ORACLE, flow, prediction
        self.table = None if table is None else np.asarray(table, dtype=np.float64)   # alphas_cumprod
        self.trace = None
        cfg = dict(in_channels=channels, out_channels=channels, sample_size=LATENT_HW, time_cond_proj_dim=None,
                   addition_embed_type=None, patch_size=1, guidance_embeds=kind == "flux",
                   joint_attention_dim=8, pooled_projection_dim=8)
        if kind == "unet-xl":
            cfg.update(addition_embed_type="text_time", addition_time_embed_dim=2)
            # 6 time ids x 2 + the pooled embedding's 8
            self.add_embedding = types.SimpleNamespace(linear_1=types.SimpleNamespace(in_features=6 * 2 + 8))
        self.config = types.SimpleNamespace(**cfg)
        self.dtype, self.device = torch.float32, torch.device("cpu")

    # what pipelines call on their backbone besides forward
    def cache_context(self, name):
        return contextlib.nullcontext()

    def __call__(self, *args, **kw):
        torch = self.torch
        x = kw.pop("sample", None)
        if x is None:
            x = kw.pop("hidden_states", None)
        if x is None:
            x = args[0]
        t = kw.pop("timestep", None)
        if t is None:
            t = args[1]
        ehs = kw.get("encoder_hidden_states")
        xs = x.detach().to(torch.float64).numpy()
        B = xs.shape[0]
        ts = torch.as_tensor(t).detach().to(torch.float64).reshape(-1).numpy()
        ts = np.broadcast_to(ts, (B,)) if ts.size == 1 else ts
        if not np.all(ts == ts[0]):
            raise ValueError(f"the oracle takes one timestep per call, got {ts}")
        alpha, sigma, sigma_ve = self.level(float(ts[0]))
        labels = np.rint(ehs.detach().to(torch.float64).numpy()[:, 0, 0]).astype(int) - 1
        out = np.empty_like(xs)
        for b in range(B):
            data = self.data if labels[b] < 0 else self.data.conditional(int(labels[b]))
            rows = xs[b].reshape(-1, 4)
            eps = data.eps(rows, alpha, sigma)
            x0 = data.denoise(rows, alpha, sigma)
            if self.flow:
                m = eps - x0
            elif self.prediction == "epsilon":
                m = eps
            elif self.prediction == "v_prediction":
                m = alpha * eps - sigma * x0
            else:
                m = x0
            out[b] = m.reshape(xs[b].shape)
        res = torch.from_numpy(out).to(x.dtype)
        if self.trace is not None:
            self.trace.calls.append(Call(xs, sigma_ve, res.to(torch.float64).numpy(), len(self.trace.states)))
        return (res,)

    def level(self, t: float):
        """(alpha, sigma, sigma / alpha) of the timestep the pipeline passed: flow t in [0, 1] (Flux passes
        sigma; SD3 sigma x 1000, divided by the caller), else an integer index into alphas_cumprod."""
        if self.flow:
            s = t / 1000.0 if self.kind == "sd3" else t
            return 1.0 - s, s, (s / (1.0 - s) if s < 1.0 else np.inf)      # t = 1: pure noise (SNR 0)
        k = int(round(t))
        if abs(t - k) > 1e-3 or not 0 <= k < len(self.table):
            raise ValueError(f"the oracle reads levels at integer timesteps of the table, got t = {t}")
        ab = self.table[k]
        return np.sqrt(ab), np.sqrt(1.0 - ab), np.sqrt((1.0 - ab) / ab)


class _PipelineReading(Reading):
    """Guided output, the model input the pipeline must form, and the adapter's x0 coefficients."""

    def __init__(self, adapter, prediction, scale, rescale, cfg, space):
        self.adapter, self.prediction, self.scale, self.rescale, self.cfg, self.space = \
            adapter, prediction, scale, rescale, cfg, space

    def _halves(self, call):
        out = np.asarray(call.out, dtype=np.float64)
        return np.split(out, 2) if self.cfg else (out, out)

    def _guided(self, call):
        u, c = self._halves(call)
        if not self.cfg:
            return exact(c), 1.0
        g = exact(u) + (exact(c) - exact(u)) * self.scale
        k = 1.0
        if self.rescale > 0:
            axes = tuple(range(1, c.ndim))
            std_c = np.std(c, axis=axes, ddof=1, keepdims=True)
            std_g = np.std(g.v, axis=axes, ddof=1, keepdims=True)
            k = self.rescale * std_c / std_g + (1.0 - self.rescale)
        return g, k

    def m(self, call):
        g, k = self._guided(call)
        return g.v * k

    def m_bounded(self, call):
        g, k = self._guided(call)
        if np.all(np.asarray(k) == 1.0):
            return g
        n = g.v[0].size
        out = g * k
        # the float32 standard deviations behind k: relative error ~ (4 + 2 log2 n) u each, times phi
        return Bounded(out.v, out.e + self.rescale * np.abs(out.v) * (4.0 + 2.0 * np.log2(n)))

    def coeffs(self, level):
        return self.adapter.coeffs(self.prediction, level)

    def model_input(self, x, level):
        if self.space == "ve":
            x = x * (1.0 / np.sqrt(1.0 + np.asarray(level.sigma_ve, dtype=np.float64) ** 2))
        if self.cfg:
            x = Bounded(np.concatenate([x.v, x.v]), np.concatenate([x.e, x.e]))
        return x


class PipelineTarget:
    """One diffusers pipeline class as a check target."""

    def __init__(self, name: str):
        self.pipeline = name
        self.name = f"diffusers-pipeline:{name}"
        self.kind, self.channels, self.schedulers = PIPELINES[name]

    def cases(self, quick: bool = False):
        out = []
        guidance = [(1.0, 0.0), (7.5, 0.0), (5.0, 0.7)] if self.kind != "flux" else [(3.5, 0.0)]
        if not self._takes("guidance_rescale", loosely=True):        # SD3: no such argument (a TypeError)
            guidance = [gp for gp in guidance if gp[1] == 0.0]
        for sched in (self.schedulers[:1] if quick else self.schedulers):
            for steps in ((6,) if quick else (4, 10)):
                for g, phi in (guidance[-2:-1] or guidance if quick else guidance):
                    c = {"variant": sched, "scheduler_class": sched, "steps": steps, "guidance_scale": g,
                         "guidance_rescale": phi, "beta_schedule": "scaled_linear" if "Flow" not in sched else
                         "flow shift 3", "timestep_spacing": "leading" if "Flow" not in sched else "-",
                         "prediction_type": "flow" if "Flow" in sched else "epsilon", "dtype": "float32"}
                    if "Img2Img" in self.pipeline:
                        c["strength"] = 0.6
                    out.append(c)
        return out

    def _takes(self, arg: str, loosely: bool = False) -> bool:
        """Whether the pipeline's __call__ names ``arg`` (``loosely``: or swallows it in **kwargs)."""
        import inspect

        import diffusers

        params = inspect.signature(getattr(diffusers, self.pipeline).__call__).parameters
        return arg in params or (loosely and any(p.kind == p.VAR_KEYWORD for p in params.values()))

    def _scheduler(self, config):
        import diffusers

        cls = getattr(diffusers, config["scheduler_class"])
        if "Flow" in config["scheduler_class"]:
            if self.kind == "flux":      # Flux's resolution-dependent shift (mu from the image sequence length)
                return cls(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                           base_image_seq_len=256, max_image_seq_len=4096)
            return cls(shift=3.0)
        kw = dict(SD_SCHEDULE, timestep_spacing="leading", steps_offset=1)
        if config["scheduler_class"] == "DDIMScheduler":
            kw.update(clip_sample=False, set_alpha_to_one=False)
        return cls(**kw)

    def _build(self, sched, backbone):
        import diffusers
        import torch

        torch.manual_seed(0)          # the tiny VAE's weights (never used: latents are returned undecoded)
        vae = diffusers.AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1,
                                      down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=self.channels,
                                      norm_num_groups=8, sample_size=16)
        cls = getattr(diffusers, self.pipeline)
        if self.kind == "unet":
            extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            return cls(vae=vae, text_encoder=None, tokenizer=None, unet=backbone, scheduler=sched, **extra)
        if self.kind == "unet-xl":
            return cls(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                       unet=backbone, scheduler=sched, force_zeros_for_empty_prompt=False, add_watermarker=False)
        if self.kind == "sd3":
            return cls(transformer=backbone, scheduler=sched, vae=vae, text_encoder=None, tokenizer=None,
                       text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        return cls(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                   tokenizer_2=None, transformer=backbone)

    def _call_kwargs(self, config, latents):
        import torch

        B = latents.shape[0]
        cond = torch.zeros(B, 3, 8)
        cond[:, 0, 0] = LABEL + 1
        neg = torch.zeros(B, 3, 8)
        kw = dict(prompt_embeds=cond, num_inference_steps=config["steps"], guidance_scale=config["guidance_scale"],
                  output_type="latent")
        if self.kind == "flux":
            kw.update(pooled_prompt_embeds=torch.zeros(B, 8), latents=latents, height=LATENT_HW * 8,
                      width=LATENT_HW * 8)
            return kw
        kw.update(negative_prompt_embeds=neg)
        if self.kind in ("unet-xl", "sd3"):
            kw.update(pooled_prompt_embeds=torch.zeros(B, 8), negative_pooled_prompt_embeds=torch.zeros(B, 8))
        if config.get("guidance_rescale", 0.0) > 0:
            kw["guidance_rescale"] = config["guidance_rescale"]
        if "strength" in config:
            kw.update(image=latents, strength=config["strength"])
        else:
            kw.update(latents=latents, height=LATENT_HW * 8, width=LATENT_HW * 8)
        return kw

    def run_case(self, config: dict, seed: int = 0, x_T=None) -> dict:
        import torch

        from . import diffusers as DS

        sched = self._scheduler(config)
        adapter = DS.SCHEDULERS[config["scheduler_class"]](__import__("diffusers"))
        flow = "Flow" in config["scheduler_class"]
        table = None if flow else sched.alphas_cumprod.double().numpy()
        backbone = OracleBackbone(self.kind, self.channels, table, flow, config["prediction_type"])
        pipe = self._build(sched, backbone)
        pipe.set_progress_bar_config(disable=True)
        if self.kind == "flux":                   # packed 2 x 2 patches of the latent image: (B, tokens, 4 C)
            shape = (1, (LATENT_HW // 2) ** 2, self.channels * 4)
        else:
            shape = (1, self.channels, LATENT_HW, LATENT_HW)
        rng = np.random.default_rng(seed)
        img2img = "strength" in config
        if x_T is None:                         # img2img: a clean latent image, a draw of the data law per 4-vector
            x_T = (backbone.data.sample(int(np.prod(shape)) // 4, rng).reshape(shape) if img2img
                   else rng.standard_normal(shape))
        x = torch.from_numpy(np.asarray(x_T, dtype=np.float32))
        trace = Trace(x.double().numpy())
        backbone.trace = trace
        noise_draws = []

        def on_step_end(p, i, t, kw):
            trace.states[i + 1] = kw["latents"].detach().to(torch.float64).numpy()
            return kw
        kw = self._call_kwargs(config, x)
        kw.update(callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
                  generator=torch.Generator().manual_seed(seed))
        case = {"scheduler": self.name, **config, "x_T": np.asarray(x_T).tolist()}
        import sys

        restore = [_record_randn(sys.modules[type(pipe).__module__], noise_draws),
                   _record_randn(sys.modules[type(sched).__module__], trace.draws)]
        try:
            out = pipe(**kw)
        finally:
            for undo in restore:
                undo()
        if not (img2img or flow):   # given latents are scaled by the scheduler's init_noise_sigma (after set_timesteps)
            trace.x_T = (x * sched.init_noise_sigma).double().numpy()
        final = out.images if hasattr(out, "images") else out[0]
        trace.final = torch.as_tensor(final).detach().to(torch.float64).numpy()
        findings = []
        grid = adapter.grid(sched, None if flow else adapter.table(sched))
        smp = adapter.sampler(sched, None if flow else adapter.table(sched), grid)
        case["refdiff_sampler"] = smp.name
        n = config["steps"]
        start = 0
        if img2img:
            init = min(int(n * config["strength"]), n)
            start = max(n - init, 0)
            if trace.calls:
                findings += self._judge_noising(trace, grid.levels[start], noise_draws, adapter)
        if start:
            from ...samplers import Grid

            grid = Grid(grid.levels[start:], grid.schedule, grid.inversion)
        cfg = config["guidance_scale"] > 1.0 and self.kind != "flux"
        phi = config.get("guidance_rescale", 0.0)
        reading = _PipelineReading(adapter, config["prediction_type"], config["guidance_scale"], phi, cfg,
                                   adapter.space)
        if img2img and trace.calls:                       # the loop starts from the noised image the model saw
            first = np.asarray(trace.calls[0].x)
            trace.x_T = np.split(first, 2)[1] if cfg else first
            if adapter.space == "ve":
                trace.x_T = trace.x_T * np.sqrt(1.0 + float(np.mean(grid.levels[0].sigma_ve)) ** 2)
        j = judge(trace, smp, grid, u=float(np.finfo(np.float32).eps) / 2.0, dt_terms=adapter.dt_terms,
                  reading=reading)
        if phi > 0 and j.findings and not self._takes("guidance_rescale"):
            # the pipeline swallows guidance_rescale in **kwargs: re-judged as if it were 0
            again = judge(trace, smp, grid, u=float(np.finfo(np.float32).eps) / 2.0, dt_terms=adapter.dt_terms,
                          reading=_PipelineReading(adapter, config["prediction_type"], config["guidance_scale"], 0.0,
                                                   cfg, adapter.space))
            if not again.findings:
                j.findings = [Finding(
                    "step", f"{self.pipeline}.__call__ has no guidance_rescale argument but accepts it through "
                            "**kwargs and ignores it without a warning: the guided output is not rescaled (the run "
                            "agrees with guidance_rescale = 0)", explained=True,
                    id="diffusers-pipeline-ignores-guidance-rescale",
                    evidence={"per_step_ratio": j.per_step_ratio, "per_step_ratio_without_rescale":
                              again.per_step_ratio})]
        findings += j.findings
        case.update({"per_step_ratio": [r for r in j.per_step_ratio if r == r], "per_call_ratio": j.per_call_ratio,
                     "level_ratio": j.level_ratio, "end_to_end_max_abs": None, "model_calls": len(trace.calls),
                     "timesteps": np.asarray(sched.timesteps, dtype=np.float64).tolist(),
                     "findings": [f.to_dict() for f in findings], "verdict": case_verdict(findings),
                     "finding": "; ".join(str(f) for f in findings)})
        return case

    def _judge_noising(self, trace, level, draws, adapter):
        """img2img: the first model input against sqrt(abar) x0 + sqrt(1 - abar) z (VP; scaled on sigma grids)."""
        if len(draws) != 1:
            return [Finding("structure", f"img2img drew {len(draws)} noise tensors before the loop, expected 1")]
        x0, z = np.asarray(trace.x_T), draws[0]
        a, s = float(np.mean(level.alpha)), float(np.mean(level.sigma))
        if adapter.space == "ve":                  # sigma grid: x_ve = x0 + sigma_ve z, the model sees x_ve * alpha
            want = exact(x0) + exact(z) * float(np.mean(level.sigma_ve))
            want = want * (1.0 / np.sqrt(1.0 + float(np.mean(level.sigma_ve)) ** 2))
        else:
            want = exact(x0) * a + exact(z) * s
        first = np.asarray(trace.calls[0].x)
        got = np.split(first, 2)[1] if first.shape[0] == 2 * x0.shape[0] else first
        u = float(np.finfo(np.float32).eps) / 2.0
        r = float(np.max(np.abs(got - want.v) / (R * u * (want.e + np.abs(want.v)) + 1e-300)))
        if r > 1.0:
            return [Finding("step", f"img2img: the noised start differs from sqrt(abar) x0 + sqrt(1 - abar) z at the "
                                    f"strength's start level beyond the rounding rule (ratio {r:.3g})",
                            evidence={"ratio": r})]
        return []


def _record_randn(module, draws):
    """Record into ``draws`` the noise ``module`` draws with randn_tensor (diffusers imports it by name into each
    pipeline and scheduler module): img2img's noising of the start, a stochastic scheduler's step noise. Returns
    the function that restores the module; a no-op for a module that draws none."""
    real = getattr(module, "randn_tensor", None)
    if real is None:
        return lambda: None

    def recording(*a, **k):
        z = real(*a, **k)
        draws.append(z.detach().double().numpy())
        return z
    module.randn_tensor = recording

    def restore():
        module.randn_tensor = real
    return restore


def resolve_pipeline(name: str):
    """[PipelineTarget] for ``diffusers-pipeline[:NAME]``; UsageError naming the supported ones otherwise."""
    from ..runner import UsageError, did_you_mean

    try:
        import diffusers
        import transformers  # noqa: F401  (diffusers' pipeline modules import it)
    except ImportError as exc:
        raise UsageError(f"the pipeline check needs diffusers and transformers: {exc}") from None
    diffusers.utils.logging.set_verbosity_error()
    if not name:
        return [PipelineTarget(n) for n in PIPELINES]
    if name in PIPELINES:
        return [PipelineTarget(name)]
    if hasattr(diffusers, name) and name.endswith("Pipeline"):
        raise UsageError(f"diffusers-pipeline:{name} is a diffusers pipeline that refdiff does not check yet; "
                         f"checked: {sorted(PIPELINES)}")
    raise UsageError(f"diffusers has no pipeline {name!r}{did_you_mean(name, list(PIPELINES))}; checked: "
                     f"{sorted(PIPELINES)}")
