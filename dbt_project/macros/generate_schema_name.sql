{#- Schemas are named exactly as configured (staging, intermediate, products, dq_audit): the layout in ARCHITECTURE.md. -#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {%- if custom_schema_name is none -%}{{ target.schema }}{%- else -%}{{ custom_schema_name | trim }}{%- endif -%}
{%- endmacro %}
