"""Typed errors. Every failure a user can cause is one of these, with a message meant for them;
and the checks of numbers that settings share, which raise them."""

import math
import numbers


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


class RefAny3DWarning(UserWarning):
    """An input that still runs but likely not as meant (views that show nothing of the asset, say);
    the CLI prints it as one line, the app as a notice."""


OUT_OF_MEMORY_ADVICE = ("fewer views, smaller images (height, width, condition size) or fewer candidates need less; "
                        "on a GPU, CPU offload ('model', or 'blocks' for 16-24 GB GPUs) keeps the weights off it")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is running out of memory: Python's MemoryError, or torch's on a GPU or the CPU
    (torch.OutOfMemoryError and the allocators' RuntimeErrors all say "out of memory")."""
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def out_of_memory_message(err: BaseException) -> str:
    """One line for a user: what ran out, and what to change."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"out of memory ({first}): {OUT_OF_MEMORY_ADVICE}"


class JobsFailed(RefAny3DError):
    """Some jobs of a batch failed (each logged with its reason); the others were written."""


class GenerationStopped(RefAny3DError):
    """The person who asked for a generation stopped it (the app's Stop button, or the tab closed)."""


def require_finite(name: str, value) -> None:
    """InputError unless `value` is a finite real number (NumPy's too; not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")


def require_whole_number(name: str, value, minimum: int = 0, maximum: int | None = None) -> None:
    """InputError unless `value` is a whole number within [minimum, maximum] (NumPy's too; not a bool)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum
            or (maximum is not None and value > maximum)):
        if maximum is not None:
            wanted = f"a whole number from {minimum} to {maximum}"
        else:
            wanted = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
        raise InputError(f"{name} must be {wanted}, got {value!r}")
