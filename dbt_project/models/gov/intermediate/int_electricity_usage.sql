-- generated from the registry by zqdata/reference.py (python -m zqdata.reference); do not edit
-- depends_on: {{ ref('stg_power__electricity_usage') }}
-- depends_on: {{ source('ref', 'code_tables') }}
-- depends_on: {{ source('ref', 'fields') }}
-- depends_on: {{ ref('int_enterprise_registry') }}
with staged as (

    select * from {{ ref('stg_power__electricity_usage') }}
    where {{ zq_in_partition('_partition_date') }}

),

rejected as (

    -- the lineage ids failing an error-severity rule of stg_power__electricity_usage (its tests are the list)
    {{ zq_error_failures('stg_power__electricity_usage') }}

),

final as (

    select staged.*
    from staged
    anti join rejected on rejected._lineage_id = staged._lineage_id

)

select * from final
