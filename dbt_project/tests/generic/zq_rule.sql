{#- One generic test for every row-level rule: returns the failing rows of the partition WITH lineage
    (`where` and `store_failures` come from dbt_project.yml; dimension/severity/rule id from the test's meta). -#}
{% test zq_rule(model, rule, column_name=none, dataset=none, code_table=none, kind=none, columns=none, credit_column=none) %}
    {{ zq_rule_failures(model, column_name, rule, {
        'dataset': dataset, 'code_table': code_table, 'kind': kind, 'columns': columns, 'credit_column': credit_column}) }}
{% endtest %}
