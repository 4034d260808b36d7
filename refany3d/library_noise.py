"""Known-harmless start-up messages of the libraries refany3d loads, dropped so a command's first
lines are its own.

Importing diffusers' FluxPipeline on a machine with torchao but no CUDA prints seven lines before
anything happens: torchao lists each CUDA kernel library it could not load (int8 weight-only
needs none), torch deprecates how torchao registers two enums, diffusers says it cannot import
torchao tensor classes for checkpoints saved with torchao (refany3d saves none), and transformers
says it falls back to the PIL image processors because torchvision is absent (FLUX's pipeline
never uses them). Each filter below drops one such message by its text and leaves every other
message of that logger alone.
"""
from __future__ import annotations

import logging
import re

# logger name -> the messages of it that are dropped
HARMLESS = {
    "torchao": re.compile(r"^Failed to load \S+\.so\b"),
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported"),
    "diffusers.quantizers.torchao.torchao_quantizer": re.compile(r"^Unable to import `torchao` Tensor objects"),
    "transformers.utils.import_utils": re.compile(r"requires torchvision \(not installed\); falling back to"),
}


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def drop_harmless_library_messages() -> None:
    """Install the filters (once; the loggers need not exist yet: a library that creates one later
    gets the same object)."""
    for name, pattern in HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
