"""dbt models that did not build for a partition: one failing model holds back its own dataset only (issue 12).

When `dbt build --target gov` fails on a model (an error, or skipped because a model it reads failed), the other
agencies' models have been built and tested. Instead of failing the whole step — which would stop every agency's path
to the operations platform — the gov step records the unbuilt models here, empties their partition (what is left there
was not rebuilt from this delivery and must not be mistaken for it), and the quality gate holds back their datasets
(`evaluate_gate`). Isolation applies only when every unbuilt model belongs to one registered dataset and at least one
model was built; anything else (dbt crashed, a shared model failed, nothing built) fails the step as before.

Messages are kept to their first line with quoted values removed: a conversion error may quote a delivered value.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import duckdb

from zqdata.registry import Registry
from zqdata.warehouse import relation_columns

NOT_BUILT = ("error", "skipped")  # dbt run_results statuses of a model that did not build
_DDL = """create table if not exists quality.model_failures (
    partition_date DATE, dataset VARCHAR, model VARCHAR, relation VARCHAR, status VARCHAR, message VARCHAR,
    run_id VARCHAR, recorded_at TIMESTAMPTZ)"""


@dataclass(frozen=True)
class UnbuiltModel:
    unique_id: str
    model: str
    relation: str  # schema.table in the gov DB
    status: str  # error | skipped (an upstream model failed)
    message: str  # scrubbed first line


def scrub_message(message: str | None, limit: int = 300) -> str:
    """The first line of a dbt/DuckDB error, quoted literals replaced by '…' (no delivered value is kept)."""
    line = next((ln.strip() for ln in (message or "").splitlines() if ln.strip()), "")
    line = re.sub(r"'(?:[^']|'')*'", "'…'", line)
    line = re.sub(r'"(?:[^"]|"")*"', '"…"', line) if "Conversion" in line or "convert" in line else line
    return line[:limit]


def unbuilt_models(run_results: Mapping[str, Any], manifest: Mapping[str, Any]) -> list[UnbuiltModel]:
    """The models of a dbt run that did not build (status error or skipped), from its run_results.json and manifest."""
    nodes = manifest.get("nodes", {})
    out = []
    for result in run_results.get("results", []):
        uid = result.get("unique_id", "")
        if not uid.startswith("model.") or result.get("status") not in NOT_BUILT:
            continue
        node = nodes.get(uid, {})
        relation = f"{node.get('schema', '')}.{node.get('alias') or node.get('name') or uid.rsplit('.', 1)[-1]}".lower()
        status = str(result.get("status"))
        message = scrub_message(result.get("message")) if status == "error" else "上游模型失败，未运行 (skipped: an upstream model failed)"
        out.append(UnbuiltModel(uid, uid.rsplit(".", 1)[-1], relation, status, message))
    return out


def lost_commit_race(run_results: Mapping[str, Any]) -> bool:
    """A model failed because a DuckLake refused its commit (a concurrent day committed to the same table first,
    ``zqdata.lakes.run_in_transaction``): not the data's fault. The step fails and runs again (its retry policy);
    nothing is held back for it."""
    def raced(message: str) -> bool:
        # a commit refused, or the first build of a model created by a concurrent day between dbt's check and its
        # CREATE TABLE (dbt then runs the incremental path on the next attempt)
        # DuckLake gave up after its own retries (`ducklake_max_retry_count`) when concurrent days committed snapshots
        # at once (the catalog's "duplicate key ... ducklake_snapshot_pkey"): found by the distributed equality test
        return ("transaction conflict" in message or ("catalog error" in message and "already exists" in message)
                or "failed to commit ducklake transaction" in message
                or ("duplicate key value" in message and "ducklake_" in message))

    return any(raced(str(r.get("message") or "").lower()) for r in run_results.get("results", []))


def isolable(unbuilt: Iterable[UnbuiltModel], registry: Registry, models_selected: int) -> dict[str, str] | None:
    """{model: dataset} when the failure can be confined to datasets; None when it cannot (the step must fail)."""
    from zqdata.quality.scores import dataset_of_model

    unbuilt = list(unbuilt)
    if not unbuilt or len(unbuilt) >= models_selected:
        return None  # nothing failed, or nothing was built: no other agency's path to keep
    datasets = {u.model: dataset_of_model(u.model, registry) for u in unbuilt}
    return None if any(d is None for d in datasets.values()) else datasets  # type: ignore[return-value]


def clear_model_failures(con: duckdb.DuckDBPyConnection, partition_date: dt.date) -> None:
    """Forget the partition's earlier failures: a new build of the partition decides afresh."""
    con.execute("create schema if not exists quality")
    con.execute(_DDL)
    con.execute("delete from quality.model_failures where partition_date = ?", [partition_date])


def record_model_failures(con: duckdb.DuckDBPyConnection, partition_date: dt.date, unbuilt: Iterable[UnbuiltModel],
                          datasets: Mapping[str, str], run_id: str,
                          now: dt.datetime | None = None) -> dict[str, int]:
    """Record the unbuilt models and empty their partition, in one transaction; {relation: rows removed}."""
    now = now or dt.datetime.now(dt.timezone.utc)
    removed: dict[str, int] = {}
    con.execute("begin")
    try:
        clear_model_failures(con, partition_date)
        for u in unbuilt:
            schema, table = u.relation.split(".", 1)
            has_partition = "_partition_date" in relation_columns(con, schema, table)
            if has_partition:
                (n,) = con.execute(f'delete from "{schema}"."{table}" where cast(_partition_date as date) = ?',
                                   [partition_date]).fetchone()
                removed[u.relation] = int(n)
            con.execute("insert into quality.model_failures values (?, ?, ?, ?, ?, ?, ?, ?)",
                        [partition_date, datasets[u.model], u.model, u.relation, u.status, u.message, run_id, now])
        con.execute("commit")
    except Exception:
        con.execute("rollback")
        raise
    return removed


def model_failure_reasons(con: duckdb.DuckDBPyConnection, partition_date: dt.date) -> dict[str, str]:
    """{dataset: why} for the datasets whose models did not build for the partition (read by the quality gate)."""
    if not relation_columns(con, "quality", "model_failures"):
        return {}
    rows = con.execute("""select dataset, string_agg(model || '（' || status || '：' || message || '）', '；' order by model)
                          from quality.model_failures where partition_date = ? group by dataset""",
                       [partition_date]).fetchall()
    return {d: f"dbt 模型未构建 model not built: {why}" for d, why in rows}
