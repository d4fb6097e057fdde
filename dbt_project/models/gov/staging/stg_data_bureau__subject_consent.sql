-- generated from the registry by zqdata/reference.py (python -m zqdata.reference); do not edit
with source as (

    select * from {{ source('ods', 'subject_consent') }}
    where {{ zq_in_partition('_partition_date') }}

),

final as (

    select
        {{ zq_clean('consent_id') }}          as consent_id,
        {{ zq_clean('subject_type') }}        as subject_type,
        {{ zq_clean('subject_id') }}          as subject_id,
        {{ zq_clean('scenario_code') }}       as scenario_code,
        {{ zq_clean('status') }}              as status,
        {{ zq_to_timestamp('effective_at') }} as effective_at,
        {{ zq_lineage_columns() }}
    from source

)

select * from final
