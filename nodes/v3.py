"""The DPS nodes in ComfyUI's V3 schema (``comfy_api.latest``). Imported only inside ComfyUI.

V3 because core ComfyUI writes its own nodes in it and new node features land only there; the classic
in-process ``io.ComfyNode`` (not the brokered SDK tier) because guidance needs raw autograd in sampling.
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable

import torch
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io, ui

from ..dps.guidance import MODES, RULES
from ..dps.operators import registry
from ..dps.operators.spec import OperatorSpec, Param
from . import builders
from ..dps.vae_gradient import VAE_GRADIENTS
from .hook import DEFAULT_RULE, DEFAULT_ZETA, OUTER_SAMPLE, PRECISIONS, PREDICT_NOISE, Settings, apply_dps

CATEGORY = "sampling/dps"
Operator = io.Custom("DPS_OPERATOR")
Noise = io.Custom("DPS_NOISE")
log = logging.getLogger("dps_guidance")


def _op_out() -> list:
    return [Operator.Output(display_name="operator", tooltip="The forward model A; connect it to DPS Measure and "
                                                             "Apply DPS Guidance")]


def _seed(tooltip: str) -> io.Int.Input:
    return io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip=tooltip)


def _input(p: Param) -> io.Input:
    """The widget or socket of one operator parameter, its range and its help text (with units) as tooltip."""
    if p.kind == "int":
        return io.Int.Input(p.name, default=p.default, min=p.min, max=p.max, step=p.step, tooltip=p.help)
    if p.kind == "float":
        return io.Float.Input(p.name, default=p.default, min=p.min, max=p.max, step=p.step, tooltip=p.help)
    if p.kind == "choice":
        return io.Combo.Input(p.name, options=list(p.choices), default=p.default, tooltip=p.help)
    if p.kind == "mask":
        return io.Mask.Input(p.name, optional=p.optional, tooltip=f"{p.help} From Load Image's mask, DPS Box Mask or "
                                                                 "DPS Random Mask.")
    return io.Image.Input(p.name, optional=p.optional, tooltip=p.help)


def _schema(**fields) -> io.Schema:
    """``io.Schema`` with the fields this ComfyUI has (``search_aliases`` is newer than some installs)."""
    params = inspect.signature(io.Schema).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        fields = {k: v for k, v in fields.items() if k in params}
    return io.Schema(**fields)


class OperatorNode(io.ComfyNode):
    """The node of one registered operator (``SPEC``): one input per parameter, the operator out."""

    SPEC: OperatorSpec

    @classmethod
    def define_schema(cls) -> io.Schema:
        spec = cls.SPEC
        return _schema(node_id=spec.node_id, display_name=f"DPS {spec.display_name}", category=CATEGORY,
                       description=f"{spec.description} The measurement: {spec.measurement}.",
                       inputs=[_input(p) for p in spec.params], outputs=_op_out(),
                       search_aliases=list(spec.aliases), is_experimental=spec.experimental)

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        return io.NodeOutput(builders.build_operator(cls.SPEC, values))


def operator_nodes() -> list[type[io.ComfyNode]]:
    """One node class per registered operator, named by its node id (``DPSSuperResolution``, ...)."""
    return [type(spec.node_id, (OperatorNode,), {"SPEC": spec, "__module__": __name__,
                                                 "__doc__": f"DPS {spec.display_name}: {spec.description}"})
            for spec in registry.specs()]


class DPSBoxMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DPSBoxMask", display_name="DPS Box Mask", category=CATEGORY,
            description="A mask with one missing rectangle at a random (seeded) place, for trying inpainting.",
            inputs=[
                io.Int.Input("width", default=512, min=8, max=16384, step=8, tooltip="Mask width in pixels (the measurement's)."),
                io.Int.Input("height", default=512, min=8, max=16384, step=8, tooltip="Mask height in pixels."),
                io.Int.Input("box_width", default=256, min=1, max=16384, tooltip="Width of the missing box in pixels."),
                io.Int.Input("box_height", default=256, min=1, max=16384, tooltip="Height of the missing box in pixels."),
                io.Int.Input("margin", default=32, min=0, max=8192, tooltip="The box keeps this many pixels from each edge."),
                _seed("Where the box goes."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="1 = missing")])

    @classmethod
    def execute(cls, width, height, box_width, box_height, margin, seed) -> io.NodeOutput:
        return io.NodeOutput(builders.box_mask(width, height, box_width, box_height, margin, seed))


class DPSRandomMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DPSRandomMask", display_name="DPS Random Mask", category=CATEGORY,
            description="A mask with a fraction of scattered pixels missing (the paper's random inpainting).",
            inputs=[
                io.Int.Input("width", default=512, min=8, max=16384, step=8, tooltip="Mask width in pixels."),
                io.Int.Input("height", default=512, min=8, max=16384, step=8, tooltip="Mask height in pixels."),
                io.Float.Input("fraction", default=0.7, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of pixels that are missing (0.7 = 70 %)."),
                _seed("Which pixels go missing."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="1 = missing")])

    @classmethod
    def execute(cls, width, height, fraction, seed) -> io.NodeOutput:
        return io.NodeOutput(builders.random_mask(width, height, fraction, seed))


class DPSCompose(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DPSCompose", display_name="DPS Chain Operators", category=CATEGORY,
            description="Apply operators one after the other, e.g. grayscale, then blur, then shrink.",
            inputs=[
                Operator.Input("first", tooltip="Applied first to the picture."),
                Operator.Input("second", tooltip="Applied to the result of the first."),
                Operator.Input("third", optional=True, tooltip="Optional: applied last."),
            ],
            outputs=_op_out())

    @classmethod
    def execute(cls, first, second, third=None) -> io.NodeOutput:
        return io.NodeOutput(builders.compose(first, second, third))


class DPSGaussianNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DPSGaussianNoise", display_name="DPS Gaussian Noise", category=CATEGORY,
            description="Sensor noise of the measurement: additive, normally distributed.",
            inputs=[io.Float.Input("sigma", default=0.05, min=0.0, max=2.0, step=0.005,
                                   tooltip="Noise standard deviation on the [-1, 1] image range (the paper: 0.05, "
                                           "i.e. 0.025 of full white, about 6 of 255 levels). 0 = noiseless.")],
            outputs=[Noise.Output(display_name="noise", tooltip="Connect to DPS Measure and Apply DPS Guidance.")])

    @classmethod
    def execute(cls, sigma) -> io.NodeOutput:
        return io.NodeOutput(builders.gaussian_noise(sigma))


class DPSPoissonNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DPSPoissonNoise", display_name="DPS Poisson Noise", category=CATEGORY,
            description="Photon (shot) noise of the measurement: grainier in bright areas.",
            inputs=[io.Float.Input("rate", default=1.0, min=0.001, max=100.0, step=0.01,
                                   tooltip="Light level: 255 x rate photons at full white. Lower = noisier.")],
            outputs=[Noise.Output(display_name="noise", tooltip="Connect to DPS Measure and Apply DPS Guidance.")])

    @classmethod
    def execute(cls, rate) -> io.NodeOutput:
        return io.NodeOutput(builders.poisson_noise(rate))


class DPSMeasure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DPSMeasure", display_name="DPS Measure", category=CATEGORY,
            description="Simulate the measurement of a clean picture (shrink, blur, holes, plus noise) to try a "
                        "workflow where the true answer is known.",
            inputs=[
                io.Image.Input("image", tooltip="The clean picture."),
                Operator.Input("operator", tooltip="What the camera did to the picture."),
                Noise.Input("noise", tooltip="The sensor noise added afterwards."),
                _seed("The noise draw."),
            ],
            outputs=[io.Image.Output(display_name="measurement", tooltip="The simulated measurement y = A(x) + n "
                                                                         "(shown on the node).")])

    @classmethod
    def execute(cls, image, operator, noise, seed) -> io.NodeOutput:
        y = builders.measure(image, operator, noise, seed)
        return io.NodeOutput(y, ui=ui.PreviewImage(builders.preview(y), cls=cls))


def _progress_text() -> Callable[[str], None] | None:
    """Show a line of text on the node that is sampling (the KSampler), as ComfyUI's own nodes do; None where
    ComfyUI runs without its server (scripts that import it as a library)."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:
        return None

    def send(text: str) -> None:
        context, server = get_executing_context(), getattr(PromptServer, "instance", None)
        if context is not None and server is not None:
            server.send_progress_text(text, context.node_id)
    return send


def _vae_approx_decoders() -> list[str]:
    import folder_paths
    return ["none"] + [n for n in folder_paths.get_filename_list("vae_approx") if "decoder" in n]


def _load_taesd_decoder(name: str) -> torch.nn.Module:
    import comfy.taesd.taesd
    import comfy.utils
    import folder_paths
    sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("vae_approx", name), safe_load=True)
    if "1.weight" not in sd:
        raise ValueError(f"{name} is not a TAESD decoder (taesd_decoder, taesdxl_decoder, taesd3_decoder, taef1_decoder)")
    decoder = comfy.taesd.taesd.Decoder(latent_channels=sd["1.weight"].shape[1])
    decoder.load_state_dict(sd)
    return decoder.float().eval().requires_grad_(False)


class DPSApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DPSApply", display_name="Apply DPS Guidance", category=CATEGORY,
            description="Diffusion Posterior Sampling: every step of your usual sampler is pulled toward results "
                        "that, measured the same way, match the measurement. Wire it like Apply ControlNet, "
                        "between the model loader (and LoRAs) and the KSampler.",
            inputs=[
                io.Model.Input("model", tooltip="The model the KSampler uses (after LoRAs and other patches)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE: it turns the sampler's latent into a picture to "
                                            "compare with the measurement."),
                io.Image.Input("measurement", tooltip="The degraded picture to restore (small, blurred, with holes)."),
                Operator.Input("operator", tooltip="How the measurement was made from the picture."),
                Noise.Input("noise", tooltip="How noisy the measurement is."),
                io.Float.Input("strength", default=DEFAULT_ZETA, min=0.0, max=100.0, step=0.05,
                               tooltip="Guidance strength zeta. 0 = off. With the polyak rule: how fast the result is "
                                       "pulled onto the measurement (1 = by default; 0.5-2 is the useful range). Raise "
                                       "it if the result drifts from the measurement, lower it if colours blow out."),
                io.Combo.Input("step_rule", options=list(RULES), default=DEFAULT_RULE,
                               tooltip="polyak: each step removes a set share of the mismatch with the measurement, so "
                                       "one strength suits every task and step count (recommended). dps: the paper's "
                                       "code, a fixed step per sampler step (needs a strength per task). dps_paper: "
                                       "the paper's Algorithm 1 (dps with half the strength). schedule: scaled with "
                                       "the noise level, gentle early, firm late. proximal: the prediction is made to "
                                       "fit the measurement at every step, after one step through the model with "
                                       "gradient full (with x0_only no gradient through the model: less memory, a "
                                       "little weaker); use it with the lcm sampler and a fast_decoder (through the "
                                       "full VAE it decodes about 20 times per step)."),
                io.Combo.Input("gradient", options=list(MODES), default="full",
                               tooltip="full: through the UNet, as the paper (slower, more memory). x0_only: through "
                                       "the VAE only, about 2x faster, weaker early on."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start guiding at this point of the schedule (0 = first step), as ControlNet."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Stop guiding after this point of the schedule (1 = last step)."),
                io.Combo.Input("vae_precision", options=list(PRECISIONS), default="auto",
                               tooltip="auto: decode in the VAE's dtype. fp32: decode with a float32 copy of the VAE "
                                       "(more memory; steadier gradients for fp16/bf16 VAEs). The residual is always "
                                       "computed in float32."),
                io.Combo.Input("fast_decoder", options=_vae_approx_decoders(), default="none",
                               tooltip="Optional TAESD decoder from models/vae_approx used instead of the VAE: much "
                                       "faster and lighter, a little less exact. Pick the model family's file."),
                io.Combo.Input("vae_gradient", options=list(VAE_GRADIENTS), default="auto", optional=True,
                               tooltip="How the gradient goes through the VAE: full (exact, ~6 GB at 512 px and "
                                       "~24 GB at 1024 px for an SD/SDXL VAE in fp32), checkpointed (exact, about "
                                       "two thirds of that, one more VAE decode) or tiled (tiles of the image; least "
                                       "memory, approximate at the seams). auto: full when it takes under a quarter "
                                       "of half the free memory, else checkpointed if that fits, else tiled. The "
                                       "console says which was used."),
                io.Int.Input("vae_tile", default=0, min=0, max=8192, step=64, optional=True,
                             tooltip="Tile side in pixels for vae_gradient tiled (0 = the largest that fits in "
                                     "memory). Smaller tiles use less memory and are less exact."),
                io.Float.Input("fast_decoder_end", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="With a fast_decoder: use it until this point of the schedule (0-1), the real "
                                       "VAE after it. 1 = the fast decoder throughout; e.g. 0.7 = the fast decoder "
                                       "for the noisy first 70 %, the VAE for the detailed end."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The guided model; connect it to your KSampler.")])

    @classmethod
    def execute(cls, model, vae, measurement, operator, noise, strength, step_rule, gradient, start_percent,
                end_percent, vae_precision, fast_decoder, vae_gradient="auto", vae_tile=0, fast_decoder_end=1.0) -> io.NodeOutput:
        import comfy.model_management
        import comfy.patcher_extension as pe
        settings = Settings(zeta=strength, rule=step_rule, mode=gradient, start_percent=start_percent,
                            end_percent=end_percent, precision=vae_precision, vae_gradient=vae_gradient,
                            vae_tile=vae_tile, fast_decoder_end=fast_decoder_end)
        surrogate = None if fast_decoder in (None, "none") else _load_taesd_decoder(fast_decoder)
        m, _ = apply_dps(model, vae, measurement, operator, noise, settings, surrogate=surrogate,
                         interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                         report=_progress_text(),
                         wrapper_types=(pe.WrappersMP.OUTER_SAMPLE, pe.WrappersMP.PREDICT_NOISE))
        return io.NodeOutput(m)


def nodes() -> list[type[io.ComfyNode]]:
    """Every node of the pack; the operator nodes come from the operator registry."""
    return [DPSApply, DPSMeasure, *operator_nodes(), DPSBoxMask, DPSRandomMask, DPSCompose, DPSGaussianNoise,
            DPSPoissonNoise]


class DPSExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return nodes()


async def comfy_entrypoint() -> DPSExtension:
    return DPSExtension()
