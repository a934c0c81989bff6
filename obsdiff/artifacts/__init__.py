"""What a run leaves on disk: the typed run record, pruned models, the W&B mirror."""
