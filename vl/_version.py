"""The version of vl (imported by modules that must not import the package root, which exposes `load`)."""

__version__ = "0.1.0"
