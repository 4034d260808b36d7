"""Typed errors. Every failure a user can cause is one of these, with a message meant for them."""


class RefAny3DError(Exception):
    """Base of every error refany3d raises on purpose; the CLI and the app show its message as is."""


class MeshError(RefAny3DError, ValueError):
    """The mesh file cannot be used: unreadable, empty, malformed, too large, or not a surface."""


class InputError(RefAny3DError, ValueError):
    """A setting or an input image is invalid (wrong count, size, range or file)."""


class ModelLoadError(RefAny3DError, OSError):
    """Model weights were not found or could not be loaded."""


class AlignmentError(RefAny3DError, ValueError):
    """An alignment measurement was asked for inputs that cannot be measured."""


class RenderError(RefAny3DError, RuntimeError):
    """No usable offscreen OpenGL (EGL or OSMesa) to render with."""


class GenerationStopped(RefAny3DError):
    """The person who asked for a generation stopped it (the app's Stop button, or the tab closed)."""
