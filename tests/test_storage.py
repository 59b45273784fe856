"""notelake.jobs.storage against real stores: a local tmp folder, fsspec's memory://, and S3 (moto_server on
127.0.0.1, tests/s3server.py). Delta tables are written by delta-rs and read back through Spark's Python data source,
so every client (delta-rs, pyarrow, Spark tasks) goes through the same storage options."""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import date

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from deltalake import DeltaTable, write_deltalake

from notelake.jobs import storage
from s3server import BUCKET, s3_server


@pytest.fixture(scope="module")
def s3_opts():
    with s3_server() as opts:
        yield opts


def _s3_root() -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex}"


@pytest.fixture(params=["local", "file-uri", "memory", "s3"])
def store(request, tmp_path):
    """(root location, storage options) of an empty folder on each kind of store."""
    if request.param == "local":
        return str(tmp_path / "root"), None
    if request.param == "file-uri":
        return (tmp_path / "root").as_uri(), None
    if request.param == "memory":
        return f"memory://notelake/{uuid.uuid4().hex}", None
    return _s3_root(), request.getfixturevalue("s3_opts")


# -- locations and options -----------------------------------------------------------------------------------------

def test_is_uri_and_join_on_uris_and_paths(tmp_path):
    assert storage.is_uri("s3://b/x") and storage.is_uri("gs://b") and storage.is_uri(
        "abfss://c@a.dfs.core.windows.net/x")
    assert not storage.is_uri("file:///tmp/x") and not storage.is_uri("/tmp/x") and not storage.is_uri("rel/x")
    assert storage.is_local("file:///tmp/x") and storage.is_local("rel/x") and not storage.is_local("s3://b")

    assert storage.join("s3://b/x", "t", "part.parquet") == "s3://b/x/t/part.parquet"
    assert storage.join("s3://b/x/", "/t/", "u") == "s3://b/x/t/u"
    assert storage.join("abfss://c@a.dfs.core.windows.net/root", "t") == "abfss://c@a.dfs.core.windows.net/root/t"
    assert storage.join("file:///tmp/a%20b", "t") == "/tmp/a b/t"
    assert storage.join(str(tmp_path), "t", "u") == str(tmp_path / "t" / "u")
    assert storage.join("rel", "t") == "rel/t"


def test_storage_options_conf_wins_env_fills_and_values_never_shown(monkeypatch):
    for name in [n for n in os.environ if n.startswith(("AWS_", "AZURE_", "GOOGLE_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")  # an alias: the canonical AWS_REGION wins
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("TOKEN", "not-ours")  # a bare alias outside AWS_/AZURE_/GOOGLE_ is never taken
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_PROFILE", "not-a-storage-option")

    assert storage.storage_options(None) == {
        "AWS_ENDPOINT_URL": "http://from-env:1", "AWS_REGION": "eu-west-1", "AWS_SECRET_ACCESS_KEY": "env-secret"}
    # the conf's alias wins over the environment's canonical name; keys delta-rs would not know are kept as given
    merged = storage.storage_options({"endpoint_url": "http://from-conf:2", "aws_access_key_id": "conf-key",
                                      "aws_conditional_put": "etag", "custom_Key": "v"})
    assert merged == {"AWS_ENDPOINT_URL": "http://from-conf:2", "AWS_ACCESS_KEY_ID": "conf-key",
                      "AWS_CONDITIONAL_PUT": "etag", "custom_Key": "v", "AWS_REGION": "eu-west-1",
                      "AWS_SECRET_ACCESS_KEY": "env-secret"}
    assert storage.redacted(merged) == {key: "***" for key in merged}


def test_filesystem_picks_the_store_and_the_path_inside_it(tmp_path):
    fs, path = storage.filesystem(str(tmp_path / "x"), None)
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "x")
    assert storage.filesystem((tmp_path / "a b").as_uri(), None)[1] == str(tmp_path / "a b")

    fs, path = storage.filesystem("s3://bkt/a/b/", {"endpoint_url": "http://127.0.0.1:9", "region": "eu-west-1"})
    assert isinstance(fs, pafs.S3FileSystem) and path == "bkt/a/b" and fs.region == "eu-west-1"

    fs, path = storage.filesystem("abfss://cont@acct.dfs.core.windows.net/a/b", {"account_key": "a2V5"})
    assert isinstance(fs, pafs.AzureFileSystem) and path == "cont/a/b"
    fs, path = storage.filesystem("az://cont/a", {"AZURE_STORAGE_ACCOUNT_NAME": "acct", "sas_token": "sv=x"})
    assert isinstance(fs, pafs.AzureFileSystem) and path == "cont/a"
    with pytest.raises(ValueError, match="account"):
        storage.filesystem("az://cont/a", {})


# -- small files and Parquet on every store ------------------------------------------------------------------------

def test_text_files_round_trip(store):
    root, opts = store
    marker = storage.join(root, "run-1", "manifest.json")
    assert storage.read_text(marker, opts) is None and not storage.exists(root, opts)
    assert storage.list_dirs(root, opts) == []

    storage.write_text(marker, '{"ok": true, "é": 1}', opts)
    storage.write_text(storage.join(root, "run-2", "deep", "m.txt"), "two", opts)
    storage.write_text(marker, '{"ok": false}', opts)  # replaced whole

    assert storage.read_text(marker, opts) == '{"ok": false}'
    assert storage.exists(marker, opts) and storage.exists(storage.join(root, "run-2"), opts)
    assert storage.list_dirs(root, opts) == ["run-1", "run-2"]

    storage.delete_tree(storage.join(root, "run-1"), opts)
    storage.delete_tree(storage.join(root, "never-written"), opts)  # missing: no error
    assert storage.read_text(marker, opts) is None and storage.list_dirs(root, opts) == ["run-2"]
    storage.delete_tree(root, opts)
    assert not storage.exists(root, opts)


def test_parquet_folder_round_trip(store):
    root, opts = store
    folder = storage.join(root, "staging", "concepts")
    assert storage.read_parquet_dir(folder, opts) is None

    first = pa.table({"note_id": ["n1", "n2"], "label": ["Drug", None]})
    second = pa.table({"note_id": ["n3"], "label": pa.array([None], pa.null())})  # an all-null column: null type
    storage.write_parquet(first, storage.join(folder, "a--000001.parquet"), opts)
    storage.write_parquet(second, storage.join(folder, "sub", "b--000001.parquet"), opts)
    storage.write_text(storage.join(folder, "_SUCCESS"), "", opts)
    storage.write_parquet(first, storage.join(folder, "_temporary", "0", "c.parquet"), opts)  # in-flight: skipped

    table = storage.read_parquet_dir(folder, opts)
    assert table.schema == pa.schema([("note_id", pa.string()), ("label", pa.string())])
    assert sorted(table.to_pylist(), key=lambda r: r["note_id"]) == [
        {"note_id": "n1", "label": "Drug"}, {"note_id": "n2", "label": None}, {"note_id": "n3", "label": None}]
    storage.delete_tree(folder, opts)
    assert storage.read_parquet_dir(folder, opts) is None


# -- Delta on S3 ---------------------------------------------------------------------------------------------------

def test_delta_commits_on_s3_need_no_lock_options(s3_opts):
    """delta-rs 1.x commits to S3 with put-if-absent: concurrent appends all land, none is overwritten."""
    uri = storage.join(_s3_root(), "t")
    write_deltalake(uri, pa.table({"id": [0]}), storage_options=s3_opts)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: write_deltalake(uri, pa.table({"id": [i]}), mode="append",
                                                storage_options=s3_opts), range(1, 5)))
    table = DeltaTable(uri, storage_options=s3_opts)
    assert table.version() == 4 and sorted(table.to_pyarrow_table()["id"].to_pylist()) == [0, 1, 2, 3, 4]


NOTES = pa.table({
    "note_id": ["n1", "n2", "n3", "n4"],
    "text": ["Pt on metformin 500 mg.", "No known allergies; é ü 中文.", "", "Aspirin 81 mg daily."],
    "site": ["north", "a b/c%", None, "north"],  # partition values needing escaping, and a null partition
    "visit": [date(2024, 1, 2), date(2024, 2, 3), date(2024, 3, 4), date(2024, 4, 5)],
    "n_words": pa.array([4, 5, 0, 4], pa.int32()),
})


def _rows(df):
    return sorted((tuple(r) for r in df.collect()), key=lambda r: r[0])


def test_delta_table_on_s3_read_through_spark(spark, s3_opts, capsys):
    uri = storage.join(_s3_root(), "notes")
    write_deltalake(uri, NOTES.slice(0, 3), partition_by=["site"], storage_options=s3_opts)
    write_deltalake(uri, NOTES.slice(3), partition_by=["site"], mode="append", storage_options=s3_opts)

    df = storage.read_table(spark, uri, "delta", s3_opts)

    assert df.columns == ["note_id", "text", "site", "visit", "n_words"]
    assert [f.dataType.simpleString() for f in df.schema] == ["string", "string", "string", "date", "int"]
    assert _rows(df) == [tuple(r.values()) for r in NOTES.to_pylist()]
    assert df.rdd.getNumPartitions() == len(DeltaTable(uri, storage_options=s3_opts).file_uris())  # one per file
    df.explain()  # the tasks scan the files: no rows were read on the driver and shipped (no LocalTableScan)
    plan = capsys.readouterr().out
    assert "BatchScan notelake_table" in plan and "LocalTableScan" not in plan

    # the DataFrame is pinned to the version it was made at; a new read sees the new commit
    write_deltalake(uri, pa.table({"note_id": ["n5"], "text": ["x"], "site": ["south"], "visit": [date(2024, 5, 6)],
                                   "n_words": pa.array([1], pa.int32())}), mode="append", storage_options=s3_opts)
    assert df.count() == 4
    assert storage.read_table(spark, uri, "delta", s3_opts).where("site = 'south'").count() == 1


def test_parquet_folder_on_s3_read_through_spark(spark, s3_opts):
    root = storage.join(_s3_root(), "selected")
    storage.write_parquet(NOTES.slice(0, 2), storage.join(root, "_round=0", "part-0.parquet"), s3_opts)
    storage.write_parquet(NOTES.slice(2).drop_columns(["n_words"]), storage.join(root, "_round=1", "part-0.parquet"),
                          s3_opts)
    storage.write_text(storage.join(root, "_SUCCESS"), "", s3_opts)

    df = storage.read_table(spark, root, "parquet", s3_opts)

    assert df.columns == ["note_id", "text", "site", "visit", "n_words", "_round"]
    rows = [tuple(r.values()) for r in NOTES.to_pylist()]
    expected = [(*rows[0], 0), (*rows[1], 0), (*rows[2][:4], None, 1), (*rows[3][:4], None, 1)]  # round 1: no n_words
    assert _rows(df) == expected
    assert df.rdd.getNumPartitions() == 2


def test_a_staged_round_reads_alike_from_a_local_folder_and_from_s3(spark, s3_opts, tmp_path, capsys):
    """``read_parquet``: Spark's own reader for a local folder (no Python planner workers), the data source for a
    URI; the job reads its staged rounds through it, so both must give the same rows and column types."""
    from datetime import datetime, timezone

    seen = [datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)] * 4  # what Spark's Arrow batches carry for a timestamp
    notes = NOTES.append_column("seen_at", pa.array(seen, pa.timestamp("us", tz="UTC")))
    frames = {}
    for root, opts in ((str(tmp_path / "selected"), None), (tmp_path.as_uri() + "/selected-uri", None),
                       (storage.join(_s3_root(), "selected"), s3_opts)):
        storage.write_parquet(notes.slice(0, 2), storage.join(root, "_round=0", "s1-p0-a0--000000.parquet"), opts)
        storage.write_parquet(notes.slice(2), storage.join(root, "_round=0", "s1-p1-a0--000000.parquet"), opts)
        frames[root] = df = storage.read_parquet(spark, storage.join(root, "_round=0"), opts)
        df.explain()
        plan = capsys.readouterr().out
        native = not storage.is_uri(root)
        assert ("FileScan parquet" in plan, "notelake_table" in plan) == (native, not native), root
    rows = [tuple(r.values())[:-1] for r in notes.to_pylist()]
    for df in frames.values():
        assert df.columns == ["note_id", "text", "site", "visit", "n_words", "seen_at"]
        assert [f.dataType.simpleString() for f in df.schema] == ["string", "string", "string", "date", "int",
                                                                  "timestamp"]
        assert [r[:-1] for r in _rows(df)] == rows
        assert {r[-1].isoformat() for r in _rows(df)} == {"2024-01-02T03:04:05"}  # session time zone UTC
