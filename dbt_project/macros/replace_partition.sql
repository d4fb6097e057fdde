{#- Incremental strategy `zq_replace_partition` (dbt_project.yml, every model): a run REPLACES its partition.

    The target's rows of the run's partition (zq_partition_date()) are always deleted, then the new rows inserted, so
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
    {%- set day = zq_partition_date() -%}
    select error('模型 {{ target }} 的新数据含分区 {{ day }} 以外的行 (rows outside the run''s partition)')
    from {{ source }}
    where cast(_partition_date as date) is distinct from date '{{ day }}';

    delete from {{ target }} where cast(_partition_date as date) = date '{{ day }}';

    insert into {{ target }} ({{ dest_cols_csv }})
    (select {{ dest_cols_csv }} from {{ source }})
{%- endmacro %}
