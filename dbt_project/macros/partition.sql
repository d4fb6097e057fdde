{#- The partition being built, 'YYYY-MM-DD' (the one place models, tests and macros get it from).
    Dagster passes it in the environment (ZQ_PARTITION_DATE, set for the dbt subprocess only). It is read at execution
    time only, never while parsing, so a new night changes nothing dbt parses: partial parsing survives from night to
    night (a changed --vars value would make dbt re-parse the whole project). Without the variable (manual runs, tests)
    the `partition_date` var applies: --vars or the dbt_project.yml default.

    A range build (issue 15: a backfill's gov models built once over its days) gets ZQ_PARTITION_START and
    ZQ_PARTITION_END instead. Models and tests that work row by row on their own day read the range through
    zq_partition_range() / zq_in_partition(); anything that still asks for the one day of the build fails to compile
    in a range build rather than silently reading only one day of it. -#}
{% macro zq_partition_date() -%}
    {%- set day = var('partition_date') | string -%}
    {%- if execute -%}
        {%- set day = env_var('ZQ_PARTITION_DATE', '') or day -%}
        {%- set start, end = env_var('ZQ_PARTITION_START', ''), env_var('ZQ_PARTITION_END', '') -%}
        {%- if start or end -%}
            {%- if start != end -%}
                {{- exceptions.raise_compiler_error("本节点按单日分区编写，不能在多日区间构建中运行 (this node reads one "
                    ~ "partition day; it cannot run in a range build " ~ start ~ ".." ~ end ~ ")") -}}
            {%- endif -%}
            {%- set day = start -%}
        {%- endif -%}
    {%- endif -%}
    {{- return(zq_checked_day(day)) -}}
{%- endmacro %}

{% macro zq_checked_day(day) -%}
    {%- if not modules.re.fullmatch('[0-9]{4}-[0-9]{2}-[0-9]{2}', day) -%}
        {{- exceptions.raise_compiler_error("partition_date must be YYYY-MM-DD, got '" ~ day ~ "'") -}}
    {%- endif -%}
    {{- return(day) -}}
{%- endmacro %}

{#- [first, last] day of the build: the range of a range build, else [day, day] of zq_partition_date(). -#}
{% macro zq_partition_range() -%}
    {%- if execute and (env_var('ZQ_PARTITION_START', '') or env_var('ZQ_PARTITION_END', '')) -%}
        {%- set start = zq_checked_day(env_var('ZQ_PARTITION_START', '')) -%}
        {%- set end = zq_checked_day(env_var('ZQ_PARTITION_END', '')) -%}
        {%- if start > end -%}
            {{- exceptions.raise_compiler_error("partition range ends before it starts: " ~ start ~ ".." ~ end) -}}
        {%- endif -%}
        {{- return([start, end]) -}}
    {%- endif -%}
    {%- set day = zq_partition_date() -%}
    {{- return([day, day]) -}}
{%- endmacro %}

{#- SQL: `column` (a date or 'YYYY-MM-DD') lies in the build's partition days. -#}
{% macro zq_in_partition(column) -%}
    {%- set start, end = zq_partition_range() -%}
    {%- if start == end -%}
        cast({{ column }} as date) = date '{{ start }}'
    {%- else -%}
        cast({{ column }} as date) between date '{{ start }}' and date '{{ end }}'
    {%- endif -%}
{%- endmacro %}
