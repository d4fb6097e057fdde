-- generated from the registry by zqdata/reference.py (python -m zqdata.reference); do not edit
with source as (

    select * from {{ source('ods', 'enterprise_registry') }}
    where {{ zq_in_partition('_partition_date') }}

),

final as (

    select
        {{ zq_clean_upper('credit_code') }}    as credit_code,
        {{ zq_clean('ent_name') }}             as ent_name,
        {{ zq_clean('legal_rep_name') }}       as legal_rep_name,
        {{ zq_clean_upper('legal_rep_id') }}   as legal_rep_id,
        {{ zq_clean('district_code') }}        as district_code,
        {{ zq_to_decimal('reg_capital_wan') }} as reg_capital_wan,
        {{ zq_clean('status') }}               as status,
        {{ zq_to_date('established_date') }}   as established_date,
        {{ zq_to_timestamp('updated_at') }}    as updated_at,
        {{ zq_lineage_columns() }}
    from source

)

select * from final
