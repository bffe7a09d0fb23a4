"""The decode paths against Pillow + torchvision, pixel by pixel, on the sample set's awkward files."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import VALID
from PIL import Image

from pipeline.image.decode import ORIENTATION_TRANSPOSE
from pipeline.image.device import DeviceJpeg, _orient, decode_on_device, device_decodable
from pipeline.image.header import orientation
from pipeline.image.jpeghead import read_header
from pipeline.image.transform import TransformConfig, crop_uint8

EXACT, FAST, DEVICE = (TransformConfig(mode=m) for m in ("exact", "fast", "device"))


def test_jpeg_header_reader_agrees_with_pillow():
    """Size, layers and EXIF orientation from the segment headers, against Pillow's parser, on
    every sample (rotated, progressive, CMYK, gray, truncated, not a JPEG at all…)."""
    from conftest import BROKEN

    read = 0
    for rel, data in {**VALID, **BROKEN}.items():
        head = read_header(data)
        if head is None:
            continue
        read += 1
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG", rel
            assert (head.width, head.height) == im.size, rel
            assert {1: "L", 3: "RGB", 4: "CMYK"}[head.layers] == im.mode, rel
            assert head.orientation == orientation(im), rel
    assert read >= 8  # the fast path is taken, not skipped


@pytest.mark.parametrize("rotation", sorted(ORIENTATION_TRANSPOSE))
def test_device_orientation_matches_pillow(rotation):
    a = np.random.RandomState(rotation).randint(0, 255, (5, 7, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(a).transpose(ORIENTATION_TRANSPOSE[rotation]))
    got = _orient(torch.from_numpy(a).permute(2, 0, 1), rotation).permute(1, 2, 0).numpy()
    assert got.shape == want.shape and np.array_equal(got, want)


@pytest.mark.parametrize("rel", sorted(VALID))
def test_fast_crop_matches_exact_where_no_reduced_decode(rel):
    data = VALID[rel]
    exact, fast = crop_uint8(data, EXACT).numpy().astype(int), crop_uint8(data, FAST).numpy().astype(int)
    assert exact.shape == fast.shape == (3, 224, 224)
    short = min(Image.open(io.BytesIO(data)).size)
    if rel.endswith("sixteen_bit.png"):
        # the original clips 16-bit samples to white; fast mode scales them to 8 bits
        assert exact.min() == 255 and fast.std() > 20
    elif short < 512:
        # the same geometry and filter (Pillow's, in torch's uint8 kernel): at most rounding apart
        assert np.abs(exact - fast).max() <= 2 and np.abs(exact - fast).mean() < 0.1, rel
    else:
        assert np.abs(exact - fast).mean() < 1.5, rel  # reduced-size decode: close, not identical


@pytest.mark.parametrize("backend", ["torchcodec", "torchvision"])
def test_device_decode_on_cpu_matches_exact_closely(backend):
    """Both decoders (torchcodec, installed by the test extra, and the torchvision fallback), with
    no DeprecationWarning from featpipe's call."""
    import warnings

    jpegs = {rel: d for rel, d in VALID.items() if device_decodable(d)[0]}
    assert "formats/cmyk.jpg" not in jpegs and "formats/exif_rotated.jpg" in jpegs and len(jpegs) > 15
    items = [
        DeviceJpeg(i, torch.frombuffer(bytearray(d), dtype=torch.uint8), device_decodable(d)[1])
        for i, d in enumerate(jpegs.values())
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        crops, failed = decode_on_device(items, torch.device("cpu"), DEVICE, backend)
    assert not failed and sorted(crops) == list(range(len(items)))
    for i, (rel, data) in enumerate(jpegs.items()):
        diff = np.abs(crops[i].numpy().astype(int) - crop_uint8(data, EXACT).numpy().astype(int))
        assert diff.mean() < 1.5, rel


def test_device_decode_records_a_bad_jpeg_and_keeps_the_rest():
    good = VALID["photos/IMG_0001.jpg"]
    items = [
        DeviceJpeg(0, torch.frombuffer(bytearray(good), dtype=torch.uint8), 1),
        DeviceJpeg(1, torch.frombuffer(bytearray(good[: len(good) // 3]), dtype=torch.uint8), 1),
    ]
    crops, failed = decode_on_device(items, torch.device("cpu"), DEVICE)
    assert list(crops) == [0] and list(failed) == [1] and "decode failed" in failed[1]


def test_device_decode_records_an_exception_with_an_empty_message(monkeypatch):
    """A decoder that raises with no message (RuntimeError()) is one recorded image, not an aborted run."""
    import pipeline.image.device as device

    real = device.decode_jpeg

    def flaky(data, **kwargs):  # the backend decoder, failing with an empty message on a short file
        if isinstance(data, list) or len(data) < 20000:
            raise RuntimeError()
        return real(data, **kwargs)

    monkeypatch.setattr(device, "decode_jpeg", flaky)
    good = VALID["photos/IMG_0001.jpg"]
    items = [
        DeviceJpeg(0, torch.frombuffer(bytearray(good), dtype=torch.uint8), 1),
        DeviceJpeg(1, torch.frombuffer(bytearray(good[:10000]), dtype=torch.uint8), 1),
    ]
    crops, failed = decode_on_device(items, torch.device("cpu"), DEVICE)
    assert list(crops) == [0] and failed == {1: "decode failed on cpu: RuntimeError"}
