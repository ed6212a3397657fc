"""Quality evaluation, Ray-free: dataset feature extractors, the metrics (Frechet distance against real data's
floor, precision/recall, classifier score, class coverage, label accuracy) and the hook that scores checkpoints
during training."""
