"""DPS Guidance for the Stable Diffusion WebUI (AUTOMATIC1111 and Forge): an always-visible accordion
in txt2img and img2img that steers the host's own sampler towards a measurement (Chung et al. 2023).

The WebUI imports only ``scripts/*.py`` and puts the extension root on ``sys.path`` while doing so, so
``dps`` (the core) and ``dps_webui`` (the host-free adapter) are imported here, at module level.
Outside a WebUI (no ``modules``), this file defines nothing and does nothing.
"""

from __future__ import annotations

import math

import torch

from dps.guidance import DPSGuidance
from dps.recompute import BlockRecompute
from dps.operators import registry
from dps.proximal import sampler_note
from dps.vae_gradient import VAE_GRADIENTS
from dps_webui import hooks, measure, xyz
from dps_webui.settings import (ARG_NAMES, DEFAULTS, INFOTEXT_KEY, NOISES, NOTE_KEY, OPERATOR_SETTINGS, RULES, SOURCES,
                                TASKS, DPSSettings, build_noise, build_operator, needs_mask, operator_values,
                                parse_infotext, replace, setting_name, webui_specs)

try:
    import gradio as gr
    from modules import scripts, shared
except ImportError:  # not inside the WebUI
    scripts = None

try:
    from modules.ui_components import InputAccordion
except ImportError:
    InputAccordion = None
try:
    from modules import images as host_images
except ImportError:
    host_images = None
try:
    from modules import lowvram as host_lowvram
except ImportError:
    host_lowvram = None
try:  # the restoration tab
    from modules import processing as host_processing
    from modules import script_callbacks
except ImportError:
    host_processing = script_callbacks = None
try:
    from modules.call_queue import queue_lock
except ImportError:
    queue_lock = None
try:  # img2img's own reading of a mask (RGBA masks carry it in alpha)
    from modules.processing import create_binary_mask
except ImportError:
    create_binary_mask = None

TITLE = "DPS Guidance"
ERROR_KEY = "DPS error"
# SD latents are scaled (scale_factor) to unit variance: the prior std that mode "x0_only" assumes.
LATENT_SIGMA_DATA = 1.0


def _paste(name: str):
    return lambda params: parse_infotext(params.get(INFOTEXT_KEY)).get(name)


def _low_vram(p) -> bool:
    if host_lowvram is not None and hasattr(host_lowvram, "is_enabled"):
        try:
            return bool(host_lowvram.is_enabled(p.sd_model))
        except Exception:
            pass
    opts = getattr(shared, "cmd_opts", None)
    return bool(getattr(opts, "medvram", False) or getattr(opts, "lowvram", False))


def _unet_forward_replaced(sd_model) -> bool:
    """ControlNet (and others) replace the UNet's forward on the instance and run parts of it under no_grad."""
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    return unet is not None and ("_original_forward" in vars(unet) or "forward" in vars(unet))


def _notes(job: hooks.Job) -> str | None:
    notes = list(job.notes)
    if job.skipped_calls:
        notes.append(f"{job.skipped_calls} of {job.guided_calls} guided steps skipped (non-finite or exploding "
                     "gradient; lower zeta, or use --no-half-vae)")
    return "; ".join(notes) or None


def _fit(p, image, width: int, height: int):
    """Resize an init image (or mask) the way img2img resizes it, so y lines up with the init latent."""
    if not hasattr(image, "crop") or host_images is None:
        return image
    if getattr(p, "inpaint_full_res", False) and getattr(p, "paste_to", None) is not None:
        x, y, w, h = p.paste_to
        return host_images.resize_image(2, image.crop((x, y, x + w, y + h)), width, height)
    return host_images.resize_image(getattr(p, "resize_mode", 0), image, width, height)


def _operator_control(name: str):
    """The gradio control of one operator setting, from its parameter's spec (label, range, help with units)."""
    param, value = OPERATOR_SETTINGS[name], getattr(DEFAULTS, name)
    if param.kind == "choice":
        return gr.Dropdown(label=param.label, choices=list(param.choices), value=value, info=param.help)
    if param.min is None or param.max is None or param.max - param.min > 10_000:  # a seed: type it
        return gr.Number(label=param.label, value=value, precision=0 if param.kind == "int" else None, info=param.help)
    step = param.step or (1 if param.kind == "int" else 0.01)
    return gr.Slider(label=param.label, minimum=param.min, maximum=param.max, step=step, value=value, info=param.help)


def _operator_controls(c: dict) -> None:
    """The operators' parameters, a row per operator as the registry lists them (shared by the accordion and
    the tab); a setting two operators share (the blur kernel size) is shown once."""
    for spec in webui_specs():
        names = [setting_name(spec, p) for p in spec.params if not p.is_tensor]
        names = [n for n in dict.fromkeys(names) if n not in c]
        if names:
            with gr.Row():
                for name in names:
                    c[name] = _operator_control(name)


def _guidance_controls(c: dict) -> None:
    """Noise model and guidance settings (shared by the accordion and the tab)."""
    d = DEFAULTS
    c["simulate"] = gr.Checkbox(label="The image is clean: simulate y = A(x) + noise (for testing)", value=d.simulate)
    with gr.Row():
        c["noise"] = gr.Dropdown(label="Measurement noise", choices=list(NOISES), value=d.noise)
        c["noise_sigma"] = gr.Slider(label="Gaussian sigma (on [-1, 1])", minimum=0.0, maximum=1.0, step=0.005,
                                     value=d.noise_sigma)
        c["poisson_rate"] = gr.Slider(label="Poisson rate", minimum=0.01, maximum=10.0, step=0.01,
                                      value=d.poisson_rate)
    with gr.Row():
        c["zeta"] = gr.Slider(label="Strength zeta", minimum=0.0, maximum=10.0, step=0.05, value=d.zeta)
        c["rule"] = gr.Dropdown(label="Step rule", choices=list(RULES), value=d.rule)
        c["mode"] = gr.Radio(label="Gradient", choices=["full", "x0_only"], value=d.mode)
    with gr.Row():
        c["start"] = gr.Slider(label="Start (fraction of sampling)", minimum=0.0, maximum=1.0, step=0.01,
                               value=d.start)
        c["end"] = gr.Slider(label="End (fraction of sampling)", minimum=0.0, maximum=1.0, step=0.01, value=d.end)
        c["vae_gradient"] = gr.Dropdown(label="VAE gradient (memory)", choices=list(VAE_GRADIENTS),
                                        value=d.vae_gradient)


class JobState:
    """What one generation needs: settings, the hooks' shared Job, and guidance built per image size."""

    def __init__(self, settings: DPSSettings) -> None:
        self.settings = settings
        self.job = hooks.Job()
        self.guidance: dict[tuple[int, int, bool], DPSGuidance] = {}
        self.y_hash: str | None = None


if scripts is not None:

    class DPSGuidanceScript(scripts.Script):
        def title(self):
            return TITLE

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            c: dict = {}
            if InputAccordion is not None:
                accordion = InputAccordion(False, label=TITLE, elem_id=self.elem_id("dps_enabled"))
                c["enabled"] = accordion
            else:
                accordion = gr.Accordion(TITLE, open=False)
            with accordion:
                if InputAccordion is None:
                    c["enabled"] = gr.Checkbox(label="Enable", value=False)
                with gr.Row():
                    c["task"] = gr.Dropdown(label="Task (operator A)", choices=list(TASKS), value=DEFAULTS.task)
                    c["source"] = gr.Radio(label="Measurement y from", choices=list(SOURCES),
                                           value="init image" if is_img2img else "upload")
                _operator_controls(c)
                with gr.Row():
                    c["image"] = gr.Image(label="Measurement (the degraded image)", type="pil")
                    c["mask"] = gr.Image(label="Inpainting mask (white = missing; img2img's mask if empty)",
                                         type="pil")
                _guidance_controls(c)
            self.infotext_fields = [(c["enabled"], lambda params: INFOTEXT_KEY in params)]
            self.infotext_fields += [(c[n], _paste(n)) for n in ARG_NAMES if n not in ("enabled", "image", "mask")]
            self.paste_field_names = [INFOTEXT_KEY]
            return [c[n] for n in ARG_NAMES]

        def process(self, p, *args):
            p.dps_state = None
            try:
                settings = DPSSettings.from_args(args)
                overrides = xyz.overrides_of(p)  # X/Y/Z plot cells (dps_webui/xyz.py)
                if overrides:
                    settings = replace(settings, **overrides)
            except (ValueError, TypeError) as exc:
                if args and args[0]:
                    hooks.console(str(exc))
                    p.extra_generation_params[ERROR_KEY] = str(exc)
                return
            if settings.enabled:
                p.dps_state = JobState(settings)

        def process_before_every_sampling(self, p, *args, **kwargs):
            state = getattr(p, "dps_state", None)
            if state is None:
                return
            job = state.job
            p.extra_generation_params[NOTE_KEY] = lambda **_: _notes(job)
            p.extra_generation_params[ERROR_KEY] = lambda **_: job.error
            if getattr(p, "is_hr_pass", False):
                job.note("not applied in the hires-fix pass (the measurement fits the first pass)")
                return
            note = sampler_note(state.settings.rule, str(getattr(p, "sampler_name", "") or ""))
            if note is not None:
                job.note(note)
            try:
                forge = hasattr(p.sd_model, "forge_objects")
                guidance = self._guidance(p, state, forge)
                p.extra_generation_params[INFOTEXT_KEY] = replace(state.settings, mode=guidance.mode).to_infotext(
                    state.y_hash)
                if forge:
                    self._hook_forge(p, guidance, job)
                else:
                    self._hook_a1111(p, guidance, job)
            except Exception as exc:  # the WebUI would only log it; say so in the infotext too
                job.fail(exc)

        def postprocess(self, p, processed, *args):
            state = getattr(p, "dps_state", None)
            sampler = getattr(p, "sampler", None)
            if sampler is not None and hasattr(sampler, "model_wrap_cfg"):
                hooks.DenoiserWrapper.uninstall(sampler.model_wrap_cfg)
            if state is not None and state.job.last_distance is not None:
                job = state.job
                refined = f", {job.refined[-1].mean():.4g} after the last step's refinement" if job.refined else ""
                hooks.console(f"measurement distance {job.first_distance.mean():.4g} -> {job.last_distance.mean():.4g}"
                              f" over {job.guided_calls} guided denoiser calls ({job.skipped_calls} skipped){refined}")

        # -- building blocks -------------------------------------------------------------------------------

        def _guidance(self, p, state: JobState, forge: bool) -> DPSGuidance:
            settings, job = state.settings, state.job
            mode, note = settings.mode, job.note
            if forge and mode == "full":
                mode = "x0_only"
                note("x0_only: Forge samples under inference mode with inference-tensor weights; "
                     "the full gradient through the UNet is not supported there")
            elif not forge and mode == "full" and _low_vram(p):
                mode = "x0_only"
                note("x0_only: --medvram/--lowvram moves the UNet off the GPU while the VAE decodes, "
                     "which breaks a backward through both")
            elif not forge and mode == "full" and _unet_forward_replaced(p.sd_model):
                mode = "x0_only"
                note("x0_only: another extension (e.g. ControlNet) replaced the UNet's forward and runs it "
                     "partly without gradients")
            key = (p.height, p.width, forge, mode)
            if key not in state.guidance:
                operator, y = self._measurement(p, settings, p.height, p.width)
                state.y_hash = measure.measurement_hash(y)
                if forge:
                    gradient = hooks.forge_gradient(p.sd_model.forge_objects.vae, settings.vae_gradient)
                else:
                    gradient = hooks.vae_gradient(lambda: getattr(shared, "sd_model", None) or p.sd_model,
                                                  settings.vae_gradient)
                unet = getattr(getattr(p.sd_model, "model", None), "diffusion_model", None)
                recompute = BlockRecompute(unet) if mode == "full" and isinstance(unet, torch.nn.Module) else None
                state.guidance[key] = DPSGuidance(operator, build_noise(settings), y, zeta=settings.zeta,
                                                  rule=settings.rule, mode=mode, decoder_gradient=gradient,
                                                  start=settings.start, end=settings.end, on_nonfinite="skip",
                                                  sigma_data=LATENT_SIGMA_DATA, inplace_safe=True,
                                                  denoiser_recompute=recompute, fallback_on_oom=True)
            return state.guidance[key]

        def _measurement(self, p, settings: DPSSettings, height: int, width: int):
            mask = None
            if needs_mask(settings.task):
                source_mask = measure.decode_image(settings.mask)
                invert = False
                if source_mask is None:
                    source_mask = getattr(p, "image_mask", None)
                    invert = bool(getattr(p, "inpainting_mask_invert", 0))
                    if source_mask is not None and create_binary_mask is not None and hasattr(source_mask, "mode"):
                        source_mask = create_binary_mask(source_mask, round=getattr(p, "mask_round", True))
                if source_mask is None:
                    build_operator(settings)  # raises the error that names the fix
                mask = measure.mask_to_tensor(_fit(p, source_mask, width, height), height, width, invert)
            operator = build_operator(settings, mask)
            if settings.source == "init image":
                if not getattr(p, "init_images", None):
                    raise ValueError("DPS: 'Measurement y from' is 'init image' but there is no init image "
                                     "(txt2img?); upload the measurement in the DPS accordion and choose 'upload'")
                image = p.init_images[0]
            else:
                image = measure.decode_image(settings.image)
                if image is None:
                    raise ValueError("DPS: no measurement image; upload the degraded image in the DPS accordion, "
                                     "or in img2img choose 'init image'")
            h, w = height, width
            spec = registry.get(settings.task)
            if not settings.simulate and spec.from_picture == "resize":  # e.g. 1/factor for super-resolution
                h, w = spec.measurement_size(height, width, **operator_values(settings))
            tensor = measure.image_to_tensor(_fit(p, image, w, h) if settings.source == "init image" else image)
            seed = getattr(p, "seed", 0)
            generator = torch.Generator().manual_seed(int(seed) if isinstance(seed, int) and seed >= 0 else 0)
            return operator, measure.make_measurement(settings, operator, tensor, height, width, generator)

        def _hook_a1111(self, p, guidance: DPSGuidance, job: hooks.Job) -> None:
            sampler = p.sampler
            denoiser = sampler.model_wrap_cfg
            try:  # CFGDenoiser.inner_model is a property (k-diffusion: CompVisDenoiser, which knows sigma_min)
                sigma_min = getattr(denoiser.inner_model, "sigma_min", None)
            except Exception:
                sigma_min = None
            clock = hooks.SigmaClock("sigma", sigma_min=float(sigma_min) if sigma_min is not None else None,
                                     sampler=sampler, log=job.log)
            _capture_schedule(sampler, clock)

            def detach_preview() -> None:
                hooks._detach_attr(getattr(shared, "state", None), "current_latent")

            hooks.DenoiserWrapper.install(denoiser, guidance, job, clock, after_call=detach_preview)

        def _hook_forge(self, p, guidance: DPSGuidance, job: hooks.Job) -> None:
            clock = hooks.SigmaClock("sigma", sampler=getattr(p, "sampler", None), log=job.log)
            if getattr(p, "sampler", None) is not None:
                _capture_schedule(p.sampler, clock)
            unet = p.sd_model.forge_objects.unet.clone()
            options = unet.model_options
            options["sampler_post_cfg_function"] = [
                f for f in options.get("sampler_post_cfg_function", []) if not getattr(f, "dps_guidance", False)]
            unet.set_model_sampler_post_cfg_function(hooks.post_cfg_function(guidance, job, clock))
            p.sd_model.forge_objects.unet = unet


def _capture_schedule(sampler, clock: hooks.SigmaClock) -> None:
    """Let ``clock`` see the σ schedule the sampler builds (``get_sigmas``), wrapping it once per sampler
    instance, so that the Euler-calibrated rules know the step's Δσ."""
    sampler.dps_clock = clock
    if "get_sigmas" in vars(sampler) or not hasattr(sampler, "get_sigmas"):
        return
    original = sampler.get_sigmas

    def get_sigmas(*args, **kwargs):
        sigmas = original(*args, **kwargs)
        sampler.dps_clock.set_schedule(sigmas)
        return sigmas

    sampler.get_sigmas = get_sigmas


# -- the restoration tab ---------------------------------------------------------------------------------

TAB_SETTINGS = tuple(n for n in ARG_NAMES if n not in ("enabled", "source", "image", "mask"))


class OnlyDPS:
    """Stands in for img2img's script runner on ``p.scripts`` in the tab: runs this script's hooks with the
    tab's settings; every other runner hook is a no-op (the tab has no other extensions' controls)."""

    def __init__(self, script, args: list) -> None:
        self.script, self.args = script, args

    def process(self, p):
        self.script.process(p, *self.args)

    def process_before_every_sampling(self, p, **kwargs):
        self.script.process_before_every_sampling(p, *self.args, **kwargs)

    def postprocess(self, p, processed):
        self.script.postprocess(p, processed, *self.args)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def output_size(settings: DPSSettings, width: int, height: int) -> tuple[int, int]:
    """The size to generate for a degraded image of (width, height): the operator's image size for it (the
    super-resolution factor times larger), rounded down to what both the latent (multiples of 8) and the
    operator accept."""
    spec, factor = registry.get(settings.task), 1
    if spec.from_picture == "resize":
        factor = max(1, round(spec.image_size(height, width, **operator_values(settings))[1] / width))
    step = 8 * factor // math.gcd(8, factor)
    w, h = (width * factor) // step * step, (height * factor) // step * step
    if w < step or h < step:
        raise ValueError(f"DPS: the image is too small; it must give at least {step}x{step} pixels after "
                         f"super-resolution")
    return w, h


def restore(degraded, mask, prompt: str, negative_prompt: str, steps: int, cfg_scale: float, denoising_strength: float,
            seed: int, sampler_name: str, *values):
    """The tab's button: run img2img on the degraded image with DPS on; returns (before, after, infotext)."""
    if degraded is None:
        return None, None, "Upload the degraded image first."
    try:
        settings = DPSSettings(enabled=True, source="init image", **dict(zip(TAB_SETTINGS, values)))
        image = measure.decode_image(degraded)
        image = image.convert("RGB") if hasattr(image, "convert") else image
        height, width = measure.image_to_tensor(image).shape[-2:]
        out_w, out_h = output_size(settings, width, height)
        mask_image = measure.decode_image(mask) if needs_mask(settings.task) else None
        p = host_processing.StableDiffusionProcessingImg2Img(
            sd_model=shared.sd_model, outpath_samples=shared.opts.outdir_samples or shared.opts.outdir_img2img_samples,
            outpath_grids=shared.opts.outdir_grids or shared.opts.outdir_img2img_grids, prompt=prompt,
            negative_prompt=negative_prompt, init_images=[image], mask=mask_image, width=out_w, height=out_h,
            steps=int(steps), cfg_scale=float(cfg_scale), denoising_strength=float(denoising_strength),
            seed=int(seed), sampler_name=sampler_name)
        p.scripts = OnlyDPS(DPSGuidanceScript(), [settings.enabled] + [getattr(settings, n) for n in ARG_NAMES[1:]])
        if queue_lock is not None:
            with queue_lock:
                shared.state.begin(job="dps_restore")
                try:
                    processed = host_processing.process_images(p)
                finally:
                    shared.state.end()
        else:
            processed = host_processing.process_images(p)
        if hasattr(p, "close"):
            p.close()
    except Exception as exc:  # a tab callback must not take the UI down
        hooks.console(f"restore failed: {exc}")
        return degraded, None, f"DPS error: {exc}"
    infotexts = getattr(processed, "infotexts", None)
    return image, processed.images[0], infotexts[0] if infotexts else getattr(processed, "info", "")


def _sampler_names() -> list[str]:
    try:
        from modules import sd_samplers
        return list(sd_samplers.visible_sampler_names())
    except Exception:
        return ["Euler"]


def restore_tab():
    """``on_ui_tabs``: upload, pick the task, restore with the loaded checkpoint, compare."""
    c: dict = {}
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            with gr.Column():
                degraded = gr.Image(label="Degraded image", type="pil")
                mask = gr.Image(label="Mask for inpainting (white = missing)", type="pil")
                prompt = gr.Textbox(label="Prompt (describe the image)", lines=2)
                negative = gr.Textbox(label="Negative prompt", lines=1)
                with gr.Row():
                    steps = gr.Slider(label="Steps", minimum=1, maximum=150, step=1, value=30)
                    cfg = gr.Slider(label="CFG scale", minimum=1.0, maximum=30.0, step=0.5, value=5.0)
                    strength = gr.Slider(label="Denoising strength", minimum=0.0, maximum=1.0, step=0.01, value=1.0)
                with gr.Row():
                    seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0)
                    names = _sampler_names()
                    sampler = gr.Dropdown(label="Sampler", choices=names, value=names[0])
                c["task"] = gr.Dropdown(label="Task (operator A)", choices=list(TASKS), value=DEFAULTS.task)
                _operator_controls(c)
                _guidance_controls(c)
                button = gr.Button("Restore", variant="primary")
            with gr.Column():
                with gr.Row():
                    before = gr.Image(label="Before", interactive=False)
                    after = gr.Image(label="After", interactive=False)
                info = gr.Textbox(label="Infotext", interactive=False, lines=3)
        button.click(fn=restore, inputs=[degraded, mask, prompt, negative, steps, cfg, strength, seed, sampler]
                     + [c[n] for n in TAB_SETTINGS], outputs=[before, after, info])
    return [(tab, "DPS Restore", "dps_restore")]


def add_xyz_axes() -> None:
    """``on_before_ui``: the DPS axes of the X/Y/Z plot, when its script is loaded."""
    added = xyz.add_axes(xyz.find_xyz_module(getattr(scripts, "scripts_data", [])))
    if added:
        hooks.console(f"added {added} X/Y/Z plot axes")


if scripts is not None and script_callbacks is not None and host_processing is not None:
    script_callbacks.on_ui_tabs(restore_tab)
    if hasattr(script_callbacks, "on_before_ui"):
        script_callbacks.on_before_ui(add_xyz_axes)
