"""DICOM as hospitals send it: sniff, check, decode to grey, and the few facts worth keeping.

``read_dicom(data, max_pixels)`` turns the bytes of one DICOM file (with or without the
128-byte preamble and file meta group) into the same 2-D ``uint8`` grey image that a JPEG
or PNG gives, plus a ``DicomInfo`` with the study/series/instance UIDs, modality, body part,
transfer syntax and the patient's age. Names and dates are read only to compute the age and
are never kept. Objects the model was not made for are refused with a ``DecodeError`` that
says why in plain words: non-images (SR, presentation states), multi-frame and colour
images, and, unless ``accept_any_body_part``, anything other than a chest projection
radiograph.

The display pipeline follows DICOM PS3.4 (Grayscale Transformations): stored values ->
modality LUT (Rescale Slope/Intercept or Modality LUT Sequence) -> VOI LUT Sequence, else
the first Window Center/Width (pydicom's ``apply_voi_lut`` semantics, ``prefer_lut=True``)
-> the VOI output range mapped linearly onto 0..255 -> MONOCHROME1 inverted. Without any
VOI transform, 8-bit unsigned data without a modality transform is kept as is and anything
else is stretched from its minimum to its maximum.

Pixel data is decoded by pydicom's pixel plugins (pylibjpeg + libjpeg/openjpeg/rle,
pyjpegls, Pillow); see ``benchmarks/dicom_decode.py`` for which covers which syntax.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi, apply_windowing
from pydicom.uid import UID

from watcher.errors import DecodeError

GreyImage = npt.NDArray[np.uint8]
Mask = npt.NDArray[np.bool_] | None

DEFAULT_POPULATION: dict[str, Any] = {
    "description": "pediatric, 1 to 5 years, anterior-posterior chest films",
    "age_years": [1, 5],
}

PROJECTION_MODALITIES = frozenset({"CR", "DX", "DR"})
SECONDARY_CAPTURE_MODALITY = "OT"
# SOP classes whose objects are projection radiographs or captures of one.
RADIOGRAPH_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    }
)
SECONDARY_CAPTURE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC (refused later if >1 frame)
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    }
)
# BodyPartExamined values (CID 4031 and common free text, several languages) that mean chest.
CHEST_WORDS = frozenset(
    {"CHEST", "THORAX", "THORACIC", "LUNG", "LUNGS", "TORAX", "TORACE", "BRUST", "BORST", "POUMON", "PECHO"}
)

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_AGE_RE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12.0, "Y": 365.25}

# Explicit VR little endian: VRs with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL",
     b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)  # fmt: skip
_UNDEFINED = 0xFFFFFFFF
_JPEG_FAMILY = frozenset(pydicom.uid.JPEGTransferSyntaxes) | frozenset(pydicom.uid.JPEGLSTransferSyntaxes)
# One decoder per syntax, the strict one: pydicom's default falls back to the next plugin when
# one fails, and libjpeg (pylibjpeg) silently decodes some corrupt JPEG-LS/JPEG streams.
_PLUGINS = {
    pydicom.uid.JPEGBaseline8Bit: "pillow",
    pydicom.uid.JPEGExtended12Bit: "pylibjpeg",
    pydicom.uid.JPEGLossless: "pylibjpeg",
    pydicom.uid.JPEGLosslessSV1: "pylibjpeg",
    pydicom.uid.JPEGLSLossless: "pyjpegls",
    pydicom.uid.JPEGLSNearLossless: "pyjpegls",
    pydicom.uid.JPEG2000Lossless: "pylibjpeg",
    pydicom.uid.JPEG2000: "pylibjpeg",
    pydicom.uid.RLELossless: "pylibjpeg",
}
_TABLE_LIMIT = 1 << 20  # integer value ranges up to this size go through a lookup table
_ALL_PLUGINS_FAILED = "Unable to decode as exceptions were raised by all available plugins:"
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


@dataclass(frozen=True)
class DicomInfo:
    """What a DICOM file tells about itself; nothing that identifies the patient.

    UIDs are ``""`` when missing or not a valid UID string. ``age_years`` is ``None`` when
    neither Patient's Age nor the study and birth dates give it; ``age_text`` is the age as
    DICOM writes it (``"58Y"``, ``"18M"``, ``"3W"``, ``"10D"``) or ``""``.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    body_part: str
    view_position: str
    transfer_syntax: str  # name, e.g. "JPEG 2000 Image Compression (Lossless Only)"
    transfer_syntax_uid: str
    photometric: str
    bits_stored: int
    age_years: float | None
    age_text: str
    display: str  # how stored values became grey, e.g. "rescale, window 1 of 2 (C 40 W 400)"


# ---------------------------------------------------------------- sniffing


def _element_at(data: bytes, pos: int) -> tuple[int, int] | None:
    """(tag, end offset) of a plausible little-endian element at ``pos``, explicit or implicit VR."""
    if pos + 8 > len(data):
        return None
    group, elem = struct.unpack_from("<HH", data, pos)
    vr = data[pos + 4 : pos + 6]
    room = len(data) - pos
    if vr in _LONG_VRS:
        if data[pos + 6 : pos + 8] != b"\0\0" or pos + 12 > len(data):
            return None
        (length,) = struct.unpack_from("<I", data, pos + 8)
        header = 12
    elif vr in _SHORT_VRS:
        (length,) = struct.unpack_from("<H", data, pos + 6)
        header = 8
    else:  # implicit VR: a 4-byte length
        (length,) = struct.unpack_from("<I", data, pos + 4)
        header = 8
    if length == _UNDEFINED:  # a sequence of undefined length: plausible, stop looking here
        return (group << 16 | elem), len(data)
    if length % 2 or header + length > room:
        return None
    return (group << 16 | elem), pos + header + length


def looks_like_dicom(data: bytes) -> bool:
    """Whether these bytes are DICOM: ``DICM`` after the preamble, or a bare little-endian data set.

    Cheap and conservative, for extension-less inbox files: a bare data set must start with
    an element of group 0x0002 (file meta) or 0x0008 (identification) followed by a second
    well-formed element with a larger tag.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    first = _element_at(data, 0)
    if first is None or first[0] >> 16 not in (0x0002, 0x0008):
        return False
    if first[1] >= len(data):
        return first[1] == len(data) and first[0] >> 16 == 0x0008 and len(data) > 8
    second = _element_at(data, first[1])
    return second is not None and first[0] < second[0] and second[0] >> 16 in range(0x0002, 0x0011)


def _meta_transfer_syntax(data: bytes) -> tuple[str, int]:
    """The file meta group's Transfer Syntax UID and where the data set starts ("", 0 if none)."""
    pos = 132 if data[128:132] == b"DICM" else 0
    syntax = ""
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        if elem == 0x0010:
            syntax = data[start : start + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos = start + length
    return syntax, pos


# ---------------------------------------------------------------- reading


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else ""
    return str(value).strip()


def _uid(ds: Dataset, keyword: str) -> str:
    value = _text(ds, keyword)
    return value if len(value) <= 64 and _UID_RE.match(value) else ""


def _sop_name(sop_class: str) -> str:
    name = UID(sop_class).name if sop_class else ""
    return f"a {name}" if name and name != sop_class else f"an object of SOP class {sop_class or '(none)'}"


def _check_bounded_inflate(data: bytes, max_pixels: int) -> None:
    """Refuse a deflated data set that would inflate past what a single image can need."""
    syntax, start = _meta_transfer_syntax(data)
    if syntax != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return
    check_deflated_size(data[start:], max_pixels)


def check_deflated_size(deflated: bytes, max_pixels: int) -> None:
    """Raise DecodeError for a deflated data set (after its file meta, or as received over the
    network) that inflates past what one image within ``max_pixels`` can need: a bomb."""
    limit = 4 * max_pixels + (16 << 20)  # 32 bits per pixel, plus 16 MiB for everything else
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(deflated, limit)
    except zlib.error as exc:
        raise DecodeError(f"deflated DICOM data set is corrupt: {exc}") from exc
    if len(out) >= limit and (inflater.unconsumed_tail or not inflater.eof):
        raise DecodeError(
            f"deflated DICOM data set inflates to more than {limit:,} bytes, more than a single image "
            f"within decode.max_pixels ({max_pixels:,}) can need; refusing a possible decompression bomb"
        )


def _read_dataset(data: bytes, max_pixels: int) -> Dataset:
    _check_bounded_inflate(data, max_pixels)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        ds.get("SOPClassUID")  # force the first elements to be parsed
    except Exception as exc:  # pydicom raises many types for broken files
        raise DecodeError(f"DICOM header could not be read: {exc}") from exc
    if len(ds) == 0:
        raise DecodeError("DICOM file holds no data elements (not DICOM, or the header is damaged)")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        # bare data set without file meta: name the syntax pydicom found while reading
        implicit, little = ds.original_encoding
        if implicit is None:
            raise DecodeError("DICOM file has no file meta and its encoding could not be determined")
        syntax = pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
        if not little:
            syntax = pydicom.uid.ExplicitVRBigEndian
        ds.file_meta = meta if meta is not None else FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _refusal(ds: Dataset, accept_any_body_part: bool) -> str:
    """Why this object is not scored, or ``""``."""
    sop_class = _uid(ds, "SOPClassUID")
    if "PixelData" not in ds:
        return f"DICOM object is {_sop_name(sop_class)} with no Pixel Data: there is no image to score"
    modality = _text(ds, "Modality").upper()
    if not accept_any_body_part:
        radiograph = modality in PROJECTION_MODALITIES or modality == SECONDARY_CAPTURE_MODALITY
        if not modality:
            radiograph = sop_class in RADIOGRAPH_SOP_CLASSES | SECONDARY_CAPTURE_SOP_CLASSES
        if not radiograph:
            return (
                f"DICOM modality is {modality or '(none)'} ({_sop_name(sop_class)}), not a projection "
                f"radiograph (CR, DX, DR or a secondary capture of one); set dicom.accept_any_body_part "
                f"to score it anyway"
            )
        body_part = _text(ds, "BodyPartExamined")
        words = set(re.split(r"[^A-Z]+", body_part.upper()))
        if body_part and not words & CHEST_WORDS:
            return (
                f"DICOM body part examined is {body_part!r}, not chest (expected CHEST, THORAX or LUNG); "
                f"set dicom.accept_any_body_part to score it anyway"
            )
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        return f"DICOM image has {frames} frames; only single-frame radiographs are scored"
    samples = int(ds.get("SamplesPerPixel") or 1)
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return (
            f"DICOM image is colour (Samples per Pixel {samples}, Photometric Interpretation "
            f"{photometric or '(none)'}); only greyscale (MONOCHROME1/MONOCHROME2) radiographs are scored"
        )
    return ""


_SIZE_SEARCH = 1 << 20  # bytes of a codestream searched for its declared size (SOF, SIZ)


def _codestream_size(fragment: bytes, syntax: UID) -> tuple[int, int] | None:
    """(width, height) declared by a JPEG, JPEG-LS or JPEG 2000 codestream, if found."""
    if syntax in pydicom.uid.JPEG2000TransferSyntaxes:
        pos = fragment.find(b"\xff\x4f\xff\x51")  # SOC then SIZ (may follow a JP2 header)
        if pos < 0 or pos + 24 > len(fragment):
            return None
        xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", fragment, pos + 8)
        return xsiz - xo, ysiz - yo
    if syntax == pydicom.uid.RLELossless:
        return None  # decoded into a buffer sized by Rows x Columns
    pos = 2 if fragment[:2] == b"\xff\xd8" else -1
    while 0 <= pos and pos + 4 <= len(fragment):
        if fragment[pos] != 0xFF:
            return None
        marker = fragment[pos + 1]
        if marker == 0xFF or marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 1 if marker == 0xFF else 2
            continue
        if marker in _JPEG_SOF and pos + 9 <= len(fragment):
            height, width = struct.unpack_from(">HH", fragment, pos + 5)
            return width, height
        if marker == 0xDA:
            return None
        pos += 2 + struct.unpack_from(">H", fragment, pos + 2)[0]
    return None


def _after_offset_table(pixel_data: bytes) -> bytes:
    """Encapsulated Pixel Data without its leading Basic Offset Table item."""
    if pixel_data[:4] != b"\xfe\xff\x00\xe0" or len(pixel_data) < 8:
        raise ValueError("encapsulated Pixel Data does not start with an item (Basic Offset Table)")
    (length,) = struct.unpack_from("<I", pixel_data, 4)
    return pixel_data[8 + length :]


def _check_size(ds: Dataset, max_pixels: int) -> None:
    """Apply the decompression-bomb limit to the header and to the codestream, before decoding."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception as exc:
        raise DecodeError(f"DICOM image has no usable Rows/Columns: {exc}") from exc
    sizes = [(cols, rows, "header")]
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if syntax.is_encapsulated:
        try:
            fragments = list(generate_fragments(_after_offset_table(ds.PixelData)))
        except Exception as exc:
            raise DecodeError(f"DICOM encapsulated pixel data is damaged: {exc}") from exc
        if not fragments or not fragments[0]:
            raise DecodeError(f"DICOM encapsulated pixel data ({syntax.name}) holds no codestream")
        # the size is looked for in the stream's first bytes across fragments: a stream split
        # right after its start marker must not hide a 20000 x 20000 image behind a 64 x 64 header
        head = bytearray()
        for fragment in fragments:
            head += fragment[: _SIZE_SEARCH - len(head)]
            if len(head) >= _SIZE_SEARCH:
                break
        declared = _codestream_size(bytes(head), syntax)
        if declared is not None:
            sizes.append((*declared, f"{syntax.name} codestream"))
        elif syntax != pydicom.uid.RLELossless:
            raise DecodeError(
                f"DICOM pixel data ({syntax.name}) declares no image size in its first "
                f"{_SIZE_SEARCH // 1024} KB: refused rather than decoded unchecked"
            )
        if syntax in _JPEG_FAMILY and b"\xff\xda" not in head:  # a header, then no image data
            raise DecodeError(
                f"DICOM pixel data ({syntax.name}) has no scan (start-of-scan marker) in its first "
                f"{_SIZE_SEARCH // 1024} KB: no image to decode"
            )
        # libjpeg fills a truncated JPEG/JPEG-LS stream with black instead of failing
        if syntax in _JPEG_FAMILY and b"\xff\xd9" not in fragments[-1].rstrip(b"\0")[-64:]:
            raise DecodeError(
                f"DICOM pixel data ({syntax.name}) ends before its end-of-image marker: "
                f"the codestream is truncated"
            )
    for width, height, where in sizes:
        if width <= 0 or height <= 0:
            raise DecodeError(f"DICOM {where} declares an empty image {width}x{height}")
        if width * height > max_pixels:
            raise DecodeError(
                f"DICOM {where} declares {width}x{height} = {width * height:,} pixels, more than the "
                f"limit of {max_pixels:,} (decode.max_pixels); refusing to decode a possible "
                f"decompression bomb"
            )


def _voi(arr: npt.NDArray[Any], ds: Dataset, present: Mask) -> tuple[npt.NDArray[Any], float, float, str]:
    """Apply the VOI LUT or first window; return the values and the output range to map to 0..255."""
    voi_seq = ds.get("VOILUTSequence")
    if voi_seq and voi_seq[0].get("LUTDescriptor") is not None and voi_seq[0].get("LUTData") is not None:
        out = apply_voi(arr, ds, 0)
        lut = apply_voi(np.arange(*_lut_domain(voi_seq[0])), ds, 0)
        return out, float(lut.min()), float(lut.max()), f"VOI LUT 1 of {len(voi_seq)}"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        try:
            out = apply_windowing(arr, ds, 0)
        except (ValueError, IndexError, TypeError) as exc:
            return arr, *_min_max(arr, present), f"window ignored ({exc})"
        y_min, y_max = _window_output_range(ds)
        elem = ds["WindowCenter"]
        count = elem.VM if elem.VM > 1 else 1
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        return out, y_min, y_max, f"window 1 of {count} (C {center:g} W {width:g})"
    return arr, *_min_max(arr, present), "no VOI"


def _first(value: Any) -> float:
    return float(value[0] if isinstance(value, MultiValue | list | tuple) else value)


def _lut_domain(item: Dataset) -> tuple[int, int]:
    entries, first_map = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
    return first_map, first_map + entries


def _window_output_range(ds: Dataset) -> tuple[float, float]:
    """The y_min/y_max that pydicom's ``apply_windowing`` maps below/above the window to."""
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.PixelRepresentation) == 0:
        y_min, y_max = 0.0, float(2**bits - 1)
    else:
        y_min, y_max = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
    return y_min, y_max


def _min_max(arr: npt.NDArray[Any], present: Mask) -> tuple[float, float]:
    """Smallest and largest value (of the entries marked present, when ``arr`` is a table)."""
    if present is not None:
        arr = arr[present]
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise DecodeError("DICOM image holds non-finite pixel values")
    return lo, hi


def _modality_lut(stored: npt.NDArray[Any], ds: Dataset) -> npt.NDArray[Any]:
    """pydicom's ``apply_modality_lut``, also for LUT entries of 9 to 15 bits.

    pydicom 3.0.2 builds ``uint{bits}`` from the LUT Descriptor, which fails for e.g. 12;
    the entries are read as 16-bit instead and the descriptor is put back afterwards.
    """
    seq = ds.get("ModalityLUTSequence")
    descriptor = list(seq[0].LUTDescriptor) if seq and "LUTDescriptor" in seq[0] else None
    if descriptor is None or descriptor[2] in (8, 16):
        return np.asarray(apply_modality_lut(stored, ds))
    try:
        seq[0].LUTDescriptor = [descriptor[0], descriptor[1], 16 if descriptor[2] > 8 else 8]
        return np.asarray(apply_modality_lut(stored, ds))
    finally:
        seq[0].LUTDescriptor = descriptor


def _to_grey(stored: npt.NDArray[Any], ds: Dataset) -> tuple[GreyImage, str]:
    """Stored values -> modality LUT -> VOI -> 0..255 -> MONOCHROME1 inverted.

    The pipeline is pointwise, so integer images run it once per distinct stored value in
    their range (a table) and then look every pixel up: exact, and ~10x faster than per pixel.
    """
    if stored.dtype.kind in "iu":
        lo, hi = int(stored.min()), int(stored.max())
        if hi - lo < _TABLE_LIMIT:
            offsets = stored.astype(np.int32) - np.int32(lo)
            present = np.bincount(offsets.ravel(), minlength=hi - lo + 1) > 0
            domain = np.arange(lo, hi + 1).astype(stored.dtype)
            table, display = _grey_values(domain, ds, stored.dtype, present)
            return table[offsets], display
    return _grey_values(stored, ds, stored.dtype, None)


def _grey_values(
    stored: npt.NDArray[Any], ds: Dataset, stored_dtype: np.dtype[Any], present: Mask
) -> tuple[GreyImage, str]:
    """The grey pipeline on an array of stored values (the image, or a table of its value range)."""
    steps = []
    has_rescale = ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None
    identity = not ds.get("ModalityLUTSequence") and (
        not has_rescale or (float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0)
    )
    values = stored if identity else _modality_lut(stored, ds)
    if not identity:
        steps.append("modality LUT" if ds.get("ModalityLUTSequence") else "rescale")
    if values.dtype.kind == "f" and ds.get("VOILUTSequence"):
        values = np.round(values).astype(np.int64)  # LUT indices are integers
    values, lo, hi, voi = _voi(values, ds, present)
    if voi == "no VOI" and identity and stored_dtype.kind == "u" and int(ds.BitsStored) <= 8:
        lo, hi, voi = 0.0, 255.0, "8-bit as stored"
    steps.append(voi)
    if _text(ds, "PhotometricInterpretation").upper() == "MONOCHROME1":
        lo, hi = hi, lo  # map the range backwards: exactly the mirror image of MONOCHROME2
        steps.append("MONOCHROME1 inverted")
    if hi == lo:
        unit = np.zeros(values.shape, dtype=np.float64)
    else:
        unit = np.clip((values.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
    grey = np.floor(unit * 255.0 + 0.5).astype(np.uint8)
    return grey, ", ".join(steps)


def decoding_plugin(syntax: UID, bits_stored: int = 16) -> str:
    """The pydicom pixel plugin used for ``syntax`` ("" lets pydicom choose: native data)."""
    wanted = _PLUGINS.get(syntax, "")
    if syntax == pydicom.uid.JPEGExtended12Bit and 0 < bits_stored <= 8:
        wanted = "pillow"
    decoder = get_decoder(syntax) if syntax.is_encapsulated else None
    if decoder is None or wanted not in decoder.available_plugins:
        return ""
    return wanted


def _pixels(ds: Dataset) -> npt.NDArray[Any]:
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    plugin = decoding_plugin(syntax, int(ds.get("BitsStored") or 0))
    try:
        ds.pixel_array_options(decoding_plugin=plugin)
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:  # each decoder has its own exception types
        reason = " ".join(str(exc).replace(_ALL_PLUGINS_FAILED, "").split())
        raise DecodeError(f"DICOM pixel data ({syntax.name}) could not be decoded: {reason}") from exc
    except BaseException as exc:
        # Rust decoders (pylibjpeg-rle) raise pyo3's PanicException, a BaseException, on some
        # corrupt streams; that is a per-file failure, not a reason to stop the service.
        if type(exc).__name__ != "PanicException":
            raise
        reason = " ".join(str(exc).split())
        raise DecodeError(
            f"DICOM pixel data ({syntax.name}) could not be decoded: the decoder failed on corrupt "
            f"data ({reason})"
        ) from exc
    if arr.ndim != 2:
        raise DecodeError(f"DICOM pixel data decoded to shape {arr.shape}; expected one 2-D grey frame")
    return arr


def read_dicom(
    data: bytes, max_pixels: int, accept_any_body_part: bool = False
) -> tuple[GreyImage, DicomInfo]:
    """Decode one DICOM file to a 2-D uint8 grey image and its ``DicomInfo``, or raise ``DecodeError``."""
    ds = _read_dataset(data, max_pixels)
    reason = _refusal(ds, accept_any_body_part)
    if reason:
        raise DecodeError(reason)
    _check_size(ds, max_pixels)
    stored = _pixels(ds)
    try:
        grey, display = _to_grey(stored, ds)
    except (ValueError, TypeError, OverflowError, struct.error, NotImplementedError, AttributeError) as exc:
        # a Rescale Slope of "x.yz", a LUT shorter than its descriptor, a descriptor of one value
        raise DecodeError(
            f"DICOM grey-level transform (Rescale Slope/Intercept, Modality or VOI LUT, Window) is "
            f"malformed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        ) from exc
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    age_years, age_text = patient_age(ds)
    info = DicomInfo(
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        sop_class_uid=_uid(ds, "SOPClassUID"),
        modality=_text(ds, "Modality").upper(),
        body_part=_text(ds, "BodyPartExamined"),
        view_position=_text(ds, "ViewPosition").upper(),
        transfer_syntax=syntax.name,
        transfer_syntax_uid=str(syntax),
        photometric=_text(ds, "PhotometricInterpretation").upper(),
        bits_stored=int(ds.get("BitsStored") or 0),
        age_years=age_years,
        age_text=age_text,
        display=display,
    )
    return grey, info


# ---------------------------------------------------------------- age and population


def parse_age(text: str) -> tuple[float | None, str]:
    """Patient's Age (AS) such as ``"058Y"``, ``"018M"``, ``"003W"``, ``"010D"`` -> (years, ``"58Y"``).

    A bare number is read as years. Returns ``(None, "")`` for anything else.
    """
    match = _AGE_RE.match(text or "")
    if not match:
        return None, ""
    number, unit = int(match.group(1)), (match.group(2) or "Y").upper()
    return number * _DAYS_PER_UNIT[unit] / 365.25, f"{number}{unit}"


def _date(value: Any) -> dt.date | None:
    text = str(value or "").strip()
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None


def age_from_dates(birth: Any, study: Any) -> tuple[float | None, str]:
    """Age at the study from two DICOM DA values (``YYYYMMDD``), as (years, text like ``"3Y"``)."""
    born, seen = _date(birth), _date(study)
    if born is None or seen is None or seen < born:
        return None, ""
    days = (seen - born).days
    years = days / 365.25
    if years > 150:
        return None, ""
    whole_years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    if whole_years >= 1:
        return years, f"{whole_years}Y"
    months = (seen.year - born.year) * 12 + seen.month - born.month - (seen.day < born.day)
    return years, f"{months}M" if months >= 1 else f"{days}D"


def patient_age(ds: Dataset) -> tuple[float | None, str]:
    """Patient's Age if valid, else the study date minus the birth date; the dates are not kept."""
    years, text = parse_age(_text(ds, "PatientAge"))
    if years is not None:
        return years, text
    birth = ds.get("PatientBirthDate")
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        if ds.get(keyword):
            return age_from_dates(birth, ds.get(keyword))
    return None, ""


def population_of(metadata: dict[str, Any]) -> dict[str, Any]:
    """The intended population of a model version: its metadata's own, else ``DEFAULT_POPULATION``.

    Raises ``ValueError`` when ``intended_population`` is present but malformed.
    """
    own = metadata.get("intended_population")
    if own is None:
        return DEFAULT_POPULATION
    ages = own.get("age_years") if isinstance(own, dict) else None
    if (
        not isinstance(ages, list | tuple)
        or len(ages) != 2
        or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in ages)
        or ages[0] > ages[1]
    ):
        raise ValueError(
            f"intended_population {own!r} in model metadata must be a mapping with "
            f"'age_years': [youngest, oldest]"
        )
    return {"description": str(own.get("description", "")), "age_years": [ages[0], ages[1]]}


def population_warning(age_years: float | None, age_text: str, population: dict[str, Any]) -> str:
    """A plain-words warning when the patient's age is outside the population, else ``""``.

    Ages count in completed years, as people say them: with ``age_years [1, 5]`` a child of
    5 years 11 months is inside and one of 11 months is outside. Unknown age: no warning.
    """
    if age_years is None:
        return ""
    youngest, oldest = (float(a) for a in population["age_years"])
    if youngest <= age_years < oldest + 1:
        return ""
    shown = age_text or f"{age_years:.1f} years"
    return f"patient age {shown} is outside the model's intended population, {youngest:g}-{oldest:g} years"
