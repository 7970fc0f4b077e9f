"""Where and how work runs: device choice, torch.distributed sessions, background threads."""
