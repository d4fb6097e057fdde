{#- dbt's `relationships`, as of each row's partition day: the value must exist in `to` on that day or before it.
    The same answer whether the day is built alone, in a range build or re-run after later days (a plain
    `relationships` also saw the later days of the parent), and the failures keep their `_partition_date`. -#}
{% test zq_relationship(model, column_name, to, field) %}
    with child as (
        select _partition_date, {{ column_name }} as from_field
        from {{ model }}
        where {{ column_name }} is not null
    )
    select child._partition_date, child.from_field
    from child
    where not exists (select 1 from {{ to }} parent
                      where parent.{{ field }} = child.from_field
                        and cast(parent._partition_date as date) <= cast(child._partition_date as date))
{% endtest %}
