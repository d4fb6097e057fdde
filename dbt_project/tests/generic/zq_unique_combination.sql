{#- Composite primary keys must be unique within each partition day (relational rule on intermediate models and
    products); the failures keep their `_partition_date`, so a range build reports each day on its own. -#}
{% test zq_unique_combination(model, columns) %}
    select _partition_date, {{ columns | join(', ') }}, count(*) as n_records
    from {{ model }}
    group by _partition_date, {{ columns | join(', ') }}
    having count(*) > 1
{% endtest %}
