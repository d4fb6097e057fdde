{#- Composite primary keys must be unique within the partition (relational rule on intermediate models). -#}
{% test zq_unique_combination(model, columns) %}
    select {{ columns | join(', ') }}, count(*) as n_records
    from {{ model }}
    group by {{ columns | join(', ') }}
    having count(*) > 1
{% endtest %}
