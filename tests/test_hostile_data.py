"""Hostile data on the way in: item ids, embedding values, ids already stored that break the
rules, odd images, and item sources pointing anywhere on the host. The service runs over a
real index and a stand-in model (the JSON endpoints and thumbnails never embed an image), so
these tests need no training."""

import io
import json
import types
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import tiny_config
import jaxretrieval.index
from jaxretrieval.errors import JaxRetrievalError
from jaxretrieval.index import Index, ShardedIndex, snapshot_directory, wal
from jaxretrieval.retriever import Retriever
from jaxretrieval.service.app import ServiceSettings, create_app

DIM = 8
BAD_IDS = ["\ud800", "", "a\x00b", "line\nbreak", "\x7f", "next\x85line", "x" * 1025,
           "\u00e9" * 513]
# Valid, and awkward in a URL path or in JSON.
AWKWARD_IDS = ["a/b", "a%2Fb", "x?y#z", "100%", "%", "..", ".", "a/../b", "/lead", "trail/",
               "a//b", " spaced ", "\u00e9t\u00e9", "\U0001f600", "zero\u200dwidth",
               "\\ud800", "k" * 1024, "a/thumbnail"]


def shown_key(key):
    # Looked up when called, so that this file also runs against code without it.
    return jaxretrieval.index.shown_key(key)


def axis(number, dim=DIM):
    vector = np.zeros(dim, np.float32)
    vector[number % dim] = 1.0
    return vector


def build_index(count=20):
    rows = np.random.default_rng(0).normal(size=(count, DIM))
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return Index.build(rows, [f"item-{row}" for row in range(count)], checkpoint_step=1,
                       model_config_hash="abc")


def stand_in_retriever(index):
    embedder = types.SimpleNamespace(embedding_dim=DIM, config=tiny_config(""),
                                     embed_uint8=lambda images: None)
    return Retriever(embedder, index)


def client_over(retriever):
    return TestClient(create_app(retriever, ServiceSettings(max_k=50, allowed_hosts=("testserver",))))


def url_id(item_id):
    """An id in a URL path: every reserved character percent-encoded, and dots too, since
    clients resolve the path segments `.` and `..` before sending."""
    return quote(item_id, safe="").replace(".", "%2E")


def raw_json(body):
    """JSON text as a client may send it: lone surrogates as \\u escapes."""
    return {"content": json.dumps(body).encode("ascii"),
            "headers": {"content-type": "application/json"}}


# ---------------------------------------------------------------------- ids

@pytest.mark.parametrize("bad", BAD_IDS)
def test_ids_breaking_the_rules_are_refused_by_python_and_http(bad):
    index = build_index()
    for call in (lambda: index.upsert([bad], axis(0)[None]),
                 lambda: ShardedIndex.build(np.stack([axis(0), axis(1)]), ["fine", bad],
                                            checkpoint_step=1, model_config_hash="abc",
                                            num_shards=2),
                 lambda: stand_in_retriever(index).upsert_embeddings([bad], axis(0)[None])):
        with pytest.raises(JaxRetrievalError, match="a key \\(item id\\) must be non-empty"):
            call()
    assert index.count == 20
    with client_over(stand_in_retriever(index)) as client:
        response = client.post("/items", **raw_json(
            {"items": [{"id": "fine", "embedding": axis(0).tolist()},
                       {"id": bad, "embedding": axis(1).tolist()}]}))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "bad_id" and "at row 1" in error["message"]
        assert "at most 1024 bytes in UTF-8" in error["message"]
    assert index.count == 20 and "fine" not in index


def test_multipart_ids_are_checked_before_any_image_is_embedded():
    index = build_index()
    with client_over(stand_in_retriever(index)) as client:  # its model embeds nothing
        for bad in ("a\x00b", "x" * 1025):
            response = client.post("/items", data={"id": bad},
                                   files={"image": ("a.png", b"not read", "image/png")})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "bad_id"
    assert index.count == 20


def test_awkward_valid_ids_are_searchable_and_deletable_over_http():
    index = build_index()
    retriever = stand_in_retriever(index)
    items = [{"id": item_id, "embedding": (axis(row) * 3).tolist()}
             for row, item_id in enumerate(AWKWARD_IDS)]
    with client_over(retriever) as client:
        added = client.post("/items", **raw_json({"items": items}))
        assert added.status_code == 200, added.text
        found = client.post("/search?k=50", json={"embedding": axis(0).tolist()})
        assert found.status_code == 200
        assert set(AWKWARD_IDS) <= {hit["id"] for hit in found.json()["results"]}
        for item_id in AWKWARD_IDS:
            response = client.delete(f"/items/{url_id(item_id)}")
            assert response.status_code == 200, (item_id, response.text)
            assert response.json()["deleted"] == item_id and item_id not in index
    assert index.count == 20


def write_ids_past_the_rules(directory, ids):
    """Logs an upsert of `ids` straight into the index's write-ahead log, as a version
    without the id rules did."""
    record = {"op": "upsert", "keys": ids, "sources": None,
              "embeddings": wal.encode_vectors(np.stack([axis(row) for row in range(len(ids))]))}
    with open(f"{snapshot_directory(directory)}/{wal.LOG_FILE}", "ab") as log:
        log.write(wal.encode_record(record))


def test_an_index_already_holding_bad_ids_loads_searches_and_deletes_them(tmp_path):
    directory = tmp_path / "index"
    build_index().save(directory)
    write_ids_past_the_rules(directory, ["\ud800", "line\nbreak", "low\udc00high\ud800"])
    index = Index.load(directory, writable=True)
    assert "\ud800" in index and index.count == 23
    retriever = stand_in_retriever(index)
    with client_over(retriever) as client:
        found = client.post("/search?k=1", json={"embedding": axis(0).tolist()})
        assert found.status_code == 200, found.text
        assert found.json()["results"][0]["id"] == "\\ud800" == shown_key("\ud800")
        index.snapshot()  # the stored keys survive a snapshot
        for stored in ("low\udc00high\ud800", "line\nbreak"):
            deleted = client.delete("/items/" + url_id(shown_key(stored)))
            assert deleted.status_code == 200, deleted.text
    retriever.delete(["\\ud800"])  # Python takes the shown form too, or the key itself
    assert index.count == 20
    index.close()
    assert Index.load(directory).count == 20


def test_a_valid_id_that_looks_like_a_shown_one_is_matched_first():
    index = build_index()
    index.upsert(["\\udc00"], axis(0)[None])
    with pytest.raises(JaxRetrievalError):
        index.upsert(["\udc00"], axis(1)[None])
    retriever = stand_in_retriever(index)
    retriever.delete(["\\udc00"])
    assert "\\udc00" not in index and index.count == 20


# ---------------------------------------------------------------------- embedding values

def test_embeddings_near_float32s_limit_are_normalised_without_overflow():
    index = build_index()
    index.upsert(["x-axis"], axis(0)[None])
    with client_over(stand_in_retriever(index)) as client:
        for scale in (1e38, 3e38, 1e-38, 1e-44):
            response = client.post("/search?k=1", json={"embedding": (axis(0) * scale).tolist()})
            assert response.status_code == 200, response.text
            top = response.json()["results"][0]
            assert top["id"] == "x-axis" and top["score"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("value, message", [
    (True, "bool"), ("1.5", "str"), (None, "NoneType"), ([1.0], "list"),
    pytest.param(10 ** 400, "too large", id="400-digit-int"), (1e39, "float32's range")])
def test_embedding_values_must_be_json_numbers_in_range(value, message):
    index = build_index()
    values = [value] + [0.5] * (DIM - 1)
    with client_over(stand_in_retriever(index)) as client:
        for response in (client.post("/search", **raw_json({"embedding": values})),
                         client.post("/items", **raw_json(
                             {"items": [{"id": "new", "embedding": values}]}))):
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "bad_embedding" and message in error["message"]
    assert "new" not in index


def test_the_python_api_refuses_booleans_and_strings_as_embeddings():
    index = build_index()
    one_hot = np.zeros((1, DIM), bool)
    one_hot[0, 0] = True
    with pytest.raises(JaxRetrievalError, match="dtype bool"):
        index.upsert(["new"], one_hot)
    with pytest.raises(JaxRetrievalError, match="hold str"):
        index.upsert(["new"], [["1"] + ["0"] * (DIM - 1)])
    with pytest.raises(JaxRetrievalError, match="hold bool"):
        index.search([[True] + [0.0] * (DIM - 1)], 1)
    assert "new" not in index


# ---------------------------------------------------------------------- images

def png_or_tiff(image, fmt, **options):
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_greyscale_is_scaled_to_eight_bits(fmt):
    from jaxretrieval.data.images import InputSpec, decode_image_bytes, to_model_input

    gradient = np.tile(np.arange(256, dtype=np.uint16) * 257, (256, 1))  # 0 .. 65535
    data = png_or_tiff(Image.fromarray(gradient), fmt)
    decoded = decode_image_bytes(data, max_pixels=10**6)
    assert decoded.mode.startswith("I;16")
    pixels = to_model_input(decoded, InputSpec(256, 1))[..., 0]
    np.testing.assert_array_equal(pixels[0], np.arange(256))  # proportional, not black/white
    np.testing.assert_array_equal(pixels, np.tile(pixels[0], (256, 1)))
    grey_image = Image.fromarray((gradient // 2).astype(np.int32))  # mode I, within 16 bits
    np.testing.assert_array_equal(to_model_input(grey_image, InputSpec(256, 1))[0, :, 0],
                                  np.round(gradient[0] // 2 / 257).astype(np.uint8))


def test_colour_modes_convert_or_give_one_clear_error():
    from jaxretrieval.data.images import InputSpec, decode_image_bytes, to_model_input

    lab = png_or_tiff(Image.new("LAB", (16, 16), (50, 10, 10)), "TIFF")
    cmyk = png_or_tiff(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "TIFF")
    for channels in (1, 3):
        spec = InputSpec(16, channels)
        for data in (lab, cmyk):
            pixels = to_model_input(decode_image_bytes(data, max_pixels=10**6), spec)
            assert pixels.shape == (16, 16, channels) and pixels.max() > 0
        with pytest.raises(JaxRetrievalError, match="colour mode La cannot be converted"):
            to_model_input(Image.new("La", (16, 16)), spec)
    assert to_model_input(decode_image_bytes(cmyk, max_pixels=10**6),
                          InputSpec(16, 3))[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied_to_files_uploads_and_thumbnails(tmp_path):
    from jaxretrieval.data.images import (InputSpec, decode_image_bytes, load_images,
                                          read_image_file)

    upright = np.random.default_rng(0).integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 10 x 6
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = png_or_tiff(stored, "PNG", exif=exif)
    (tmp_path / "rotated.png").write_bytes(data)
    np.testing.assert_array_equal(np.asarray(decode_image_bytes(data, max_pixels=10**6)),
                                  upright)
    np.testing.assert_array_equal(np.asarray(read_image_file(str(tmp_path / "rotated.png"))),
                                  upright)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    spec = InputSpec(12, 3)
    np.testing.assert_array_equal(load_images([str(tmp_path / "rotated.png")], spec),
                                  load_images([str(tmp_path / "upright.png")], spec))


# ---------------------------------------------------------------------- thumbnails

def test_thumbnails_come_only_from_the_dataset_roots_with_one_answer(tmp_path):
    root, outside = tmp_path / "dataset", tmp_path / "elsewhere"
    (root / "cats").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (40, 20), "red").save(root / "cats" / "tom.png")
    Image.new("RGB", (40, 20), "blue").save(outside / "secret.png")
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "cats" / "link.png").symlink_to(outside / "secret.png")
    sources = {"inside": root / "cats" / "tom.png",
               "passwd-like": outside / "passwd",
               "outside-image": outside / "secret.png",
               "missing-outside": outside / "nothing.png",
               "missing-inside": root / "cats" / "nothing.png",
               "dot-dot": f"{root}/cats/../../elsewhere/secret.png",
               "symlink-out": root / "cats" / "link.png",
               "relative": "elsewhere/secret.png",
               "other-tfds": "tfds:mnist/train/0"}
    keys = list(sources)
    rows = np.stack([axis(row) for row in range(len(keys))])
    for manifest in ({"source_roots": [str(root)]},  # as recorded now
                     {"dataset": f"folder:{root}"}):  # as older indexes recorded it
        index = Index.build(rows, keys, sources=[str(sources[key]) for key in keys],
                            checkpoint_step=1, model_config_hash="abc",
                            extra_manifest=manifest)
        with client_over(stand_in_retriever(index)) as client:
            good = client.get("/items/inside/thumbnail")
            assert good.status_code == 200 and good.content[:4] == b"\x89PNG"
            bodies = set()
            for key in keys[1:]:
                response = client.get(f"/items/{url_id(key)}/thumbnail")
                assert response.status_code == 404, (key, response.text)
                bodies.add(response.text)
            assert len(bodies) == 1 and "no thumbnail for this item" in bodies.pop()
    trusting = Retriever(stand_in_retriever(index).embedder, index, thumbnail_roots=[outside])
    assert trusting.thumbnail("outside-image").size == (40, 20)


def test_a_link_changed_after_the_roots_check_is_not_followed_outside(tmp_path, monkeypatch):
    import jaxretrieval.retriever as retriever_module
    from jaxretrieval.data.sources import resolve_within_roots

    root, outside = tmp_path / "dataset", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (40, 20), "red").save(root / "tom.png")
    Image.new("RGB", (40, 20), "blue").save(outside / "secret.png")
    (root / "link.png").symlink_to(root / "tom.png")
    index = Index.build(axis(0)[None], ["cat"], sources=[str(root / "link.png")],
                        checkpoint_step=1, model_config_hash="abc",
                        extra_manifest={"source_roots": [str(root)]})
    retriever = Retriever(stand_in_retriever(index).embedder, index)

    def check_then_swap(reference, roots):
        # The link moves outside the roots between the check and the read.
        readable = resolve_within_roots(reference, roots)
        (root / "link.png").unlink()
        (root / "link.png").symlink_to(outside / "secret.png")
        return readable

    monkeypatch.setattr(retriever_module, "resolve_within_roots", check_then_swap)
    pixel = retriever.source_image("cat").convert("RGB").getpixel((0, 0))
    assert pixel == (255, 0, 0)  # the image the check saw, not the secret one
    assert resolve_within_roots(str(root / "link.png"), [str(root)]) is None


def test_a_video_frame_checked_as_such_is_read_from_its_video_whatever_appears_later(
        tmp_path, monkeypatch):
    import jaxretrieval.video.decode as decode_module
    from jaxretrieval.data.sources import read_resolved, resolve_within_roots

    root, outside = tmp_path / "videos", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "a.mp4").write_bytes(b"a video")  # only its path matters here
    Image.new("RGB", (40, 20), "blue").save(outside / "secret.png")
    readable = resolve_within_roots(str(root / "a.mp4@1.0"), [str(root)])
    assert readable.frame == (str((root / "a.mp4").resolve()), 1.0)
    # A file named like the frame appears after the check, linking outside the roots.
    (root / "a.mp4@1.0").symlink_to(outside / "secret.png")
    read = []
    monkeypatch.setattr(decode_module, "read_frame_at", lambda path, seconds: (
        read.append((path, seconds)) or Image.new("RGB", (8, 8), "red")))
    assert read_resolved(readable).getpixel((0, 0)) == (255, 0, 0)
    assert read == [readable.frame]


def test_folder_datasets_record_their_root_turn_images_upright_and_check_keys(tmp_path):
    from jaxretrieval.data.sources import load_dataset

    upright = np.random.default_rng(1).integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "photos" / "rotated").mkdir(parents=True)
    (tmp_path / "photos" / "upright").mkdir()
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(
        tmp_path / "photos" / "rotated" / "a.png", exif=exif)
    Image.fromarray(upright).save(tmp_path / "photos" / "upright" / "a.png")
    config = tiny_config(str(tmp_path), dataset=f"folder:{tmp_path / 'photos'}", channels=3,
                         cache_max_bytes=0)
    dataset = load_dataset(config)
    assert dataset.source_roots == (str(tmp_path / "photos"),)
    assert dataset.keys == ["rotated/a.png", "upright/a.png"]
    images = dataset.images([0, 1])
    np.testing.assert_array_equal(images[0], images[1])
    (tmp_path / "photos" / "upright" / "bad\nname.png").write_bytes(
        (tmp_path / "photos" / "upright" / "a.png").read_bytes())
    with pytest.raises(JaxRetrievalError, match="control character.*rename that file"):
        load_dataset(config)
