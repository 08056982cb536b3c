"""fishds: FISH-Tuning (Fisher-information sparse masks inside PEFT adapters) on DeepSpeed ZeRO 0-3."""

__version__ = "0.1.0"
