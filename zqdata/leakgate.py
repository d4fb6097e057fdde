"""The leak gate (泄露闸门): raw personal values of the gov platform must never appear in any ops table (Arts. 2, 24).

Split from zqdata.boundary (the crossing itself); ``find_leaks`` scans every ops column for ID numbers and mobiles (by
shape, whether gov holds them or not) and for the gov platform's names (docs/security.md "Leak gate").
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from zqdata import standards
from zqdata.lakes import run_in_transaction
from zqdata.desensitize import quote_ident
from zqdata.registry import Registry
from zqdata.warehouse import relation_columns


NOT_IN_GOV = ":not_in_gov"  # kind suffix of a value found by its shape (check digit, number pattern) only


@dataclass(frozen=True)
class Leak:
    """Raw personal values found in an ops column (``sample`` is itself masked; ``rows`` counts distinct values).

    ``kind`` is what was found and whether gov holds it: ``citizen_id``, ``mobile``, ``name`` for values of the gov
    value set; ``citizen_id:not_in_gov``, ``mobile:not_in_gov`` for a valid ID number (GB 11643 check digit) or a
    mobile number that gov never saw.
    """

    table: str
    column: str
    kind: str  # citizen_id | mobile | name, or citizen_id:not_in_gov | mobile:not_in_gov
    rows: int
    sample: str

    @property
    def found(self) -> str:
        """citizen_id | mobile | name."""
        return self.kind.removesuffix(NOT_IN_GOV)

    @property
    def held_by_gov(self) -> bool:
        return not self.kind.endswith(NOT_IN_GOV)


def personal_value_fields(registry: Registry) -> dict[str, dict[str, str]]:
    """dataset -> {field: kind} of raw identifiers the leak gate looks for: ID numbers, mobiles, personal names."""
    out: dict[str, dict[str, str]] = {}
    for ds in registry.datasets.values():
        for f in ds.fields:
            if f.class_.pi == "none":
                continue
            if f.format in ("citizen_id", "mobile"):
                out.setdefault(ds.code, {})[f.name] = f.format
            elif f.name == "name" or f.name.endswith("_name"):
                out.setdefault(ds.code, {})[f.name] = "name"
    return out


def _personal_value_selects(gov_con: duckdb.DuckDBPyConnection, registry: Registry, schemas: Collection[str],
                            datasets: Collection[str] | None = None) -> list[str]:
    """SELECT kind, value, _partition_date of the raw personal identifiers in the gov relations of ``schemas``."""
    selects = []
    for dataset, fields in personal_value_fields(registry).items():
        if datasets is not None and dataset not in datasets:
            continue
        ds = registry.datasets[dataset]
        relations = [("ods", dataset), ("staging", f"stg_{ds.agency}__{dataset}"), ("intermediate", f"int_{dataset}")]
        staged: set[str] = set()
        for schema, table in relations:
            cols = relation_columns(gov_con, schema, table)
            if "_partition_date" not in cols:
                continue
            names = [n for n in fields if n in cols]
            if schema == "staging":
                staged = set(names)
            if schema not in schemas:
                continue
            if schema == "intermediate" and set(names) <= staged:
                # int_<dataset> is its staging model minus rejected rows (models/gov/intermediate): no value it holds
                # is missing from staging, so reading it again only costs time
                continue
            for name, kind in fields.items():
                if name in cols:
                    selects.append(
                        f"SELECT '{kind}' AS kind, upper(trim(CAST({quote_ident(name)} AS VARCHAR))) AS value, "
                        f"CAST(_partition_date AS DATE) AS day FROM {schema}.{quote_ident(table)}")
    return selects


_GOV_LAYERS = ("ods", "staging", "intermediate")
INDEX_SCHEMA, INDEX_TABLE = "leakgate", "gov_identifiers"  # in the gov DB: the raw identifiers ever held, by first day
# One row, written in the transaction that fills the index from the whole history: the personal fields it was built
# for (`index_fields`). Without it (a first build that failed part way) or for other fields (the registry classified a
# field personal, or no longer), the index is not used and the next update builds it again from the whole history.
INDEX_STATE = "gov_identifiers_built_for"


def index_fields(registry: Registry) -> str:
    """The fields the leak gate's value set is made of (`personal_value_fields`), as one canonical text."""
    return json.dumps(sorted((d, sorted(f.items())) for d, f in personal_value_fields(registry).items()),
                      ensure_ascii=False)


def _index_ready(gov_con: duckdb.DuckDBPyConnection, registry: Registry) -> bool:
    """The index holds the whole history of the registry's current personal fields."""
    if not all(relation_columns(gov_con, INDEX_SCHEMA, t) for t in (INDEX_STATE, INDEX_TABLE)):
        return False
    return gov_con.execute(f"SELECT fields FROM {INDEX_SCHEMA}.{INDEX_STATE}").fetchall() == [(index_fields(registry),)]


def update_identifier_index(gov_con: duckdb.DuckDBPyConnection, registry: Registry, partition_date: dt.date | None,
                            datasets: Collection[str] | None = None, schemas: Collection[str] = _GOV_LAYERS) -> int:
    """Keep `leakgate.gov_identifiers` (kind, value, first day seen) current: the partition's identifiers of
    ``datasets`` in the gov relations of ``schemas``. The gov dbt step calls it for its day after every build (ODS,
    staging and intermediate; also when the build failed): the crossing reads those models only, so every value that
    can reach ops is indexed in the step that builds it. Built from the whole history when the index is not ready
    (`_index_ready`: never built, a build that failed, or other personal fields in the registry), in one transaction
    with its state row; then each night adds only its own partition, so the leak gate's value set no longer costs a
    scan of every day ever loaded (issue 15). A value that a redelivery removed stays in the index until the next
    whole build: the gate then looks for more values than gov holds, never fewer. Runs on a writable gov connection;
    returns rows added (a whole build: the rows it holds)."""
    rebuild = not _index_ready(gov_con, registry)
    if rebuild:
        partition_date, datasets, schemas = None, None, _GOV_LAYERS  # everything already held
    selects = _personal_value_selects(gov_con, registry, schemas, datasets)
    if not selects and not rebuild:
        return 0
    index, state = f"{INDEX_SCHEMA}.{INDEX_TABLE}", f"{INDEX_SCHEMA}.{INDEX_STATE}"
    if rebuild:  # the tables alone are not a ready index: the state row is written with the rows, below
        gov_con.execute(f"CREATE SCHEMA IF NOT EXISTS {INDEX_SCHEMA}")
        # No PRIMARY KEY / ON CONFLICT: a DuckLake (ZQ_WAREHOUSE=ducklake) has no constraints. (kind, value) stays
        # unique by the update-then-insert below, one transaction; the gate reads values, never counts rows.
        gov_con.execute(f"CREATE TABLE IF NOT EXISTS {index} (kind VARCHAR NOT NULL, value VARCHAR NOT NULL, "
                        "first_day DATE NOT NULL)")
        gov_con.execute(f"CREATE TABLE IF NOT EXISTS {state} (fields VARCHAR NOT NULL)")
    where = "length(value) >= 2" + ("" if partition_date is None else " AND day = $zq_partition")
    values = (f"SELECT kind, value, min(day) AS first_day FROM ({' UNION ALL '.join(selects)}) WHERE {where} "
              "GROUP BY kind, value") if selects else \
        "SELECT NULL::VARCHAR AS kind, NULL::VARCHAR AS value, NULL::DATE AS first_day LIMIT 0"
    gov_con.execute(f"CREATE OR REPLACE TEMP TABLE _zq_new_identifiers AS {values}",
                    {} if partition_date is None else {"zq_partition": partition_date})

    def upsert(con: duckdb.DuckDBPyConnection, _attempt: int) -> int:
        if rebuild:
            con.execute(f"DELETE FROM {index}")
            con.execute(f"DELETE FROM {state}")
            con.execute(f"INSERT INTO {state} VALUES (?)", [index_fields(registry)])
        before = con.execute(f"SELECT count(*) FROM {index}").fetchone()[0]
        con.execute(f"UPDATE {index} AS i SET first_day = n.first_day FROM _zq_new_identifiers n "
                    "WHERE i.kind = n.kind AND i.value = n.value AND n.first_day < i.first_day")
        con.execute(f"INSERT INTO {index} SELECT n.kind, n.value, n.first_day FROM _zq_new_identifiers n "
                    f"WHERE NOT EXISTS (SELECT 1 FROM {index} i WHERE i.kind = n.kind AND i.value = n.value)")
        return con.execute(f"SELECT count(*) FROM {index}").fetchone()[0] - before

    try:  # a concurrent night's commit on a DuckLake: run again (lakes.run_in_transaction); a DuckDB file never races
        added, _ = run_in_transaction(gov_con, upsert)
    finally:
        gov_con.execute("DROP TABLE IF EXISTS _zq_new_identifiers")
    return added


def gov_personal_values(gov_con: duckdb.DuckDBPyConnection, registry: Registry, partition_date: dt.date) -> pa.Table:
    """Distinct (kind, value) of raw personal identifiers on the gov platform up to ``partition_date``, as Arrow:
    from the maintained index when it is ready for the registry's personal fields (`update_identifier_index`), else by
    scanning every relation."""
    if _index_ready(gov_con, registry):
        return gov_con.execute(f"SELECT kind, value FROM {INDEX_SCHEMA}.{INDEX_TABLE} WHERE first_day <= $zq_partition",
                               {"zq_partition": partition_date}).fetch_arrow_table()
    selects = _personal_value_selects(gov_con, registry, _GOV_LAYERS)
    if not selects:
        return pa.table({"kind": pa.array([], pa.string()), "value": pa.array([], pa.string())})
    # A one-character "name" would match ordinary text; real names have at least two characters.
    sql = (f"SELECT DISTINCT kind, value FROM ({' UNION ALL '.join(selects)}) "
           "WHERE length(value) >= 2 AND day <= $zq_partition")
    return gov_con.execute(sql, {"zq_partition": partition_date}).fetch_arrow_table()


_VALUE_SET_CACHE: dict[tuple, pa.Table] = {}  # one entry: the latest (gov file version, partition) in this process


def _read_only_file_version(gov_con: duckdb.DuckDBPyConnection) -> tuple | None:
    """(path, size and mtime of the file and of its WAL) of a gov DB opened read-only; None otherwise.

    Read-only: nothing can change the file while the connection is open (DuckDB's lock), and any later write
    changes size or mtime, so the key names one version of the data. In-memory or writable DBs are never cached.
    """
    if gov_con.execute("SELECT current_setting('access_mode')").fetchone()[0] != "read_only":
        return None
    row = gov_con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    if not row or not row[0]:
        return None
    path = Path(row[0]).resolve()
    stats = []
    for f in (path, path.with_name(path.name + ".wal")):
        try:
            st = f.stat()
            stats.append((st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            stats.append(None)
    return (str(path), *stats)


def cached_gov_personal_values(gov_con: duckdb.DuckDBPyConnection, registry: Registry,
                               partition_date: dt.date) -> pa.Table:
    """`gov_personal_values`, computed once per gov file version and partition in this process.

    A night runs three leak gates (the boundary and one per product) on the same gov data: the all-history
    DISTINCT is the part of each gate that grows with history, so the later gates reuse the first one's set.
    """
    version = _read_only_file_version(gov_con)
    if version is None:
        return gov_personal_values(gov_con, registry, partition_date)
    key = (version, partition_date, index_fields(registry))
    if key not in _VALUE_SET_CACHE:
        _VALUE_SET_CACHE.clear()
        _VALUE_SET_CACHE[key] = gov_personal_values(gov_con, registry, partition_date)
    return _VALUE_SET_CACHE[key]


def _mask_sample(value: str) -> str:
    return value[:1] + "*" * max(len(value) - 2, 1) + value[-1:] if len(value) > 2 else "*" * len(value)


# -- what the scan looks for, by shape ------------------------------------------------------------------------------
# GB/T 2260 province-level codes: the first two digits of every citizen ID (81/82/83: Hong Kong, Macao, Taiwan
# residence permits). With a birth year from 1900 they are the gate's plausibility filter on top of GB 11643's own
# rule (`standards.is_valid_citizen_id`): an 18-digit number that is not an ID (an all-digit credit code starts with
# 91/92/93/1x-9x registration codes and has a district code where the birth date would be) rarely passes all three.
PROVINCE_CODES = ("11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35", "36", "37", "41", "42",
                  "43", "44", "45", "46", "50", "51", "52", "53", "54", "61", "62", "63", "64", "65", "71", "81", "82",
                  "83")
MIN_BIRTH_YEAR = 1900
MOBILE_PATTERN = "1[3-9][0-9]{9}"  # standards.is_valid_mobile
# Full-width forms (what an IME types) of the characters an ID or mobile number is written with, and the spaces and
# hyphens that group its digits: ０-９ Ｘ ｘ － ＋ and the ideographic space.
_FULL_WIDTH = "".join(chr(0xFF10 + i) for i in range(10)) + "\uff38\uff58\uff0d\uff0b\u3000"
_HALF_WIDTH = "0123456789Xx-+ "
# 32+ hex characters are a digest (the 64-hex HMAC pseudonyms, md5s): an 11-digit run inside one is chance, not a
# mobile number (at 10 M pseudonyms a day, thousands of them hold such a run).
_HEX_RUN = "[0-9A-Fa-f]{32,}"
# A digit run, its groups joined by single spaces or hyphens ("138 1234 5678", "4412-0219-…"), with a trailing X.
_DIGIT_RUN = r"[0-9]+(?:[ \-][0-9]+)*[Xx]?"
_GROUP_SEP = r"[ \-]"
_HAN_RUN = r"[\p{Han}·]{2,}"  # names are Han characters (· in minority names); two at least, like the gov value set
MIN_NAME_IN_TEXT = 3  # shorter gov names are matched only as a whole Han run, never inside a longer one
MAX_NAME_IN_TEXT = 12

# Column types whose text can hold no ID number, mobile number or name: booleans, dates and times (fixed formats),
# UUIDs (generated), and integers of at most 10 digits (a mobile has 11, an ID 18).
_SKIPPED_TYPES = {"BOOLEAN", "DATE", "TIME", "TIME WITH TIME ZONE", "TIME_NS", "TIMESTAMP", "TIMESTAMP WITH TIME ZONE",
                  "TIMESTAMP_NS", "TIMESTAMP_MS", "TIMESTAMP_S", "INTERVAL", "UUID", "BIT", "TINYINT", "SMALLINT",
                  "INTEGER", "UTINYINT", "USMALLINT", "UINTEGER"}
_WHOLE_NUMBER_TYPES = {"BIGINT", "UBIGINT", "HUGEINT", "UHUGEINT"}
_MEASURE_TYPES = {"FLOAT", "DOUBLE"}
_DECIMAL = re.compile(r"DECIMAL\((\d+),\s*(\d+)\)")


# The ingestion's lineage id, ``<dataset>/<date>/<delivered file>#<row number>``: the file name comes from the
# supplier's manifest (free text, so it is scanned), the row number (at most 10 digits: no ID, no mobile) is not. The
# scan reads each lineage id with its row number cut off, i.e. one value per delivered file, not one per row.
LINEAGE_COLUMN = "_lineage_id"
_LINEAGE_FILE = ("CASE WHEN ends_with(rtrim({col}, '0123456789'), '#') "
                 "AND length({col}) - length(rtrim({col}, '0123456789')) <= 10 "
                 "THEN rtrim({col}, '0123456789') ELSE {col} END")


def is_plausible_citizen_id(s: object, today: dt.date | None = None) -> bool:
    """An ID number the gate reports by shape: GB 11643-valid and plausible (province code, born ≥ 1900).

    The Python reference of `citizen_id_sql` (the tests cross-check them on `standards.sample_values`)."""
    return (standards.is_valid_citizen_id(s, today) and s[:2] in PROVINCE_CODES  # type: ignore[index]
            and int(s[6:10]) >= MIN_BIRTH_YEAR)  # type: ignore[index]


def citizen_id_sql(tok: str) -> str:
    """SQL predicate of `is_plausible_citizen_id` on an upper-case text expression, from the standard's constants."""
    weighted = " + ".join(f"(ascii(substr({tok}, {i + 1}, 1)) - 48) * {w}"
                          for i, w in enumerate(standards.CITIZEN_ID_WEIGHTS))
    born = f"try_strptime(substr({tok}, 7, 8), '%Y%m%d')"
    return (f"(length({tok}) = 18 AND regexp_full_match({tok}, '(?:{'|'.join(PROVINCE_CODES)})[0-9]{{15}}[0-9X]') "
            f"AND {born} >= DATE '{MIN_BIRTH_YEAR}-01-01' AND {born} <= current_date "
            f"AND substr('{standards.CITIZEN_ID_CHECK_CHARS}', ({weighted}) % 11 + 1, 1) = substr({tok}, 18, 1))")


def mobile_sql(tok: str) -> str:
    return f"(length({tok}) = 11 AND regexp_full_match({tok}, '{MOBILE_PATTERN}'))"


def _number_tokens_sql(folded: str) -> str:
    """The ID/mobile candidates in a text (``folded``: full-width forms already folded, `_fold_sql`): every maximal
    digit run (letters around it do not matter) outside 32+ hex digests; for a run grouped by spaces/hyphens, every span
    of whole groups joined; +86 / 0086 stripped from a mobile; upper-case. Only 11- and 18-character candidates are
    kept. A value that is a digest as a whole (most ops values: the pseudonyms) is passed over by one full match."""
    groups = f"string_split_regex(r, '{_GROUP_SEP}')"
    spans = (f"flatten(list_transform(range(1, len({groups}) + 1), lambda i: "
             f"list_transform(range(i, len({groups}) + 1), lambda j: array_to_string({groups}[i:j], ''))))")
    runs = (f"list_filter(regexp_extract_all(regexp_replace({folded}, '{_HEX_RUN}', ' ', 'g'), '{_DIGIT_RUN}'), "
            "lambda r: length(r) >= 11)")
    cands = (f"flatten(list_transform({runs}, lambda r: "
             f"CASE WHEN regexp_matches(r, '{_GROUP_SEP}') THEN {spans} ELSE [r] END))")
    fixed = ("CASE WHEN length(x) = 13 AND starts_with(x, '86') THEN right(x, 11) "
             "WHEN length(x) = 15 AND starts_with(x, '0086') THEN right(x, 11) "
             "WHEN length(x) = 12 AND upper(right(x, 1)) = 'X' THEN left(x, 11) ELSE upper(x) END")
    return (f"CASE WHEN regexp_full_match({folded}, '{_HEX_RUN}') THEN []::VARCHAR[] ELSE "
            f"list_filter(list_transform({cands}, lambda x: {fixed}), lambda x: length(x) = 11 OR length(x) = 18) END")


def _fold_sql(text: str) -> str:
    """Full-width digits, X, hyphen, plus and space folded to ASCII (only a non-ASCII text needs the translate)."""
    return (f"CASE WHEN strlen({text}) = length({text}) THEN {text} "
            f"ELSE translate({text}, '{_FULL_WIDTH}', '{_HALF_WIDTH}') END")


def _name_tokens_sql(text: str, longest: int) -> str:
    """Han runs of a text (a name standing alone) and their substrings of MIN_NAME_IN_TEXT..``longest`` characters (a
    name inside longer text: 联系人张伟强电话 holds 张伟强)."""
    runs = f"regexp_extract_all({text}, '{_HAN_RUN}')"
    if longest < MIN_NAME_IN_TEXT:
        return f"CASE WHEN strlen({text}) = length({text}) THEN []::VARCHAR[] ELSE {runs} END"
    grams = (f"flatten(list_transform(list_filter({runs}, lambda r: length(r) > {MIN_NAME_IN_TEXT}), lambda r: "
             f"flatten(list_transform(range({MIN_NAME_IN_TEXT}, least({longest}, length(r) - 1) + 1), lambda k: "
             f"list_transform(range(1, length(r) - k + 2), lambda s: substr(r, s, k))))))")
    # an ASCII text holds no Han character: one byte count instead of a regex
    return f"CASE WHEN strlen({text}) = length({text}) THEN []::VARCHAR[] ELSE list_concat({runs}, {grams}) END"


def _column_plan(data_type: str, column: str, public_names: Collection[str],
                 longest_name: int) -> tuple[str, str, bool] | None:
    """(text of the value ``v``, its token list, whether shape alone flags a token) for a column; None: nothing to scan.

    Exact numbers (BIGINT, HUGEINT, DECIMAL(p,0)) are flagged by shape like text: an ID or a mobile stored as a number.
    Measures (FLOAT, DOUBLE, DECIMAL with a scale: amounts) only when gov holds their integer part: an amount of
    13 800 000 000.00 yuan is not a mobile number. Text (VARCHAR, JSON, BLOB, LIST/STRUCT/MAP/ARRAY/UNION, ENUM, any
    other type) is scanned whole, its number tokens and its names; a column named like a public name field of the
    registry (an enterprise name) only whole, since such names legitimately contain persons' names.
    """
    dtype = data_type.upper()
    m = _DECIMAL.fullmatch(dtype)
    if dtype in _SKIPPED_TYPES or (m and int(m.group(1)) - int(m.group(2)) < 11):
        return None
    if dtype in _WHOLE_NUMBER_TYPES or (m and m.group(2) == "0"):
        text = "CAST(v AS VARCHAR)"
        return text, f"[ltrim({text}, '-')]", True
    if dtype in _MEASURE_TYPES or m:
        text = "CAST(v AS VARCHAR)"
        return text, f"[ltrim(split_part({text}, '.', 1), '-')]", False
    # JSON keeps \uXXXX escapes in its text; json() re-serializes with the characters themselves
    text = "v" if dtype == "VARCHAR" else "CAST(json(v) AS VARCHAR)" if dtype == "JSON" else "CAST(v AS VARCHAR)"
    tokens = f"list_concat([upper(trim(t))], {_number_tokens_sql('f')})"
    if column not in public_names:
        tokens = f"list_concat({tokens}, {_name_tokens_sql('t', longest_name)})"
    return text, tokens, True


def public_name_fields(registry: Registry) -> set[str]:
    """Registry fields named like names that are not personal (``ent_name``): public, may contain a person's name."""
    return {f.name for ds in registry.datasets.values() for f in ds.fields
            if f.class_.pi == "none" and (f.name == "name" or f.name.endswith("_name"))}


def _longest_name(values: pa.Table) -> int:
    names = values.filter(pc.equal(values["kind"], "name"))["value"]
    longest = pc.max(pc.utf8_length(names)).as_py() if len(names) else None
    return min(longest or 0, MAX_NAME_IN_TEXT)


def find_leaks(gov_con: duckdb.DuckDBPyConnection, ops_con: duckdb.DuckDBPyConnection, partition_date: dt.date | str,
               registry: Registry | None = None, all_partitions: bool = False,
               tables: Collection[str] | None = None) -> list[Leak]:
    """Every ops column holding a raw ID number, mobile number or gov name (zero allowed).

    Every column of every type is read as text (lists, structs, maps, JSON and numbers cast), except types that
    cannot hold one (`_column_plan`). Found: the gov value set's IDs, mobiles and names as a whole value; ID and
    mobile numbers inside longer text (glued to letters, grouped by spaces or hyphens, +86-prefixed, full-width),
    whether gov holds them or not (GB 11643 check digit, mobile pattern); gov names inside free text (3+ characters;
    shorter ones standing alone). Digit runs inside 32+ hex digests (pseudonyms) are not numbers.
    Tables with ``_partition_date`` are scanned for that partition (``all_partitions`` for a full sweep); others whole.
    ``tables`` (``"schema.table"`` names) limits the scan, e.g. a product gate checking its own product only.
    The gov value set is registered on the ops connection only for the scan (an Arrow view, never written to ops).
    """
    if registry is None:
        from zqdata.registry import registry as _registry

        registry = _registry()
    d = dt.date.fromisoformat(partition_date) if isinstance(partition_date, str) else partition_date
    values = cached_gov_personal_values(gov_con, registry, d)
    columns = ops_con.execute(  # DuckDB's catalog function: the information_schema join took ~4× as long
        "SELECT schema_name, table_name, column_name, data_type FROM duckdb_columns() "
        "WHERE database_name = current_database() AND NOT internal ORDER BY 1, 2, 3"
    ).fetchall()
    if tables is not None:  # the scan is per column and costly at scale: skip what the caller does not ask about
        wanted = set(tables)
        columns = [c for c in columns if f"{c[0]}.{c[1]}" in wanted]
    partitioned = {
        (s, t) for s, t in ops_con.execute(
            "SELECT schema_name, table_name FROM duckdb_columns() WHERE column_name = '_partition_date' "
            "AND database_name = current_database() AND NOT internal").fetchall()
    }
    public_names, longest = public_name_fields(registry), _longest_name(values)
    planned = []
    for schema, table, column, data_type in columns:
        plan = _column_plan(data_type, column, public_names, longest)
        if plan is not None:
            planned.append(((schema, table, column, data_type), plan))
    leaks: list[Leak] = []
    if not planned:
        return leaks
    # One query over every column: the gov value set (all history, millions of values) is hashed once per scan,
    # not once per ops column.
    ctes, branches = [], []
    for i, ((schema, table, column, data_type), (text, tokens, by_shape)) in enumerate(planned):
        col = quote_ident(column)
        target = f"{quote_ident(schema)}.{quote_ident(table)}"
        scope = "TRUE" if all_partitions or (schema, table) not in partitioned else "_partition_date = $zq_partition"
        value = _LINEAGE_FILE.format(col=col) if column == LINEAGE_COLUMN and data_type == "VARCHAR" else col
        ctes.append(f"vals_{i} AS (SELECT DISTINCT {value} AS v FROM {target} WHERE {col} IS NOT NULL AND {scope})")
        # one reference to vals_i, so DuckDB streams it instead of materializing every column
        branches.append(f"SELECT {i} AS c, {by_shape} AS by_shape, t AS v, unnest({tokens}) AS tok "
                        f"FROM (SELECT t, {_fold_sql('t')} AS f FROM (SELECT {text} AS t FROM vals_{i}))")
    by_shape = (f"CASE WHEN tokens.by_shape AND {mobile_sql('tokens.tok')} THEN 'mobile{NOT_IN_GOV}' "
                f"WHEN tokens.by_shape AND {citizen_id_sql('tokens.tok')} THEN 'citizen_id{NOT_IN_GOV}' END")
    sql = (f"WITH {', '.join(ctes)}, tokens AS ({' UNION ALL '.join(branches)}) "
           "SELECT c, kind, count(DISTINCT v), min(tok) FROM ("
           f"SELECT tokens.c, tokens.v, tokens.tok, coalesce(g.kind, {by_shape}) AS kind "
           "FROM tokens LEFT JOIN _zq_gov_personal_values AS g ON tokens.tok = g.value) "
           "WHERE kind IS NOT NULL GROUP BY c, kind ORDER BY c, kind")
    params = {"zq_partition": d} if "$zq_partition" in sql else {}
    ops_con.register("_zq_gov_personal_values", values)
    try:
        for c, kind, rows, sample in ops_con.execute(sql, params).fetchall():
            schema, table, column, _ = planned[c][0]
            leaks.append(Leak(table=f"{schema}.{table}", column=column, kind=kind, rows=rows,
                              sample=_mask_sample(sample)))
    finally:
        ops_con.unregister("_zq_gov_personal_values")
    return leaks
