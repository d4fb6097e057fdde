{#- A rule a scenario product imposes on its own rows (stricter than the big-data platform's), returning the failing
    product rows with `_source_lineage_ids`, so that a failure traces back to the agency's delivery and rows. -#}
{% test zq_product_rule(model, column_name, rule) %}
select {{ column_name }} as failing_value, _source_lineage_ids, _partition_date
from {{ model }}
where {{ column_name }} is not null
  and not (
    {%- if rule == 'uscc' %} {{ zq_is_valid_uscc(column_name) }}
    {%- else %} {{ exceptions.raise_compiler_error("zq_product_rule: unknown rule " ~ rule) }}
    {%- endif %})
{% endtest %}
