"""The WebUI script (scripts/dps_guidance.py) against fakes of the AUTOMATIC1111 and Forge contracts
(tests/fakes/webui_host.py): no WebUI needed. The fake ``modules``/``gradio`` packages exist only inside
each test (``monkeypatch`` removes them)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from conftest import ROOT
from dps.operators import Inpainting, SuperResolution
from dps_webui.settings import ARG_NAMES, DPSSettings, parse_infotext
from fakes import webui_host as host

FACTOR = 4


@pytest.fixture
def webui(monkeypatch):
    """Load the script the way the WebUI does, with fake host modules; yields a namespace of helpers."""
    fake = host.make_modules()
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    module, classes = host.load_script(ROOT / "scripts" / "dps_guidance.py", ROOT)
    assert len(classes) == 1, classes
    return _Env(module, classes[0], fake)


class _Env:
    def __init__(self, module, cls, fake):
        self.module, self.cls, self.shared = module, cls, fake["modules.shared"]
        self.fake = fake

    def script(self, is_img2img=False):
        s = self.cls()
        s.is_img2img = is_img2img
        self.components = s.ui(is_img2img)
        return s


def truth_and_measurement(sd_model, size=32, seed=0):
    """A clean image the decoder can produce and its x4-downsampled measurement (HxWx3 in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        truth = sd_model.decode_first_stage(torch.randn(1, 4, size // 2, size // 2, generator=g) * 0.5)
        y = SuperResolution(factor=FACTOR)(truth.clone())
    return truth, y, ((y[0].permute(1, 2, 0) + 1) / 2).numpy()


def args_for(**changes):
    settings = {"enabled": True, "task": "super_resolution", "sr_factor": FACTOR, "source": "upload",
                "noise": "gaussian", "noise_sigma": 0.01, "zeta": 10.0, "rule": "dps", "mode": "full"}
    settings.update(changes)
    return [settings.get(name, getattr(DPSSettings(), name)) for name in ARG_NAMES]


def sr_residual(image, y):
    return float((SuperResolution(factor=FACTOR)(image.float()) - y).flatten(1).norm(dim=1).mean())


def a1111_run(env, p, args, func=host.sample_euler, script=True):
    scripts = [env.script()] if script else []
    return host.process_images(p, scripts, args, lambda p_: host.KDiffusionSampler(p_.sd_model, env.shared, func))


@pytest.mark.parametrize("func", [host.sample_euler, host.sample_heun], ids=["euler", "heun"])
def test_a1111_guidance_lowers_the_residual_and_writes_infotext(webui, func):
    sd_model = host.SdModel()
    _, y, upload = truth_and_measurement(sd_model)
    plain, _ = a1111_run(webui, host.Processing(sd_model), args_for(enabled=False), func)
    p = host.Processing(sd_model)
    guided, info = a1111_run(webui, p, args_for(image=upload), func)
    assert sr_residual(guided, y) < 0.5 * sr_residual(plain, y), (sr_residual(guided, y), sr_residual(plain, y))
    assert "DPS error" not in info and "DPS note" not in info, info
    assert info["DPS"].startswith("task: super_resolution, sr_factor: 4")
    assert not any(p.sampler.preview_had_grad), "live-preview / interrupt tensors must be detached"
    assert "forward" not in vars(p.sampler.model_wrap_cfg), "the wrapper is removed in postprocess"


def test_a1111_full_gradient_recomputes_the_unet_blocks_when_told(webui, capsys):
    """Gradient full in A1111 goes through dps.recompute on the UNet (said once on the console)."""
    sd_model = host.SdModel()
    _, y, upload = truth_and_measurement(sd_model)
    guided, info = a1111_run(webui, host.Processing(sd_model), args_for(image=upload))
    told = [line for line in capsys.readouterr().err.splitlines() if "gradient through the UNet:" in line]
    assert len(told) == 1 and "plain backward pass" in told[0], told
    _, info = a1111_run(webui, host.Processing(sd_model), args_for(image=upload, mode="x0_only"))
    assert not [line for line in capsys.readouterr().err.splitlines() if "gradient through the UNet" in line]


def test_a1111_multistep_sampler_gets_the_filtered_correction(webui):
    """DPM++ 2M in the WebUI: the correction goes through the 2M family's filter (dps.samplers), as in ComfyUI."""
    sd_model = host.SdModel()
    _, y, upload = truth_and_measurement(sd_model)
    plain, _ = a1111_run(webui, host.Processing(sd_model), args_for(enabled=False), host.sample_dpmpp_2m)
    p = host.Processing(sd_model)
    guided, info = a1111_run(webui, p, args_for(image=upload), host.sample_dpmpp_2m)
    feed = p.sampler.dps_clock.filter
    assert feed and feed.family.name == "dpmpp_2m" and sorted(feed.fed) == list(range(len(feed.sigmas) - 1))
    assert sr_residual(guided, y) < 0.5 * sr_residual(plain, y) and "DPS error" not in info
    euler_p = host.Processing(sd_model)
    a1111_run(webui, euler_p, args_for(image=upload), host.sample_euler)
    assert euler_p.sampler.dps_clock.filter is False          # a single-step sampler: the correction as is


def test_a1111_heun_feeds_the_steps_correction_to_its_second_evaluation(webui):
    """Heun evaluates twice per step: the step's correction, computed at the first evaluation, is fed to the
    second (``StageClock``), so each step is guided once, as in ComfyUI."""
    sd_model = host.SdModel()
    _, y, upload = truth_and_measurement(sd_model)
    p = host.Processing(sd_model)
    guided, info = a1111_run(webui, p, args_for(image=upload), host.sample_heun)
    stages = p.sampler.dps_clock.stages
    assert stages and stages.kind == "heun"
    steps = len(p.sampler.dps_clock.schedule) - 1
    assert p.dps_state.job.guided_calls == steps                 # not 2 x steps - 1
    plain, _ = a1111_run(webui, host.Processing(sd_model), args_for(enabled=False), host.sample_heun)
    assert sr_residual(guided, y) < 0.5 * sr_residual(plain, y) and "DPS error" not in info


def test_disabled_or_zero_strength_leaves_the_image_unchanged(webui):
    sd_model = host.SdModel()
    _, _, upload = truth_and_measurement(sd_model)
    without, _ = a1111_run(webui, host.Processing(sd_model), [], script=False)
    off, info = a1111_run(webui, host.Processing(sd_model), args_for(enabled=False, image=upload))
    zero, _ = a1111_run(webui, host.Processing(sd_model), args_for(zeta=0.0, image=upload))
    assert torch.equal(without, off) and torch.equal(without, zero)
    assert info == {}


def test_x0_only_mode_and_timestep_sampler_lower_the_residual(webui):
    sd_model = host.SdModel()
    _, y, upload = truth_and_measurement(sd_model)
    make = lambda p_: host.DDIMSampler(p_.sd_model, webui.shared)  # noqa: E731
    plain, _ = host.process_images(host.Processing(sd_model), [], [], make)
    guided, info = host.process_images(host.Processing(sd_model), [webui.script()], args_for(image=upload), make)
    assert sr_residual(guided, y) < 0.5 * sr_residual(plain, y)
    x0_only, info = a1111_run(webui, host.Processing(sd_model), args_for(image=upload, mode="x0_only"))
    plain_k, _ = a1111_run(webui, host.Processing(sd_model), [], script=False)
    assert sr_residual(x0_only, y) < 0.5 * sr_residual(plain_k, y)
    assert "mode: x0_only" in info["DPS"]


def test_a1111_ddim_cfg_pp_gets_the_correction_in_both_outputs(webui):
    """DDIM CFG++ reads the unconditional output apart (``last_noise_uncond``): the wrapper moves it as the guided
    one, so with the two outputs equal (the same conditioning) guided DDIM CFG++ is guided DDIM; with CFG proper
    the residual falls."""
    sd_model = host.SdModel()
    _, y, upload = truth_and_measurement(sd_model)
    args = args_for(image=upload, rule="polyak", zeta=1.0)
    runs = {}
    for name, sampler in (("ddim", host.DDIMSampler), ("cfg_pp", host.DDIMCFGPPSampler)):
        runs[name], info = host.process_images(host.Processing(sd_model), [webui.script()], args,
                                               lambda p_: sampler(p_.sd_model, webui.shared, same_condition=True))
        assert "DPS error" not in info, info
    torch.testing.assert_close(runs["cfg_pp"], runs["ddim"], rtol=0, atol=1e-5)
    make = lambda p_: host.DDIMCFGPPSampler(p_.sd_model, webui.shared)  # noqa: E731
    plain, _ = host.process_images(host.Processing(sd_model), [], [], make)
    guided, _ = host.process_images(host.Processing(sd_model), [webui.script()], args, make)
    assert sr_residual(guided, y) < 0.5 * sr_residual(plain, y), (sr_residual(guided, y), sr_residual(plain, y))


def test_forge_cfg_pp_gets_the_correction_in_both_predictions(webui):
    """Forge computes ``last_noise_uncond`` from the unconditional prediction after the post-CFG functions: the
    hook moves that prediction as the guided one, so with the two equal, guided CFG++ is guided Euler."""
    sd_model = host.ForgeSdModel()
    _, y, upload = truth_and_measurement(sd_model)
    args = args_for(image=upload, rule="polyak", zeta=1.0, mode="x0_only")
    euler, info = host.forge_process_images(host.Processing(sd_model), [webui.script()], args, same_condition=True)
    cfg_pp, _ = host.forge_process_images(host.Processing(sd_model), [webui.script()], args, same_condition=True,
                                          func=host.sample_euler_cfg_pp)
    assert "DPS error" not in info, info
    torch.testing.assert_close(cfg_pp, euler, rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["k-diffusion euler", "DDIM", "Forge"])
def test_default_rule_and_strength_lower_the_residual(webui, path):
    """The accordion's defaults ("polyak", ζ = 1), unchanged, on each hook path."""
    defaults = DPSSettings()
    assert (defaults.rule, defaults.zeta) == ("polyak", 1.0)
    sd_model = host.ForgeSdModel() if path == "Forge" else host.SdModel()
    _, y, upload = truth_and_measurement(sd_model)
    args = args_for(image=upload, rule=defaults.rule, zeta=defaults.zeta)
    if path == "Forge":
        plain, _ = host.forge_process_images(host.Processing(sd_model), [], [])
        guided, info = host.forge_process_images(host.Processing(sd_model), [webui.script()], args)
    else:
        make = ((lambda p_: host.DDIMSampler(p_.sd_model, webui.shared)) if path == "DDIM"
                else (lambda p_: host.KDiffusionSampler(p_.sd_model, webui.shared, host.sample_euler)))
        plain, _ = host.process_images(host.Processing(sd_model), [], [], make)
        guided, info = host.process_images(host.Processing(sd_model), [webui.script()], args, make)
    assert "DPS error" not in info and "rule: polyak" in info["DPS"], info
    assert sr_residual(guided, y) < 0.5 * sr_residual(plain, y), (sr_residual(guided, y), sr_residual(plain, y))


def test_img2img_inpainting_uses_the_init_image_and_its_mask(webui):
    sd_model = host.SdModel()
    truth, _, _ = truth_and_measurement(sd_model)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255  # white = repaint = missing
    init = ((truth[0].permute(1, 2, 0) + 1) / 2).numpy()
    args = args_for(task="inpainting", source="init image", zeta=5.0)
    op = Inpainting(torch.from_numpy(mask > 0).float())
    y = op(truth)

    def run(script):
        p = host.Processing(sd_model, init_images=[init], image_mask=mask)
        s = webui.script(is_img2img=True)
        return host.process_images(p, [s] if script else [], args,
                                   lambda p_: host.KDiffusionSampler(p_.sd_model, webui.shared))

    plain, _ = run(False)
    guided, info = run(True)
    residual = lambda img: float((op(img) - y).norm())  # noqa: E731
    assert residual(guided) < 0.5 * residual(plain), info


def test_forge_post_cfg_hook_under_inference_mode(webui):
    sd_model = host.ForgeSdModel()
    assert sd_model.first_stage_model.conv.weight.is_inference()
    _, y, upload = truth_and_measurement(sd_model)
    plain, _ = host.forge_process_images(host.Processing(sd_model), [], [])
    p = host.Processing(sd_model)
    script = webui.script()
    guided, info = host.forge_process_images(p, [script], args_for(image=upload))
    assert sr_residual(guided, y) < 0.5 * sr_residual(plain, y)
    assert "mode: x0_only" in info["DPS"] and "Forge" in info["DPS note"]
    assert "DPS error" not in info
    # idempotent: the hires pass calls the hook again; one DPS function, and the original patcher untouched
    script.process_before_every_sampling(p, *args_for(image=upload))
    fns = sd_model.forge_objects.unet.model_options["sampler_post_cfg_function"]
    assert len(fns) == 1 and "sampler_post_cfg_function" not in sd_model.base_unet.model_options
    off, _ = host.forge_process_images(host.Processing(sd_model), [webui.script()], args_for(enabled=False))
    assert torch.equal(off, plain)


def test_hook_is_idempotent_on_a_reused_sampler(webui):
    sd_model = host.SdModel()
    _, _, upload = truth_and_measurement(sd_model)
    p = host.Processing(sd_model)
    script = webui.script()
    args = args_for(image=upload)
    script.process(p, *args)
    p.sampler = host.KDiffusionSampler(sd_model, webui.shared)
    for _ in range(3):  # img2img reuses its sampler for every batch; hires fix calls the hook again
        script.process_before_every_sampling(p, *args)
    wrapper = vars(p.sampler.model_wrap_cfg)["forward"]
    assert wrapper.previous is None, "the wrapper must not wrap itself"
    script.postprocess(p, None, *args)
    assert "forward" not in vars(p.sampler.model_wrap_cfg)


def test_low_vram_and_replaced_unet_fall_back_to_x0_only_and_say_so(webui, monkeypatch):
    sd_model = host.SdModel()
    _, _, upload = truth_and_measurement(sd_model)
    sd_model.lowvram = True  # what modules/lowvram.setup_for_low_vram sets under --medvram/--lowvram
    _, info = a1111_run(webui, host.Processing(sd_model), args_for(image=upload))
    assert "mode: x0_only" in info["DPS"] and "--medvram" in info["DPS note"]
    sd_model.lowvram = False
    unet = sd_model.model.diffusion_model
    unet._original_forward = unet.forward  # what sd-webui-controlnet's UnetHook does
    _, info = a1111_run(webui, host.Processing(sd_model), args_for(image=upload))
    assert "mode: x0_only" in info["DPS"] and "ControlNet" in info["DPS note"]


def test_errors_are_reported_not_raised_and_leave_the_image_unguided(webui):
    sd_model = host.SdModel()
    plain, _ = a1111_run(webui, host.Processing(sd_model), [], script=False)
    # inpainting in txt2img without any mask
    image, info = a1111_run(webui, host.Processing(sd_model), args_for(task="inpainting", image=np.zeros((32, 32, 3))))
    assert torch.equal(image, plain) and "draw one in img2img" in info["DPS error"]
    # a failure inside a sampling step (the decoder breaks): the step and the rest run unguided
    _, _, upload = truth_and_measurement(sd_model)
    broken = host.SdModel()
    broken.load_state_dict(sd_model.state_dict())
    host_decode = broken.first_stage_model.decode

    def decode_oom_under_grad(z):
        if torch.is_grad_enabled():
            raise RuntimeError("CUDA out of memory")
        return host_decode(z)

    broken.first_stage_model.decode = decode_oom_under_grad
    image, info = a1111_run(webui, host.Processing(broken), args_for(image=upload))
    assert "CUDA out of memory" in info["DPS error"]
    # invalid settings
    _, info = a1111_run(webui, host.Processing(sd_model), args_for(rule="nope"))
    assert "rule must be one of" in info["DPS error"]


def test_interrupt_passes_through(webui):
    sd_model = host.SdModel()
    _, _, upload = truth_and_measurement(sd_model)
    webui.shared.state.interrupted = True
    with pytest.raises(host.InterruptedException):
        a1111_run(webui, host.Processing(sd_model), args_for(image=upload))


def test_ui_components_follow_the_arg_order_and_infotext_pastes_back(webui):
    script = webui.script()
    components = webui.components
    assert len(components) == len(ARG_NAMES)
    assert script.show(False) is webui.fake["modules.scripts"].AlwaysVisible
    settings = DPSSettings(enabled=True, task="motion_blur", blur_kernel=31, motion_intensity=0.3, motion_seed=7,
                           noise="poisson", poisson_rate=2.5, zeta=0.7, rule="schedule", mode="x0_only",
                           start=0.1, end=0.9, source="upload")
    params = {"DPS": settings.to_infotext("abc123")}  # what parse_generation_parameters returns, unquoted
    pasted = {}
    for component, key in script.infotext_fields:
        value = key(params) if callable(key) else params.get(key)
        if value is not None:
            pasted[ARG_NAMES[components.index(component)]] = value
    for name in ("task", "blur_kernel", "motion_intensity", "motion_seed", "noise", "poisson_rate", "zeta", "rule",
                 "mode", "start", "end", "source"):
        assert pasted[name] == getattr(settings, name), name
    assert pasted["enabled"] is True
    assert script.paste_field_names == ["DPS"]
    no_dps = {c: k({}) for c, k in script.infotext_fields if callable(k)}
    assert no_dps[components[0]] is False


def test_api_accepts_positional_args_or_one_dict(webui):
    sd_model = host.SdModel()
    _, y, upload = truth_and_measurement(sd_model)
    as_dict = {"enabled": True, "task": "super_resolution", "sr_factor": 4, "source": "upload", "image": upload,
               "noise_sigma": 0.01, "zeta": 10.0, "rule": "dps"}
    image_dict, info = a1111_run(webui, host.Processing(sd_model), [as_dict] + args_for()[1:])
    image_list, _ = a1111_run(webui, host.Processing(sd_model), args_for(image=upload))
    assert torch.equal(image_dict, image_list) and "DPS" in info
    assert parse_infotext(info["DPS"])["sr_factor"] == 4
    with pytest.raises(ValueError, match="unknown setting"):
        DPSSettings.from_args([{"enabled": True, "zetta": 1}])


def _xyz_grid_entry():
    """What scripts.scripts_data holds for the built-in xyz_grid.py: its class (``__module__`` is the file
    name, as the WebUI loads scripts from file) and its module with ``AxisOption`` and ``axis_options``."""
    class AxisOption:   # scripts/xyz_grid.py: AxisOption(label, type, apply, format_value, confirm, cost, choices)
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None):
            self.label, self.type, self.apply, self.choices = label, type, apply, choices

    module = types.SimpleNamespace(AxisOption=AxisOption, axis_options=[AxisOption("Nothing", str, None)])
    script_class = type("Script", (), {"__module__": "xyz_grid.py"})
    return types.SimpleNamespace(script_class=script_class, module=module)


def test_xyz_plot_axes_override_the_accordion(webui):
    entry = _xyz_grid_entry()
    webui.fake["modules.scripts"].scripts_data.append(entry)
    [add_axes] = webui.fake["modules.script_callbacks"].before_ui
    add_axes()
    add_axes()   # a UI reload calls it again: no duplicates
    labels = [o.label for o in entry.module.axis_options]
    assert labels == ["Nothing", "[DPS] Strength zeta", "[DPS] Step rule", "[DPS] Gradient", "[DPS] Guidance start",
                      "[DPS] Guidance end"]
    axes = {o.label: o for o in entry.module.axis_options}
    assert axes["[DPS] Step rule"].choices() == ["dps", "dps_paper", "schedule", "polyak", "proximal"]

    sd_model = host.SdModel()
    _, y, upload = truth_and_measurement(sd_model)
    plain, _ = a1111_run(webui, host.Processing(sd_model), args_for(enabled=False))
    cells = {}
    for zeta in (0.0, 10.0):   # one X axis, two cells, each on its own copy of p as xyz_grid makes them
        p = host.Processing(sd_model)
        axes["[DPS] Strength zeta"].apply(p, zeta, [0.0, 10.0])
        axes["[DPS] Step rule"].apply(p, "dps", ["dps"])
        cells[zeta] = a1111_run(webui, p, args_for(image=upload, zeta=1.0, rule="polyak"))
    assert torch.equal(cells[0.0][0], plain)                       # the axis value, not the accordion's 1.0
    assert sr_residual(cells[10.0][0], y) < 0.5 * sr_residual(plain, y)
    info = parse_infotext(cells[10.0][1]["DPS"])
    assert info["zeta"] == 10.0 and info["rule"] == "dps"           # the infotext records the cell's settings


def test_restore_tab_runs_img2img_with_dps_and_compares(webui):
    callbacks = webui.fake["modules.script_callbacks"]
    assert callbacks.ui_tabs == [webui.module.restore_tab]
    gr = webui.fake["gradio"]
    [(blocks, title, elem_id)] = webui.module.restore_tab()
    assert title == "DPS Restore" and isinstance(blocks, gr.Blocks)
    fn, inputs, outputs = gr.buttons[-1].clicked
    assert fn is webui.module.restore and len(outputs) == 3
    assert len(inputs) == 9 + len(webui.module.TAB_SETTINGS)

    sd_model = host.SdModel()
    webui.shared.sd_model = sd_model
    _, y, upload = truth_and_measurement(sd_model)  # an 8x8 image: x4 super-resolution gives 32x32

    def restore(zeta):
        values = {name: getattr(DPSSettings(), name) for name in webui.module.TAB_SETTINGS}
        values.update(task="super_resolution", sr_factor=FACTOR, zeta=zeta, rule="dps", noise_sigma=0.01)
        return webui.module.restore(upload, None, "a photo", "", 12, 2.0, 1.0, 1, "Euler",
                                    *[values[n] for n in webui.module.TAB_SETTINGS])

    before, after, info = restore(10.0)
    p = webui.fake["modules.processing"].created[-1]
    assert (p.width, p.height) == (32, 32) and p.closed
    assert "DPS: task: super_resolution" in info and "source: init image" in info
    _, plain, _ = restore(0.0)
    assert sr_residual(after, y) < 0.5 * sr_residual(plain, y)
    _, none, message = webui.module.restore(np.zeros((1, 1, 3)), None, "", "", 12, 2.0, 1.0, 1, "Euler",
                                            *[getattr(DPSSettings(), n) for n in webui.module.TAB_SETTINGS])
    assert none is None and "too small" in message


@pytest.mark.filterwarnings("ignore:DPS guidance produced a non-finite gradient:RuntimeWarning")
def test_non_finite_gradients_are_skipped_and_reported(webui):
    sd_model = host.SdModel()
    _, _, upload = truth_and_measurement(sd_model)
    host_decode = sd_model.first_stage_model.decode

    def nan_under_grad(z):
        out = host_decode(z)
        return out * float("nan") if torch.is_grad_enabled() else out

    sd_model.first_stage_model.decode = nan_under_grad
    plain, _ = a1111_run(webui, host.Processing(sd_model), [], script=False)
    image, info = a1111_run(webui, host.Processing(sd_model), args_for(image=upload))
    assert torch.equal(image, plain)
    assert "12 of 12 guided steps skipped" in info["DPS note"] and "DPS error" not in info


@pytest.mark.parametrize("vae_gradient", ["checkpointed", "tiled"])
def test_vae_gradient_setting_reaches_the_guidance_and_the_infotext(webui, vae_gradient):
    """The memory-bounded VAE gradients (dps.vae_gradient) in A1111: checkpointed gives the full mode's image,
    tiled still lowers the residual; a non-default choice is written to the infotext."""
    sd_model = host.SdModel()
    _, y, upload = truth_and_measurement(sd_model)
    plain, _ = a1111_run(webui, host.Processing(sd_model), args_for(enabled=False))
    full, _ = a1111_run(webui, host.Processing(sd_model), args_for(image=upload, vae_gradient="full"))
    bounded, info = a1111_run(webui, host.Processing(sd_model), args_for(image=upload, vae_gradient=vae_gradient))
    assert f"vae_gradient: {vae_gradient}" in info["DPS"]
    assert sr_residual(bounded, y) < 0.5 * sr_residual(plain, y)
    if vae_gradient == "checkpointed":
        torch.testing.assert_close(bounded, full, rtol=1e-5, atol=1e-5)


def test_the_proximal_rule_guides_and_says_when_the_sampler_does_not_suit_it(webui):
    """Rule ``proximal`` through the WebUI's k-diffusion path: the residual falls; with a sampler other than LCM
    the infotext's note says which sampler suits it (``dps.proximal.sampler_note``), with LCM nothing is said."""
    sd_model = host.SdModel()
    _, y, upload = truth_and_measurement(sd_model)
    args = args_for(image=upload, rule="proximal", zeta=1.0)
    plain, _ = a1111_run(webui, host.Processing(sd_model), args, script=False)
    guided, info = a1111_run(webui, host.Processing(sd_model), args)
    assert "DPS error" not in info and "rule: proximal" in info["DPS"], info
    assert sr_residual(guided, y) < 0.5 * sr_residual(plain, y)
    assert "LCM sampler" in info["DPS note"] and "Euler" in info["DPS note"]
    _, info = a1111_run(webui, host.Processing(sd_model, sampler_name="LCM"), args)
    assert "LCM sampler" not in info.get("DPS note", "")


def test_forge_says_x0_only_for_the_proximal_rule_too(webui):
    """Forge guides in x0_only and says so, for the rule proximal too: in mode full that rule moves the prediction
    through the UNet first (``dps.proximal``, (2)), which Forge's inference-mode UNet cannot give; the data step
    itself still runs and fits the measurement."""
    sd_model = host.ForgeSdModel()
    _, y, upload = truth_and_measurement(sd_model)
    plain, _ = host.forge_process_images(host.Processing(sd_model), [], [])
    p = host.Processing(sd_model, sampler_name="LCM")
    guided, info = host.forge_process_images(p, [webui.script()], args_for(image=upload, rule="proximal", zeta=1.0))
    assert "DPS error" not in info and "rule: proximal" in info["DPS"], info
    assert sr_residual(guided, y) < 0.5 * sr_residual(plain, y)
    assert "x0_only: Forge" in info["DPS note"], info
