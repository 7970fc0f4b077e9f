"""Analysis tools: attention statistics per head, layer similarity (linear CKA), best layer per task, plots."""
