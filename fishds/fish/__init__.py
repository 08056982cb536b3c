"""The FISH method, independent of any training loop: pool, scores, exact top-k, selection rules, masks,
enforcement. `fishds train` (fishds.run) and the Hugging Face callback (fishds.integrations.hf) are its clients."""
