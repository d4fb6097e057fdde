{#- Materialization `test` on DuckDB (every data test: dbt_project.yml stores their failures in dq_audit, which the
    quality findings read back to the failing rows). dbt's contract -- the result is the count of the test's failing
    rows, and the test's dq_audit table holds the failing rows of its last build -- with less per test than dbt's
    lookup, `drop ... cascade`, BEGIN, `create table`, COMMIT, count (a data test's time at a small night is dbt's
    per-statement machinery and DuckDB's catalog writes, not the query; bench/notes.md 17-19):
    - The count runs first, on the test's query, outside a transaction (auto_begin=False: DuckDB runs each statement in
      its own, so dbt's BEGIN and ROLLBACK were two statements more per test for nothing).
    - A test that found failing rows (a count other than 0, or none) then stores them with ONE `create or replace
      table` (atomic in DuckDB and in DuckLake: a reader sees the old table or the new one, never none). The query
      runs twice for these few tests: nothing else writes the tested models while their tests run.
    - A test that found none stores nothing, and its table from an earlier build (that build's failures) is dropped:
      dq_audit holds the failing rows of the tests that found some, never an empty table. ~140 of a 1,000-row night's
      143 gov tests pass; their empty tables were 2/3 of the gov file's catalog, which every connection loads and
      every checkpoint rewrites (bench/notes.md 18), and each was a DDL statement in the build (bench/notes.md 19).
      A missing table reads as no failure (zqdata.quality.dbt_findings.collect_dbt_findings, a range's
      assets.dbt_common.failures_by_day).
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

  {% call statement('main', fetch_result=True, auto_begin=False) -%}
    {% if sql_header %}{{ sql_header }}{% endif %}
    {{ get_test_sql(main_sql, config.get('fail_calc'), config.get('warn_if'), config.get('error_if'), limit=none) }}
  {%- endcall %}

  {% if stored_as == 'table' %}
    {% set result = load_result('main')['table'] %}
    {% set failures = result.rows[0][0] if result.rows else none %}
    {% if failures is none or failures != 0 %}
      {% do zq_store_failures(target_relation, sql_with_limit, sql_header) %}
      {% do relations.append(target_relation) %}
    {% elif old_relation %}
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
