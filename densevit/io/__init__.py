"""Files and images: the one image reader, atomic writes and verification, the output policy, data paths."""
from .files import (WritesIntoInputsError, atomic_write, check_outputs, ensure_writable, file_problem, file_sha256,
                    verify_file)
from .images import (IMAGE_SUFFIXES, UnreadableImageError, check_load_size, decode_once, denormalize, gather_images,
                     gather_sets, image_size, load_image, load_resized, max_pixels, open_image, preprocess,
                     resize_short_side, resized_hw, skip_unreadable)
from .paths import example_images, golden_weights, repo_root, shared_dir

__all__ = [
    "WritesIntoInputsError", "atomic_write", "check_outputs", "ensure_writable", "file_problem", "file_sha256",
    "verify_file",
    "IMAGE_SUFFIXES", "UnreadableImageError", "check_load_size", "decode_once", "denormalize", "gather_images",
    "gather_sets", "image_size", "load_image", "load_resized", "max_pixels", "open_image", "preprocess",
    "resize_short_side", "resized_hw", "skip_unreadable",
    "example_images", "golden_weights", "repo_root", "shared_dir",
]
