"""optpipe's pass families, one module each (installed as `optpipe.passes`).

Modules register their passes with `optpipe.registry.register_pass`; the core imports them lazily
through `optpipe.registry.BUILTIN_PASSES`. Passes never import targets.
"""
