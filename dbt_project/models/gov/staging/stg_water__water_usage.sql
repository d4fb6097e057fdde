-- generated from the registry by zqdata/reference.py (python -m zqdata.reference); do not edit
with source as (

    select * from {{ source('ods', 'water_usage') }}
    where {{ zq_in_partition('_partition_date') }}

),

final as (

    select
        {{ zq_clean('meter_id') }}          as meter_id,
        {{ zq_clean_upper('credit_code') }} as credit_code,
        {{ zq_clean('district_code') }}     as district_code,
        {{ zq_to_date('reading_date') }}    as reading_date,
        {{ zq_to_decimal('cubic_meters') }} as cubic_meters,
        {{ zq_lineage_columns() }}
    from source

)

select * from final
