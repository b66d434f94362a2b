"""Grad-CAM on the shipped model: same probabilities as predict, sane maps, and a model
randomisation test (Adebayo et al. 2018, "Sanity Checks for Saliency Maps")."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from tests.conftest import build_tiny_model, fixture_images
from watcher.explain import (
    ExplainError,
    GradCam,
    border_mass_fraction,
    find_last_conv_block,
    overlay_png,
    stored_png,
    upsample_map,
    write_overlay,
)
from watcher.imaging import PreprocessSpec, decode_image, preprocess
from watcher.inference import calibrate

STORE = Path(__file__).parents[1] / "model_store"
INITIALISERS = {
    "kernel": "kernel_initializer",
    "depthwise_kernel": "depthwise_initializer",
    "pointwise_kernel": "pointwise_initializer",
}


def _load(version: str) -> tuple[Any, dict[str, Any]]:
    import keras

    meta = json.loads((STORE / version / "metadata.json").read_text())
    return keras.saving.load_model(STORE / version / "model.keras", compile=False), meta


def _batch(meta: dict[str, Any]) -> np.ndarray:
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    return np.stack([preprocess(decode_image(p), spec) for p in fixture_images()])


@pytest.fixture(scope="module")
def shipped() -> tuple[Any, dict[str, Any], np.ndarray]:
    """The shipped model (v0002), its metadata and the fixture images as one batch."""
    model, meta = _load("v0002")
    return model, meta, _batch(meta)


@pytest.fixture(scope="module")
def explained(shipped: tuple[Any, dict[str, Any], np.ndarray]) -> tuple[GradCam, np.ndarray, np.ndarray]:
    """Grad-CAM of the shipped model on the fixtures: (explainer, raw probabilities, maps)."""
    model, _, batch = shipped
    cam = GradCam(model)
    probs, maps = cam.predict_and_explain(batch)
    return cam, probs, maps


class TestFindLastConvBlock:
    def test_dsnet_block_ends_after_its_activation(self, shipped: tuple[Any, Any, Any]) -> None:
        """In dsnet the block is the ReLU after the last separable conv, before the pooling."""
        layer = find_last_conv_block(shipped[0])
        assert "ReLU" == type(layer).__name__
        assert (None, 8, 8, 256) == tuple(layer.output.shape)

    def test_seed_architecture(self) -> None:
        """In the seed CNN it is the last Conv2D (relu built in), not the pooling after it."""
        from watcher.architectures import build

        model = build("seed")
        assert (
            model.get_layer(find_last_conv_block(model).name)
            is [layer for layer in model.layers if type(layer).__name__ == "Conv2D"][-1]
        )

    def test_sequential_model(self) -> None:
        """A keras.Sequential CNN works too."""
        import keras

        model = keras.Sequential(
            [
                keras.Input((32, 32, 1)),
                keras.layers.Conv2D(4, 3, activation="relu"),
                keras.layers.MaxPooling2D(2),
                keras.layers.Flatten(),
                keras.layers.Dense(1, activation="sigmoid"),
            ]
        )
        cam = GradCam(model)
        x = np.random.default_rng(0).random((3, 32, 32, 1), dtype=np.float32)
        probs, maps = cam.predict_and_explain(x)
        np.testing.assert_allclose(np.asarray(model.predict_on_batch(x)).reshape(-1), probs, atol=1e-5)
        assert (3, 32, 32) == maps.shape

    def test_model_without_conv_layers_is_a_clear_error(self) -> None:
        """GlobalAveragePooling + Dense has nothing to explain spatially: ExplainError says so."""
        with pytest.raises(ExplainError, match="no 2-D convolutional layer"):
            GradCam(build_tiny_model())

    def test_non_sigmoid_head_is_a_clear_error(self) -> None:
        """A softmax head has no single PNEUMONIA logit here: ExplainError names the layer."""
        import keras

        inputs = keras.Input((16, 16, 1))
        x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(inputs))
        model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
        with pytest.raises(ExplainError, match="sigmoid"):
            GradCam(model)


class TestGradCam:
    def test_probabilities_equal_predict_on_batch(
        self, shipped: tuple[Any, Any, np.ndarray], explained: tuple[GradCam, np.ndarray, np.ndarray]
    ) -> None:
        """The explaining pass scores exactly like the plain forward pass."""
        model, _, batch = shipped
        expected = np.asarray(model.predict_on_batch(batch)).reshape(-1)
        np.testing.assert_allclose(expected, explained[1], atol=1e-5, rtol=0)

    def test_maps_shape_dtype_range(self, explained: tuple[GradCam, np.ndarray, np.ndarray]) -> None:
        """One float32 map per image at the input size, in 0..1, peak 1, no NaN."""
        _, probs, maps = explained
        assert (len(probs), 128, 128) == maps.shape
        assert np.float32 == maps.dtype
        assert np.isfinite(maps).all()
        assert 0.0 <= float(maps.min())
        np.testing.assert_allclose(np.ones(len(maps)), maps.max(axis=(1, 2)), atol=1e-6)

    def test_grid_maps_are_what_gets_upsampled(
        self, shipped: tuple[Any, Any, Any], explained: tuple[GradCam, np.ndarray, np.ndarray]
    ) -> None:
        """``upsample=False`` gives the last block's grid (dsnet: 8x8), peak 1, same scores;
        bilinear upsampling of it is the input-size map."""
        cam, probs, maps = explained
        batch = shipped[2]
        raw, grid = cam.predict_and_explain(batch, upsample=False)
        assert (len(batch), 8, 8) == grid.shape == (len(batch), *cam.grid)
        np.testing.assert_allclose(probs, raw, atol=1e-6)
        np.testing.assert_allclose(np.ones(len(grid)), grid.max(axis=(1, 2)), atol=1e-6)
        np.testing.assert_allclose(maps, np.stack([upsample_map(g, 128, 128) for g in grid]), atol=1e-6)
        assert ((0,), (0, 8, 8)) == tuple(
            a.shape for a in cam.predict_and_explain(np.zeros((0, 128, 128, 1), np.float32), upsample=False)
        )

    def test_no_retracing_across_batch_sizes(self, explained: tuple[GradCam, np.ndarray, np.ndarray]) -> None:
        """The fixed input signature serves every batch size with one trace."""
        cam = explained[0]
        for n in (1, 3, 5):
            cam.predict_and_explain(np.zeros((n, 128, 128, 1), np.float32))
        assert 1 == cam._explain_fn.experimental_get_tracing_count()

    def test_empty_and_wrong_shaped_batches(self, explained: tuple[GradCam, np.ndarray, np.ndarray]) -> None:
        """An empty batch gives empty arrays; a wrong shape is a ValueError naming both shapes."""
        cam = explained[0]
        probs, maps = cam.predict_and_explain(np.zeros((0, 128, 128, 1), np.float32))
        assert ((0,), (0, 128, 128)) == (probs.shape, maps.shape)
        with pytest.raises(ValueError, match=r"\(n, 128, 128, 1\).*\(2, 64, 64, 1\)"):
            cam.predict_and_explain(np.zeros((2, 64, 64, 1), np.float32))

    def test_flat_map_stays_zero(self) -> None:
        """Feature maps that are all zero give an all-zero map, not NaN."""
        import keras

        inputs = keras.Input((24, 24, 1))
        x = keras.layers.Conv2D(3, 3, kernel_initializer="zeros", bias_initializer="zeros")(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
        _, maps = GradCam(model).predict_and_explain(np.ones((2, 24, 24, 1), np.float32))
        assert np.array_equal(np.zeros((2, 24, 24), np.float32), maps)

    def test_seed_version_v0001(self) -> None:
        """The shipped seed-architecture version (150 px, Flatten head) is explained too."""
        model, meta = _load("v0001")
        batch = _batch(meta)[:4]
        probs, maps = GradCam(model).predict_and_explain(batch)
        np.testing.assert_allclose(np.asarray(model.predict_on_batch(batch)).reshape(-1), probs, atol=1e-5)
        assert (4, 150, 150) == maps.shape

    def test_model_randomisation_changes_the_maps(
        self, shipped: tuple[Any, Any, np.ndarray], explained: tuple[GradCam, np.ndarray, np.ndarray]
    ) -> None:
        """Re-initialising the last conv layer's kernels decorrelates the maps (Spearman < 0.5)."""
        import keras
        from scipy.stats import spearmanr

        model, _, batch = shipped
        cam, _, maps = explained
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        conv = [layer for layer in clone.layers if type(layer).__name__ in ("Conv2D", "SeparableConv2D")][-1]
        for var in conv.weights:  # re-draw the kernels from the layer's own initialisers
            attr = INITIALISERS.get(var.name)
            if attr:
                init = getattr(conv, attr)
                var.assign(type(init).from_config({**init.get_config(), "seed": 1337})(var.shape))
        _, randomised = GradCam(clone, layer_name=cam.layer_name).predict_and_explain(batch)
        rhos = []
        for a, b in zip(maps, randomised, strict=True):
            rho = spearmanr(a.ravel(), b.ravel()).statistic
            rhos.append(0.0 if np.isnan(rho) else float(rho))  # a flat map: no rank order at all
        assert float(np.mean(rhos)) < 0.5, rhos

    def test_pneumonia_maps_lie_inside_the_chest(
        self,
        shipped: tuple[Any, dict[str, Any], np.ndarray],
        explained: tuple[GradCam, np.ndarray, np.ndarray],
    ) -> None:
        """On images called PNEUMONIA most of the map's mass is away from the 10% border."""
        _, meta, _ = shipped
        _, raw, maps = explained
        called = calibrate(raw, float(meta["temperature"])) >= float(meta["threshold"])
        assert called.sum() >= 5
        fractions = [border_mass_fraction(m) for m in maps[called]]
        assert max(fractions) < 0.5, fractions


class TestBorderMassFraction:
    @pytest.mark.parametrize(
        ("fill", "expected"),
        [("flat", 0.36), ("centre", 0.0), ("border", 1.0), ("zeros", 0.0)],
    )
    def test_known_maps(self, fill: str, expected: float) -> None:
        """A flat map puts 36% of its mass in the 10% border; centre-only 0; border-only 1."""
        cam = np.zeros((100, 100), np.float32)
        if fill == "flat":
            cam[:] = 1
        elif fill == "centre":
            cam[10:90, 10:90] = 1
        elif fill == "border":
            cam[:] = 1
            cam[10:90, 10:90] = 0
        assert expected == pytest.approx(border_mass_fraction(cam))


class TestOverlay:
    def test_png_has_the_image_size_and_decodes(self) -> None:
        """Any image size, any map size: a colour PNG of the image's size comes back."""
        image = np.tile(np.linspace(0, 255, 420, dtype=np.uint8), (300, 1))
        cam = np.zeros((8, 8), np.float32)
        cam[3:5, 3:5] = 1.0
        png = overlay_png(image, cam, "PNEUMONIA", 0.912, 0.578)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        assert (300, 420, 3) == decoded.shape
        centre = decoded[140:160, 200:220].astype(int)
        assert (centre[..., 2] - centre[..., 0]).mean() > 20  # warm colour where the map is hot
        corner = decoded[280:300, 0:20].astype(int)
        assert (np.abs(corner[..., 2] - corner[..., 0]) < 3).all()  # plain grey where it is not

    def test_label_is_printed_in_a_dark_box(self) -> None:
        """The top-left corner holds dark box pixels and white text."""
        image = np.full((256, 256), 200, np.uint8)
        decoded = cv2.imdecode(
            np.frombuffer(overlay_png(image, np.zeros((4, 4)), "NORMAL", 0.1, 0.5), np.uint8),
            cv2.IMREAD_GRAYSCALE,
        )
        box = decoded[:20, :60]
        assert box.min() < 80 and box.max() > 230

    def test_no_evidence_shows_the_plain_radiograph(self) -> None:
        """A zero map leaves every pixel outside the label box exactly the radiograph's grey;
        a full map tints it at most ``max_alpha`` of the way to the colour map's top."""
        image = np.tile(np.arange(256, dtype=np.uint8), (200, 1))
        plain = cv2.imdecode(
            np.frombuffer(overlay_png(image, np.zeros((8, 8)), "NORMAL", 0.1, 0.5), np.uint8), 1
        )
        below_box = (slice(60, None), slice(None))
        assert np.array_equal(np.repeat(image[..., None], 3, axis=2)[below_box], plain[below_box])
        hot = cv2.imdecode(
            np.frombuffer(overlay_png(image, np.ones((8, 8)), "PNEUMONIA", 0.9, 0.5), np.uint8), 1
        )
        top = cv2.applyColorMap(np.full((1, 1), 255, np.uint8), cv2.COLORMAP_INFERNO)[0, 0].astype(float)
        expected = image[..., None] * 0.4 + top * 0.6
        assert np.abs(hot[below_box].astype(float) - expected[below_box]).max() <= 1.5

    def test_nan_map_and_bad_input(self) -> None:
        """NaN in the map is drawn as no evidence; a colour image is a ValueError."""
        image = np.zeros((64, 64), np.uint8)
        assert overlay_png(image, np.full((8, 8), np.nan), "NORMAL", 0.2, 0.5).startswith(b"\x89PNG")
        with pytest.raises(ValueError, match="2-D uint8"):
            overlay_png(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)), "NORMAL", 0.2, 0.5)

    @pytest.mark.parametrize("shape", [(1, 1), (30, 1456), (300, 420), (207, 256)])
    def test_stored_png_decodes_to_the_same_pixels(self, shape: tuple[int, int]) -> None:
        """libpng (checking both CRC-32 and Adler-32) reads back every pixel, in RGB order; the
        sizes cover one block, exactly two full 65,535-byte deflate blocks, and several."""
        rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
        png = stored_png(rgb)
        decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert decoded is not None
        assert np.array_equal(rgb, cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB))

    def test_stored_png_checksums_are_what_a_reader_checks(self) -> None:
        """One pixel byte changed inside the file: the reader refuses it (so the round trip
        above also proves the checksums right), and a bad image is a ValueError."""
        rgb = np.full((20, 20, 3), 100, np.uint8)
        png = bytearray(stored_png(rgb))
        png[len(png) // 2] ^= 0x01
        assert cv2.imdecode(np.frombuffer(bytes(png), np.uint8), cv2.IMREAD_UNCHANGED) is None
        for bad in (
            np.zeros((4, 4), np.uint8),
            np.zeros((4, 4, 3), np.uint16),
            np.zeros((0, 4, 3), np.uint8),
        ):
            with pytest.raises(ValueError, match="non-empty"):
                stored_png(bad)

    def test_write_overlay_is_atomic_and_makes_folders(self, tmp_path: Path) -> None:
        """Parent folders are created, the bytes land whole, no temp file stays behind."""
        target = tmp_path / "heatmaps" / "2026" / "a.png"
        write_overlay(target, b"\x89PNG first")
        write_overlay(target, b"\x89PNG second")
        assert b"\x89PNG second" == target.read_bytes()
        assert ["a.png"] == os.listdir(target.parent)
        assert 0o644 == target.stat().st_mode & 0o777

    def test_overlay_is_readable_by_others_whatever_the_umask(self, tmp_path: Path) -> None:
        """The service runs with UMask=0027; the review page is read by others on a share."""
        old = os.umask(0o077)
        try:
            write_overlay(tmp_path / "b.png", b"\x89PNG", durable=False)
        finally:
            os.umask(old)
        assert 0o644 == (tmp_path / "b.png").stat().st_mode & 0o777
        assert ["b.png"] == os.listdir(tmp_path)


def test_real_overlay_of_a_fixture(explained: tuple[GradCam, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    """End to end on a 224 px fixture: decode, explain, draw, write, read back."""
    _, probs, maps = explained
    path = fixture_images()[-1]
    image = decode_image(path)
    png = overlay_png(image, maps[-1], "PNEUMONIA", float(probs[-1]), 0.5)
    write_overlay(tmp_path / "x.png", png)
    assert image.shape == cv2.imread(str(tmp_path / "x.png"), cv2.IMREAD_GRAYSCALE).shape
