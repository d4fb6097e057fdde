{#- Incremental strategy `zq_replace_partition` (dbt_project.yml: every model on the lake targets; `zq_partition` below
    on a DuckDB file): a run REPLACES its partition.

    The target's rows of the run's partition (its days: zq_in_partition) are always deleted, then the new rows inserted, so
    a redelivery with fewer rows, or none at all, leaves exactly the new rows downstream. dbt's delete+insert by
    unique_key deletes only the keys present in the new batch: an empty batch deleted nothing and the earlier rows
    stayed (issue 12, finding 5).

    A row of another partition in the new batch fails the run (DuckDB `error()`): a model builds its own partition only.
    Called by the incremental materialization (dbt resolves `incremental_strategy: zq_replace_partition` to this macro),
    not by the models: no hook, no query while compiling. DuckLake keeps dbt-duckdb's temp table: the transaction that
    deletes and inserts stays short there, where concurrent partitions' commits can conflict (zqdata/lakes.py). -#}
{% macro get_incremental_zq_replace_partition_sql(arg_dict) -%}
    {%- set target = arg_dict['target_relation'] -%}
    {%- set source = arg_dict['temp_relation'] -%}
    {%- set dest_cols_csv = get_quoted_csv(arg_dict['dest_columns'] | map(attribute='name')) -%}
    select error({{ zq_outside_partition_message(target) }})
    from {{ source }}
    where not coalesce({{ zq_in_partition('_partition_date') }}, false);

    delete from {{ target }} where {{ zq_in_partition('_partition_date') }};

    insert into {{ target }} ({{ dest_cols_csv }})
    (select {{ dest_cols_csv }} from {{ source }})
{%- endmacro %}

{#- Materialization `zq_partition` (dbt_project.yml: every model on a DuckDB file; the lake targets keep dbt-duckdb's
    `incremental` with the strategy above). The same contract as `zq_replace_partition` -- the run's days are deleted,
    then its rows inserted; a row of another day fails the run and nothing changes -- without the temporary copy:
    dbt-duckdb's incremental writes the whole new batch to a temp table first, then copies it into the target, two writes
    of every row (issue 15: +1.3 to 2 s on three models at 1 M rows/day, and the day after a year is incremental where a
    first day is one CREATE). Here the model's query is inserted straight into the target, in the run's transaction.

    The new batch's columns come from a temp table of none of its rows (`limit 0`): dbt's `process_schema_changes`
    applies `on_schema_change` (append_new_columns) to the target as the incremental materialization does. -#}
{% materialization zq_partition, adapter='duckdb', supported_languages=['sql'] -%}
  {%- set existing = load_cached_relation(this) -%}
  {%- set target = this.incorporate(type='table') -%}
  {{ run_hooks(pre_hooks, inside_transaction=False) }}
  {{ run_hooks(pre_hooks, inside_transaction=True) }}
  {%- if existing is not none and (existing.is_view or should_full_refresh()) -%}
    {% do adapter.drop_relation(existing) %}
    {%- set existing = none -%}
  {%- endif -%}
  {%- if existing is none -%}
    {%- set build_sql = create_table_as(False, target, compiled_code) -%}
  {%- else -%}
    {%- set probe = make_temp_relation(target, '__zq_columns') -%}
    {% do run_query(create_table_as(True, probe, 'select * from (\n' ~ compiled_code ~ '\n) limit 0')) %}
    {%- set on_schema_change = incremental_validate_on_schema_change(config.get('on_schema_change'), default='ignore') -%}
    {%- set dest_columns = process_schema_changes(on_schema_change, probe, existing)
                           or adapter.get_columns_in_relation(existing) -%}
    {% do adapter.drop_relation(probe) %}
    {%- set build_sql = zq_replace_partition_from_query(target, compiled_code, dest_columns) -%}
  {%- endif -%}
  {% call statement('main') %}{{ build_sql }}{% endcall %}
  {{ run_hooks(post_hooks, inside_transaction=True) }}
  {% do adapter.commit() %}
  {{ run_hooks(post_hooks, inside_transaction=False) }}
  {{ return({'relations': [target]}) }}
{%- endmaterialization %}

{#- SQL: replace the run's days of `target` by the rows of `query` (its `dest_columns`); a row of another day raises. -#}
{% macro zq_replace_partition_from_query(target, query, dest_columns) -%}
    {%- set cols = get_quoted_csv(dest_columns | map(attribute='name')) -%}
    delete from {{ target }} where {{ zq_in_partition('_partition_date') }};

    insert into {{ target }} ({{ cols }})
    select {{ cols }} from (
{{ query }}
    ) as zq_new
    where case when coalesce({{ zq_in_partition('_partition_date') }}, false) then true
               else error({{ zq_outside_partition_message(target) }}) end
{%- endmacro %}

{% macro zq_outside_partition_message(target) -%}
    {%- set start, end = zq_partition_range() -%}
    {%- set days = start if start == end else start ~ '..' ~ end -%}
    '模型 {{ target }} 的新数据含分区 {{ days }} 以外的行 (rows outside the run''s partition)'
{%- endmacro %}
