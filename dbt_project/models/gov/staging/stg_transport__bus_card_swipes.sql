-- generated from the registry by zqdata/reference.py (python -m zqdata.reference); do not edit
with source as (

    select * from {{ source('ods', 'bus_card_swipes') }}
    where {{ zq_in_partition('_partition_date') }}

),

final as (

    select
        {{ zq_clean('swipe_id') }}          as swipe_id,
        {{ zq_clean('card_id') }}           as card_id,
        {{ zq_clean('card_type') }}         as card_type,
        {{ zq_clean('route_id') }}          as route_id,
        {{ zq_clean('stop_id') }}           as stop_id,
        {{ zq_to_timestamp('swipe_time') }} as swipe_time,
        {{ zq_to_decimal('fare_yuan') }}    as fare_yuan,
        {{ zq_lineage_columns() }}
    from source

)

select * from final
