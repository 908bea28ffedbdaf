"""ComfyUI entry point of the DPS Guidance node pack (V3 node API: ``comfy_entrypoint``).

ComfyUI imports this folder as a package (custom_nodes/<name>/__init__.py), so everything here uses
relative imports: ComfyUI has a top-level module called ``nodes`` of its own. Outside ComfyUI (no
``comfy_api``) the package still imports, without an entry point; ``dps`` is the host-free library.
No ``NODE_CLASS_MAPPINGS`` is defined: ComfyUI would then take the V1 path and never call the entry point.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes.v3 import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
else:
    __all__ = []

WEB_DIRECTORY = None
