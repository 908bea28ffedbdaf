"""The operator registry (dps.operators.registry): every host renders its operators from the specs.

The acceptance test of the registry: a toy operator, one spec registered here and no other edit, appears as a
ComfyUI node (the V3 classes generated against a fake ``comfy_api``), as a WebUI task with its control, and
as a command-line task with its option, and builds in each. The other tests check that every registered spec
is consistent with its operator, so a new operator file is covered by adding its spec, and nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch

from conftest import ROOT
from dps.operators import LinearOperator, OperatorSpec, Param, registry
from fakes import webui_host as host

BUILT_IN = {  # ComfyUI node id -> input names: saved workflows depend on both
    "DPSSuperResolution": ["factor", "filter"], "DPSInpainting": ["mask"],
    "DPSGaussianBlur": ["kernel_size", "sigma"], "DPSMotionBlur": ["kernel_size", "intensity", "seed", "kernel"],
    "DPSGrayscale": [], "DPSPhaseRetrieval": ["oversample"],
}


class Gain(LinearOperator):
    """The toy operator: ``y = gain · x``."""

    def __init__(self, gain: float = 2.0) -> None:
        super().__init__()
        self.gain = float(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.gain * y


def toy_spec(spec_module=None) -> OperatorSpec:
    """The toy's spec; ``spec_module``: ``dps.operators.spec`` of another copy of the package (the ComfyUI pack)."""
    s = spec_module or sys.modules[OperatorSpec.__module__]
    return s.OperatorSpec(name="toy", display_name="Toy Gain", description="Undo a known brightness gain.",
                          measurement="the picture times gain, at full size", factory=Gain, aliases=("brighten",),
                          params=(s.Param("gain", "float", default=2.0, min=0.5, max=4.0, step=0.5,
                                          label="Toy gain (x)", help="Brightness factor (no unit)."),))


@pytest.fixture
def toy():
    spec = registry.register(toy_spec())
    yield spec
    registry.unregister(spec.name)


# ---- the registry ------------------------------------------------------------------------------------------

def test_built_in_operators_keep_their_names_tasks_and_node_ids():
    assert registry.names() == ("super_resolution", "inpainting", "gaussian_blur", "motion_blur", "grayscale",
                                "phase_retrieval")
    assert {s.node_id for s in registry.specs()} == set(BUILT_IN)
    assert [t.name for _, t in registry.tasks(demo_only=True)] == [
        "super_resolution", "box_inpainting", "random_inpainting", "gaussian_deblur", "motion_deblur",
        "phase_retrieval"]
    assert registry.get("phase_retrieval").experimental and not registry.get("super_resolution").experimental
    for words, name in (("upscale", "super_resolution"), ("deblur", "gaussian_blur"), ("deblur", "motion_blur"),
                        ("inpaint", "inpainting"), ("sketch", "grayscale"), ("restore", "super_resolution")):
        assert words in registry.get(name).aliases, (words, name)


def test_unknown_and_duplicate_names_are_refused_naming_the_valid_ones(toy):
    with pytest.raises(ValueError, match="unknown operator 'blur'; choose one of super_resolution, inpainting"):
        registry.get("blur")
    with pytest.raises(ValueError, match="unknown task 'deblur'; choose one of super_resolution"):
        registry.find_task("deblur")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(toy_spec())
    with pytest.raises(ValueError, match="has no parameter 'gian'; its parameters: \\['gain'\\]"):
        toy.build(gian=3)
    with pytest.raises(ValueError, match="inpainting needs its mask 'mask'"):
        registry.get("inpainting").build()


def test_a_bad_spec_is_refused_when_it_is_written():
    with pytest.raises(TypeError, match="sigma must be a number, got None"):
        Param("sigma", "float", default=None, help="Blur radius in pixels.")
    with pytest.raises(ValueError, match="must be one of"):
        Param("filter", "choice", default="nearest", choices=("bicubic",), help="The filter.")
    with pytest.raises(ValueError, match="has no default"):
        Param("mask", "mask", default=0, help="1 = missing.")
    with pytest.raises(ValueError, match="unique"):
        dataclasses.replace(toy_spec(), params=toy_spec().params * 2)


@pytest.mark.parametrize("spec", registry.specs(), ids=lambda s: s.name)
def test_every_spec_builds_its_operator_and_states_its_sizes(spec):
    """Each spec, with its defaults scaled to the image: the operator builds, its measurement has the size the
    spec says, the image size comes back from it, and the help text of every parameter is there for tooltips."""
    shape = (2, 3, 32, 32)
    for task in spec.tasks:
        drawn = task.draw(shape, 0) if task.draw else {}
        values = spec.resolve(drawn, side=32)
        op = spec.factory(**values)
        y = op(torch.rand(shape) * 2 - 1)
        assert tuple(y.shape[-2:]) == spec.measurement_size(32, 32, **values), task.name
        assert spec.image_size(*y.shape[-2:], **values) == (32, 32), task.name
    assert all(len(p.help) > 10 and p.label for p in spec.params)


# ---- a toy operator appears in every host --------------------------------------------------------------

def _fake_comfy_api() -> dict[str, types.ModuleType]:
    """``comfy_api.latest`` reduced to what the pack's V3 module touches; inputs record their arguments."""
    class Recorded:
        def __init__(self, id=None, **kwargs):
            self.id, self.kwargs = id, kwargs

    def comfy_type(name):
        return type(name, (), {"io_type": name, "Input": type("Input", (Recorded,), {}),
                               "Output": type("Output", (Recorded,), {})})

    @dataclasses.dataclass
    class Schema:  # the fields of ComfyUI's io.Schema the pack uses, search_aliases included (late 2025)
        node_id: str
        display_name: str = None
        category: str = "sd"
        inputs: list = None
        outputs: list = None
        description: str = ""
        search_aliases: list = dataclasses.field(default_factory=list)
        is_experimental: bool = False
        is_output_node: bool = False

    class NodeOutput:
        def __init__(self, *args, ui=None):
            self.args, self.ui = args, ui

    io = types.SimpleNamespace(Schema=Schema, NodeOutput=NodeOutput, ComfyNode=type("ComfyNode", (), {}),
                               Input=Recorded, Custom=comfy_type,
                               **{n: comfy_type(n.upper()) for n in ("Int", "Float", "Combo", "Boolean", "Image",
                                                                     "Mask", "Model", "Vae", "Latent")})
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, type("ComfyExtension", (), {})
    latest.ui = types.SimpleNamespace(PreviewImage=lambda *args, **kwargs: None)   # DPS Measure's preview
    package = types.ModuleType("comfy_api")
    package.latest = latest
    for module in (package, latest):
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    return {"comfy_api": package, "comfy_api.latest": latest}


def test_toy_operator_appears_as_a_comfyui_node(monkeypatch):
    for name, module in _fake_comfy_api().items():
        monkeypatch.setitem(sys.modules, name, module)
    pack = "dps_guidance_pack_registry_test"
    spec = importlib.util.spec_from_file_location(pack, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    monkeypatch.setitem(sys.modules, pack, importlib.util.module_from_spec(spec))
    try:
        spec.loader.exec_module(sys.modules[pack])
        v3 = importlib.import_module(f"{pack}.nodes.v3")
        pack_registry = importlib.import_module(f"{pack}.dps.operators.registry")
        pack_registry.register(toy_spec(importlib.import_module(f"{pack}.dps.operators.spec")))
        _check_nodes(v3)
    finally:
        for name in [n for n in sys.modules if n.startswith(pack + ".")]:
            del sys.modules[name]


def _check_nodes(v3) -> None:

    nodes = {cls.define_schema().node_id: cls for cls in v3.nodes() if hasattr(cls, "SPEC")}
    assert {k: [i.id for i in nodes[k].define_schema().inputs] for k in BUILT_IN} == BUILT_IN
    schema = nodes["DPSToy"].define_schema()
    [gain] = schema.inputs
    assert schema.display_name == "DPS Toy Gain" and schema.category == "sampling/dps"
    assert gain.id == "gain" and gain.kwargs == {"default": 2.0, "min": 0.5, "max": 4.0, "step": 0.5,
                                                 "tooltip": "Brightness factor (no unit)."}
    assert schema.search_aliases == ["brighten"] and not schema.is_experimental
    assert nodes["DPSPhaseRetrieval"].define_schema().is_experimental
    assert "upscale" in nodes["DPSSuperResolution"].define_schema().search_aliases
    op = nodes["DPSToy"].execute(gain=3.0).args[0]
    assert isinstance(op, Gain) and op.gain == 3.0


def test_toy_operator_appears_as_a_webui_task_with_its_control(toy, monkeypatch):
    for name in [n for n in sys.modules if n == "dps_webui" or n.startswith("dps_webui.")]:
        monkeypatch.delitem(sys.modules, name)            # the WebUI starts with the toy installed
    for name, module in host.make_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    module, [script_class] = host.load_script(ROOT / "scripts" / "dps_guidance.py", ROOT)
    settings = sys.modules["dps_webui.settings"]
    assert "toy" in settings.TASKS and settings.ARG_NAMES[-1] == "toy_gain"    # appended: old args keep places

    components = script_class().ui(False)
    assert len(components) == len(settings.ARG_NAMES)
    assert "toy" in components[settings.ARG_NAMES.index("task")].kwargs["choices"]
    control = components[settings.ARG_NAMES.index("toy_gain")]
    assert (control.label, control.value, control.kwargs["minimum"], control.kwargs["maximum"]) == (
        "Toy gain (x)", 2.0, 0.5, 4.0)

    chosen = settings.DPSSettings.from_args([True, "toy"] + [getattr(settings.DEFAULTS, n)
                                                             for n in settings.ARG_NAMES[2:-1]] + [3.0])
    op = settings.build_operator(chosen)
    assert isinstance(op, Gain) and op.gain == 3.0
    assert "task: toy, toy_gain: 3," in chosen.to_infotext()
    assert settings.parse_infotext(chosen.to_infotext())["toy_gain"] == 3.0
    with pytest.raises(ValueError, match="task must be one of"):
        settings.DPSSettings(task="blur")


def test_toy_operator_appears_as_a_command_line_task_with_its_option(toy, tmp_path):
    from dps.app import cli, tasks

    args = cli.build_parser().parse_args(["restore", "--task", "toy", "--input", str(tmp_path / "y.png"),
                                          "--output", str(tmp_path / "x.png"), "--gain", "3"])
    assert args.task == "toy" and tasks.operator_params(args, "toy") == {"gain": 3.0}
    assert "toy" in tasks.task_names() and ("toy" in [t.name for _, t in registry.tasks(demo_only=True)])
    op = tasks.make_operator("toy", (2, 1, 28, 28), seed=0)
    assert isinstance(op, Gain) and op.gain == 2.0
