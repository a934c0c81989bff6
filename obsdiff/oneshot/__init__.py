"""The one-shot prune run: the job and its checks, the run, its resume checkpoint."""
