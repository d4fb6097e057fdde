-- generated from the registry by zqdata/reference.py (python -m zqdata.reference); do not edit
with source as (

    select * from {{ source('ods', 'social_insurance') }}
    where {{ zq_in_partition('_partition_date') }}

),

final as (

    select
        {{ zq_clean('record_id') }}              as record_id,
        {{ zq_clean_upper('credit_code') }}      as credit_code,
        {{ zq_clean('district_code') }}          as district_code,
        {{ zq_to_year_month('period') }}         as period,
        {{ zq_to_integer('insured_headcount') }} as insured_headcount,
        {{ zq_to_decimal('contribution_yuan') }} as contribution_yuan,
        {{ zq_to_timestamp('paid_at') }}         as paid_at,
        {{ zq_lineage_columns() }}
    from source

)

select * from final
