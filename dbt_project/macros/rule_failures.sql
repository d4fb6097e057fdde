{#- The failing rows of one rule on one staging relation, WITH lineage: the shape every generic test returns and the
    set the intermediate models exclude. Columns: _lineage_id, _agency, _dataset, _delivery_file, _row_number,
    _partition_date, field, value. -#}

{% macro zq_failure_columns(field, value_sql) -%}
    _lineage_id, _agency, _dataset, _delivery_file, _row_number, _partition_date,
    '{{ field }}' as field, cast({{ value_sql }} as varchar) as value
{%- endmacro %}

{% macro zq_rule_failures(relation, column_name, rule, kw) -%}
    {%- if rule == 'standard_format' -%}
        {#- reads the ODS (the value as delivered) because staging holds the normalized value -#}
        select {{ zq_failure_columns(column_name, column_name) }}
        from {{ source('ods', kw['dataset']) }}
        where {{ zq_in_partition('_partition_date') }}
          and _lineage_id in (select _lineage_id from {{ relation }})
          and not {{ zq_is_standard_format(column_name, kw['kind']) }}
    {%- elif rule == 'duplicate_key' -%}
        {{ zq_duplicate_key_failures(relation, kw['columns']) }}
    {%- elif rule == 'registry_reference' -%}
        {{ zq_registry_reference_failures(relation, column_name) }}
    {%- elif rule == 'registry_district' -%}
        {{ zq_registry_district_failures(relation, column_name, kw['credit_column']) }}
    {%- else -%}
        {%- if rule == 'citizen_id' -%}{%- set ok = zq_is_valid_citizen_id(column_name) -%}
        {%- elif rule == 'uscc' -%}{%- set ok = zq_is_valid_uscc(column_name) -%}
        {%- elif rule == 'mobile' -%}{%- set ok = zq_is_valid_mobile(column_name) -%}
        {%- elif rule == 'district' -%}{%- set ok = zq_is_valid_district(column_name) -%}
        {%- elif rule == 'district_level' -%}{%- set ok = zq_is_county_level_district(column_name) -%}
        {#- cross-field rules: `columns` names the one field the value is compared with (the GB 11643 ID) -#}
        {%- elif rule == 'citizen_id_birth_date' -%}{%- set ok = zq_is_id_birth_date_consistent(column_name, zq_compared_column(kw)) -%}
        {%- elif rule == 'citizen_id_sex' -%}{%- set ok = zq_is_id_sex_consistent(column_name, zq_compared_column(kw)) -%}
        {%- elif rule == 'code_table' -%}{%- set ok = zq_is_in_code_table(column_name, kw['code_table']) -%}
        {%- elif rule == 'range' -%}{%- set ok = zq_is_in_range(column_name, kw['dataset'], column_name) -%}
        {%- elif rule == 'event_in_day' -%}{%- set ok = zq_is_in_partition_day(column_name) -%}
        {%- elif rule == 'required' -%}{%- set ok = zq_is_present(column_name) -%}
        {%- else -%}{{ exceptions.raise_compiler_error("zq_rule: 未知规则 unknown rule " ~ rule) }}
        {%- endif -%}
        select {{ zq_failure_columns(column_name, column_name) }}
        from {{ relation }}
        where not {{ ok }}
    {%- endif -%}
{%- endmacro %}

{% macro zq_compared_column(kw) -%}
    {%- if not kw.get('columns') or kw['columns'] | length != 1 -%}
        {{ exceptions.raise_compiler_error("zq_rule: 跨字段规则须以 columns 指定一个比对字段 a cross-field rule needs one column in `columns`") }}
    {%- endif -%}
    {{ kw['columns'][0] }}
{%- endmacro %}

{% macro zq_duplicate_key_failures(relation, columns) -%}
    {#- 一致性: every row sharing its primary key with another row of its partition day (none of them can be trusted) -#}
    select {{ zq_failure_columns(columns | join('+'), "concat_ws('|', " ~ (columns | join(', ')) ~ ")") }}
    from (
        select *, count(*) over (partition by _partition_date, {{ columns | join(', ') }}) as _key_rows
        from {{ relation }}
        where {% for c in columns %}{{ c }} is not null{{ ' and ' if not loop.last }}{% endfor %}
    ) keyed
    where _key_rows > 1
{%- endmacro %}

{% macro zq_registry_as_of(relation) -%}
    {#- the enterprise registry as of each partition day of `relation` (`_as_of_day`): the latest valid daily snapshot
        on or before that day. Per row's day, so a range build judges each day as that day's own build did. -#}
    (select snap._as_of_day, r.credit_code, r.district_code
     from (select d._as_of_day, max(s._partition_date) as _snapshot
           from (select distinct cast(_partition_date as date) as _as_of_day from {{ relation }}) d
           join (select distinct _partition_date from {{ ref('int_enterprise_registry') }}) s
             on s._partition_date <= d._as_of_day
           group by d._as_of_day) snap
     join {{ ref('int_enterprise_registry') }} r on r._partition_date = snap._snapshot)
{%- endmacro %}

{% macro zq_registry_reference_failures(relation, column_name) -%}
    {#- 一致性: the credit code must be a (valid) enterprise of the day's registry -#}
    select {{ zq_failure_columns(column_name, column_name) }}
    from (select * from {{ relation }}) t
    where {{ column_name }} is not null
      and not exists (select 1 from {{ zq_registry_as_of(relation) }} registry
                      where registry._as_of_day = cast(t._partition_date as date)
                        and registry.credit_code = t.{{ column_name }})
{%- endmacro %}

{% macro zq_registry_district_failures(relation, column_name, credit_column) -%}
    {#- 一致性: the district agrees with the registry's district for the same credit code -#}
    select {{ zq_failure_columns(column_name, "t." ~ column_name ~ " || ' ≠ ' || registry.district_code") }}
    from (select * from {{ relation }}) t
    join {{ zq_registry_as_of(relation) }} registry
      on registry.credit_code = t.{{ credit_column }} and registry._as_of_day = cast(t._partition_date as date)
    where t.{{ column_name }} is not null and t.{{ column_name }} <> registry.district_code
{%- endmacro %}

{% macro zq_error_failures(staging_model) -%}
    {#- lineage ids of the partition's rows failing any error-severity zq_rule test attached to `staging_model`
        (read from the project graph, so the tests in the .yml are the only list of rules) -#}
    {%- set parts = [] -%}
    {%- if execute -%}
        {%- set relation = "(select * from " ~ ref(staging_model) ~ " where " ~ zq_in_partition('_partition_date') ~ ")" -%}
        {%- for node in graph.nodes.values() -%}
            {%- set tm = node.get('test_metadata') or {} -%}
            {%- set meta = (node.get('config') or {}).get('meta') or node.get('meta') or {} -%}
            {%- if node.resource_type == 'test' and tm.get('name') == 'zq_rule'
                  and node.get('attached_node') == 'model.zhaoqing.' ~ staging_model and meta.get('severity') == 'error' -%}
                {%- set kw = tm.get('kwargs') -%}
                {%- do parts.append(zq_rule_failures(relation, kw.get('column_name'), kw.get('rule'), kw)) -%}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {%- if parts -%}
        {%- for p in parts %}
        select _lineage_id from ({{ p }}) f{{ loop.index }}
        {{ 'union' if not loop.last }}
        {%- endfor -%}
    {%- else -%}
        select cast(null as varchar) as _lineage_id where false
    {%- endif -%}
{%- endmacro %}
