python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits|head -1); if [ "$MEM" -gt 100000 ]; then L=14; else L=7; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
C="--size 7b --workdir /tmp/w --num-layers $L --bf16-moments --bf16-grads --recompute-elementwise --steps 3 --warmup 2"
timeout 400 python3 benchmarks/sft_step.py $C --mode sft,lora --systems megatron,hf --out $OUT/issue_$L.json > $OUT/issue_$L.log 2>&1
timeout 150 env VLM_BRIDGE_DEFER_TOKEN_SCALE=0 VLM_BRIDGE_ENCODE_AHEAD=0 python3 benchmarks/sft_step.py $C --mode sft,lora --systems megatron --out $OUT/base_$L.json >/dev/null 2>&1
python3 - <<'PY'
import json,glob,os
for f in sorted(glob.glob(os.environ['OUT']+'/*.json')):
    d=json.load(open(f))
    for m,v in d['modes'].items():
        for s in ('megatron','hf'):
            r=v.get(s)
            if r: print(os.path.basename(f),m,s,round(r.get('step_s') or 0,3),[round(x,3) for x in r.get('step_times',[])],round((r.get('mfu') or 0)*100,1),round(r.get('peak_gb') or 0,1),r.get('errors'))
PY
grep -v Warn $OUT/issue_*.log | grep -iE "error|Traceback" | head -5
