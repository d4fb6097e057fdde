{#- Row-level quality rules (Art. 20), ONE macro each. A predicate returns TRUE when the value passes; NULL values pass
    every rule except zq_is_present (absence is the completeness rule's business). The same macros are used by the
    generic test `zq_rule` (findings) and by the intermediate models (exclusion of error-severity rows). -#}

{% macro zq_is_valid_citizen_id(col) -%}
    {#- GB 11643: 17 digits + check char "10X98765432"[S mod 11], real birth date not in the future -#}
    {%- set weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2] -%}
    ({{ col }} is null or coalesce(
        regexp_full_match({{ col }}, '[0-9]{17}[0-9X]')
        and try_strptime(substr({{ col }}, 7, 8), '%Y%m%d') is not null
        and substr({{ col }}, 7, 8) <= strftime(current_date, '%Y%m%d')
        and substr('10X98765432', ((
            {%- for w in weights %}{{ '+ ' if not loop.first }}try_cast(substr({{ col }}, {{ loop.index }}, 1) as integer) * {{ w }} {% endfor -%}
        ) % 11) + 1, 1) = substr({{ col }}, 18, 1), false))
{%- endmacro %}

{% macro zq_is_valid_uscc(col) -%}
    {#- GB 32100: alphabet 0-9 A-Y without I O S V Z; weights 3^(i-1) mod 31; C = 31 - S mod 31, 31 -> 0 -#}
    {%- set alphabet = '0123456789ABCDEFGHJKLMNPQRTUWXY' -%}
    {%- set weights = [1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28] -%}
    ({{ col }} is null or coalesce(
        regexp_full_match({{ col }}, '[0-9ABCDEFGHJKLMNPQRTUWXY]{18}')
        and substr('{{ alphabet }}', ((31 - ((
            {%- for w in weights %}{{ '+ ' if not loop.first }}(strpos('{{ alphabet }}', substr({{ col }}, {{ loop.index }}, 1)) - 1) * {{ w }} {% endfor -%}
        ) % 31)) % 31) + 1, 1) = substr({{ col }}, 18, 1), false))
{%- endmacro %}

{% macro zq_is_valid_mobile(col) -%}
    ({{ col }} is null or regexp_full_match({{ col }}, '1[3-9][0-9]{9}'))
{%- endmacro %}

{% macro zq_is_in_code_table(col, code_table) -%}
    {#- code tables are synced from the registry into ref.code_tables (zqdata/reference.py), never copied here -#}
    ({{ col }} is null or {{ col }} in (
        select code from {{ source('ref', 'code_tables') }} where table_name = '{{ code_table }}'))
{%- endmacro %}

{% macro zq_is_valid_district(col) -%}
    {{ zq_is_in_code_table(col, 'district') }}
{%- endmacro %}

{% macro zq_is_county_level_district(col) -%}
    {#- 准确性 (GB/T 2260 level): a field documented as 区县代码 holds a county-level code, not the prefecture 4412**00**.
        Only codes of the Zhaoqing table are judged: any other code already fails zq_is_valid_district. -#}
    ({{ col }} is null or {{ col }} not in (
        select code from {{ source('ref', 'code_tables') }} where table_name = 'district') or substr({{ col }}, 5, 2) <> '00')
{%- endmacro %}

{% macro zq_is_id_birth_date_consistent(col, id_col) -%}
    {#- 一致性: the record's birth date is the one GB 11643 encodes in digits 7–14 of its citizen ID. A malformed ID or
        one whose digits are no real date is the citizen_id rule's finding and is not judged again here. -#}
    ({{ col }} is null or {{ id_col }} is null or not regexp_full_match({{ id_col }}, '[0-9]{17}[0-9X]')
     or try_strptime(substr({{ id_col }}, 7, 8), '%Y%m%d') is null
     or strftime(cast({{ col }} as date), '%Y%m%d') = substr({{ id_col }}, 7, 8))
{%- endmacro %}

{% macro zq_is_id_sex_consistent(col, id_col) -%}
    {#- 一致性: the GB/T 2261.1 sex code 1 男 / 2 女 agrees with the 17th digit of the GB 11643 ID (odd 男, even 女).
        Codes outside 1/2 are the code-table rule's business, a malformed ID the citizen_id rule's. -#}
    ({{ col }} is null or {{ id_col }} is null or {{ col }} not in ('1', '2')
     or not regexp_full_match({{ id_col }}, '[0-9]{17}[0-9X]')
     or {{ col }} = case when try_cast(substr({{ id_col }}, 17, 1) as integer) % 2 = 1 then '1' else '2' end)
{%- endmacro %}

{% macro zq_is_in_range(col, dataset, field) -%}
    {#- bounds from the registry field `range` (ref.fields); negative amounts fail through min = 0 -#}
    ({{ col }} is null or (
        {{ col }} >= coalesce((select range_min from {{ source('ref', 'fields') }}
                               where dataset = '{{ dataset }}' and field = '{{ field }}'), {{ col }})
        and {{ col }} <= coalesce((select range_max from {{ source('ref', 'fields') }}
                                  where dataset = '{{ dataset }}' and field = '{{ field }}'), {{ col }})))
{%- endmacro %}

{% macro zq_is_in_partition_day(col) -%}
    {#- 时效性: the event happened on its row's partition day (Beijing time; staging already converted to Asia/Shanghai) -#}
    ({{ col }} is null or cast({{ col }} as date) = cast(_partition_date as date))
{%- endmacro %}

{% macro zq_is_present(col) -%}
    {#- 完整性: staging turns blank-after-trim into NULL -#}
    ({{ col }} is not null)
{%- endmacro %}

{% macro zq_is_standard_format(col, kind) -%}
    {#- 规范性: the raw delivered value already uses the standard notation of the landing contract
        (zqdata.standards.STANDARD_DATE_FORMAT / STANDARD_TIMESTAMP_FORMAT); staging normalizes the others -#}
    {%- set patterns = {
        'date': '[0-9]{4}-[0-9]{2}-[0-9]{2}',
        'timestamp': '[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\+08:00',
        'decimal': '-?[0-9]+(\\.[0-9]+)?',
        'integer': '-?[0-9]+',
        'year_month': '[0-9]{4}-[0-9]{2}',
        'citizen_id': '[0-9]{17}[0-9X]',
        'uscc': '[0-9A-Z]{18}',
        'mobile': '[0-9]{11}',
        'district_code': '[0-9]{6}',
    } -%}
    {%- if kind not in patterns -%}
        {{ exceptions.raise_compiler_error("zq_is_standard_format: 未知格式 unknown kind " ~ kind) }}
    {%- endif -%}
    ({{ col }} is null or trim({{ col }}) = '' or regexp_full_match({{ col }}, '{{ patterns[kind] }}'))
{%- endmacro %}
