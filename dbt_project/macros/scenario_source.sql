{#- 一场景一授权 (Art. 23): a scenario product reads a dataset only through this macro, and only the fields the registry
    authorizes for the scenario (dbt var `authorized_fields`, built by assets/dbt_common.py from registry/scenarios.yaml).
    An unlisted field is a compile error, so an unauthorized product never runs. -#}
{% macro scenario_source(scenario, dataset, columns) -%}
    {%- set relation = source('scenario_' ~ scenario, dataset) -%}
    {%- if execute -%}
        {%- set authorized = var('authorized_fields', {}) -%}
        {%- if authorized is string -%}{%- set authorized = fromjson(authorized) -%}{%- endif -%}
        {%- set allowed = (authorized.get(scenario) or {}).get(dataset) or [] -%}
        {%- for column in columns -%}
            {%- if column not in allowed -%}
                {{ exceptions.raise_compiler_error("场景 " ~ scenario ~ " 未授权字段 " ~ dataset ~ "." ~ column ~ " (unauthorized field)") }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    (select {{ columns | join(', ') }}, _lineage_id, _partition_date from {{ relation }})
{%- endmacro %}
