"""ComfyUI entry point of the DPS Guidance node pack.

ComfyUI imports this folder as a package (custom_nodes/<name>/__init__.py), so everything here uses
relative imports: ComfyUI has a top-level module called ``nodes`` of its own. Importing the package
outside ComfyUI works too (``nodes`` imports the host lazily).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
