{#- Incremental strategy `zq_replace_partition` (dbt_project.yml, every model): a run REPLACES its partition.

    The target's rows of the run's partition (its days: zq_in_partition) are always deleted, then the new rows inserted, so
    a redelivery with fewer rows, or none at all, leaves exactly the new rows downstream. dbt's delete+insert by
    unique_key deletes only the keys present in the new batch: an empty batch deleted nothing and the earlier rows
    stayed (issue 12, finding 5).

    A row of another partition in the new batch fails the run (DuckDB `error()`): a model builds its own partition only.
    Called by the incremental materialization (dbt resolves `incremental_strategy: zq_replace_partition` to this macro),
    not by the models: no hook, no query while compiling. -#}
{% macro get_incremental_zq_replace_partition_sql(arg_dict) -%}
    {%- set target = arg_dict['target_relation'] -%}
    {%- set source = arg_dict['temp_relation'] -%}
    {%- set dest_cols_csv = get_quoted_csv(arg_dict['dest_columns'] | map(attribute='name')) -%}
    {%- set start, end = zq_partition_range() -%}
    {%- set days = start if start == end else start ~ '..' ~ end -%}
    select error('模型 {{ target }} 的新数据含分区 {{ days }} 以外的行 (rows outside the run''s partition)')
    from {{ source }}
    where not coalesce({{ zq_in_partition('_partition_date') }}, false);

    delete from {{ target }} where {{ zq_in_partition('_partition_date') }};

    insert into {{ target }} ({{ dest_cols_csv }})
    (select {{ dest_cols_csv }} from {{ source }})
{%- endmacro %}
