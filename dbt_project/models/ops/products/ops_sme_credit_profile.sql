-- 普惠金融中小企业信用画像: one row per consenting enterprise per partition.
-- Lineage: _source_lineage_ids lists the input rows (enterprise, latest social insurance, the day's meter readings).
-- Every row is computed from its own day (`_partition_date`), so one build over several days (a range run) gives
-- each day what a build of that day alone gives.
with enterprises as (

    select * from {{ scenario_source('sme_credit_profile', 'enterprise_registry',
        ['credit_code', 'ent_name', 'district_code', 'reg_capital_wan', 'status', 'established_date']) }}
    where {{ zq_in_partition('_partition_date') }}

),

social_insurance as (

    select * from {{ scenario_source('sme_credit_profile', 'social_insurance',
        ['credit_code', 'period', 'insured_headcount', 'contribution_yuan']) }}
    where cast(_partition_date as date) <= date '{{ zq_partition_range()[1] }}'

),

electricity as (

    select * from {{ scenario_source('sme_credit_profile', 'electricity_usage', ['credit_code', 'reading_date', 'kwh']) }}
    where {{ zq_in_partition('_partition_date') }}

),

water as (

    select * from {{ scenario_source('sme_credit_profile', 'water_usage', ['credit_code', 'reading_date', 'cubic_meters']) }}
    where {{ zq_in_partition('_partition_date') }}

),

latest_social_insurance as (

    -- for each enterprise row's day: the most recent contribution period delivered up to that day
    select e._day, si.credit_code, si.period, si.insured_headcount, si.contribution_yuan, si._lineage_id
    from (select distinct credit_code, cast(_partition_date as date) as _day from enterprises) e
    join social_insurance si on si.credit_code = e.credit_code and cast(si._partition_date as date) <= e._day
    qualify row_number() over (
        partition by e._day, si.credit_code
        order by si.period desc, cast(si._partition_date as date) desc, si._lineage_id desc) = 1

),

daily_electricity as (

    select credit_code, cast(_partition_date as date) as _day, sum(cast(kwh as decimal(18, 4))) as kwh,
           list(_lineage_id order by _lineage_id) as lineage_ids
    from electricity
    group by credit_code, cast(_partition_date as date)

),

daily_water as (

    select credit_code, cast(_partition_date as date) as _day, sum(cast(cubic_meters as decimal(18, 4))) as cubic_meters,
           list(_lineage_id order by _lineage_id) as lineage_ids
    from water
    group by credit_code, cast(_partition_date as date)

),

final as (

    select
        e.credit_code,
        e.ent_name,
        e.district_code,
        cast(e.reg_capital_wan as decimal(18, 4)) as reg_capital_wan,
        e.status,
        cast(e.established_date as date) as established_date,
        si.period as social_insurance_period,
        cast(si.insured_headcount as bigint) as insured_headcount,
        cast(si.contribution_yuan as decimal(18, 4)) as contribution_yuan,
        el.kwh as daily_kwh,
        wa.cubic_meters as daily_cubic_meters,
        list_concat(
            [e._lineage_id],
            case when si._lineage_id is null then [] else [si._lineage_id] end,
            coalesce(el.lineage_ids, []),
            coalesce(wa.lineage_ids, [])
        ) as _source_lineage_ids,
        cast(e._partition_date as date) as _partition_date
    from enterprises e
    left join latest_social_insurance si on si.credit_code = e.credit_code and si._day = cast(e._partition_date as date)
    left join daily_electricity el on el.credit_code = e.credit_code and el._day = cast(e._partition_date as date)
    left join daily_water wa on wa.credit_code = e.credit_code and wa._day = cast(e._partition_date as date)

)

select * from final
