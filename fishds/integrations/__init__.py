"""fishds inside other trainers (Hugging Face Trainer: hf.FishCallback)."""
