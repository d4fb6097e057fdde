{#- Materialization `test` on DuckDB (every data test: dbt_project.yml stores their failures in dq_audit, which the
    quality findings read back to the failing rows). dbt's contract -- the result is the count of the test's failing
    rows, and the test's dq_audit table holds the failing rows of its last build -- with less per test than dbt's
    lookup, `drop ... cascade`, BEGIN, `create table`, COMMIT, count (a data test's time at a small night is dbt's
    per-statement machinery and DuckDB's catalog writes, not the query; bench/notes.md 17-19):
    - First whether the test finds any row: its query with LIMIT 1 (DuckDB stops at the first row), counted as dbt
      counts, outside a transaction (auto_begin=False: DuckDB runs each statement in its own; dbt's BEGIN and ROLLBACK
      were two statements more per test for nothing).
    - None: that count (0) is the result; nothing is written, and the test's table from an earlier build (that build's
      failing rows) is dropped. dq_audit never holds an empty table: ~140 of a 1,000-row night's 143 gov tests pass,
      and their empty tables were 2/3 of the gov file's catalog, which every connection loads and every checkpoint
      rewrites (bench/notes.md 18), each a DDL statement in the build (bench/notes.md 19). A missing table reads as no
      failure (zqdata.quality.dbt_findings.collect_dbt_findings, a range's assets.dbt_common.failures_by_day).
    - Some: the rows are stored with ONE `create or replace table` (atomic in DuckDB and in DuckLake: a reader sees the
      old table or the new one, never none; the query's one full evaluation), and dbt's count over the stored rows is
      the result (at 10 M rows a day ~45 of the tests fail; counting first and storing after evaluated their queries
      twice).
    - Another `fail_calc` (the probe's count says nothing of it): dbt's order, stored then counted over the table.
    - `store_failures_as: view`: the view is replaced and the count reads it (a view costs no data).
    An object of another type under the test's name (a `store_failures_as` changed between builds) is dropped first,
    as dbt does. Without store_failures the test's query is counted as it is. -#}
{%- materialization test, adapter='duckdb' -%}
  {% set relations = [] %}
  {% set sql_header = config.get('sql_header') if flags.REQUIRE_SQL_HEADER_IN_TEST_CONFIGS else none %}
  {% set sql_with_limit %}{{ get_limit_subquery_sql(sql, config.get('limit')) }}{% endset %}
  {% set main_sql = sql_with_limit %}
  {% set stored_as = none %}

  {% if should_store_failures() %}
    {% set stored_as = config.get('store_failures_as') or 'table' %}
    {% if stored_as not in ['table', 'view'] %}
      {{ exceptions.raise_compiler_error("'" ~ stored_as ~ "' is not a valid value for `store_failures_as`. "
                                         "Accepted values are: ['ephemeral', 'table', 'view']") }}
    {% endif %}
    {% set target_relation = api.Relation.create(identifier=model['alias'], schema=schema, database=database,
                                                 type=stored_as) %}
    {% set old_relation = adapter.get_relation(database=database, schema=schema, identifier=model['alias']) %}
    {% if old_relation and old_relation.type != target_relation.type %}
      {% do adapter.drop_relation(old_relation) %}
      {% set old_relation = none %}
    {% endif %}
    {% if stored_as == 'view' %}
      {% do zq_store_failures(target_relation, sql_with_limit, sql_header) %}
      {% do relations.append(target_relation) %}
      {% set main_sql %}select * from {{ target_relation }}{% endset %}
    {% endif %}
  {% endif %}

  {#- With its failures stored in a table and dbt's count as the result: first whether the test finds any row at all
      (LIMIT 1: it stops at the first), the rows evaluated once more only when it does -#}
  {% set probe = stored_as == 'table' and (config.get('fail_calc') or 'count(*)') | trim | lower == 'count(*)' %}
  {% if stored_as == 'table' and not probe %}  {#- another fail_calc: dbt's order, the count over the stored rows -#}
    {% do zq_store_failures(target_relation, sql_with_limit, sql_header) %}
    {% do relations.append(target_relation) %}
    {% set main_sql %}select * from {{ target_relation }}{% endset %}
  {% elif probe %}
    {% set main_sql %}select * from ({{ sql_with_limit }}) as zq_probe limit 1{% endset %}
  {% endif %}

  {% do zq_test_result(main_sql, sql_header) %}

  {% if probe %}
    {% set found = load_result('main')['table'].rows[0][0] %}
    {% if found is none or found != 0 %}  {#- failing rows: stored, then dbt's count over them is the result -#}
      {% do zq_store_failures(target_relation, sql_with_limit, sql_header) %}
      {% do relations.append(target_relation) %}
      {% set stored_sql %}select * from {{ target_relation }}{% endset %}
      {% do zq_test_result(stored_sql, sql_header) %}
    {% elif old_relation %}  {#- none: an earlier build's failing rows must not stay -#}
      {% do adapter.drop_relation(old_relation) %}
    {% endif %}
  {% endif %}

  {{ return({'relations': relations}) }}
{%- endmaterialization -%}


{#- The test's failing rows as `relation` (a table or a view, its type), replacing what was there: one statement. -#}
{% macro zq_store_failures(relation, sql, sql_header) %}
  {% call statement(auto_begin=False) %}
    {% if sql_header %}{{ sql_header }}{% endif %}
    create or replace {{ relation.type }} {{ relation }} as (
      {{ sql }}
    )
  {% endcall %}
{% endmacro %}


{#- The test's result as dbt reads it (statement 'main': failures, should_warn, should_error) over `sql`. -#}
{% macro zq_test_result(sql, sql_header) %}
  {% call statement('main', fetch_result=True, auto_begin=False) -%}
    {% if sql_header %}{{ sql_header }}{% endif %}
    {{ get_test_sql(sql, config.get('fail_calc'), config.get('warn_if'), config.get('error_if'), limit=none) }}
  {%- endcall %}
{% endmacro %}
