{#- dbt's `unique`, within each partition day: a daily snapshot (the enterprise registry, the resident population)
    holds each key once per day, and a range build (several days in one build) must judge each day on its own. The
    failures keep their `_partition_date` (one row per duplicated value and day, like `unique`'s). -#}
{% test zq_unique(model, column_name) %}
    select _partition_date, {{ column_name }} as unique_field, count(*) as n_records
    from {{ model }}
    where {{ column_name }} is not null
    group by _partition_date, {{ column_name }}
    having count(*) > 1
{% endtest %}
