"""Learning from labels and reports on the stored features: few-shot curves, linear
probes, scale-aware attention MIL, slide-report contrastive training and report pairing."""
