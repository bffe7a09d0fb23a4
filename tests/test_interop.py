"""What users of the LAION toolchain expect of extract (issue 30): unit vectors on request
(autofaiss and clip-retrieval rank by inner product), and folders of gzipped shards."""

from __future__ import annotations

import json

import numpy as np
from conftest import ROOT, run_cli
from conftest import noisy_photo as jpeg

from pipeline import api

HUB = str(ROOT / "pipeline" / "hub")
MODEL = ("--model-repo", HUB, "--model-name", "tiny_cnn", "--workers", "0", "--no-progress")


def photos(folder, count: int):
    """A folder of `count` small JPEGs."""
    folder.mkdir()
    for i in range(count):
        (folder / f"a{i}.jpg").write_bytes(jpeg(i))
    return folder


def test_extract_normalize_writes_unit_vectors_everywhere(tmp_path):
    """--normalize (for autofaiss and clip-retrieval, which rank by inner product): chunks,
    fts.pth and fts.npy hold unit vectors, the same directions as a plain run, and run.json says so;
    a plain run's settings do not name it (its outputs stay the original script's)."""
    import pyarrow.parquet as pq
    import torch

    src = photos(tmp_path / "src", 5)
    run_cli("extract", src, tmp_path / "plain", *MODEL)
    run_cli("extract", src, tmp_path / "unit", *MODEL, "--normalize")
    plain = torch.load(tmp_path / "plain" / "fts.pth", weights_only=True).double()
    unit = torch.load(tmp_path / "unit" / "fts.pth", weights_only=True).double()
    ones = torch.ones(5, dtype=torch.float64)
    assert torch.allclose(unit.norm(dim=1), ones, atol=1e-6) and not torch.allclose(plain.norm(dim=1), ones, atol=1e-2)
    assert torch.allclose(unit, plain / plain.norm(dim=1, keepdim=True), atol=1e-5)
    assert np.allclose(np.linalg.norm(np.load(tmp_path / "unit" / "fts.npy").astype(np.float64), axis=1), 1, atol=2e-3)
    chunk = pq.read_table(tmp_path / "unit" / "chunks").column("embedding").to_pylist()
    assert np.allclose(np.linalg.norm(np.asarray(chunk), axis=1), 1, atol=1e-6)
    settings = [json.loads((tmp_path / d / "run.json").read_text())["settings"] for d in ("plain", "unit")]
    assert "normalize" not in settings[0] and settings[1]["normalize"] is True


def test_a_folder_of_gzipped_shards_is_found_and_extracts_like_the_tars(tmp_path):
    """A folder of .tar.gz / .tgz shards (no manifest) was "no shards": it is found like *.tar and
    gives the features the plain tars give."""
    import gzip
    import shutil

    src = photos(tmp_path / "src", 6)
    api.pack(src, tmp_path / "shards", shard_size=2, progress=False)
    tars, gz = tmp_path / "tars", tmp_path / "gz"
    tars.mkdir()
    gz.mkdir()
    for i, tar in enumerate(sorted((tmp_path / "shards").glob("*.tar"))):
        shutil.copy(tar, tars / tar.name)
        (gz / (tar.stem + (".tar.gz" if i % 2 else ".tgz"))).write_bytes(gzip.compress(tar.read_bytes(), mtime=0))
    run_cli("extract", tars, tmp_path / "from-tars", *MODEL)
    run_cli("extract", gz, tmp_path / "from-gz", *MODEL)
    assert (tmp_path / "from-gz" / "fts.npy").read_bytes() == (tmp_path / "from-tars" / "fts.npy").read_bytes()
    names = json.loads((tmp_path / "from-gz" / "img_list.json").read_text())
    assert len(names) == 6 and names == json.loads((tmp_path / "from-tars" / "img_list.json").read_text())


def test_dotted_base_names_are_recorded_with_what_to_do(tmp_path):
    """`images/cat.v2.jpg` and `cat.v3.jpg` make one webdataset key `images/cat` with fields
    `v2.jpg` and `v3.jpg`: no image field. The record says so and how to repack; others embed."""
    import io
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "s-000000.tar", "w") as tar:
        for name, data in (("images/cat.v2.jpg", jpeg(1)), ("images/cat.v3.jpg", jpeg(2)), ("images/dog.jpg", jpeg(3))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    proc = run_cli("extract", shards, tmp_path / "out", *MODEL, check=False)
    assert proc.returncode == 3  # completed, a sample recorded as failed
    assert len(json.loads((tmp_path / "out" / "img_list.json").read_text())) == 1
    (error,) = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert error["key"] == "images/cat" and "images/cat.v2.jpg, images/cat.v3.jpg hold dots" in error["reason"]
    assert "repack" in error["reason"]


def test_duckdb_ranks_the_chunks_by_cosine(tmp_path):
    """duckdb on OUT/chunks as they are. From Parquet, duckdb 2.0 types `embedding` FLOAT[] even
    though the chunk's Arrow schema says fixed_size_list<float>[D] (Parquet has no fixed-size
    list; duckdb ignores the Arrow schema): the command that works casts it, `embedding::FLOAT[D]`;
    through pyarrow it is FLOAT[D] as it is. Both give the cosines of the stored vectors."""
    import duckdb
    import pyarrow.parquet as pq

    run_cli("extract", photos(tmp_path / "src", 4), tmp_path / "out", *MODEL)
    table = pq.read_table(tmp_path / "out" / "chunks").sort_by("key")
    vectors = np.asarray(table.column("embedding").to_pylist(), np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    dim = vectors.shape[1]
    con = duckdb.connect()
    chunks = f"read_parquet('{tmp_path / 'out' / 'chunks' / '*.parquet'}')"
    assert con.execute(f"SELECT DISTINCT typeof(embedding) FROM {chunks}").fetchall() == [("FLOAT[]",)]
    first = f"(SELECT embedding::FLOAT[{dim}] FROM {chunks} ORDER BY key LIMIT 1)"
    sql = f"SELECT array_cosine_similarity(embedding::FLOAT[{dim}], {first}) FROM {chunks} ORDER BY key"
    got = [s for (s,) in con.execute(sql).fetchall()]
    assert np.allclose(got, unit @ unit[0], atol=1e-5) and abs(got[0] - 1) < 1e-5
    con.register("arrow_chunks", table)
    assert con.execute("SELECT DISTINCT typeof(embedding) FROM arrow_chunks").fetchall() == [(f"FLOAT[{dim}]",)]


def test_pipe_urls_run_a_command_and_read_its_output(tmp_path):
    """`pipe:COMMAND` shards (webdataset's convention; a list file may hold them): the features
    equal those of the tars read directly; a command that fails is a failed shard with its
    stderr's first line, and the other shards are embedded."""
    api.pack(photos(tmp_path / "src", 6), tmp_path / "shards", shard_size=2, progress=False)
    tars = sorted((tmp_path / "shards").glob("*.tar"))
    listing = tmp_path / "shards.txt"
    listing.write_text("".join(f"pipe:cat '{t}'\n" for t in tars))
    run_cli("extract", tmp_path / "shards", tmp_path / "direct", *MODEL)
    run_cli("extract", listing, tmp_path / "piped", *MODEL)
    assert (tmp_path / "piped" / "fts.npy").read_bytes() == (tmp_path / "direct" / "fts.npy").read_bytes()
    broken = tmp_path / "broken.txt"
    broken.write_text(f"pipe:cat '{tars[0]}'\npipe:echo gone >&2; exit 3\n")
    proc = run_cli("extract", broken, tmp_path / "partial", *MODEL, "--retries", "0", check=False)
    assert proc.returncode == 3 and len(json.loads((tmp_path / "partial" / "img_list.json").read_text())) == 2
    errors = (tmp_path / "partial" / "errors.jsonl").read_text()
    assert "pipe command exited 3: gone" in errors


HOSTILE_CAPTION = '<b onmouseover="x()">bold</b> & "quoted"'


def img2dataset_folder(folder, shards: int = 2, per_shard: int = 3):
    """img2dataset 1.47's output layout: NNNNN.tar with KEY.jpg, KEY.txt (the caption) and KEY.json
    (url, caption, key, status, error_message, width, height, original_width, original_height, exif,
    sha256 and --save_additional_columns), and NNNNN.parquet and NNNNN_stats.json beside each tar.
    Sample 0's caption is markup; the last sample repeats sample 0's image (a duplicate for show);
    sample 4 holds a .png beside its .jpg; `aesthetic` is whole numbers in shard 0, fractions in 1."""
    import hashlib
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    for s in range(shards):
        rows = []
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                i, key = s * per_shard + j, f"{s:05d}{j:04d}"
                image = jpeg(0 if i == shards * per_shard - 1 else i)
                caption = HOSTILE_CAPTION if i == 0 else f"a photo number {i}"
                meta = {
                    "url": f"http://127.0.0.1:9/img/{i}.jpg",
                    "caption": caption,
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": 96,
                    "height": 72,
                    "original_width": 960,
                    "original_height": 720,
                    "exif": "{}",
                    "sha256": hashlib.sha256(image).hexdigest(),
                    "aesthetic": 5 + i if s == 0 else 5.5 + i,
                }
                members = [("jpg", image), ("txt", caption.encode()), ("json", json.dumps(meta).encode())]
                if i == 4:
                    members.insert(1, ("png", jpeg(40)))  # bytes are never read: the jpg is the image
                for ext, data in members:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                rows.append(meta)
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{s:05d}.parquet")
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return folder


def test_img2dataset_captions_and_metadata_reach_every_output(tmp_path, monkeypatch):
    """img2dataset's shards → extract --normalize: the chunks and OUT/metadata/metadata.parquet
    hold each sample's caption and .json fields under their own names, the file row-aligned with
    fts.npy (embedding-reader reads both together); query and show answer with the caption."""
    import duckdb
    import pandas as pd
    import pyarrow.parquet as pq
    from embedding_reader import EmbeddingReader

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read when datasets is imported: never the network
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from datasets import Dataset, concatenate_datasets

    out = tmp_path / "out"
    run_cli("extract", img2dataset_folder(tmp_path / "i2d"), out, *MODEL, "--normalize")
    paths = json.loads((out / "img_list.json").read_text())
    assert paths == [f"http://127.0.0.1:9/img/{i}.jpg" for i in range(6)]
    meta = pq.read_table(out / "metadata" / "metadata.parquet")
    assert meta.column_names[:4] == ["key", "path", "caption", "url"] and meta.column("path").to_pylist() == paths
    captions = meta.column("caption").to_pylist()
    assert captions == [HOSTILE_CAPTION] + [f"a photo number {i}" for i in range(1, 6)]
    assert meta.column("original_width").to_pylist() == [960] * 6 and meta.schema.field("aesthetic").type == "double"
    assert meta.column("aesthetic").to_pylist() == [
        5,
        6,
        7,
        8.5,
        9.5,
        10.5,
    ]  # whole in one shard, fractions in the other
    assert meta.column("other_images").to_pylist() == [None] * 4 + ["png", None]  # skipped, but named
    assert meta.column("error_message").to_pylist() == [None] * 6
    chunk = pq.read_table(out / "chunks" / "00001.parquet")
    assert chunk.column("status").to_pylist() == ["success"] * 3 and chunk.column("width").to_pylist() == [96] * 3
    fts = np.load(out / "fts.npy").astype(np.float32)
    reader = EmbeddingReader(str(out), metadata_folder=str(out / "metadata"), file_format="parquet_npy",
                             meta_columns=["caption", "url"])  # fmt: skip
    (emb, rows), *_ = list(reader(batch_size=6, start=0, end=6, show_progress=False))
    assert np.allclose(emb, fts) and rows["caption"].tolist() == captions and rows["url"].tolist() == paths
    frame = pd.read_parquet(out / "metadata" / "metadata.parquet")  # the README's pandas and HF lines
    assert frame["caption"].tolist() == captions and len(frame) == len(fts)
    ds = Dataset.from_parquet(str(out / "metadata" / "metadata.parquet"), cache_dir=str(tmp_path / "hf"))
    ds = concatenate_datasets([ds, Dataset.from_dict({"embedding": np.load(out / "fts.npy")})], axis=1)
    assert ds["path"] == paths and ds["caption"] == captions
    assert np.allclose(np.asarray(ds["embedding"]), fts, atol=1e-3)
    chunks = f"read_parquet('{out / 'chunks' / '*.parquet'}', union_by_name = true)"  # shards' columns differ
    got = duckdb.connect().execute(f"SELECT caption, aesthetic, other_images FROM {chunks} ORDER BY key").fetchall()
    assert got == list(zip(captions, [5, 6, 7, 8.5, 9.5, 10.5], [None] * 4 + ["png", None], strict=True))

    hits = [json.loads(x) for x in run_cli("query", out, "000010001", "-k", "2", "--json").stdout.splitlines()]
    assert hits[0]["row"] == 4 and hits[0]["caption"] == "a photo number 4"
    run_cli("index", out, tmp_path / "index", "--no-progress")
    hits = [
        json.loads(x) for x in run_cli("query", tmp_path / "index", paths[0], "-k", "2", "--json").stdout.splitlines()
    ]
    assert {h["row"]: h["caption"] for h in hits} == {0: HOSTILE_CAPTION, 5: "a photo number 5"}  # 5 is 0's copy
    run_cli("dedup", out, tmp_path / "dedup", "--threshold", "0.99", "--no-progress")
    run_cli("show", tmp_path / "dedup", tmp_path / "page.html")
    page = (tmp_path / "page.html").read_text()
    assert "&lt;b onmouseover=&quot;x()&quot;&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot;" in page
    assert "<b onmouseover" not in page and "a photo number 5" in page


def test_meta_and_image_field_choose_what_is_kept(tmp_path):
    """--meta keeps the fields named, --no-meta none (other images are still named); --image-field
    png takes the png where a sample has one and records every other sample as lacking it; the
    choices are in run.json's settings (a default run's settings do not name them)."""
    import pyarrow.parquet as pq

    src = img2dataset_folder(tmp_path / "i2d")
    run_cli("extract", src, tmp_path / "some", *MODEL, "--meta", "status,caption")
    assert pq.read_table(tmp_path / "some" / "metadata").column_names == [
        "key",
        "path",
        "status",
        "caption",
        "other_images",
    ]
    run_cli("extract", src, tmp_path / "none", *MODEL, "--no-meta")
    assert pq.read_table(tmp_path / "none" / "metadata").column_names == ["key", "path", "other_images"]
    proc = run_cli("extract", src, tmp_path / "png", *MODEL, "--image-field", "png;webp", check=False)
    assert proc.returncode == 3 and json.loads((tmp_path / "png" / "img_list.json").read_text()) == [
        "http://127.0.0.1:9/img/4.jpg"
    ]
    errors = [json.loads(line) for line in (tmp_path / "png" / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 5 and all("has no png;webp field (it has jpg)" in e["reason"] for e in errors)
    assert pq.read_table(tmp_path / "png" / "metadata").column("other_images").to_pylist() == ["jpg"]
    settings = {d: json.loads((tmp_path / d / "run.json").read_text())["settings"] for d in ("some", "none", "png")}
    assert settings["some"]["meta"] == ["status", "caption"] and settings["none"]["meta"] == []
    assert settings["png"]["image_field"] == "png;webp" and "meta" not in settings["png"]
    bad = run_cli("extract", src, tmp_path / "bad", *MODEL, "--meta", "width", check=False)
    assert bad.returncode == 1 and "featpipe's own column" in bad.stderr and not (tmp_path / "bad").exists()
