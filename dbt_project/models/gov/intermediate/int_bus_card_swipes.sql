-- generated from the registry by zqdata/reference.py (python -m zqdata.reference); do not edit
-- depends_on: {{ ref('stg_transport__bus_card_swipes') }}
-- depends_on: {{ source('ref', 'code_tables') }}
-- depends_on: {{ source('ref', 'fields') }}
with staged as (

    select * from {{ ref('stg_transport__bus_card_swipes') }}
    where {{ zq_in_partition('_partition_date') }}

),

rejected as (

    -- the lineage ids failing an error-severity rule of stg_transport__bus_card_swipes (its tests are the list)
    {{ zq_error_failures('stg_transport__bus_card_swipes') }}

),

final as (

    select staged.*
    from staged
    anti join rejected on rejected._lineage_id = staged._lineage_id

)

select * from final
