"""The old module paths stay importable for one release (CHANGELOG.md), as the same module objects."""
import importlib
import subprocess
import sys

import pytest

MOVED = {
    "densevit.backbones": "densevit.models.registry", "densevit.weights": "densevit.models.weights",
    "densevit.posenc": "densevit.models.posenc", "densevit.adapters": "densevit.models.families",
    "densevit.coords": "densevit.models.grid", "densevit.extractor": "densevit.features.extractor",
    "densevit.binning": "densevit.features.binning", "densevit.similarity": "densevit.features.similarity",
    "densevit.preprocess": "densevit.io.images", "densevit.paths": "densevit.io.paths",
    "densevit.transfer": "densevit.matching.transfer", "densevit.store": "densevit.storage.store",
    "densevit.dataset_extract": "densevit.storage.extract", "densevit.patch_index": "densevit.storage.patch_index",
    "densevit.cache": "densevit.storage.cache", "densevit.device": "densevit.runtime.device",
    "densevit.dist": "densevit.runtime.dist", "densevit.pipeline": "densevit.runtime.threads",
    "densevit.keypoint_eval": "densevit.eval.keypoints", "densevit.datasets.davis": "densevit.eval.datasets.davis",
    "densevit.metrics.pck": "densevit.eval.metrics.pck", "densevit.analysis.cka": "densevit.eval.analysis.cka",
    "densevit.apps.cli_coseg": "densevit.apps.cli.coseg", "densevit.apps.cli_vos": "densevit.apps.cli.vos",
    "densevit.apps.cli_common": "densevit.apps.cli.common", "densevit.apps.discover": "densevit.apps.discovery.core",
    "densevit.apps.explore_web": "densevit.apps.explore.web",
}


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_old_path_is_the_new_module(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_split_index_keeps_its_names():
    import densevit.index as old
    from densevit.matching import cluster, knn, transfer

    assert old.knn is knn.knn and old.best_buddies is knn.best_buddies
    assert old.kmeans is cluster.kmeans and old.elbow_kmeans is cluster.elbow_kmeans
    assert old.label_transfer is transfer.label_transfer


def test_public_names_and_old_imports():
    from densevit import ViTExtractor
    from densevit.apps.explore import Explorer
    from densevit.store import FeatureStore
    from densevit.storage.store import FeatureStore as New

    assert FeatureStore is New and ViTExtractor.__module__ == "densevit.features.extractor"
    assert Explorer.__module__ == "densevit.apps.explore.session"


def test_old_command_module_runs_as_main():
    out = subprocess.run([sys.executable, "-m", "densevit.apps.cli_coseg", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "densevit-coseg" in out.stdout
