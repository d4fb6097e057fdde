{#- The partition being built, 'YYYY-MM-DD' (the one place models, tests and macros get it from).
    Dagster passes it in the environment (ZQ_PARTITION_DATE, set for the dbt subprocess only). It is read at execution
    time only, never while parsing, so a new night changes nothing dbt parses: partial parsing survives from night to
    night (a changed --vars value would make dbt re-parse the whole project). Without the variable (manual runs, tests)
    the `partition_date` var applies: --vars or the dbt_project.yml default. -#}
{% macro zq_partition_date() -%}
    {%- set day = var('partition_date') | string -%}
    {%- if execute -%}
        {%- set day = env_var('ZQ_PARTITION_DATE', '') or day -%}
    {%- endif -%}
    {%- if not modules.re.fullmatch('[0-9]{4}-[0-9]{2}-[0-9]{2}', day) -%}
        {{- exceptions.raise_compiler_error("partition_date must be YYYY-MM-DD, got '" ~ day ~ "'") -}}
    {%- endif -%}
    {{- return(day) -}}
{%- endmacro %}
