"""Recovery after pruning: the pruned denoiser distilled towards the dense one (data-free), on
Lightning."""
