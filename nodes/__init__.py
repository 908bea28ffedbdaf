"""ComfyUI adapter of DPS Guidance: thin nodes that convert host types and call ``dps``.

* ``hook``: the two model wrappers (OUTER_SAMPLE checks, PREDICT_NOISE guidance) and ``apply_dps``;
  host-free, so CI tests it with fakes.
* ``builders``: node values (IMAGE, MASK, numbers) to ``dps`` operators and noise models; host-free.
* ``v3``: the V3 node classes and ``comfy_entrypoint``; imports ``comfy_api``, so only ComfyUI loads it.
"""
