"""optpipe's target backends, one module each (installed as `optpipe.targets`).

Modules register their targets with `optpipe.registry.register_target`; the core imports them
lazily through `optpipe.registry.BUILTIN_TARGETS`. Targets never import passes.

- `torch_backend`: cpu and cuda (eager or torch.compile).
- `onnxruntime_backend`: onnxruntime inference; `onnxruntime_training` trains on it,
  `onnxruntime_fusions` rewrites the export into ORT contrib ops, and `onnx_export` is the exporter
  and ORT plumbing inference and training share.
- `tvm_backend`: tvm and tvm-cuda inference; `tvm_training` trains on tvm; `tvm_build` is what
  both build with (TVM, build targets, default schedules, Relax → VM).

A target module imports its training module only when a trainer is asked for.
"""
