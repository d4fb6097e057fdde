{#- 规范性: parsing the formats the ingestion contract accepts into one standard type. All return NULL when unparseable
    (those rows were already quarantined at ingestion, so NULL here means the value was absent). -#}

{% macro zq_clean(col) -%}
    {#- trim, full-width digits/letters/punctuation to ASCII, blank -> NULL -#}
    nullif(trim(translate(cast({{ col }} as varchar),
        '０１２３４５６７８９Ｘｘ－／：．　', '0123456789Xx-/:. ')), '')
{%- endmacro %}

{% macro zq_clean_upper(col) -%}
    upper({{ zq_clean(col) }})
{%- endmacro %}

{% macro zq_to_date(col) -%}
    cast(try_strptime({{ zq_clean(col) }}, [
        '%Y-%m-%d', '%Y/%m/%d', '%Y%m%d', '%Y-%m-%d %H:%M:%S', '%Y/%m/%d %H:%M:%S', '%Y/%m/%d %H:%M',
        '%Y-%m-%d %H:%M', '%Y-%m-%dT%H:%M:%S']) as date)
{%- endmacro %}

{% macro zq_to_timestamp(col) -%}
    {#- Naive values are Beijing time; values with an offset are converted to Asia/Shanghai wall time. -#}
    case
        when regexp_matches({{ zq_clean(col) }}, '([+-][0-9]{2}:?[0-9]{2}|Z)$')
            then cast(timezone('Asia/Shanghai', try_strptime(replace({{ zq_clean(col) }}, 'Z', '+00:00'), [
                '%Y-%m-%dT%H:%M:%S%z', '%Y-%m-%d %H:%M:%S%z', '%Y-%m-%dT%H:%M:%S.%f%z', '%Y-%m-%d %H:%M:%S.%f%z'])) as timestamp)
        else try_strptime({{ zq_clean(col) }}, [
            '%Y-%m-%d %H:%M:%S', '%Y-%m-%dT%H:%M:%S', '%Y-%m-%d %H:%M:%S.%f', '%Y-%m-%dT%H:%M:%S.%f',
            '%Y/%m/%d %H:%M:%S', '%Y/%m/%d %H:%M', '%Y-%m-%d %H:%M', '%Y%m%d%H%M%S', '%Y%m%d %H:%M:%S',
            '%Y-%m-%d', '%Y/%m/%d', '%Y%m%d'])
    end
{%- endmacro %}

{% macro zq_to_decimal(col, precision=18, scale=4) -%}
    try_cast({{ zq_clean(col) }} as decimal({{ precision }}, {{ scale }}))
{%- endmacro %}

{% macro zq_to_integer(col) -%}
    try_cast({{ zq_clean(col) }} as bigint)
{%- endmacro %}

{% macro zq_to_year_month(col) -%}
    strftime(try_strptime({{ zq_clean(col) }}, ['%Y-%m', '%Y/%m', '%Y%m', '%Y-%m-%d', '%Y/%m/%d']), '%Y-%m')
{%- endmacro %}

{% macro zq_lineage_columns(relation_alias=none) -%}
    {%- set p = (relation_alias ~ '.') if relation_alias else '' -%}
    {{ p }}_lineage_id, {{ p }}_agency, {{ p }}_dataset, {{ p }}_delivery_file, {{ p }}_row_number,
    {{ p }}_batch_id, {{ p }}_ingested_at, cast({{ p }}_partition_date as date) as _partition_date
{%- endmacro %}
