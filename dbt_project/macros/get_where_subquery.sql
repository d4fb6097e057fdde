{#- dbt's `where` test config, with `__zq_partition__` replaced by the build's partition filter (zq_in_partition) when
    the test runs: one day, or each day of a range build, whose failures then keep their own `_partition_date`. -#}
{% macro get_where_subquery(relation) -%}
    {%- set where = config.get('where') -%}
    {%- if where -%}
        {%- set where = where | replace('__zq_partition__', zq_in_partition('_partition_date')) -%}
        {%- set filtered -%}
            (select * from {{ relation }} where {{ where }}) dbt_subquery
        {%- endset -%}
        {%- do return(filtered) -%}
    {%- else -%}
        {%- do return(relation) -%}
    {%- endif -%}
{%- endmacro %}
