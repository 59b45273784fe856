"""Storage locations as URIs: local paths, ``file://``, ``s3://``, ``gs://``, ``abfss://`` ... end to end.

One dict of *storage options* configures every client, spelled the way delta-rs spells them
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AZURE_STORAGE_ACCOUNT_NAME`` ..., any case, object_store's aliases
too). delta-rs takes the dict as it is (``storage_options=``); :func:`filesystem` maps it onto the matching pyarrow
FileSystem, so Delta tables, staged Parquet and small text files (manifests, markers) all go through the same
credentials and endpoint. :func:`storage_options` fills the keys the conf lacks from the environment, so a job
configured by ``AWS_*`` variables alone still hands explicit options to executors on other hosts. Option values
are credentials: log only :func:`redacted`.

Spark has no object-store connector here (no hadoop-aws), so Spark never opens an ``s3://`` path itself. Tables are
read through the Python data source ``notelake_table`` (:func:`register_table_source`, :func:`read_table`): the
driver lists the files of the table (the Delta snapshot's data files, pinned to one table version, or the Parquet
files under a folder) and makes one input partition per file; each Spark task opens its file with delta-rs/pyarrow
and yields Arrow record batches. Only file paths cross the driver, never note text.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SOURCE_NAME = "notelake_table"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_S3_SCHEMES = ("s3", "s3a")
_AZURE_SCHEMES = ("abfs", "abfss", "az", "adl", "azure")
# Rows per Arrow batch a Spark task yields: bounds a task's memory when notes are long.
_BATCH_ROWS = 8192

# Canonical option name -> the aliases delta-rs (object_store) also accepts, lower-case.
_ALIASES: dict[str, tuple[str, ...]] = {
    "AWS_ACCESS_KEY_ID": ("access_key_id",),
    "AWS_SECRET_ACCESS_KEY": ("secret_access_key",),
    "AWS_SESSION_TOKEN": ("aws_token", "session_token", "token"),
    "AWS_REGION": ("region", "aws_default_region", "default_region"),
    "AWS_ENDPOINT_URL": ("aws_endpoint", "endpoint_url", "endpoint"),
    "AWS_ALLOW_HTTP": ("allow_http",),
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": ("virtual_hosted_style_request",),
    "AWS_SKIP_SIGNATURE": ("skip_signature",),
    "AWS_S3_LOCKING_PROVIDER": (),
    "AWS_S3_ALLOW_UNSAFE_RENAME": (),
    "AWS_CONDITIONAL_PUT": ("conditional_put",),
    "AZURE_STORAGE_ACCOUNT_NAME": ("account_name",),
    "AZURE_STORAGE_ACCOUNT_KEY": ("azure_storage_access_key", "azure_storage_master_key", "account_key",
                                  "access_key", "master_key"),
    "AZURE_STORAGE_SAS_KEY": ("azure_storage_sas_token", "sas_key", "sas_token"),
    "AZURE_CLIENT_ID": ("azure_storage_client_id", "client_id"),
    "AZURE_CLIENT_SECRET": ("azure_storage_client_secret", "client_secret"),
    "AZURE_TENANT_ID": ("azure_storage_tenant_id", "tenant_id"),
    "GOOGLE_SERVICE_ACCOUNT": ("google_service_account_path", "service_account", "service_account_path"),
    "GOOGLE_APPLICATION_CREDENTIALS": (),
}
_CANONICAL = {alias: name for name, aliases in _ALIASES.items() for alias in (name.lower(), *aliases)}


# -- locations -----------------------------------------------------------------------------------------------------

def is_uri(location: str) -> bool:
    """True for an object-store (or other remote) URI: a scheme other than ``file``."""
    match = _SCHEME.match(str(location))
    return bool(match) and match.group(1).lower() != "file"


def is_local(location: str) -> bool:
    """True for a plain path or a ``file://`` URI."""
    return not is_uri(location)


def _local_path(location: str) -> str:
    location = str(location)
    if location.lower().startswith("file:"):
        return unquote(urlparse(location).path)
    return os.path.expanduser(location)


def join(location: str, *parts: str) -> str:
    """``location/part/...``: URIs stay URIs (``/`` separators), ``file://`` URIs and paths become local paths."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *(str(p).strip("/") for p in parts)])
    return os.path.join(_local_path(location), *(str(p).lstrip("/") for p in parts))


# -- storage options -----------------------------------------------------------------------------------------------

def _canonical(options: dict[str, str] | None) -> dict[str, str]:
    return {_CANONICAL.get(k.lower(), k): str(v) for k, v in (options or {}).items()}


def storage_options(configured: dict[str, str] | None = None) -> dict[str, str]:
    """The configured options over the environment's: each known key the conf lacks is taken from the environment.

    Known aliases are renamed to their canonical ``AWS_*``/``AZURE_*``/``GOOGLE_*`` name, so ``endpoint_url`` in the
    conf wins over ``AWS_ENDPOINT_URL`` in the environment instead of both reaching delta-rs.
    """
    env: dict[str, str] = {}
    for key, value in os.environ.items():
        name = _CANONICAL.get(key.lower())
        # AWS_DEFAULT_REGION counts, a bare REGION or TOKEN does not; the canonical spelling beats an alias
        if name and value and key.startswith(("AWS_", "AZURE_", "GOOGLE_")) and (key == name or name not in env):
            env[name] = value
    return {**env, **_canonical(configured)}


def settings_options(settings) -> dict[str, str]:
    """The storage options a run uses: ``settings.storage.options`` over the environment's."""
    return storage_options(settings.storage.revealed_options())


def redacted(options: dict[str, str] | None) -> dict[str, str]:
    """The option names with every value replaced by ``***``: what may be logged."""
    return {key: "***" for key in sorted(options or {})}


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


# -- file systems --------------------------------------------------------------------------------------------------

def _s3(parsed, opts: dict[str, str]) -> tuple[pafs.FileSystem, str]:
    kwargs: dict = {
        "access_key": opts.get("AWS_ACCESS_KEY_ID"),
        "secret_key": opts.get("AWS_SECRET_ACCESS_KEY"),
        "session_token": opts.get("AWS_SESSION_TOKEN"),
        "region": opts.get("AWS_REGION"),
        "anonymous": _truthy(opts.get("AWS_SKIP_SIGNATURE")),
        "force_virtual_addressing": _truthy(opts.get("AWS_VIRTUAL_HOSTED_STYLE_REQUEST")),
    }
    if endpoint := opts.get("AWS_ENDPOINT_URL"):
        # pyarrow wants host[:port] and the scheme apart; delta-rs takes the URL (and AWS_ALLOW_HTTP for http)
        url = urlparse(endpoint if "://" in endpoint else f"//{endpoint}")
        kwargs["endpoint_override"] = url.netloc + url.path.rstrip("/")
        kwargs["scheme"] = url.scheme or ("http" if _truthy(opts.get("AWS_ALLOW_HTTP")) else "https")
    return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None}), \
        f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")


def _azure(parsed, opts: dict[str, str]) -> tuple[pafs.FileSystem, str]:
    # abfss://container@account.dfs.core.windows.net/path, or az://container/path with the account in the options
    container, _, host = parsed.netloc.rpartition("@")
    if not container:
        container, host = host, ""
    account = host.split(".")[0] or opts.get("AZURE_STORAGE_ACCOUNT_NAME")
    if not account:
        raise ValueError(f"no Azure storage account in {parsed.scheme}:// location or AZURE_STORAGE_ACCOUNT_NAME")
    kwargs = {
        "account_key": opts.get("AZURE_STORAGE_ACCOUNT_KEY"),
        "sas_token": opts.get("AZURE_STORAGE_SAS_KEY"),
        "client_id": opts.get("AZURE_CLIENT_ID"),
        "client_secret": opts.get("AZURE_CLIENT_SECRET"),
        "tenant_id": opts.get("AZURE_TENANT_ID"),
    }
    return pafs.AzureFileSystem(account, **{k: v for k, v in kwargs.items() if v is not None}), \
        f"{container}/{parsed.path.strip('/')}".rstrip("/")


def _other(location: str) -> tuple[pafs.FileSystem, str]:
    # gs:// (Application Default Credentials, as delta-rs), hdfs:// ...; else any protocol fsspec knows (memory://)
    try:
        return pafs.FileSystem.from_uri(location)
    except pa.ArrowInvalid:
        try:
            import fsspec.core
        except ImportError:
            raise ValueError(f"no pyarrow file system for {location.split('://')[0]}://, and no fsspec") from None
        fs, path = fsspec.core.url_to_fs(location)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def filesystem(location: str, storage_options: dict[str, str] | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow FileSystem for ``location`` (configured from the delta-rs style options) and the path in it."""
    if is_local(location):
        return pafs.LocalFileSystem(), os.path.abspath(_local_path(location))
    parsed = urlparse(str(location))
    scheme = parsed.scheme.lower()
    opts = _canonical(storage_options)
    if scheme in _S3_SCHEMES:
        return _s3(parsed, opts)
    if scheme in _AZURE_SCHEMES:
        return _azure(parsed, opts)
    return _other(str(location))


def _make_parent(fs: pafs.FileSystem, path: str) -> None:
    # object stores have no directories to create (pyarrow would write marker objects)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)


# -- small files ---------------------------------------------------------------------------------------------------

def exists(location: str, opts: dict[str, str] | None = None) -> bool:
    """True when a file or a folder (a non-empty prefix on an object store) is at ``location``."""
    fs, path = filesystem(location, opts)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(location: str, opts: dict[str, str] | None = None) -> str | None:
    """The UTF-8 text of a file, or None when there is none."""
    fs, path = filesystem(location, opts)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


def write_text(location: str, text: str, opts: dict[str, str] | None = None) -> None:
    """Write a UTF-8 text file whole: readers see the old content or the new one, never a partial file."""
    fs, path = filesystem(location, opts)
    _make_parent(fs, path)
    if not isinstance(fs, pafs.LocalFileSystem):  # an object PUT is atomic already
        with fs.open_output_stream(path) as stream:
            stream.write(text.encode("utf-8"))
        return
    temp = f"{path}.{uuid.uuid4().hex}.tmp"  # written aside, renamed over the target
    try:
        with fs.open_output_stream(temp) as stream:
            stream.write(text.encode("utf-8"))
        fs.move(temp, path)
    finally:
        if fs.get_file_info(temp).type == pafs.FileType.File:
            fs.delete_file(temp)


def delete_tree(location: str, opts: dict[str, str] | None = None) -> None:
    """Delete a folder and everything under it (or a single file); nothing to do when it is missing."""
    fs, path = filesystem(location, opts)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def list_dirs(location: str, opts: dict[str, str] | None = None) -> list[str]:
    """Names of the immediate child folders of ``location``, sorted; [] when it is missing."""
    fs, path = filesystem(location, opts)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.Directory)


# -- Parquet -------------------------------------------------------------------------------------------------------

def write_parquet(table: pa.Table, location: str, opts: dict[str, str] | None = None) -> None:
    """Write ``table`` as one Parquet file at ``location`` (a file path or URI, parent folders created)."""
    fs, path = filesystem(location, opts)
    _make_parent(fs, path)
    pq.write_table(table, path, filesystem=fs)


def _parquet_files(fs: pafs.FileSystem, base: str) -> list[str]:
    """The Parquet files under ``base``, recursively, sorted; hidden and ``_`` entries (Spark's ``_temporary``)
    are skipped, Hive partition folders (``_round=3``) are not."""
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True))
    files = []
    for info in infos:
        parts = posixpath.relpath(info.path, base).split("/")
        if (info.type == pafs.FileType.File and parts[-1].endswith(".parquet")
                and not any(p.startswith(".") or (p.startswith("_") and "=" not in p) for p in parts)):
            files.append(info.path)
    return sorted(files)


def _parquet_dataset(fs: pafs.FileSystem, base: str, files: list[str]) -> ds.FileSystemDataset:
    """A dataset over ``files`` with Hive partition columns taken from the folders below ``base`` and the schema
    unified over every file (staged files of different rounds may differ in nullability or null-typed columns)."""
    factory = ds.FileSystemDatasetFactory(
        fs, files, ds.ParquetFileFormat(),
        ds.FileSystemFactoryOptions(partition_base_dir=base, partitioning=ds.HivePartitioning.discover()))
    return factory.finish(factory.inspect())


def parquet_files(location: str, opts: dict[str, str] | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """(file system, the Parquet files under the folder ``location``, recursively, sorted; [] when missing)."""
    fs, base = filesystem(location, opts)
    return fs, _parquet_files(fs, base)


def read_parquet_dir(location: str, opts: dict[str, str] | None = None) -> pa.Table | None:
    """Every Parquet file under the folder ``location`` as one table; None when it is missing or has none."""
    fs, base = filesystem(location, opts)
    files = _parquet_files(fs, base)
    return _parquet_dataset(fs, base, files).to_table() if files else None


# -- Spark data source ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Source:
    """What every Spark task of one read needs (pickled with it): plain data, no clients."""

    location: str
    fmt: str
    opts: dict[str, str]
    schema: pa.Schema  # Delta: the snapshot's; Parquet: unified over all files, Hive partition columns included
    version: int | None = None  # Delta: the snapshot listed
    hive: pa.Schema | None = None  # Parquet: the Hive partition columns


# One data file: its path as the listing named it, and (Delta) its partition values as an Arrow expression.
_File = tuple[str, "ds.Expression | None"]


def _list_source(location: str, fmt: str, opts: dict[str, str], version: int | None) -> tuple[_Source, list[_File]]:
    """Resolve a read on the driver: the table's schema and its data files (file metadata only, no rows)."""
    if fmt == "delta":
        from deltalake import DeltaTable

        table = DeltaTable(location, version=version, storage_options=opts or None)
        # delta-rs names each file relative to the table root and turns its partition values into an expression
        dataset = table.to_pyarrow_dataset()
        files = [(f.path, f.partition_expression) for f in dataset.get_fragments()]
        return _Source(location, fmt, opts, dataset.schema, version=table.version()), files
    fs, base = filesystem(location, opts)
    paths = _parquet_files(fs, base)
    if not paths:
        raise FileNotFoundError(f"{SOURCE_NAME}: no Parquet files under the input location")
    schema = _parquet_dataset(fs, base, paths).schema
    # the Hive partition columns, named by the key=value folders (the discovered partitioning does not say)
    keys = {part.split("=", 1)[0] for p in paths for part in posixpath.relpath(p, base).split("/")[:-1] if "=" in part}
    hive = pa.schema([field for field in schema if field.name in keys])
    return _Source(location, fmt, opts, schema, hive=hive), [(p, None) for p in paths]


def _read_files(source: _Source, files: list[_File], target: pa.Schema) -> Iterator[pa.RecordBatch]:
    """The rows of some of the source's files, in batches of exactly the Arrow schema Spark expects."""
    if source.fmt == "delta":
        from deltalake.fs import DeltaStorageHandler

        # the listing already resolved the snapshot: read the files directly, no log replay per task
        fs = pafs.PyFileSystem(DeltaStorageHandler(source.location, source.opts or None))
        fmt = ds.ParquetFileFormat()
        fragments = [fmt.make_fragment(path, filesystem=fs, partition_expression=expr) for path, expr in files]
        dataset = ds.FileSystemDataset(fragments, source.schema, fmt, fs)
    else:
        fs, base = filesystem(source.location, source.opts)
        dataset = ds.dataset([path for path, _ in files], schema=source.schema, format="parquet", filesystem=fs,
                             partitioning=ds.HivePartitioning(source.hive), partition_base_dir=base)
    for batch in dataset.to_batches(columns=target.names, batch_size=_BATCH_ROWS):
        # Spark rejects a batch whose schema differs in any way (large_string, nullability, field order)
        yield batch.cast(target)


@functools.cache
def _table_source():
    # pyspark is imported only here: the base install (`notelake sql`) imports this module without Spark
    from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

    class TableReader(DataSourceReader):
        """One input partition per data file; each task reads its own file."""

        def __init__(self, source: _Source, files: list[_File], schema) -> None:
            self.source, self.files = source, files
            # the Arrow schema Spark checks every batch against: its own conversion of the output schema
            self.target = to_arrow_schema(schema, timezone="UTC")

        def __getstate__(self) -> dict:
            # every task gets a copy of the reader: the file list travels in the partitions instead
            return {**self.__dict__, "files": []}

        def partitions(self) -> list:
            return [InputPartition([file]) for file in self.files] or [InputPartition([])]

        def read(self, partition) -> Iterator[pa.RecordBatch]:
            if partition.value:
                yield from _read_files(self.source, partition.value, self.target)

    class TableSource(DataSource):
        """``spark.read.format("notelake_table")``; options: ``path``, ``format`` (``delta`` or ``parquet``),
        ``storage_options`` (a JSON object), ``version`` (Delta; default: the latest when the DataFrame is made)."""

        @classmethod
        def name(cls) -> str:
            return SOURCE_NAME

        def _list(self) -> tuple[_Source, list[_File]]:
            fmt = self.options.get("format", "delta").lower()
            if fmt not in ("delta", "parquet"):
                raise ValueError(f"{SOURCE_NAME}: format must be delta or parquet, not {fmt!r}")
            version = self.options.get("version")
            return _list_source(self.options["path"], fmt, json.loads(self.options.get("storage_options") or "{}"),
                                int(version) if version else None)

        def schema(self):
            source, _ = self._list()
            if source.version is not None:
                # Spark pickles the DataSource after schema(): every action on this DataFrame reads this version
                self.options["version"] = str(source.version)
            return from_arrow_schema(source.schema)

        def reader(self, schema) -> TableReader:
            return TableReader(*self._list(), schema)

    return TableSource


def register_table_source(spark) -> None:
    """Register the ``notelake_table`` data source with ``spark`` (again is harmless)."""
    spark.dataSource.register(_table_source())


def read_parquet(spark, location: str, opts: dict[str, str] | None = None):
    """A DataFrame over the Parquet folder at ``location``: Spark's own reader for a local path, the
    ``notelake_table`` data source for a URI (Spark has no object-store connector here). The data source plans
    every read in two Python worker processes (~0.3 s a read, ~1 s once Spark has ended them after a minute idle);
    Spark's reader plans in its JVM."""
    if is_uri(location):
        return read_table(spark, location, "parquet", opts)
    return spark.read.parquet(os.path.abspath(_local_path(location)))


def read_table(spark, location: str, fmt: str = "delta", opts: dict[str, str] | None = None,
               version: int | None = None):
    """A DataFrame over the Delta table (its latest snapshot, or ``version``) or Parquet folder at ``location``
    (any URI; the executors read the files)."""
    register_table_source(spark)
    # the tasks may run in another working directory: hand them an absolute local path
    location = str(location) if is_uri(location) else os.path.abspath(_local_path(location))
    reader = (spark.read.format(SOURCE_NAME)
              .option("format", fmt)
              .option("storage_options", json.dumps(opts or {})))
    if version is not None:
        reader = reader.option("version", str(version))
    return reader.load(location)
