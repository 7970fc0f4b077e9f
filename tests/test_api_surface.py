"""The public names of densevit, each layer package and densevit.apps, listed once (kornia's test_api_surface
is the model): a name that moves, appears or disappears shows in this one diff.

Each layer's ``__init__`` re-exports the public names of its own modules (never a name of a lower layer), and
every name resolves to the object its owning module defines."""
from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = {
    "densevit": [
        "BACKBONES", "BackboneSpec", "get_spec", "TokenGrid", "select_device", "DensevitError", "WeightsNotFoundError",
        "FACETS", "Features", "ViTExtractor", "FeatureSource", "load_image", "preprocess", "load_backbone", "upsample",
        "UPSAMPLERS", "__version__",
    ],
    "densevit.runtime": [
        "select_device", "parse_dtype", "synchronize", "DistContext", "deal", "session", "main_with_session",
        "BackgroundWriter", "default_workers", "prefetch_map",
    ],
    "densevit.io": [
        "WritesIntoInputsError", "atomic_write", "check_outputs", "ensure_writable", "file_problem", "file_sha256",
        "verify_file", "IMAGE_SUFFIXES", "UnreadableImageError", "check_load_size", "decode_once", "denormalize",
        "gather_images", "gather_sets", "image_size", "load_image", "load_resized", "max_pixels", "open_image",
        "preprocess", "resize_short_side", "resized_hw", "skip_unreadable", "example_images", "golden_weights",
        "repo_root", "shared_dir",
    ],
    "densevit.models": [
        "BACKBONES", "HUB_ALIASES", "BackboneSpec", "get_spec", "create_model", "load_backbone", "load_weights_file",
        "read_state_dict", "LAYOUTS", "Layout", "get_layout", "WEIGHTS_ENV", "find_checkpoint", "adopt_module",
        "FAMILIES", "BlockFamily", "make_adapter", "PosEncoding", "resample_pos_embed", "TokenGrid", "grid_shape",
    ],
    "densevit.upsample": [
        "UPSAMPLERS", "CHANNELWISE", "check_method", "upsample", "upsample_tokens", "upsample_token_maps", "bilinear",
        "jbu", "upsample_anything", "anyup", "AnyUp", "load_anyup", "ANYUP_CHECKPOINTS"
    ],
    "densevit.features": [
        "FACETS", "Features", "ViTExtractor", "FeatureSource", "ImageFeatures", "image_name", "InputRule", "FrameBatch",
        "UpsampleOptions",
        "UpsampledSource", "input_guide", "image_guide", "FeatureOptions", "log_bin", "num_bins", "similarity_map",
        "similarity_maps", "topk_tokens", "best_buddy", "best_buddies_of", "query_attention", "token_at"
    ],
    "densevit.compat": ["dvf"],
    "densevit.matching": [
        "similarity_matrix", "nearest_both_ways", "best_buddies", "faiss_available", "kmeans", "elbow_kmeans",
        "label_transfer", "transfer_points",
    ],
    "densevit.storage": [
        "FeatureStore", "StoreWriter", "StoreLock", "StoreError", "StoreFullError", "ExtractionConfig",
        "ExtractionReport", "extract_to_store", "gather_dataset", "patch_index", "IndexConfig", "PatchIndex",
        "PatchIndexError",
        "build_index", "load_index", "build_on_disk", "update_index", "IndexSpaceError", "DescriptorCache",
        "CacheError", "CacheWarning",
    ],
    "densevit.apps": [
        "CosegConfig", "CosegResult", "cosegment", "cosegment_features", "PartsegConfig", "PartsegResult",
        "part_cosegment", "part_cosegment_features", "CorrespondenceConfig", "Correspondences",
        "find_correspondences", "find_correspondences_features", "transfer_keypoints", "transfer_keypoints_features",
        "PCAConfig", "PCAImage", "descriptor_pca", "pca_features", "DiscoverConfig", "Discovery", "discover",
        "discover_features", "discover_mask", "VOSConfig", "propagate", "segment_video", "Explorer", "Settings",
    ],
    "densevit.cli": [
        "COMMANDS", "run_cli", "ModelOptions", "OutputOptions", "add_config_flags", "config_from_args", "make_parser",
    ],
    "densevit.eval": ["ImageDescriber", "EvalPair", "TransferSettings", "evaluate_pair", "ResultsLog"],
    "densevit.eval.datasets": [
        "DavisDataset", "davis_palette", "read_mask", "write_mask", "SPair", "SPairImage", "SPairPair", "WarpConfig",
        "WarpPair", "WarpSource", "default_sources", "make_warp_pair", "make_warp_pairs",
    ],
    "densevit.eval.metrics": [
        "DavisScores", "db_eval_iou", "db_eval_boundary", "evaluate_semisupervised", "PairRecord", "PCKRow",
        "pck_counts", "summarize",
    ],
    "densevit.eval.analysis": [
        "AttentionAccumulator", "AttentionStats", "attention_stats", "head_statistics", "iter_layer_attention",
        "layer_sums", "resolve_layers", "MinibatchCKA", "cka_matrix", "hsic_unbiased", "linear_cka", "model_cka",
        "resample_tokens", "FunctionTask", "available_tasks", "best_layers", "build_task", "known_tasks", "run_sweep",
        "SpatialStats", "position_similarity", "own_position_share", "spatial_information", "RobustnessStats",
        "occlusion_robustness", "NeuronImage", "unit_activation", "visualize_unit", "visualize_units",
        "UnsupSegResult", "unsupervised_segmentation", "hungarian_miou"
    ],
    "densevit.apps.discovery": [
        "METHODS", "FITS", "REFINES", "SOLVERS", "DiscoverConfig", "DiscoveryFeatures", "TokenDiscovery", "Discovery",
        "tokencut_graph", "ncut_vector", "ncut_split", "tokencut_tokens", "lost_tokens", "seed_component", "token_box",
        "extract_discovery_features", "discover_features", "discover", "discover_mask", "box_iou",
        "mask_box"
    ],
    "densevit.apps.explore": [
        "Settings", "ExploreImage", "ImageMap", "SimilarityResult", "AttentionResult", "Explorer", "DESCRIPTOR_FACETS",
        "MAX_SIDE", "MAX_LOAD_SIZE", "MAX_TOKENS", "MAX_NAME", "MAX_IMAGES", "MAX_UPLOAD_PIXELS"
    ],
}
# the front door gathers names from every layer; a layer package only re-exports its own modules' names
FRONT_DOORS = {"densevit"}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_public_names(package):
    mod = importlib.import_module(package)
    assert len(mod.__all__) == len(set(mod.__all__)), "a name listed twice"
    assert sorted(mod.__all__) == sorted(PUBLIC[package])
    assert [n for n in mod.__all__ if not hasattr(mod, n)] == []


@pytest.mark.parametrize("package", sorted(set(PUBLIC) - FRONT_DOORS))
def test_a_layer_re_exports_only_its_own_modules(package):
    mod = importlib.import_module(package)
    foreign = []
    for name in mod.__all__:
        obj = getattr(mod, name)
        owner = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
        if owner is not None and not (owner == package or owner.startswith(package + ".")):
            foreign.append(f"{name} ({owner})")
    assert foreign == []


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_re_exported_names_are_the_owners_objects(package):
    """``from densevit.features import ViTExtractor`` is ``densevit.features.extractor.ViTExtractor``."""
    mod = importlib.import_module(package)
    for name in mod.__all__:
        obj = getattr(mod, name)
        owner = getattr(obj, "__module__", None)
        if owner and owner.startswith("densevit") and not isinstance(obj, types.ModuleType):
            assert getattr(importlib.import_module(owner), getattr(obj, "__name__", name)) is obj, name


# the upsampling methods by their names in UPSAMPLERS (import their modules with `from densevit.upsample.jbu import ...`)
SHADOWS_ITS_MODULE = {("densevit.upsample", "anyup"), ("densevit.upsample", "jbu"), ("densevit.upsample", "upsample_anything")}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_a_re_export_never_hides_a_module(package):
    """``from densevit.matching import knn`` must stay the module ``densevit.matching.knn``, never its function."""
    import pkgutil

    mod = importlib.import_module(package)
    if not hasattr(mod, "__path__"):
        return
    subs = {m.name for m in pkgutil.iter_modules(mod.__path__)}
    hidden = [n for n in mod.__all__ if n in subs and not isinstance(getattr(mod, n), types.ModuleType)
              and (package, n) not in SHADOWS_ITS_MODULE]
    assert hidden == []


def test_no_alias_modules():
    """The old one-release aliases are gone: no module only hands on another one (``sys.modules`` swaps)."""
    found = []
    for top in ("densevit", "apps"):
        for path in (ROOT / top).rglob("*.py"):
            text = path.read_text()
            if "sys.modules[__name__]" in text or "alias is kept for one release" in text:
                found.append(str(path.relative_to(ROOT)))
    assert found == []


@pytest.mark.parametrize("old", ["densevit.store", "densevit.extractor", "densevit.backbones", "densevit.index",
                                 "densevit.datasets", "densevit.apps.cli_coseg", "densevit.apps.discover"])
def test_old_paths_are_gone(old):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)


def test_every_layer_package_is_listed():
    """A new layer package (an ``__init__.py`` with an ``__all__``) joins PUBLIC."""
    listed = set(PUBLIC)
    missing = []
    for top, prefix in (("densevit", "densevit"), ("apps", "densevit.apps")):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / top).parts
            name = ".".join([prefix, *parts]) if parts else prefix
            tree = ast.parse(init.read_text())
            has_all = any((isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets))
                          or (isinstance(n, ast.ImportFrom) and any(a.name == "__all__" for a in n.names))
                          for n in tree.body)
            if has_all and name not in listed:
                missing.append(name)
    assert sorted(missing) == []


def test_a_module_hands_on_no_names():
    """No re-export hubs: a module's ``__all__`` lists only what it defines (import a name from its owner);
    handing on is the layer package's job."""
    import pkgutil

    import densevit
    import densevit.apps

    handed = []
    for pkg in (densevit, densevit.apps):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.ispkg:
                continue
            mod = importlib.import_module(info.name)
            for name in getattr(mod, "__all__", []):
                owner = getattr(getattr(mod, name), "__module__", None)
                if owner and owner.startswith("densevit") and owner != info.name:
                    handed.append(f"{info.name}.{name} (owner: {owner})")
    assert handed == []


@pytest.mark.parametrize("hub, names", [
    ("densevit.cli.common", ["check_outputs", "gather_images", "gather_sets", "skip_unreadable", "report_unreadable",
                             "drop_unreadable", "check_readable", "WritesIntoInputsError", "IMAGE_SUFFIXES"]),
    ("densevit.apps.cli.common", ["check_outputs", "check_readable", "drop_unreadable", "WritesIntoInputsError"]),
    ("densevit.storage.cache", ["file_sha256", "file_fingerprint"]),
    ("densevit.apps.common", ["FeatureSource"]),
    ("densevit.cli.flags", ["opt", "zero_is_none"]),
])
def test_the_old_hubs_are_gone(hub, names):
    """Names these modules used to hand on are imported from their owners (io.files, io.images, features.source,
    options); the hub keeps at most what it uses itself, never in its ``__all__``."""
    mod = importlib.import_module(hub)
    assert [n for n in names if n in getattr(mod, "__all__", [])] == []
    bad = []
    for top, prefix in (("densevit", ["densevit"]), ("apps", ["densevit", "apps"])):
        for path in (ROOT / top).rglob("*.py"):
            parts = prefix + list(path.relative_to(ROOT / top).with_suffix("").parts)
            package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom):
                    continue
                head = package[: len(package) - (node.level - 1)] if node.level else []
                target = ".".join(head + ([node.module] if node.module else []))
                if target == hub:
                    bad += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names if a.name in names]
    assert bad == []


def test_one_place_for_the_upsampler_check_and_the_refinements():
    """The "unknown upsampler" check is written once (densevit.upsample.check_method) and every config calls it;
    refinements several apps share live in densevit.apps.refine, so no app borrows from a sibling app."""
    from densevit.errors import InvalidArgumentError
    from densevit.upsample import check_method

    sources = {p: p.read_text() for top in ("densevit", "apps") for p in (ROOT / top).rglob("*.py")}
    assert [str(p.relative_to(ROOT)) for p, t in sources.items() if "unknown upsampler" in t] == [
        "densevit/upsample/__init__.py"]
    check_method(None, allow_none=True)
    with pytest.raises(InvalidArgumentError, match="unknown upsampler 'nope'; choose from bilinear"):
        check_method("nope")
    with pytest.raises(ValueError, match="unknown upsampler None"):
        check_method(None)
    borrowed = [str(p.relative_to(ROOT)) for p, t in sources.items()
                if p.parent.name in ("apps", "discovery", "explore") and p.name not in ("__init__.py", "partseg.py")
                and ("from ..partseg import" in t
                                                                          or "from .partseg import" in t)]
    assert borrowed == []
