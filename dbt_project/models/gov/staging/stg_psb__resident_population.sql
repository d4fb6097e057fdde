-- generated from the registry by zqdata/reference.py (python -m zqdata.reference); do not edit
with source as (

    select * from {{ source('ods', 'resident_population') }}
    where {{ zq_in_partition('_partition_date') }}

),

final as (

    select
        {{ zq_clean_upper('citizen_id') }}  as citizen_id,
        {{ zq_clean('name') }}              as name,
        {{ zq_clean('gender') }}            as gender,
        {{ zq_to_date('birth_date') }}      as birth_date,
        {{ zq_clean('phone') }}             as phone,
        {{ zq_clean('address') }}           as address,
        {{ zq_clean('district_code') }}     as district_code,
        {{ zq_clean('case_flag') }}         as case_flag,
        {{ zq_to_timestamp('updated_at') }} as updated_at,
        {{ zq_lineage_columns() }}
    from source

)

select * from final
