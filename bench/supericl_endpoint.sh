#!/bin/bash
# SuperICL through slm serve against in process: the same model (SmolLM2), prompts and plug-in, greedy; compares
# the answers. Needs the plug-in of `slm supericl configs/supericl.yaml` in runs/supericl/sst2/plugin.
set -e
cd "$(dirname "$0")/.."
DATA=${SLMKIT_DATA:-../shared/data}
for d in supericl-endpoint supericl-inproc; do rm -rf runs/$d; mkdir -p runs/$d/sst2; cp -r runs/supericl/sst2/plugin runs/$d/sst2/; done
ARGS="--data-dir $DATA --set tasks=[sst2] --set test_examples=40 --set demonstrations=8 --set seeds=[1] --set large.model=smollm2-135m-instruct --set large.batch_size=4"
.venv/bin/slm serve smollm2-135m-instruct --port 8011 > /tmp/serve.log 2>&1 &
SERVER=$!
for i in $(seq 60); do curl -s http://127.0.0.1:8011/v1/models >/dev/null && break; sleep 1; done
start=$(date +%s)
.venv/bin/slm supericl configs/supericl.yaml $ARGS --set out_dir=runs/supericl-endpoint --set large.endpoint=http://127.0.0.1:8011/v1 2>/dev/null
echo "endpoint: $(( $(date +%s) - start )) s"
kill $SERVER; wait $SERVER || true
start=$(date +%s)
.venv/bin/slm supericl configs/supericl.yaml $ARGS --set out_dir=runs/supericl-inproc 2>/dev/null
echo "in process: $(( $(date +%s) - start )) s"
python3 - <<'PY'
import json
a=[json.loads(l) for l in open('runs/supericl-endpoint/sst2/predictions.jsonl')]
b=[json.loads(l) for l in open('runs/supericl-inproc/sst2/predictions.jsonl')]
for arm in ('icl_answer','supericl_answer'):
    same=sum(x[arm]==y[arm] for x,y in zip(a,b)); print(arm, 'identical answers', same, '/', len(a))
    for x,y in zip(a,b):
        if x[arm]!=y[arm]: print('  differ:', repr(x[arm]), repr(y[arm]))
PY
