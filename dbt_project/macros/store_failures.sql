{#- Materialization `test` on DuckDB (every data test: dbt_project.yml stores their failures in dq_audit, which the
    quality findings read back to the failing rows). The same contract as dbt's default test materialization -- the
    failing rows of this build replace the test's dq_audit table, then one count over that table gives the result --
    in ONE statement per test instead of dbt's lookup, `drop ... cascade`, BEGIN, `create table`, COMMIT:
    `create or replace` is atomic in DuckDB and in DuckLake, so a reader sees the old table or the new one, never
    none. A data test's time at a small night is dbt's own per-statement machinery (a 1,000-row day: 143 tests,
    13.0 s -> 9.7 s of the gov build on the 2-core bench machine; docs/benchmark.md), not the query.
    An object of another type under the test's name (a `store_failures_as` changed between builds) is dropped first,
    as dbt does. Without store_failures the test's query runs as it is. The count (a read) runs outside a transaction
    (auto_begin=False): DuckDB runs each statement in its own, so dbt's BEGIN before it and ROLLBACK when the node
    releases its connection were two statements more per test for nothing (~0.9 s of a 1,000-row night's gov build,
    bench/notes.md 17).
    On the gov platform the step drops the (empty) tables of the tests that passed in the whole build once it has read
    them (zqdata.quality.dbt_findings.drop_failure_tables): dq_audit then holds the failing rows of the tests that found
    some, and every gov connection loads a catalog a third of the size (bench/notes.md 18). -#}
{%- materialization test, adapter='duckdb' -%}
  {% set relations = [] %}
  {% set sql_header = config.get('sql_header') if flags.REQUIRE_SQL_HEADER_IN_TEST_CONFIGS else none %}
  {% set sql_with_limit %}{{ get_limit_subquery_sql(sql, config.get('limit')) }}{% endset %}

  {% if should_store_failures() %}
    {% set store_failures_as = config.get('store_failures_as') or 'table' %}
    {% if store_failures_as not in ['table', 'view'] %}
      {{ exceptions.raise_compiler_error("'" ~ store_failures_as ~ "' is not a valid value for `store_failures_as`. "
                                         "Accepted values are: ['ephemeral', 'table', 'view']") }}
    {% endif %}
    {% set target_relation = api.Relation.create(identifier=model['alias'], schema=schema, database=database,
                                                 type=store_failures_as) %}
    {% set old_relation = adapter.get_relation(database=database, schema=schema, identifier=model['alias']) %}
    {% if old_relation and old_relation.type != target_relation.type %}
      {% do adapter.drop_relation(old_relation) %}
    {% endif %}
    {% call statement(auto_begin=False) %}
      {% if sql_header %}{{ sql_header }}{% endif %}
      create or replace {{ store_failures_as }} {{ target_relation }} as (
        {{ sql_with_limit }}
      )
    {% endcall %}
    {% do relations.append(target_relation) %}
    {% set main_sql %}select * from {{ target_relation }}{% endset %}
  {% else %}
    {% set main_sql = sql_with_limit %}
  {% endif %}

  {% call statement('main', fetch_result=True, auto_begin=False) -%}
    {% if sql_header %}{{ sql_header }}{% endif %}
    {{ get_test_sql(main_sql, config.get('fail_calc'), config.get('warn_if'), config.get('error_if'), limit=none) }}
  {%- endcall %}

  {{ return({'relations': relations}) }}
{%- endmaterialization -%}
