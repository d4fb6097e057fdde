{#- k-anonymity (GB/T 37964): no published group may describe fewer than k distinct subjects. -#}
{% test zq_k_anonymity(model, column_name, k) %}
    select *
    from {{ model }}
    where {{ column_name }} < {{ k }}
{% endtest %}
