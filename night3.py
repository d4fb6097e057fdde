import os, sys, time, datetime as dt
D=sys.argv[1]; os.environ["ZQ_DATA_DIR"]=D; os.environ["DAGSTER_HOME"]=D+"/dagster_home"; os.environ["ZQ_SIMULATE"]="0"
from orchestration.nightly import run_nightly
for i in range(int(sys.argv[3])):
    t=time.time(); r, s = run_nightly(dt.date.fromisoformat(sys.argv[2])); print("night", round(time.time()-t,2), r.success, flush=True)
    for e in r.all_events:
        if e.event_type_value in ("STEP_SUCCESS",) and e.event_specific_data.duration_ms>300: print("  ", e.step_key, round(e.event_specific_data.duration_ms/1000,2))
