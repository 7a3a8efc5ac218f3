"""optpipe's target backends, one module each (installed as `optpipe.targets`).

Modules register their targets with `optpipe.registry.register_target`; the core imports them
lazily through `optpipe.registry.BUILTIN_TARGETS`. Targets never import passes.
"""
