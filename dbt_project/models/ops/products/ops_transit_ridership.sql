-- 公共交通客流分析: swipes, distinct riders and fares by route and hour of the day, k-anonymous.
-- Lineage: (_partition_date, route_id, hour_of_day) selects exactly the input rows of
-- scenario_transit_ridership.bus_card_swipes (and through their _lineage_id the source rows).
with swipes as (

    select * from {{ scenario_source('transit_ridership', 'bus_card_swipes',
        ['card_id', 'route_id', 'swipe_time', 'fare_yuan']) }}
    where {{ zq_in_partition('_partition_date') }}

),

by_route_hour as (

    select
        route_id,
        cast(hour(cast(swipe_time as timestamp)) as integer) as hour_of_day,
        count(*) as swipes,
        count(distinct card_id) as distinct_riders,
        sum(cast(fare_yuan as decimal(18, 2))) as fare_total_yuan,
        cast(_partition_date as date) as _partition_date
    from swipes
    group by all

),

final as (

    -- groups describing fewer than k riders are suppressed (GB/T 37964 k-anonymity; k from the registry scenario)
    select * from by_route_hour
    where distinct_riders >= {{ var('k_anonymity') }}

)

select * from final
