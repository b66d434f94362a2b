"""Decoding of each format and of broken files; preprocessing shape and range."""

from __future__ import annotations

import contextlib
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tests.conftest import FULLRES, fixture_images
from watcher.errors import DecodeError
from watcher.imaging import PreprocessSpec, decode_bytes, decode_image, halve, preprocess, resize


def _gradient(h: int = 64, w: int = 48) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))


def _png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _jpeg(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def _dicom_bytes(tmp_path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2") -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "x.dcm"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


class TestDecode:
    @pytest.mark.parametrize("path", fixture_images()[:3] + FULLRES, ids=lambda p: p.name)
    def test_real_jpegs(self, path: Path) -> None:
        """Real chest X-ray JPEGs decode to 2-D uint8."""
        img = decode_image(path)
        assert 2 == img.ndim
        assert np.uint8 == img.dtype
        assert img.std() > 10

    def test_png_8bit_roundtrip(self) -> None:
        """An 8-bit grey PNG decodes to the same pixels."""
        img = _gradient()
        assert np.array_equal(img, decode_bytes(_png(img)))

    def test_png_16bit_is_stretched_to_8bit(self) -> None:
        """16-bit PNGs (e.g. 12-bit data) use the full 0..255 range."""
        img16 = (np.tile(np.linspace(0, 4095, 40), (30, 1))).astype(np.uint16)
        out = decode_bytes(_png(img16))
        assert np.uint8 == out.dtype
        assert (0, 255) == (int(out.min()), int(out.max()))

    def test_rgba_png_becomes_grey(self) -> None:
        """RGBA and RGB images are reduced to one grey channel."""
        rgba = np.dstack([_gradient()] * 3 + [np.full((64, 48), 255, np.uint8)])
        out = decode_bytes(_png(rgba))
        assert (64, 48) == out.shape
        assert np.abs(out.astype(int) - _gradient().astype(int)).max() <= 1

    def test_dicom_monochrome2(self, tmp_path: Path) -> None:
        """A 12-bit DICOM decodes and is stretched to 0..255."""
        pix = np.tile(np.linspace(0, 4095, 32), (16, 1))
        out = decode_bytes(_dicom_bytes(tmp_path, pix))
        assert (16, 32) == out.shape
        assert out[0, 0] < out[0, -1]

    def test_dicom_monochrome1_is_inverted(self, tmp_path: Path) -> None:
        """MONOCHROME1 (high values dark) is inverted to MONOCHROME2."""
        pix = np.tile(np.linspace(0, 4095, 32), (16, 1))
        out = decode_bytes(_dicom_bytes(tmp_path, pix, "MONOCHROME1"))
        assert out[0, 0] > out[0, -1]


class TestBrokenFiles:
    def test_empty(self) -> None:
        """A zero-byte file is refused in plain words."""
        with pytest.raises(DecodeError, match="empty"):
            decode_bytes(b"")

    @pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
    def test_truncated_jpeg(self, keep: float) -> None:
        """A truncated JPEG fails (some decoders would return a grey-padded picture)."""
        data = FULLRES[0].read_bytes()
        cut = data[: int(len(data) * keep)]
        with pytest.raises(DecodeError, match="truncated"):
            decode_bytes(cut)

    def test_truncated_png(self) -> None:
        """A PNG cut short is refused."""
        data = _png(_gradient(200, 200))
        with pytest.raises(DecodeError, match="truncated"):
            decode_bytes(data[: len(data) // 2])

    def test_random_bytes(self) -> None:
        """Random bytes are not an image."""
        rng = np.random.default_rng(1)
        with pytest.raises(DecodeError, match="not a JPEG, PNG or DICOM"):
            decode_bytes(b"\x00\x01" + rng.bytes(1000))

    def test_text_file(self) -> None:
        """A text file is named as such."""
        with pytest.raises(DecodeError, match="text"):
            decode_bytes(b"patient notes: all fine\n" * 20)

    def test_decompression_bomb_png(self) -> None:
        """A tiny PNG declaring 30,000 x 30,000 pixels is refused before decoding."""

        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

        ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
        data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        data += chunk(b"IEND", b"")
        with pytest.raises(DecodeError, match="decompression bomb"):
            decode_bytes(data)

    def test_pixel_limit_is_configurable(self) -> None:
        """The pixel limit applies to valid images too."""
        data = _jpeg(_gradient(100, 100))
        assert (100, 100) == decode_bytes(data, max_pixels=10_000).shape
        with pytest.raises(DecodeError, match="limit"):
            decode_bytes(data, max_pixels=9_999)

    def test_corrupt_jpeg_body(self) -> None:
        """A JPEG with a valid header and garbage body is refused or decoded, never crashes."""
        data = bytearray(_jpeg(_gradient(100, 100)))
        data[200:-2] = b"\x00" * (len(data) - 202)
        with contextlib.suppress(DecodeError):
            decode_bytes(bytes(data))

    def test_unreadable_path(self, tmp_path: Path) -> None:
        """A missing file is a DecodeError, not an OSError."""
        with pytest.raises(DecodeError, match="cannot read"):
            decode_image(tmp_path / "gone.jpg")


class TestPreprocess:
    @pytest.mark.parametrize("equalize", ["none", "clahe"])
    def test_shape_dtype_range_on_real_image(self, equalize: str) -> None:
        """A real full-resolution X-ray becomes (h, w, 1) float32 in 0..1."""
        spec = PreprocessSpec(height=150, width=120, equalize=equalize)  # type: ignore[arg-type]
        out = preprocess(decode_image(FULLRES[0]), spec)
        assert (150, 120, 1) == out.shape
        assert np.float32 == out.dtype
        assert 0.0 <= out.min() and out.max() <= 1.0

    def test_spec_roundtrip(self) -> None:
        """The spec stored in metadata reads back equal; unknown fields are refused."""
        spec = PreprocessSpec(height=224, width=224, equalize="clahe", effective_size=128)
        assert spec == PreprocessSpec.from_dict(spec.to_dict())
        with pytest.raises(ValueError, match="bad preprocessing spec"):
            PreprocessSpec.from_dict({**spec.to_dict(), "gamma": 2})

    def test_clahe_tiles_travel_in_metadata_and_default_to_eight(self) -> None:
        """The tile grid is part of the stored spec; metadata written before it existed means 8x8."""
        spec = PreprocessSpec(128, 128, equalize="clahe", clahe_tiles=4)
        assert 4 == PreprocessSpec.from_dict(spec.to_dict()).clahe_tiles
        old = {k: v for k, v in spec.to_dict().items() if k != "clahe_tiles"}
        assert 8 == PreprocessSpec.from_dict(old).clahe_tiles
        with pytest.raises(ValueError, match="clahe_tiles must be 1 to 32"):
            PreprocessSpec.from_dict({**spec.to_dict(), "clahe_tiles": 0})
        img = decode_image(FULLRES[0])
        four, eight = (
            preprocess(img, PreprocessSpec(128, 128, equalize="clahe", clahe_tiles=t)) for t in (4, 8)
        )
        assert not np.array_equal(four, eight)  # the grid is applied, not ignored

    def test_rejects_non_uint8(self) -> None:
        """The pixel contract is uint8 in."""
        with pytest.raises(ValueError, match="uint8"):
            preprocess(np.zeros((10, 10), np.float32), PreprocessSpec(8, 8))  # type: ignore[arg-type]

    @settings(max_examples=40, deadline=None)
    @given(
        img=arrays(np.uint8, st.tuples(st.integers(1, 300), st.integers(1, 300))),
        size=st.integers(8, 64),
        equalize=st.sampled_from(["none", "clahe"]),
        effective=st.sampled_from([0, 16]),
    )
    def test_invariants(self, img: np.ndarray, size: int, equalize: str, effective: int) -> None:
        """Any grey image of any size gives the spec's shape, float32, within 0..1."""
        spec = PreprocessSpec(height=size, width=size + 3, equalize=equalize, effective_size=effective)  # type: ignore[arg-type]
        out = preprocess(img, spec)
        assert (size, size + 3, 1) == out.shape
        assert np.float32 == out.dtype
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


class TestResize:
    """Area averaging when shrinking; halvings first from 4x the target, never below 2x."""

    def test_large_images_are_halved_first_and_stay_close_to_one_area_step(self) -> None:
        import cv2

        img = decode_image(FULLRES[0])  # 1172 x 986
        got = resize(img, 128, 128)
        one_step = cv2.resize(img, (128, 128), interpolation=cv2.INTER_AREA)
        assert (128, 128) == got.shape and np.uint8 == got.dtype
        diff = np.abs(got.astype(int) - one_step.astype(int))
        assert float(diff.mean()) < 0.5 and float(np.percentile(diff, 99)) <= 3 and int(diff.max()) <= 16
        # one halving (1172 x 986 -> 586 x 493: under 4x the target on a side), then one area step
        half = halve(img)
        assert (493, 586) == half.shape
        assert np.array_equal(cv2.resize(half, (128, 128), interpolation=cv2.INTER_AREA), got)

    @pytest.mark.parametrize("shape", [(224, 224), (511, 2000), (375, 500), (130, 700)])
    def test_under_four_times_on_a_side_is_one_area_step(self, shape: tuple[int, int]) -> None:
        """The 224 px training images and any DCT-scaled decode resize exactly as before."""
        import cv2

        img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
        expected = cv2.resize(img, (128, 128), interpolation=cv2.INTER_AREA)
        assert np.array_equal(expected, resize(img, 128, 128))

    def test_halve_averages_2x2_blocks_and_drops_an_odd_edge(self) -> None:
        img = np.array([[0, 2, 9], [4, 6, 9], [9, 9, 9]], dtype=np.uint8)
        assert [[3]] == halve(img).tolist()


class TestFastJpegDecode:
    """DCT-scaled decoding (what the daemon does): never below the floor, same answers, clean fallbacks."""

    SPEC = PreprocessSpec(height=128, width=128, equalize="clahe")

    @given(st.integers(1, 6000), st.integers(1, 6000), st.integers(1, 600), st.integers(1, 600))
    def test_reduction_never_goes_below_the_floor(self, w: int, h: int, min_w: int, min_h: int) -> None:
        """The chosen factor keeps ceil(w/r) >= min_w and ceil(h/r) >= min_h, or is 1."""
        from watcher.imaging import jpeg_reduction

        r = jpeg_reduction(w, h, min_w, min_h)
        assert r in (1, 2, 4, 8)
        if r > 1:
            assert -(-w // r) >= min_w and -(-h // r) >= min_h
            if r < 8:  # the next factor would have gone below the floor
                assert -(-w // (2 * r)) < min_w or -(-h // (2 * r)) < min_h

    @pytest.mark.parametrize("size", [(2000, 1500), (1001, 777), (513, 2047), (300, 280)])
    @pytest.mark.parametrize("progressive", [False, True])
    def test_scaled_decode_of_odd_and_progressive_jpegs(
        self, size: tuple[int, int], progressive: bool
    ) -> None:
        """Odd sizes and progressive JPEGs decode scaled (at least twice the input) or in full, the
        declared size is the file's, and the model input stays close to the full decode's."""
        from watcher.imaging import decode, input_floor

        w, h = size
        img = cv2.resize(
            cv2.imread(str(FULLRES[0]), cv2.IMREAD_GRAYSCALE), (w, h), interpolation=cv2.INTER_AREA
        )
        ok, buf = cv2.imencode(
            ".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
        )
        assert ok
        floor = input_floor(self.SPEC)
        fast = decode(buf.tobytes(), min_size=floor)
        full = decode(buf.tobytes())
        assert (w, h) == (fast.width, fast.height) == (full.width, full.height)
        assert fast.image.shape[0] >= min(h, floor[0]) and fast.image.shape[1] >= min(w, floor[1])
        diff = np.abs(preprocess(fast.image, self.SPEC) - preprocess(full.image, self.SPEC))
        assert float(diff.mean()) < 0.02

    def test_twelve_bit_jpeg_falls_back_to_libjpeg(self) -> None:
        """A 12-bit (extended process) JPEG, which OpenCV cannot read, decodes in full via pylibjpeg."""
        import pydicom
        from pydicom.data import get_testdata_file
        from pydicom.encaps import generate_frames

        from watcher.imaging import decode

        ds = pydicom.dcmread(get_testdata_file("JPGExtended.dcm"))
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        from watcher.imaging import _jpeg_frame

        assert (256, 1024, 12) == _jpeg_frame(frame)
        got = decode(frame, min_size=(256, 256))
        assert (1024, 256) == got.image.shape and np.uint8 == got.image.dtype
        assert (256, 1024) == (got.width, got.height)
        assert got.image.max() > got.image.min()
