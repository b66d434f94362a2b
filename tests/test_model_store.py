"""Model store: publish, current pointer, promote, rollback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import publish_tiny
from watcher import model_store
from watcher.errors import ModelStoreError
from watcher.inference import Predictor


class TestModelStore:
    def test_publish_numbers_versions(self, tmp_path: Path) -> None:
        """Versions are numbered in order; build folders disappear."""
        assert "v0001" == publish_tiny(tmp_path)
        assert "v0002" == publish_tiny(tmp_path, promote=False)
        assert ["v0001", "v0002"] == model_store.list_versions(tmp_path)
        assert [] == list(tmp_path.glob(".build-*"))
        assert "v0002" == model_store.read_metadata(tmp_path, "v0002")["version"]

    def test_no_current_is_a_clear_error(self, tmp_path: Path) -> None:
        """An empty store says how to get a model."""
        with pytest.raises(ModelStoreError, match="train a model first"):
            model_store.current_version(tmp_path)

    def test_incomplete_build_not_published(self, tmp_path: Path) -> None:
        """A build without model or metadata is refused."""
        build = model_store.new_build_dir(tmp_path)
        with pytest.raises(ModelStoreError, match="lacks"):
            model_store.publish(tmp_path, build)
        assert [] == model_store.list_versions(tmp_path)

    def test_promote_and_rollback_switch_what_loads(self, tmp_path: Path) -> None:
        """Promote moves CURRENT forward; rollback returns through the promotion history."""
        publish_tiny(tmp_path, threshold=0.3)
        publish_tiny(tmp_path, threshold=0.4)
        publish_tiny(tmp_path, threshold=0.6, promote=False)
        assert "v0002" == Predictor(tmp_path).version
        model_store.set_current(tmp_path, "v0003", reason="test")
        assert 0.6 == Predictor(tmp_path).threshold
        assert "v0002" == model_store.rollback(tmp_path)
        assert "v0001" == model_store.rollback(tmp_path)
        assert 0.3 == Predictor(tmp_path).threshold
        with pytest.raises(ModelStoreError, match="no earlier promoted version"):
            model_store.rollback(tmp_path)

    def test_unknown_version_refused(self, tmp_path: Path) -> None:
        """Promoting a version that does not exist changes nothing."""
        publish_tiny(tmp_path)
        with pytest.raises(ModelStoreError, match="no published version"):
            model_store.set_current(tmp_path, "v0042", reason="test")
        assert "v0001" == model_store.current_version(tmp_path)
