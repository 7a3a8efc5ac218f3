"""The version of optpipe (one place: the package, reports and OUT manifests read it here)."""

__version__ = "0.1.0"
