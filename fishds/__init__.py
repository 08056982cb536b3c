"""fishds: FISH-Tuning (Fisher-information sparse masks inside PEFT adapters) on DeepSpeed ZeRO 0-3."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend logs a warning when it is imported (by peft) on a CPU with AVX512-BF16 and the optional
# `kernels` package (kernels fetched from the Hub) is absent; it then uses its own kernel, so the line is noise that
# would otherwise precede every fishds error message on such machines.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
