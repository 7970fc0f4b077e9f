"""Files and images: the one image reader, atomic writes and verification, the output policy, data paths."""
