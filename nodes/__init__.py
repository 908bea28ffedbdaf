"""ComfyUI adapter of DPS Guidance: thin nodes that convert host types and call ``dps``.

No nodes are registered yet (the adapter is issue 4); the mappings exist so ComfyUI loads the pack.
"""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
